//! `cowimg commit` and `cowimg resize` against `qemu-img commit` and `qemu-img resize` on
//! copies of the same images: the results read identically (`qemu-img compare`), have the
//! same virtual sizes and allocation (`qemu-img map` without host offsets), check clean,
//! and the messages and exit codes are qemu-img's.

mod common;
use common::Scratch;
use serde_json::Value;

/// The image formats and options the matrix covers, with a file suffix.
const KINDS: &[(&str, &str, &str)] = &[
    ("qcow2", "", "v3"),
    ("qcow2", "compat=0.10", "v2"),
    ("qcow2", "cluster_size=512", "c512"),
    ("qcow2", "cluster_size=2M", "c2m"),
    ("qcow2", "extended_l2=on,cluster_size=128k", "ext"),
    ("qed", "", "qed"),
];

fn create(
    s: &Scratch,
    fmt: &str,
    opts: &str,
    name: &str,
    backing: Option<(&str, &str)>,
    size: &str,
) {
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some((b, bf)) = backing {
        args.extend(["-b", b, "-F", bf]);
    }
    args.extend([name, size]);
    s.qemu_img(&args);
}

/// `qemu-img map --output=json` without host offsets: what is allocated where, and how.
fn layout(s: &Scratch, image: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(&s.qemu_img(&["map", "--output=json", image])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.as_object_mut().unwrap().remove("offset");
            e
        })
        .collect()
}

fn size_of(s: &Scratch, image: &str) -> u64 {
    s.qemu_info(image)["virtual-size"].as_u64().unwrap()
}

/// Copies the named files to "q-" names for qemu-img, and points the copies at each other.
fn twin(s: &Scratch, files: &[&str]) {
    for f in files {
        std::fs::copy(s.path(f), s.path(&format!("q-{f}"))).unwrap();
    }
}

/// A chain base <- mid <- top of one kind: base 4M, top 6M (larger: the commit grows the
/// base), with data, zeros and data past the base's end.
fn chain(s: &Scratch, fmt: &str, opts: &str, ext: &str, q: &str) -> [String; 3] {
    let n = |x: &str| format!("{q}{x}.{ext}");
    let (b, m, t) = (n("base"), n("mid"), n("top"));
    create(s, fmt, opts, &b, None, "4M");
    s.qemu_io(&b, &["write -q -P 0x11 0 4M"]);
    create(s, fmt, opts, &m, Some((&b, fmt)), "4M");
    s.qemu_io(&m, &["write -q -P 0x22 1M 512k", "write -q -z 3M 64k"]);
    create(s, fmt, opts, &t, Some((&m, fmt)), "6M");
    s.qemu_io(
        &t,
        &[
            "write -q -P 0x33 0 4k",
            "write -q -z 2M 512k",
            "write -q -P 0x34 3500k 9k",
            "write -q -P 0x35 5M 64k",
        ],
    );
    [b, m, t]
}

