//! The copy-on-read flag: stored so qemu keeps it, shown by info, and honoured by reads.

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

/// Guest bytes the overlay itself holds (depth 0 data), from qemu-img map.
fn own_data(s: &Scratch, image: &str) -> u64 {
    let map: serde_json::Value =
        serde_json::from_str(&s.qemu_img(&["map", "--output=json", image])).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn reading_a_flagged_image_copies_backing_data_into_it() {
    for fmt in ["qcow2", "qed"] {
        let s = Scratch::new();
        let f = flagged(&s, fmt);
        let base_before = s.read_file(&format!("A.{fmt}"));
        let info: serde_json::Value =
            serde_json::from_str(&s.cowimg_ok(&["info", "--output", "json", &f])).unwrap();
        assert_eq!(info["copy-on-read"], true);
        assert!(s.cowimg_ok(&["info", &f]).contains("copy-on-read: on"));
        assert_eq!(own_data(&s, &f), 64 << 10);
        s.cowimg_ok(&["convert", "-O", "raw", &f, "out.raw"]);
        assert!(s.same("before.raw", "out.raw"));
        assert!(
            s.same("before.raw", &f),
            "the copy changed what {fmt} reads"
        );
        s.assert_clean(&f);
        // Everything the backing file held is now in the overlay (the 100k piece widened to
        // whole clusters).
        let own = own_data(&s, &f);
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
fn force_share_and_no_copy_on_read_only_read() {
    let s = Scratch::new();
    let f = flagged(&s, "qcow2");
    s.cowimg_ok(&["convert", "-U", "-O", "raw", &f, "o1.raw"]);
    s.cowimg_ok(&["convert", "--no-copy-on-read", "-O", "raw", &f, "o2.raw"]);
    s.cowimg_ok(&["compare", "--no-copy-on-read", &f, "before.raw"]);
    assert_eq!(own_data(&s, &f), 64 << 10);
    assert!(s.same("before.raw", "o1.raw") && s.same("before.raw", "o2.raw"));
    // compare honours the flag as any read does.
    s.cowimg_ok(&["compare", &f, "before.raw"]);
    assert!(own_data(&s, &f) > 4 << 20);
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
