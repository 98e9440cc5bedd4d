//! `cowimg rebase` against `qemu-img rebase` on copies of the same chains: the image reads as
//! before, passes qemu-img check, and records the same backing fields qemu-img records.

mod common;
use common::Scratch;

/// Chain A <- B <- C of `fmt` with `opts` (qemu-img create -o), plus an unrelated N.
fn chain(s: &Scratch, fmt: &str, opts: &str, sizes: [&str; 3]) {
    let img = |n: &str| format!("{n}.{fmt}");
    let create = |name: &str, backing: Option<&str>, size: &str| {
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let b;
        if let Some(bk) = backing {
            b = bk.to_string();
            args.extend(["-b", &b, "-F", fmt]);
        }
        let n = name.to_string();
        args.push(&n);
        args.push(size);
        s.qemu_img(&args);
    };
    create(&img("A"), None, sizes[0]);
    s.qemu_io(
        &img("A"),
        &["write -q -P 0x11 0 4M", "write -q -P 0x12 5M 1M"],
    );
    create(&img("B"), Some(&img("A")), sizes[1]);
    s.qemu_io(
        &img("B"),
        &[
            "write -q -P 0x22 1M 1M",
            "write -q -z 3M 512k",
            "write -q -P 0x23 4608k 9k",
        ],
    );
    create(&img("C"), Some(&img("B")), sizes[2]);
    s.qemu_io(&img("C"), &["write -q -P 0x33 2M 64k"]);
    create(&img("N"), None, "8M");
    s.qemu_io(
        &img("N"),
        &["write -q -P 0x11 0 1M", "write -q -P 0x44 6M 1M"],
    );
}

fn info_backing(s: &Scratch, image: &str) -> (Option<String>, Option<String>) {
    let v = s.qemu_info(image);
    let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
    (get("backing-filename"), get("backing-filename-format"))
}

/// Rebases a copy with cowimg and one with qemu-img; both must read as before, and cowimg's
/// must be clean and record the same backing fields.
fn both(s: &Scratch, fmt: &str, args: &[&str]) {
    let c = format!("C.{fmt}");
    s.qemu_img(&["convert", "-O", "raw", &c, "before.raw"]);
    std::fs::copy(s.path(&c), s.path(&format!("Cq.{fmt}"))).unwrap();
    let mine: Vec<&str> = [&["rebase"][..], args, &[c.as_str()]].concat();
    s.cowimg_ok(&mine);
    let cq = format!("Cq.{fmt}");
    let theirs: Vec<&str> = [&["rebase"][..], args, &[cq.as_str()]].concat();
    s.qemu_img(&theirs);
    assert!(
        s.same("before.raw", &c),
        "cowimg rebase {args:?} changed the content"
    );
    assert!(
        s.same("before.raw", &cq),
        "qemu-img rebase {args:?} changed the content"
    );
    s.assert_clean(&c);
    assert_eq!(
        info_backing(s, &c),
        info_backing(s, &cq),
        "backing fields after rebase {args:?}"
    );
}

#[test]
fn unrelated_base_ancestor_and_flatten() {
    for fmt in ["qcow2", "qed"] {
        for args in [
            vec!["-b", "N.X", "-F", "X"],
            vec!["-b", "A.X", "-F", "X"],
            vec!["-b", ""],
        ] {
            let s = Scratch::new();
            chain(&s, fmt, "", ["16M", "16M", "16M"]);
            let args: Vec<String> = args.iter().map(|a| a.replace('X', fmt)).collect();
            let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
            both(&s, fmt, &refs);
        }
    }
}

#[test]
fn old_backing_shorter_and_longer_than_the_image() {
    for sizes in [
        ["16M", "5M", "16M"],
        ["16M", "32M", "8M"],
        ["7M", "16M", "16M"],
    ] {
        let s = Scratch::new();
        chain(&s, "qcow2", "", sizes);
        both(&s, "qcow2", &["-b", "N.qcow2", "-F", "qcow2"]);
        let s = Scratch::new();
        chain(&s, "qcow2", "", sizes);
        both(&s, "qcow2", &["-b", "A.qcow2", "-F", "qcow2"]);
    }
}

#[test]
fn small_large_and_extended_clusters() {
    for opts in [
        "cluster_size=512",
        "cluster_size=2M",
        "cluster_size=64k,extended_l2=on",
        "compat=0.10",
    ] {
        let s = Scratch::new();
        chain(&s, "qcow2", opts, ["16M", "16M", "16M"]);
        both(&s, "qcow2", &["-b", "N.qcow2", "-F", "qcow2"]);
    }
}

