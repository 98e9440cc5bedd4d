//! `create` makes the images `qemu-img create` makes, and `convert` writes images qemu reads
//! identically and checks clean.

mod common;
use common::Scratch;

#[test]
fn create_is_byte_identical_to_qemu_img_create() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("qcow2", &[], "64M"),
        ("qcow2", &["-o", "compat=0.10"], "64M"),
        ("qcow2", &["-o", "cluster_size=512"], "300M"),
        ("qcow2", &["-o", "cluster_size=2M"], "3G"),
        ("qcow2", &["-o", "extended_l2=on"], "64M"),
        ("qcow2", &["-o", "refcount_bits=1"], "64M"),
        (
            "qcow2",
            &["-o", "refcount_bits=64,lazy_refcounts=on"],
            "64M",
        ),
        ("qcow2", &["-o", "compression_type=zstd"], "64M"),
        ("qcow2", &[], "100"),
        ("qcow2", &[], "0"),
        ("qcow2", &["-o", "cluster_size=512"], "20G"),
        ("qed", &[], "64M"),
        ("qed", &["-o", "cluster_size=4k,table_size=16"], "64M"),
        ("qed", &["-o", "table_size=2"], "1000"),
        ("raw", &[], "5M"),
    ];
    let s = Scratch::new();
    for (i, (fmt, opts, size)) in cases.iter().enumerate() {
        let (mine, theirs) = (format!("m{i}.{fmt}"), format!("q{i}.{fmt}"));
        let mut args = vec!["create", "-q", "-f", fmt];
        args.extend_from_slice(opts);
        s.cowimg_ok(&[&args[..], &[mine.as_str(), size]].concat());
        s.qemu_img(&[&args[..], &[theirs.as_str(), size]].concat());
        if *size == "20G" {
            // Several refcount blocks: qemu places the extra ones by its allocator's history;
            // cowimg's layout differs there, the image is otherwise the same.
            let strip = |mut v: serde_json::Value| {
                let o = v.as_object_mut().unwrap();
                for k in ["filename", "actual-size", "children"] {
                    o.remove(k);
                }
                v
            };
            assert_eq!(strip(s.qemu_info(&mine)), strip(s.qemu_info(&theirs)));
            assert_eq!(s.read_file(&mine).len(), s.read_file(&theirs).len());
        } else {
            assert!(
                s.read_file(&mine) == s.read_file(&theirs),
                "create {fmt} {opts:?} {size} differs from qemu-img's"
            );
        }
        if *fmt != "raw" {
            s.assert_clean(&mine);
        }
    }
    // With backing files: relative names are stored as given, resolved against the image.
    std::fs::create_dir(s.path("sub")).unwrap();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]);
    for fmt in ["qcow2", "qed"] {
        let (mine, theirs) = (format!("sub/m.{fmt}"), format!("sub/q.{fmt}"));
        s.cowimg_ok(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            &mine,
        ]);
        s.qemu_img(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            &theirs,
        ]);
        assert!(
            s.read_file(&mine) == s.read_file(&theirs),
            "create {fmt} with a backing file"
        );
        // qemu-io can write and read it.
        s.qemu_io(&mine, &["write -q -P 7 1M 64k", "read -q -P 7 1M 64k"]);
        s.assert_clean(&mine);
    }
}

#[test]
fn the_library_s_create_overlay_makes_what_qemu_img_create_makes() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "golden.raw", "3M"]);
    s.qemu_io("golden.raw", &["write -P 0x47 0 1M"]);
    let ours = s.path("ours.qcow2").to_string_lossy().into_owned();
    cowimg::output::create_overlay(&ours, "golden.raw", cowimg_formats::Format::Raw).unwrap();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "golden.raw",
        "-F",
        "raw",
        "qemu.qcow2",
    ]);
    assert_eq!(s.read_file("ours.qcow2"), s.read_file("qemu.qcow2"));
    s.assert_clean("ours.qcow2");
    // Replacing an existing file, as a test's fresh overlay must.
    s.qemu_io("ours.qcow2", &["write -P 0x11 0 64k"]);
    cowimg::output::create_overlay(&ours, "golden.raw", cowimg_formats::Format::Raw).unwrap();
    assert_eq!(s.read_file("ours.qcow2"), s.read_file("qemu.qcow2"));
    // A missing backing file is an error naming it.
    let e = cowimg::output::create_overlay(&ours, "nosuch.raw", cowimg_formats::Format::Raw)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nosuch.raw"), "{e}");
}

