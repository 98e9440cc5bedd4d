//! The copy-on-read flag: stored so qemu keeps it, shown by info, set and cleared by amend;
//! copying happens only when asked (`--copy-on-read`): inspecting or copying out an image
//! never modifies it, flagged or not.

mod common;
use common::Scratch;

fn flagged(s: &Scratch, fmt: &str) -> String {
    let (a, f) = (format!("A.{fmt}"), format!("F.{fmt}"));
    s.qemu_img(&["create", "-q", "-f", fmt, &a, "16M"]);
    s.qemu_io(&a, &["write -q -P 0x11 0 4M", "write -q -P 0x12 9M 100k"]);
    s.cowimg_ok(&[
        "create",
        "-q",
        "-f",
        fmt,
        "-b",
        &a,
        "-F",
        fmt,
        "--copy-on-read",
        &f,
    ]);
    s.qemu_io(&f, &["write -q -P 0x33 2M 64k"]);
    s.qemu_img(&["convert", "-O", "raw", &f, "before.raw"]);
    f
}

#[test]
fn copy_on_read_asked_for_copies_backing_data_into_the_image() {
    for fmt in ["qcow2", "qed"] {
        let s = Scratch::new();
        let f = flagged(&s, fmt);
        let base_before = s.read_file(&format!("A.{fmt}"));
        let info: serde_json::Value =
            serde_json::from_str(&s.cowimg_ok(&["info", "--output", "json", &f])).unwrap();
        assert_eq!(info["copy-on-read"], true);
        assert!(s.cowimg_ok(&["info", &f]).contains("copy-on-read: on"));
        assert_eq!(s.own_data(&f), 64 << 10);
        s.cowimg_ok(&["convert", "--copy-on-read", "-O", "raw", &f, "out.raw"]);
        assert!(s.same("before.raw", "out.raw"));
        assert!(
            s.same("before.raw", &f),
            "the copy changed what {fmt} reads"
        );
        s.assert_clean(&f);
        // Everything the backing file held is now in the overlay (the 100k piece widened to
        // whole clusters).
        let own = s.own_data(&f);
        assert!(
            own >= (4 << 20) + (100 << 10),
            "{fmt}: only {own} bytes copied"
        );
        // The backing file was not touched.
        assert!(
            s.read_file(&format!("A.{fmt}")) == base_before,
            "{fmt}: the backing file changed"
        );
    }
}

#[test]
fn compare_with_copy_on_read_fills_and_an_unflagged_image_too() {
    let s = Scratch::new();
    let f = flagged(&s, "qcow2");
    s.cowimg_ok(&["compare", "--copy-on-read", &f, "before.raw"]);
    assert!(s.own_data(&f) > 4 << 20);
    s.assert_clean(&f);
    assert!(s.same("before.raw", &f));
    // The explicit option asks for the copy; the image's flag is not needed for it.
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "A.qcow2",
        "-F",
        "qcow2",
        "plain.qcow2",
    ]);
    s.cowimg_ok(&["convert", "--copy-on-read", "plain.qcow2", "p.raw"]);
    assert!(s.own_data("plain.qcow2") >= 4 << 20);
    s.assert_clean("plain.qcow2");
}

#[test]
fn copy_on_read_with_force_share_is_refused() {
    let s = Scratch::new();
    let f = flagged(&s, "qcow2");
    for cmd in [
        vec!["convert", "-U", "--copy-on-read", &f, "o.raw"],
        vec!["compare", "-U", "--copy-on-read", &f, "before.raw"],
    ] {
        let r = s.cowimg(&cmd);
        assert_ne!(r.status, 0, "{cmd:?}");
        assert!(
            r.stderr.contains("-U (force-share)"),
            "{cmd:?}: {}",
            r.stderr
        );
    }
    assert_eq!(s.own_data(&f), 64 << 10);
}

