//! convert's options that image scripts pass to qemu-img (`-B/-F`, `-S`, several sources,
//! `-q`, `-t/-T`, `-m`, `-W`, `-r`): each run beside qemu-img on the same input, the results
//! compared by what qemu reads, by their allocation (`qemu-img map`) and where cowimg lays the
//! file out as qemu does, byte for byte.

mod common;
use common::Scratch;

/// `qemu-img map --output=json` without host offsets (allocation, not layout).
fn allocation(s: &Scratch, image: &str) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&s.qemu_img(&["map", "--output=json", image])).expect("map JSON");
    for e in v.as_array_mut().expect("map is a list") {
        e.as_object_mut().expect("entry").remove("offset");
    }
    v
}

/// A qcow2 base with data and a qcow2 top holding data, a zero cluster, a cluster of zeros
/// written as data, and data that half covers a base cluster.
fn chain(s: &Scratch) {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    s.qemu_io("base.qcow2", &["write -P 1 0 3M", "write -P 5 6M 1M"]);
    s.qcow2_overlay("base.qcow2", "top.qcow2");
    s.qemu_io(
        "top.qcow2",
        &[
            "write -P 2 1M 64k",
            "write -z 2M 64k",
            "write -P 0 3M 64k",
            "write -P 3 4M 100k",
            "write -z 6M 512k",
        ],
    );
}

#[test]
fn backing_output_holds_only_the_top_as_qemu_img_makes_it() {
    let s = Scratch::new();
    chain(&s);
    let cases: &[(&str, &[&str])] = &[
        ("qcow2", &[]),
        ("qcow2", &["-o", "cluster_size=2M"]),
        ("qcow2", &["-o", "cluster_size=4k"]),
        ("qcow2", &["-o", "extended_l2=on"]),
        ("qcow2", &["-S", "0"]),
        ("qed", &[]),
    ];
    for (i, (fmt, opts)) in cases.iter().enumerate() {
        let (mine, theirs) = (format!("m{i}.{fmt}"), format!("q{i}.{fmt}"));
        let mut args = vec!["convert", "-O", fmt, "-B", "base.qcow2", "-F", "qcow2"];
        args.extend_from_slice(opts);
        s.cowimg_ok(&[&args[..], &["top.qcow2", &mine]].concat());
        s.qemu_img(&[&args[..], &["top.qcow2", &theirs]].concat());
        let what = format!("-O {fmt} {opts:?}");
        s.assert_clean(&mine);
        assert!(s.same("top.qcow2", &mine), "{what}: reads differently");
        let info = s.qemu_info(&mine);
        let theirs_info = s.qemu_info(&theirs);
        assert_eq!(info["backing-filename"], "base.qcow2", "{what}");
        // (QED stores no backing format, only whether it is raw.)
        assert_eq!(
            info["backing-filename-format"], theirs_info["backing-filename-format"],
            "{what}"
        );
        assert_eq!(allocation(&s, &mine), allocation(&s, &theirs), "{what}");
        // The base shows through where the top held nothing: moving the data under it
        // changes what the new image reads, exactly there.
        if *fmt == "qcow2" && opts.is_empty() {
            assert_eq!(s.read_file(&mine), s.read_file(&theirs), "{what}: layout");
        }
    }
    // Into an existing overlay (-n -B): only the top is written, as qemu-img writes it.
    for tool in ["cowimg", "qemu-img"] {
        let out = format!("n-{tool}.qcow2");
        s.qcow2_overlay("base.qcow2", &out);
        let args = [
            "convert",
            "-n",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            &out,
        ];
        if tool == "cowimg" {
            s.cowimg_ok(&args);
        } else {
            s.qemu_img(&args);
        }
        assert!(s.same("top.qcow2", &out), "{tool} -n -B");
    }
    s.assert_clean("n-cowimg.qcow2");
    assert_eq!(
        allocation(&s, "n-cowimg.qcow2"),
        allocation(&s, "n-qemu-img.qcow2")
    );
}

