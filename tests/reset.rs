//! `cowimg reset`: an overlay, written to, is emptied: it reads as its backing file again,
//! checks clean, and keeps everything qemu-img info and cowimg info show (backing file and
//! format, cluster size, compat, extended L2, refcount bits, lazy refcounts, compression type,
//! cowimg's copy-on-read flag) except the disk size, as well as its mode. What a reset
//! cannot keep is refused, leaving the image untouched. Kills are in reliability_kill.rs,
//! holders in locking.rs.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::Scratch;
use serde_json::Value;

/// `info` JSON without what a reset changes: the disk size, and the file's own facts.
fn options(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("actual-size");
        o.remove("children");
        o.remove("disk-size");
    }
    v
}

fn cowimg_info(s: &Scratch, image: &str) -> Value {
    serde_json::from_str(&s.cowimg_ok(&["info", "--output", "json", image])).unwrap()
}

#[test]
fn a_reset_overlay_reads_as_its_backing_file_and_keeps_its_options() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "24M"]);
    s.qemu_io(
        "base.qcow2",
        &["write -q -P 0x11 0 6M", "write -q -P 0x12 20M 1M"],
    );
    s.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "24M"]);
    s.qemu_io("base.raw", &["write -q -P 0x21 1M 3M"]);
    // (format, -o options, backing, created by cowimg with --copy-on-read)
    let cases: [(&str, &str, &str, bool); 6] = [
        ("qcow2", "", "base.qcow2", false),
        (
            "qcow2",
            "cluster_size=32k,extended_l2=on,lazy_refcounts=on,refcount_bits=8,compression_type=zstd",
            "base.qcow2",
            false,
        ),
        ("qcow2", "compat=0.10,cluster_size=4k", "base.raw", false),
        ("qcow2", "cluster_size=2M", "base.qcow2", true),
        ("qed", "cluster_size=128k,table_size=8", "base.qcow2", false),
        ("qed", "", "base.raw", true),
    ];
    for (fmt, opts, backing, cor) in cases {
        let ov = format!("ov.{fmt}");
        let bfmt = if backing.ends_with("raw") {
            "raw"
        } else {
            "qcow2"
        };
        let mut a = vec!["create", "-q", "-f", fmt, "-b", backing, "-F", bfmt];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.push(&ov);
        if cor {
            a.insert(1, "--copy-on-read");
            s.cowimg_ok(&a);
        } else {
            s.qemu_img(&a);
        }
        s.qemu_io(
            &ov,
            &[
                "write -q -P 0x31 512k 2M",
                "write -q -z 20M 512k",
                "write -q -P 0x32 23M 4k",
            ],
        );
        std::fs::set_permissions(s.path(&ov), std::fs::Permissions::from_mode(0o640)).unwrap();
        let what = format!("{fmt} {opts} over {backing}");
        assert!(!s.same(&ov, backing), "{what}: the writes did not show");
        let (qemu_before, ours_before) = (s.qemu_info(&ov), cowimg_info(&s, &ov));
        assert_eq!(ours_before["copy-on-read"], cor, "{what}: {ours_before}");

        s.cowimg_ok(&["reset", &ov]);

        assert!(
            s.same(&ov, backing),
            "{what}: reads differ from the backing file"
        );
        s.assert_clean(&ov);
        assert_eq!(
            options(s.qemu_info(&ov)),
            options(qemu_before),
            "{what}: qemu-img info"
        );
        assert_eq!(
            options(cowimg_info(&s, &ov)),
            options(ours_before),
            "{what}: cowimg info"
        );
        let mode = std::fs::metadata(s.path(&ov)).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o640, "{what}: mode");
        // A reset of an empty overlay is one too, and changes nothing.
        let once = s.read_file(&ov);
        s.cowimg_ok(&["reset", &ov]);
        assert_eq!(
            s.read_file(&ov),
            once,
            "{what}: a second reset changed the file"
        );
        std::fs::remove_file(s.path(&ov)).unwrap();
    }
}

#[test]
fn a_reset_through_a_symbolic_link_replaces_the_file_it_names() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    std::fs::create_dir(s.path("d")).unwrap();
    s.qcow2_overlay("../base.qcow2", "d/ov.qcow2");
    s.qemu_io("d/ov.qcow2", &["write -q -P 7 0 1M"]);
    std::os::unix::fs::symlink("d/ov.qcow2", s.path("link.qcow2")).unwrap();
    s.cowimg_ok(&["reset", "link.qcow2"]);
    assert!(std::fs::symlink_metadata(s.path("link.qcow2"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(s.same("d/ov.qcow2", "base.qcow2"));
    s.assert_clean("d/ov.qcow2");
    let left: Vec<_> = std::fs::read_dir(s.path("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["ov.qcow2"], "temporary files left");
}

#[test]
fn what_a_reset_would_lose_is_refused_and_the_image_left_alone() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    s.qemu_io("base.qcow2", &["write -q -P 1 0 1M"]);
    let overlay = |name: &str| {
        s.qcow2_overlay("base.qcow2", name);
        s.qemu_io(name, &["write -q -P 2 0 64k"]);
    };
    overlay("snap.qcow2");
    s.qemu_img(&["snapshot", "-c", "before", "snap.qcow2"]);
    overlay("linked.qcow2");
    std::fs::hard_link(s.path("linked.qcow2"), s.path("other-name.qcow2")).unwrap();
    s.qemu_img(&["create", "-q", "-f", "raw", "disk.raw", "1M"]);
    let mut out = String::new();
    for image in [
        "base.qcow2",
        "snap.qcow2",
        "linked.qcow2",
        "disk.raw",
        "missing.qcow2",
    ] {
        let before = std::fs::read(s.path(image)).ok();
        let r = s.cowimg(&["reset", image]);
        assert_eq!(r.status, 1, "reset {image}: {}", r.show());
        assert_eq!(
            std::fs::read(s.path(image)).ok(),
            before,
            "reset {image} changed it"
        );
        out += &format!("$ cowimg reset {image}\n{}", r.show());
    }
    insta::assert_snapshot!(out);
}