/// Every command that inspects or copies out, as run on `image` (`raw` reads the same).
fn inspections<'a>(image: &'a str, raw: &'a str) -> Vec<Vec<&'a str>> {
    vec![
        vec!["info", image],
        vec!["info", "--backing-chain", "--output", "json", image],
        vec!["map", image],
        vec!["map", "--output", "json", image],
        vec!["check", image],
        vec!["check", "--output", "json", image],
        vec!["compare", image, raw],
        vec!["compare", "-s", raw, image],
        vec!["compare", "--no-copy-on-read", image, raw],
        vec!["measure", "-O", "qcow2", image],
        vec!["convert", "-O", "raw", image, "out.raw"],
        vec!["convert", "-O", "qcow2", image, "out.qcow2"],
    ]
}

fn sha256(s: &Scratch, name: &str) -> String {
    s.run("sha256sum", &[name]).stdout
}

#[test]
fn inspecting_a_flagged_image_never_modifies_it() {
    for fmt in ["qcow2", "qed"] {
        let s = Scratch::new();
        let f = flagged(&s, fmt);
        let (before, base) = (sha256(&s, &f), sha256(&s, &format!("A.{fmt}")));
        for cmd in inspections(&f, "before.raw") {
            let r = s.cowimg(&cmd);
            // compare -s of a raw file against an overlay differs in allocation: 1.
            assert!(r.status <= 1, "cowimg {cmd:?}: {}{}", r.stdout, r.stderr);
            assert_eq!(sha256(&s, &f), before, "cowimg {cmd:?} modified {f}");
        }
        assert_eq!(sha256(&s, &format!("A.{fmt}")), base);
        assert!(s.same("before.raw", "out.raw") && s.same("before.raw", "out.qcow2"));
    }
}

/// Runs cowimg so that a file without write permission cannot be written: as root (who may
/// write anything), as the unprivileged user `nobody`.
fn cowimg_without_privileges(s: &Scratch, args: &[&str]) -> common::Run {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return s.cowimg(args);
    }
    let mut all = vec![
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        env!("CARGO_BIN_EXE_cowimg"),
    ];
    all.extend_from_slice(args);
    s.run("setpriv", &all)
}

#[test]
fn a_read_only_flagged_image_can_be_inspected() {
    use std::os::unix::fs::PermissionsExt;
    for fmt in ["qcow2", "qed"] {
        let s = Scratch::new();
        let f = flagged(&s, fmt);
        let before = sha256(&s, &f);
        for name in [f.as_str(), &format!("A.{fmt}"), "before.raw"] {
            std::fs::set_permissions(s.path(name), std::fs::Permissions::from_mode(0o444)).unwrap();
        }
        // The outputs are written by the same user: the directory must let it.
        std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        for cmd in inspections(&f, "before.raw") {
            let r = cowimg_without_privileges(&s, &cmd);
            assert!(r.status <= 1, "cowimg {cmd:?}: {}{}", r.stdout, r.stderr);
        }
        assert_eq!(sha256(&s, &f), before);
        assert!(s.same("before.raw", "out.raw"));
        // Copy-on-read needs to write: refused with the system's reason, nothing changed.
        let r = cowimg_without_privileges(&s, &["convert", "--copy-on-read", &f, "o.raw"]);
        assert_eq!(r.status, 1);
        assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);
        assert_eq!(sha256(&s, &f), before);
    }
}

#[test]
fn amend_sets_and_clears_the_flag() {
    for fmt in ["qcow2", "qed"] {
        let s = Scratch::new();
        s.qemu_img(&["create", "-q", "-f", fmt, "A.img", "16M"]);
        s.qemu_io("A.img", &["write -q -P 0x11 0 1M"]);
        s.qemu_img(&["create", "-q", "-f", fmt, "-b", "A.img", "-F", fmt, "F.img"]);
        s.qemu_io("F.img", &["write -q -P 0x22 3M 64k"]);
        s.qemu_img(&["convert", "-O", "raw", "F.img", "before.raw"]);
        let flag = |s: &Scratch| -> serde_json::Value {
            let v: serde_json::Value =
                serde_json::from_str(&s.cowimg_ok(&["info", "--output", "json", "F.img"])).unwrap();
            v["copy-on-read"].clone()
        };
        assert_eq!(flag(&s), false);
        for (value, want) in [("on", true), ("off", false), ("on", true)] {
            s.cowimg_ok(&["amend", &format!("--copy-on-read={value}"), "F.img"]);
            assert_eq!(flag(&s), want, "{fmt}: after --copy-on-read={value}");
            assert_eq!(
                s.cowimg_ok(&["info", "F.img"]).contains("copy-on-read: on"),
                want
            );
            s.assert_clean("F.img");
            let q = s.qemu_info("F.img");
            assert_eq!(q["backing-filename"], "A.img", "{fmt}");
            assert!(s.same("before.raw", "F.img"), "{fmt}: reads differently");
        }
        // -f and the value as a separate word work too.
        s.cowimg_ok(&["amend", "-f", fmt, "--copy-on-read", "off", "F.img"]);
        assert_eq!(flag(&s), false);
    }
}