#[test]
fn mixed_cluster_sizes() {
    // qemu-img 10.0.2 aborts on a 1 MiB-cluster intermediate under a 2 MiB-cluster top;
    // cowimg must simply work.
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "A.qcow2",
        "16M",
    ]);
    s.qemu_io("A.qcow2", &["write -q -P 1 0 6M"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=1M",
        "-b",
        "A.qcow2",
        "-F",
        "qcow2",
        "B.qcow2",
    ]);
    s.qemu_io("B.qcow2", &["write -q -P 2 1M 3M", "write -q -P 3 9M 5k"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        "-b",
        "B.qcow2",
        "-F",
        "qcow2",
        "C.qcow2",
    ]);
    s.qemu_io("C.qcow2", &["write -q -P 4 8M 4k"]);
    s.qemu_img(&["convert", "-O", "raw", "C.qcow2", "before.raw"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "N.qcow2",
        "16M",
    ]);
    s.cowimg_ok(&["rebase", "-b", "N.qcow2", "-F", "qcow2", "C.qcow2"]);
    assert!(s.same("before.raw", "C.qcow2"));
    s.assert_clean("C.qcow2");
    s.cowimg_ok(&["rebase", "-b", "", "C.qcow2"]);
    assert!(s.same("before.raw", "C.qcow2"));
    s.assert_clean("C.qcow2");
}

#[test]
fn unsafe_mode_changes_only_the_pointer() {
    let s = Scratch::new();
    chain(&s, "qcow2", "", ["16M", "16M", "16M"]);
    let before = s.read_file("C.qcow2");
    s.cowimg_ok(&["rebase", "-u", "-b", "gone.qcow2", "-F", "qcow2", "C.qcow2"]);
    assert_eq!(
        info_backing(&s, "C.qcow2"),
        (Some("gone.qcow2".into()), Some("qcow2".into()))
    );
    // Only the header cluster changed.
    let after = s.read_file("C.qcow2");
    assert_eq!(before.len(), after.len());
    assert_eq!(before[65536..], after[65536..]);
    s.cowimg_ok(&["rebase", "-u", "-b", "B.qcow2", "-F", "qcow2", "C.qcow2"]);
    s.assert_clean("C.qcow2");
}