#[test]
fn sparse_size_decides_holes_as_qemu_img_does() {
    let s = Scratch::new();
    chain(&s);
    // Zero runs of several lengths inside data: 4k, 32k and 128k, in a raw source.
    let mut data = vec![7u8; 1 << 20];
    for (at, len) in [
        (64 << 10, 4 << 10),
        (256 << 10, 32 << 10),
        (512 << 10, 128 << 10),
    ] {
        data[at..at + len].fill(0);
    }
    s.write_file("runs.raw", &data);
    for src in ["top.qcow2", "runs.raw"] {
        for (fmt, sparse) in [
            ("raw", "0"),
            ("qcow2", "0"),
            ("qcow2", "4k"),
            ("qcow2", "16M"),
        ] {
            let (mine, theirs) = (format!("m-{sparse}.{fmt}"), format!("q-{sparse}.{fmt}"));
            let args = ["convert", "-O", fmt, "-S", sparse, src];
            s.cowimg_ok(&[&args[..], &[mine.as_str()]].concat());
            s.qemu_img(&[&args[..], &[theirs.as_str()]].concat());
            let what = format!("{src} -O {fmt} -S {sparse}");
            assert!(s.same(src, &mine), "{what}: reads differently");
            if fmt == "qcow2" {
                s.assert_clean(&mine);
                assert_eq!(allocation(&s, &mine), allocation(&s, &theirs), "{what}");
            } else {
                // Fully allocated, as qemu-img makes it.
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(s.path(&mine)).expect("stat");
                assert!(m.blocks() * 512 >= m.len(), "{what}: holes left");
            }
        }
    }
    // Into a raw file: zero runs inside data shorter than -S are written, longer ones are
    // holes (qemu-img's rule; its further 4 KiB alignment heuristics are not copied).
    s.cowimg_ok(&["convert", "-O", "raw", "-S", "64k", "runs.raw", "s64k.raw"]);
    assert_eq!(s.read_file("s64k.raw"), data);
    let holes: Vec<(u64, u64)> = allocation(&s, "s64k.raw")
        .as_array()
        .expect("map")
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(holes, vec![(512 << 10, 128 << 10)]);
}

#[test]
fn several_sources_are_written_one_after_the_other() {
    let s = Scratch::new();
    chain(&s);
    s.write_file("odd.raw", &vec![9u8; 5 * 512]);
    s.qemu_img(&["create", "-q", "-f", "qed", "empty.qed", "1M"]);
    for (fmt, opts) in [
        ("raw", vec![]),
        ("qcow2", vec![]),
        ("qcow2", vec!["-o", "cluster_size=512"]),
    ] {
        let mut args = vec!["convert", "-O", fmt];
        args.extend_from_slice(&opts);
        args.extend_from_slice(&["top.qcow2", "odd.raw", "empty.qed", "base.qcow2"]);
        let (mine, theirs) = (format!("cat-m.{fmt}"), format!("cat-q.{fmt}"));
        s.cowimg_ok(&[&args[..], &[mine.as_str()]].concat());
        s.qemu_img(&[&args[..], &[theirs.as_str()]].concat());
        let what = format!("-O {fmt} {opts:?}");
        assert!(s.same(&theirs, &mine), "{what}: reads differently");
        assert_eq!(
            s.qemu_info(&mine)["virtual-size"],
            s.qemu_info(&theirs)["virtual-size"],
            "{what}"
        );
        if fmt == "qcow2" {
            s.assert_clean(&mine);
            assert_eq!(allocation(&s, &mine), allocation(&s, &theirs), "{what}");
        }
    }
    // -n into an image large enough for all of them.
    s.qemu_img(&["create", "-q", "-f", "raw", "big.raw", "20M"]);
    s.qemu_io("big.raw", &["write -P 0xee 0 20M"]);
    s.cowimg_ok(&["convert", "-n", "top.qcow2", "odd.raw", "big.raw"]);
    let got = s.read_file("big.raw");
    let want = s.read_file("cat-m.raw");
    assert_eq!(&got[..8 << 20], &want[..8 << 20]);
    assert_eq!(
        &got[8 << 20..(8 << 20) + 2560],
        &want[8 << 20..(8 << 20) + 2560]
    );
    assert!(
        got[(8 << 20) + 2560..].iter().all(|&b| b == 0xee),
        "bytes past the sources are kept"
    );
}