#[test]
fn amend_refuses_what_it_cannot_do() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "q.qcow2", "1M"]);
    let r = s.cowimg(&["amend", "q.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(r.stderr.contains("Nothing to change"), "{}", r.stderr);
    s.qemu_img(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let r = s.cowimg(&["amend", "--copy-on-read=on", "r.raw"]);
    assert_eq!(r.status, 1);
    assert!(r.stderr.contains("raw images cannot carry"), "{}", r.stderr);
    let r = s.cowimg(&["amend", "--copy-on-read=maybe", "q.qcow2"]);
    assert_eq!(
        r.status, 1,
        "a usage error exits 1, as in qemu-img: {}",
        r.stderr
    );
}

#[test]
fn the_flag_survives_qemu_header_rewrites() {
    let s = Scratch::new();
    let f = flagged(&s, "qcow2");
    let has = |s: &Scratch| -> bool {
        let v: serde_json::Value =
            serde_json::from_str(&s.cowimg_ok(&["info", "--output", "json", "-U", "F.qcow2"]))
                .unwrap();
        v["copy-on-read"] == true
    };
    s.qemu_io(&f, &["write -q -P 1 5M 64k"]);
    assert!(has(&s), "after qemu-io writes");
    s.qemu_img(&["rebase", "-u", "-b", "A.qcow2", "-F", "qcow2", &f]);
    assert!(has(&s), "after rebase -u");
    s.qemu_img(&["amend", "-o", "lazy_refcounts=on", &f]);
    assert!(has(&s), "after amend");
    s.qemu_img(&["check", "-r", "all", &f]);
    assert!(has(&s), "after check -r all");
    s.qemu_img(&["snapshot", "-c", "s1", &f]);
    assert!(has(&s), "after snapshot -c");
    s.assert_clean(&f);

    let s = Scratch::new();
    let f = flagged(&s, "qed");
    let has = |s: &Scratch| -> bool {
        let v: serde_json::Value =
            serde_json::from_str(&s.cowimg_ok(&["info", "--output", "json", "-U", "F.qed"]))
                .unwrap();
        v["copy-on-read"] == true
    };
    s.qemu_io(&f, &["write -q -P 1 5M 64k"]);
    assert!(has(&s), "QED after qemu-io writes");
    s.qemu_img(&["rebase", "-u", "-b", "A.qed", "-F", "qed", &f]);
    assert!(has(&s), "QED after rebase -u");
    s.qemu_img(&["check", "-r", "all", &f]);
    assert!(has(&s), "QED after check -r all");
    s.assert_clean(&f);
}

#[test]
fn create_output_matches_qemu_img_create_but_for_the_flag() {
    for fmt in ["qcow2", "qed"] {
        let s = Scratch::new();
        s.qemu_img(&["create", "-q", "-f", fmt, "base.img", "8M"]);
        s.qemu_img(&[
            "create", "-q", "-f", fmt, "-b", "base.img", "-F", fmt, "q.img",
        ]);
        s.cowimg_ok(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-b",
            "base.img",
            "-F",
            fmt,
            "--copy-on-read",
            "c.img",
        ]);
        let (mut q, mut c) = (s.qemu_info("q.img"), s.qemu_info("c.img"));
        for v in [&mut q, &mut c] {
            let o = v.as_object_mut().unwrap();
            for k in ["filename", "actual-size", "children"] {
                o.remove(k);
            }
        }
        assert_eq!(q, c, "{fmt}");
    }
}