#[test]
fn create_errors() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "1M"]);
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "missing.qcow2",
                "-F",
                "qcow2",
                "e1.qcow2",
            ],
            "Could not open 'missing.qcow2'",
        ),
        (
            &["create", "-f", "qcow2", "-b", "base.raw", "e2.qcow2"],
            "Backing file specified without backing format\nDetected format of raw",
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=1000",
                "e3.qcow2",
                "1M",
            ],
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            &["create", "-f", "qcow2", "e4.qcow2"],
            "Image creation needs a size parameter",
        ),
        (
            &["create", "-f", "qcow2", "e5.qcow2", "64Q"],
            "Invalid image size specified: '64Q'.",
        ),
        (
            &["create", "-f", "qed", "-o", "table_size=3", "e6.qed", "1M"],
            "QED table size must be within range [1, 16] and power of 2",
        ),
        (
            &[
                "create",
                "-f",
                "qed",
                "-o",
                "lazy_refcounts=on",
                "e7.qed",
                "1M",
            ],
            "Invalid parameter 'lazy_refcounts'",
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,lazy_refcounts=on",
                "e8.qcow2",
                "1M",
            ],
            "Lazy refcounts only supported",
        ),
        (
            &[
                "create", "-f", "qcow2", "-b", "e9.qcow2", "-F", "qcow2", "e9.qcow2", "1M",
            ],
            "same filename as the backing file",
        ),
        (
            &["create", "-f", "qcow2", "base.raw", "1M"],
            "already exists; cowimg never replaces a file unless told to",
        ),
        (
            &["create", "-f", "vmdk", "x.vmdk", "1M"],
            "Unknown file format 'vmdk'",
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                "e10.qcow2",
                "1T",
            ],
            "The image size is too large",
        ),
    ];
    for (args, msg) in cases {
        let r = s.cowimg(args);
        assert_eq!(r.status, 1, "{args:?}");
        assert!(r.stderr.contains(msg), "{args:?}: {}", r.stderr);
        // No "Formatting ..." line for an image that is not made.
        assert_eq!(r.stdout, "", "{args:?}");
    }
    // Nothing was left behind by the failures, and the existing file is untouched.
    assert_eq!(s.read_file("base.raw").len(), 1 << 20);
    let left: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    // --force replaces it.
    s.cowimg_ok(&["create", "-q", "-f", "qcow2", "--force", "base.raw", "1M"]);
    s.assert_clean("base.raw");
}

/// A directory where the image should go: qemu's message, then a hint to name a file inside
/// it (not "pass --force", which could not help); `--force` does not replace a directory,
/// nor does `convert`, and nothing is printed or left behind.
#[test]
fn create_on_a_directory_names_a_file_inside_it() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("d")).unwrap();
    s.qemu_img(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let mut out = String::new();
    for args in [
        &["create", "-f", "qcow2", "d", "1G"][..],
        &["create", "-f", "qcow2", "--force", "d/", "1G"],
        &["convert", "-O", "raw", "r.raw", "d"],
    ] {
        out += &format!("$ cowimg {}\n{}\n", args.join(" "), s.cowimg(args).show());
    }
    insta::assert_snapshot!("create_on_a_directory", out);
    assert!(std::fs::read_dir(s.path("d")).unwrap().next().is_none());
    // The hinted name works.
    s.cowimg_ok(&["create", "-q", "-f", "qcow2", "d/new.img", "1G"]);
    s.assert_clean("d/new.img");
}

#[test]
fn convert_to_every_format_reads_identically_and_checks_clean() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "A.qcow2", "20M"]);
    s.qemu_io(
        "A.qcow2",
        &[
            "write -q -P 0x11 0 5M",
            "write -q -z 6M 1M",
            "write -q -P 0x12 19M 100k",
        ],
    );
    s.qemu_img(&[
        "create", "-q", "-f", "qed", "-b", "A.qcow2", "-F", "qcow2", "B.qed",
    ]);
    s.qemu_io("B.qed", &["write -q -P 0x22 1M 1M"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "B.qed",
        "-F",
        "qed",
        "C.qcow2",
        "24M",
    ]);
    s.qemu_io("C.qcow2", &["write -q -P 0x33 3M 5k"]);
    for (fmt, opts) in [
        ("qcow2", ""),
        ("qcow2", "compat=0.10"),
        ("qcow2", "cluster_size=512,refcount_bits=1"),
        ("qcow2", "cluster_size=2M,extended_l2=on"),
        ("qed", ""),
        ("qed", "cluster_size=4k,table_size=16"),
        ("raw", ""),
    ] {
        let out = format!("out.{fmt}");
        let mut args = vec!["convert", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend(["C.qcow2", out.as_str()]);
        s.cowimg_ok(&args);
        assert!(s.same("C.qcow2", &out), "convert -O {fmt} {opts}");
        if fmt != "raw" {
            s.assert_clean(&out);
        }
        assert!(s.qemu_info(&out).get("backing-filename").is_none());
        std::fs::remove_file(s.path(&out)).unwrap();
    }
    // Zeros stay sparse in a raw output.
    s.cowimg_ok(&["convert", "-O", "raw", "C.qcow2", "sparse.raw"]);
    let allocated = s.qemu_info("sparse.raw")["actual-size"].as_u64().unwrap();
    assert!(
        allocated < 12 << 20,
        "{allocated} bytes allocated for 6 MiB of data in 24 MiB"
    );
}