#[test]
fn options_scripts_pass_are_accepted_or_refused_as_qemu_img_does() {
    let s = Scratch::new();
    chain(&s);
    s.qemu_img(&["convert", "-O", "raw", "top.qcow2", "want.raw"]);
    // Accepted: what they ask of qemu's I/O has no counterpart to change in cowimg.
    let r = s.cowimg(&[
        "convert",
        "-q",
        "-p",
        "-W",
        "-t",
        "none",
        "-T",
        "writeback",
        "-m",
        "4",
        "-r",
        "1G",
        "top.qcow2",
        "out.raw",
    ]);
    assert_eq!(r.status, 0, "{}", r.show());
    assert_eq!(r.stderr, "", "-q wins over -p");
    assert_eq!(s.read_file("out.raw"), s.read_file("want.raw"));
    // Refused with qemu-img's words and status, and nothing written.
    let refused: &[&[&str]] = &[
        &["-m", "17"],
        &["-m", "0"],
        &["-m", "x"],
        &["-T", "bogus"],
        &["-t", "bogus"],
        &["-S", "3"],
        &["-S", "32M"],
        &["-O", "raw", "-B", "base.qcow2"],
        &["-O", "qcow2", "-B", "base.qcow2"],
        &["-O", "qcow2", "-B", "nope.qcow2", "-F", "qcow2"],
    ];
    for opts in refused {
        let args = [&["convert"][..], opts, &["top.qcow2", "x.qcow2"]].concat();
        let mine = s.cowimg(&args);
        // Nothing is written (qemu-img leaves an image behind when the backing file is
        // missing; cowimg does not).
        assert!(!s.path("x.qcow2").exists(), "{opts:?}");
        let theirs = s.run("qemu-img", &args);
        let first = |t: &str| t.lines().next().unwrap_or("").to_string();
        assert_eq!(mine.status, 1, "{opts:?}: {}", mine.show());
        assert_eq!(theirs.status, 1, "{opts:?}: {}", theirs.stderr);
        assert_eq!(
            first(&mine.stderr).replacen("cowimg: ", "", 1),
            first(&theirs.stderr).replacen("qemu-img: ", "", 1),
            "{opts:?}"
        );
        let _ = std::fs::remove_file(s.path("x.qcow2"));
    }
    let args = [
        "convert",
        "-O",
        "qcow2",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "base.qcow2",
        "x.qcow2",
    ];
    let mine = s.cowimg(&args);
    assert_eq!(mine.status, 1);
    assert_eq!(
        mine.stderr.lines().next(),
        Some("cowimg: Having a backing file for the target makes no sense when concatenating multiple input images")
    );
}

#[test]
fn source_snapshot_reads_as_qemu_img_convert_l() {
    let s = Scratch::new();
    chain(&s);
    // Two snapshots of the overlay, then writes, a zero cluster and growth after them.
    s.qemu_img(&["snapshot", "-c", "one", "top.qcow2"]);
    s.qemu_io("top.qcow2", &["write -P 7 0 128k", "write -z 1M 64k"]);
    s.qemu_img(&["snapshot", "-c", "two", "top.qcow2"]);
    s.qemu_io("top.qcow2", &["write -P 8 64k 64k"]);
    s.qemu_img(&["resize", "-q", "top.qcow2", "12M"]);
    s.qemu_io("top.qcow2", &["write -P 9 10M 64k"]);
    let params = [
        "one",
        "2",
        "two",
        "snapshot.id=1",
        "snapshot.name=two",
        "snapshot.id=2,snapshot.name=two",
    ];
    for p in params {
        for fmt in ["raw", "qcow2"] {
            let (mine, theirs) = (format!("m.{fmt}"), format!("q.{fmt}"));
            s.cowimg_ok(&["convert", "-O", fmt, "-l", p, "top.qcow2", &mine]);
            s.qemu_img(&["convert", "-O", fmt, "-l", p, "top.qcow2", &theirs]);
            assert!(s.same(&theirs, &mine), "-l {p} -O {fmt}");
            if fmt == "raw" {
                assert_eq!(s.read_file(&mine), s.read_file(&theirs), "-l {p}");
            } else {
                s.assert_clean(&mine);
            }
        }
    }
    s.qemu_img(&["create", "-q", "-f", "qed", "e.qed", "1M"]);
    let refused: &[&[&str]] = &[
        &["-l", "three", "top.qcow2"],
        &["-l", "snapshot.id=1,snapshot.name=two", "top.qcow2"],
        &["-l", "", "top.qcow2"],
        &["-l", "one", "e.qed"],
        &["-l", "one", "top.qcow2", "top.qcow2"],
    ];
    for opts in refused {
        let args = [&["convert"][..], opts, &["x.raw"]].concat();
        let mine = s.cowimg(&args);
        assert!(!s.path("x.raw").exists(), "{opts:?}");
        let theirs = s.run("qemu-img", &args);
        assert_eq!(
            (mine.status, theirs.status),
            (1, 1),
            "{opts:?}: {}",
            mine.show()
        );
        assert_eq!(
            mine.stderr
                .lines()
                .next()
                .map(|l| l.replacen("cowimg: ", "", 1)),
            theirs
                .stderr
                .lines()
                .next()
                .map(|l| l.replacen("qemu-img: ", "", 1)),
            "{opts:?}"
        );
        let _ = std::fs::remove_file(s.path("x.raw"));
    }
}