#[test]
fn errors_like_qemu_img() {
    let s = Scratch::new();
    chain(&s, "qcow2", "", ["16M", "16M", "16M"]);
    let r = s.cowimg(&["rebase", "C.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(r
        .stderr
        .contains("Must specify backing file (-b) or use unsafe mode (-u)"));
    let r = s.cowimg(&["rebase", "-b", "A.qcow2", "C.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(r.stderr.contains("backing format must be specified"));
    let r = s.cowimg(&["rebase", "-b", "missing.qcow2", "-F", "qcow2", "C.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(
        r.stderr
            .contains("Could not open new backing file 'missing.qcow2'"),
        "{}",
        r.stderr
    );
}

#[test]
fn interrupted_rebase_keeps_data_and_resumes() {
    for args in [vec!["-b", ""], vec!["-b", "N.qcow2", "-F", "qcow2"]] {
        for n in [1u64, 2, 4] {
            let s = Scratch::new();
            chain(&s, "qcow2", "", ["16M", "16M", "16M"]);
            s.qemu_img(&["convert", "-O", "raw", "C.qcow2", "before.raw"]);
            let full: Vec<&str> = [&["rebase"][..], &args, &["C.qcow2"]].concat();
            let r = std::process::Command::new(env!("CARGO_BIN_EXE_cowimg"))
                .args(&full)
                .current_dir(s.dir.path())
                .env("COWIMG_TEST_ABORT_AFTER_CHUNKS", n.to_string())
                .env("COWIMG_TEST_BATCH_BYTES", (1u64 << 20).to_string())
                .output()
                .unwrap();
            if r.status.success() {
                // Fewer chunks than n: it finished.
                assert!(s.same("before.raw", "C.qcow2"));
                continue;
            }
            // Interrupted: the old backing file is still named, nothing reads differently.
            let check = s.run("qemu-img", &["check", "C.qcow2"]);
            assert!(check.status == 0 || check.status == 3, "{}", check.stdout);
            assert!(s.same("before.raw", "C.qcow2"));
            assert_eq!(info_backing(&s, "C.qcow2").0.as_deref(), Some("B.qcow2"));
            s.cowimg_ok(&full);
            assert!(s.same("before.raw", "C.qcow2"));
        }
    }
}

/// Rebasing onto the current backing file is "nothing to do", said in the JSON result, and
/// `--progress json` ends with a completion event also for `-u` (which copies nothing).
#[test]
fn nothing_to_do_and_unsafe_mode_are_results() {
    let s = Scratch::new();
    let _t = common::timeless();
    chain(&s, "qcow2", "", ["8M", "8M", "8M"]);
    let json = ["--output", "json", "--progress", "json"];
    for (name, args) in [
        ("current_backing", &["-b", "B.qcow2", "-F", "qcow2"][..]),
        ("unsafe_same", &["-u", "-b", "B.qcow2", "-F", "qcow2"][..]),
        ("unsafe_other", &["-u", "-b", "N.qcow2", "-F", "qcow2"][..]),
    ] {
        let r = s.cowimg(&[&["rebase"][..], &json, args, &["C.qcow2"]].concat());
        insta::assert_snapshot!(format!("rebase_{name}"), r.show());
        let last = common::last_event(&r.stderr);
        assert_eq!(last["event"], "completed", "{name}");
        assert_eq!(last["offset"], last["len"], "{name}");
    }
}

/// Safe mode probes the new backing file and refuses a `-F` its magic contradicts, saying
/// what the file is and how to proceed; `-u` records `-F` as given.
#[test]
fn safe_mode_refuses_a_backing_format_the_file_contradicts() {
    let s = Scratch::new();
    chain(&s, "qcow2", "", ["8M", "8M", "8M"]);
    s.qemu_img(&["create", "-q", "-f", "qed", "Q.qed", "8M"]);
    s.qemu_img(&["convert", "-O", "raw", "A.qcow2", "A.raw"]);
    for (name, backing, fmt) in [
        ("raw_on_qcow2", "A.qcow2", "raw"),
        ("raw_on_qed", "Q.qed", "raw"),
        ("qcow2_on_raw", "A.raw", "qcow2"),
    ] {
        let r = s.cowimg(&["rebase", "-b", backing, "-F", fmt, "C.qcow2"]);
        insta::assert_snapshot!(format!("rebase_contradicting_{name}"), r.show());
        assert_eq!(info_backing(&s, "C.qcow2").0.as_deref(), Some("B.qcow2"));
    }
    s.cowimg_ok(&["rebase", "-u", "-b", "A.qcow2", "-F", "raw", "C.qcow2"]);
    assert_eq!(
        info_backing(&s, "C.qcow2"),
        (Some("A.qcow2".into()), Some("raw".into()))
    );
}

/// A missing or looping backing file: qemu's message, then the two `rebase -u` lines that fix
/// it; and they do (each is run, and the image reads again).
#[test]
fn missing_or_looping_backing_file_says_how_to_repoint() {
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "o.qcow2",
        "1M",
    ]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "l1.qcow2", "1M"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "l1.qcow2", "-F", "qcow2", "l2.qcow2",
    ]);
    s.qemu_img(&["rebase", "-u", "-b", "l2.qcow2", "-F", "qcow2", "l1.qcow2"]);
    let r = s.cowimg(&["convert", "-O", "raw", "o.qcow2", "o.raw"]);
    insta::assert_snapshot!("missing_backing_hint", r.show());
    let r = s.cowimg(&["map", "l2.qcow2"]);
    insta::assert_snapshot!("looping_backing_hint", r.show());
    // The hinted commands, with NEW and FMT filled in.
    s.cowimg_ok(&["rebase", "-u", "-b", "l2.qcow2", "-F", "qcow2", "o.qcow2"]);
    assert_eq!(s.cowimg(&["map", "o.qcow2"]).status, 1, "o now loops too");
    s.cowimg_ok(&["rebase", "-u", "-b", "", "l1.qcow2"]);
    s.cowimg_ok(&["convert", "-O", "raw", "o.qcow2", "o.raw"]);
    s.cowimg_ok(&["rebase", "-u", "-b", "", "o.qcow2"]);
    assert_eq!(info_backing(&s, "o.qcow2"), (None, None));
    s.qemu_img(&["check", "o.qcow2"]);
    s.qemu_img(&["check", "l1.qcow2"]);
}