#[test]
fn external_data_files_are_read_but_not_written() {
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=d.raw",
        "e.qcow2",
        "4M",
    ]);
    s.qemu_io("e.qcow2", &["write -q -P 9 0 1M"]);
    s.cowimg_ok(&["convert", "-O", "raw", "e.qcow2", "e.raw"]);
    assert!(s.same("e.qcow2", "e.raw"));
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "e.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    let r = s.cowimg(&["stream", "--base", "e.qcow2", "top.qcow2"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let r = s.cowimg(&["rebase", "-u", "-b", "", "e.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(r.stderr.contains("external data file"), "{}", r.stderr);
}

/// Ctrl-C during `convert` removes the temporary output and leaves DST as it was; the
/// message says so (a rerun starts over) instead of promising to resume.
#[test]
fn interrupted_convert_says_it_starts_over_and_leaves_dst_untouched() {
    let s = Scratch::new();
    // Compressing 256 MiB of half-text, half-random clusters on one worker takes seconds:
    // time to interrupt it.
    let mut data = Vec::with_capacity(256 << 20);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while data.len() < 256 << 20 {
        data.extend(
            b"cowimg convert, interrupted. "
                .iter()
                .cycle()
                .take(32 << 10),
        );
        for _ in 0..(32 << 10) / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
    }
    s.write_file("src.raw", &data);
    s.write_file("dst.qcow2", b"the previous destination");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args([
            "convert",
            "-c",
            "-O",
            "qcow2",
            "--jobs",
            "1",
            "src.raw",
            "dst.qcow2",
        ])
        .current_dir(s.dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the copy is under way: the partial file exists and holds data.
    let partial = s.path(".dst.qcow2.cowimg-partial");
    let started = std::time::Instant::now();
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < (4 << 20) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "convert finished before it could be interrupted"
        );
        assert!(started.elapsed().as_secs() < 60, "convert made no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: sending a signal to our own child.
    unsafe { libc_kill(child.id() as i32, 2) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("cowimg: interrupted; the partial output was removed and nothing changed at 'dst.qcow2': run the same command again to start over"),
        "{stderr}"
    );
    assert!(!stderr.contains("kept"), "{stderr}");
    assert_eq!(s.read_file("dst.qcow2"), b"the previous destination");
    assert!(!partial.exists(), "the partial output was left behind");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A truncated image: data clusters past the end of the file read as zeros, as qemu reads
/// them; an L2 table past the end is refused (qemu reads it as zeros, which silently drops
/// every mapping it held; see docs/formats.md).
#[test]
fn truncated_image_converts_like_qemu_img() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "t.qcow2", "4M"]);
    s.qemu_io("t.qcow2", &["write -q -P 0x55 0 4M"]);
    // Header, refcount table and block, L1, L2 at 0x40000, data from 0x50000: cut the last
    // data clusters off (and one mid-cluster).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(s.path("t.qcow2"))
        .unwrap();
    f.set_len(0x50000 + 3 * (1 << 20) + 100).unwrap();
    s.qemu_img(&["convert", "-O", "raw", "t.qcow2", "q.raw"]);
    s.cowimg_ok(&["convert", "-O", "raw", "t.qcow2", "c.raw"]);
    assert_eq!(s.read_file("q.raw"), s.read_file("c.raw"));
    f.set_len(0x45000).unwrap();
    let r = s.cowimg(&["convert", "-O", "raw", "t.qcow2", "c2.raw"]);
    assert_eq!(r.status, 1);
    assert!(
        r.stderr
            .contains("L2 table at 0x40000 lies past the end of the file"),
        "{}",
        r.stderr
    );
}