/// Runs `commit ARGS` with cowimg on one chain and qemu-img on a copy, and compares.
fn commit_both(fmt: &str, opts: &str, ext: &str, args: &[&str], into: usize) {
    let s = Scratch::new();
    let [b, m, t] = chain(&s, fmt, opts, ext, "");
    let [qb, qm, qt] = chain(&s, fmt, opts, ext, "q-");
    s.qemu_img(&["convert", "-O", "raw", &t, "before.raw"]);
    let mid_before = s.read_file(&m);
    // BASE in the arguments names the chain's bottom image.
    let argv = |base: &str, top: &str| -> Vec<String> {
        ["commit"]
            .iter()
            .chain(args)
            .map(|a| if *a == "BASE" { base } else { a }.to_string())
            .chain([top.to_string()])
            .collect()
    };
    let (mine, theirs) = (argv(&b, &t), argv(&qb, &qt));
    let label = format!("{ext}: commit {args:?}");
    let r = s.cowimg(&mine.iter().map(String::as_str).collect::<Vec<_>>());
    let q = s.run(
        "qemu-img",
        &theirs.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(
        (r.status, q.status),
        (0, 0),
        "{label}: {}{}",
        r.stderr,
        q.stderr
    );
    assert_eq!(r.stdout, q.stdout, "{label}: the message");
    let (target, qtarget) = if into == 0 { (&b, &qb) } else { (&m, &qm) };
    // The chain above the base reads as before (TOP always; the base itself now too).
    assert!(s.same("before.raw", &t), "{label}: TOP reads differently");
    assert!(
        s.same("before.raw", target),
        "{label}: BASE does not read as TOP did"
    );
    assert!(
        s.same(target, qtarget),
        "{label}: BASE differs from qemu-img's"
    );
    assert_eq!(
        size_of(&s, target),
        size_of(&s, qtarget),
        "{label}: BASE size"
    );
    let emptied = fmt == "qcow2" && args.is_empty();
    if emptied {
        // TOP holds nothing of its own. (qemu's discard can leave a few clusters of a
        // 512-byte-cluster image allocated; cowimg drops every one.)
        let own: Vec<Value> = layout(&s, &t)
            .into_iter()
            .filter(|e| e["depth"] == 0)
            .collect();
        assert!(own.is_empty(), "{label}: TOP still holds {own:?}");
    } else {
        // What TOP holds itself is untouched (the layers below may be allocated in other
        // pieces than qemu's: BASE's data is compared above).
        let own = |img: &str| -> Vec<Value> {
            layout(&s, img)
                .into_iter()
                .filter(|e| e["depth"] == 0)
                .collect()
        };
        assert_eq!(own(&t), own(&qt), "{label}: TOP's allocation");
    }
    if into == 0 {
        // qemu leaves the images between untouched; so does cowimg.
        assert_eq!(
            s.read_file(&m),
            mid_before,
            "{label}: the middle image changed"
        );
    }
    for img in [&b, &m, &t] {
        s.assert_clean(img);
    }
}

#[test]
fn commit_into_the_backing_file_matches_qemu_img() {
    for (fmt, opts, ext) in KINDS {
        commit_both(fmt, opts, ext, &[], 1);
    }
}

#[test]
fn commit_keeping_top_matches_qemu_img() {
    for (fmt, opts, ext) in KINDS {
        commit_both(fmt, opts, ext, &["-d"], 1);
    }
}

#[test]
fn commit_into_a_base_further_down_matches_qemu_img() {
    for (fmt, opts, ext) in KINDS {
        commit_both(fmt, opts, ext, &["-b", "BASE"], 0);
    }
}

#[test]
fn commit_into_raw_and_from_a_smaller_top() {
    let s = Scratch::new();
    for q in ["", "q-"] {
        s.write_file(&format!("{q}base.raw"), &vec![0x44u8; 3 << 20]);
        create(
            &s,
            "qcow2",
            "",
            &format!("{q}top.qcow2"),
            Some((&format!("{q}base.raw"), "raw")),
            "2M",
        );
        s.qemu_io(
            &format!("{q}top.qcow2"),
            &["write -q -P 0x55 4k 8k", "write -q -z 1M 64k"],
        );
    }
    s.qemu_img(&["convert", "-O", "raw", "top.qcow2", "before.raw"]);
    assert_eq!(s.cowimg_ok(&["commit", "top.qcow2"]), "Image committed.\n");
    s.qemu_img(&["commit", "-q", "q-top.qcow2"]);
    assert_eq!(s.read_file("base.raw"), s.read_file("q-base.raw"));
    assert!(s.same("before.raw", "top.qcow2"));
    // (qemu punches holes for the zeros it commits into a raw file; cowimg writes zeros: the
    // bytes are the same, the allocation of the raw file is not.)
    s.assert_clean("top.qcow2");
}

#[test]
fn commit_refusals_match_qemu_img() {
    let s = Scratch::new();
    create(&s, "qcow2", "", "b.qcow2", None, "1M");
    create(&s, "qcow2", "", "t.qcow2", Some(("b.qcow2", "qcow2")), "1M");
    for args in [
        &["b.qcow2"][..],
        &["-b", "nothing.qcow2", "t.qcow2"][..],
        &["-b", "t.qcow2", "t.qcow2"][..],
    ] {
        let r = s.cowimg(&[&["commit"][..], args].concat());
        let q = s.run("qemu-img", &[&["commit"][..], args].concat());
        assert_eq!(r.status, q.status, "commit {args:?}");
        assert_eq!(
            r.stderr.replace("cowimg: ", ""),
            q.stderr.replace("qemu-img: ", ""),
            "commit {args:?}"
        );
    }
}

#[test]
fn commit_json_result() {
    let s = Scratch::new();
    create(&s, "qcow2", "", "b.qcow2", None, "1M");
    create(&s, "qcow2", "", "t.qcow2", Some(("b.qcow2", "qcow2")), "2M");
    s.qemu_io("t.qcow2", &["write -q -P 1 0 128k"]);
    let out = s.cowimg_ok(&["commit", "--output", "json", "t.qcow2"]);
    let _t = common::timeless();
    insta::assert_snapshot!(out, @r#"
    {
        "filename": "t.qcow2",
        "base": "b.qcow2",
        "len": 2097152,
        "copied": 131072,
        "elapsed":[T],
        "base-grown": true,
        "emptied": true
    }
    "#);
}

/// Runs `resize ARGS IMAGE SIZE` with cowimg on `image` and qemu-img on its copy; compares
/// status, message, size, data and allocation.
fn resize_both(s: &Scratch, image: &str, args: &[&str], size: &str) {
    twin(s, &[image]);
    let q_image = format!("q-{image}");
    let label = format!("resize {args:?} {image} {size}");
    let r = s.cowimg(&[&["resize"][..], args, &[image, size]].concat());
    let q = s.run(
        "qemu-img",
        &[&["resize"][..], args, &[&q_image, size]].concat(),
    );
    assert_eq!(r.status, q.status, "{label}: {}{}", r.stderr, q.stderr);
    assert_eq!(r.stdout, q.stdout, "{label}");
    if q.status != 0 {
        // qemu-img's words, which cowimg may follow with what the limit is.
        let theirs = q.stderr.replace("qemu-img: ", "");
        let mine = r.stderr.replace("cowimg: ", "");
        assert!(
            mine == theirs || mine.starts_with(theirs.trim_end()),
            "{label}: cowimg said {mine:?}, qemu-img {theirs:?}"
        );
        return;
    }
    assert_eq!(size_of(s, image), size_of(s, &q_image), "{label}: size");
    assert!(s.same(image, &q_image), "{label}: data");
    // Preallocated ranges read the same but are laid out differently (qemu's full mode also
    // fills the holes earlier metadata preallocation left; cowimg writes zeros for falloc).
    // (Raw files: the copy for qemu-img is not sparse, so their layouts cannot agree.)
    let raw = common::detect_format(&s.path(image)) == "raw";
    if !raw && !args.iter().any(|a| a.starts_with("--preallocation")) {
        assert_eq!(layout(s, image), layout(s, &q_image), "{label}: allocation");
    }
    if !raw {
        s.assert_clean(image);
    }
}

#[test]
fn resize_matches_qemu_img() {
    for (fmt, opts, ext) in KINDS {
        let s = Scratch::new();
        let img = format!("d.{ext}");
        create(&s, fmt, opts, &img, None, "8M");
        s.qemu_io(
            &img,
            &[
                "write -q -P 0x11 0 1M",
                "write -q -P 0x12 6M 1M",
                "write -q -z 7M 512k",
            ],
        );
        // Growing (512-byte clusters: far past the L1 table), refusals, shrinking.
        resize_both(&s, &img, &[], "+1G");
        resize_both(&s, &img, &[], "4M");
        resize_both(&s, &img, &[], "1000");
        resize_both(&s, &img, &[], "0");
        resize_both(&s, &img, &["--shrink"], "6500K");
    }
}

#[test]
fn resize_preallocation_matches_qemu_img() {
    let s = Scratch::new();
    for (fmt, opts, ext) in KINDS {
        let img = format!("p.{ext}");
        create(&s, fmt, opts, &img, None, "1M");
        s.qemu_io(&img, &["write -q -P 0x11 0 64k"]);
        for mode in ["metadata", "full", "falloc"] {
            resize_both(&s, &img, &[&format!("--preallocation={mode}")], "+3M");
        }
        resize_both(&s, &img, &["--preallocation=full", "--shrink"], "1M");
    }
    s.write_file("r.raw", &vec![7u8; 1 << 20]);
    for mode in ["off", "metadata", "full", "falloc"] {
        resize_both(
            &s,
            "r.raw",
            &["-f", "raw", &format!("--preallocation={mode}")],
            "+1M",
        );
    }
    resize_both(&s, "r.raw", &["-f", "raw"], "+1000");
    resize_both(&s, "r.raw", &["-f", "raw"], "1M");
    resize_both(&s, "r.raw", &["-f", "raw", "--shrink"], "1M");
}

/// Growing an overlay over a longer backing file: the new range reads zeros, not the
/// backing file's data, as in qemu.
#[test]
fn resize_over_a_longer_backing_file_reads_zeros() {
    for (fmt, opts, ext) in KINDS {
        let s = Scratch::new();
        let (b, t) = (format!("b.{ext}"), format!("t.{ext}"));
        create(&s, fmt, opts, &b, None, "4M");
        s.qemu_io(&b, &["write -q -P 0x66 0 4M"]);
        create(&s, fmt, opts, &t, Some((&b, fmt)), "2M");
        twin(&s, &[&t]);
        s.qemu_img(&["rebase", "-u", "-b", &b, "-F", fmt, &format!("q-{t}")]);
        let r = s.cowimg(&["resize", &t, "3M"]);
        let q = s.run("qemu-img", &["resize", &format!("q-{t}"), "3M"]);
        assert_eq!(r.status, 0, "{ext}: {}", r.stderr);
        assert_eq!(r.stdout, "Image resized.\n");
        if q.status == 0 {
            assert!(s.same(&t, &format!("q-{t}")), "{ext}: data");
        } else {
            // qemu cannot zero-fill a v2 image (no zero clusters) or a QED image and fails;
            // cowimg writes zeros.
            // (v2: "Failed to zero out new clusters"; QED: "Block driver does not support
            // requested flags".)
            assert!(!q.stderr.is_empty(), "{ext}");
            let mut want = vec![0x66u8; 2 << 20];
            want.resize(3 << 20, 0);
            s.write_file("want.raw", &want);
            assert!(s.same(&t, "want.raw"), "{ext}: data");
        }
        s.assert_clean(&t);
    }
}

#[test]
fn resize_with_internal_snapshots_as_qemu_allows() {
    for opts in ["", "compat=0.10"] {
        let s = Scratch::new();
        create(&s, "qcow2", opts, "s.qcow2", None, "8M");
        s.qemu_io("s.qcow2", &["write -q -P 0x11 0 8M"]);
        s.qemu_img(&["snapshot", "-c", "one", "s.qcow2"]);
        s.qemu_io("s.qcow2", &["write -q -P 0x12 6M 1M"]);
        resize_both(&s, "s.qcow2", &[], "+8M");
        resize_both(&s, "s.qcow2", &["--shrink"], "5M");
        if opts.is_empty() {
            // The snapshot still reads as it was taken, at its own size.
            s.qemu_img(&["snapshot", "-a", "one", "s.qcow2"]);
            s.write_file("want.raw", &vec![0x11u8; 8 << 20]);
            assert!(s.same("s.qcow2", "want.raw"));
            s.assert_clean("s.qcow2");
        }
    }
}

#[test]
fn qed_resize_limits_match_qemu_img() {
    let s = Scratch::new();
    create(&s, "qed", "", "q.qed", None, "1M");
    for (args, size) in [
        (&[][..], "+100G"),
        (&[][..], "100T"),
        (&["--shrink"][..], "1M"),
        (&["--preallocation=full"][..], "+1M"),
    ] {
        resize_both(&s, "q.qed", args, size);
    }
}
