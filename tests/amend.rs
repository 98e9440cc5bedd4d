//! `amend -o lazy_refcounts=on|off` against `qemu-img amend` on copies of the same images:
//! `qemu-img info` (format-specific data) and `check` agree, the data reads the same; and
//! qemu-img's messages and exit codes for what cannot be amended.

mod common;

use common::Scratch;

#[test]
fn lazy_refcounts_as_qemu_img_amend() {
    for (opts, backing) in [
        ("", false),
        ("cluster_size=512", true),
        ("extended_l2=on", false),
    ] {
        let s = Scratch::new();
        let mut a = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        if backing {
            s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
            a.extend(["-b", "base.qcow2", "-F", "qcow2"]);
        }
        a.extend(["q.qcow2", "4M"]);
        s.qemu_img(&a);
        s.qemu_io("q.qcow2", &["write -q -P 0x11 0 1M"]);
        std::fs::copy(s.path("q.qcow2"), s.path("c.qcow2")).unwrap();
        for value in ["on", "off", "on"] {
            let o = format!("lazy_refcounts={value}");
            s.cowimg_ok(&["amend", "-o", &o, "c.qcow2"]);
            s.qemu_img(&["amend", "-o", &o, "q.qcow2"]);
            let (ic, iq) = (s.qemu_info("c.qcow2"), s.qemu_info("q.qcow2"));
            assert_eq!(ic["format-specific"], iq["format-specific"], "{opts}: {o}");
            assert_eq!(
                ic["backing-filename"], iq["backing-filename"],
                "{opts}: {o}"
            );
            s.assert_clean("c.qcow2");
            assert!(s.same("c.qcow2", "q.qcow2"), "{opts}: {o}");
        }
        // qemu writes through the lazy image and cowimg writes again: still clean.
        s.qemu_io("c.qcow2", &["write -q -P 0x22 2M 1M"]);
        s.cowimg_ok(&["amend", "-o", "lazy_refcounts=off", "c.qcow2"]);
        s.assert_clean("c.qcow2");
    }
}

#[test]
fn refusals_match_qemu_img() {
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "1M",
    ]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "v3.qcow2", "1M"]);
    s.qemu_img(&["create", "-q", "-f", "qed", "a.qed", "1M"]);
    let cases: &[&[&str]] = &[
        &["-o", "lazy_refcounts=on", "v2.qcow2"],
        &["-o", "lazy_refcounts=maybe", "v3.qcow2"],
        &["-o", "foo=1", "v3.qcow2"],
        &["-o", "lazy_refcounts=on", "a.qed"],
    ];
    for case in cases {
        let mut a = vec!["amend"];
        a.extend(*case);
        s.refuses_as_qemu_img(&a);
    }
    // compat=1.1 on a v3 image: nothing to do, as in qemu-img.
    s.cowimg_ok(&["amend", "-o", "compat=1.1", "v3.qcow2"]);
    s.assert_clean("v3.qcow2");
    s.assert_clean("v2.qcow2");
}
