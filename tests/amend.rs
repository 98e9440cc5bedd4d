//! `amend -o lazy_refcounts=on|off`, `compat=0.10|1.1` and `refcount_bits=N` against
//! `qemu-img amend` on copies of the same images:
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

/// `qemu-img info --output=json` without what differs between two files with the same
/// content: names, host sizes, snapshot dates (the images were made apart).
fn info_of(s: &Scratch, image: &str) -> serde_json::Value {
    let mut v = s.qemu_info(image);
    let o = v.as_object_mut().expect("an object");
    for k in ["filename", "actual-size", "children", "dirty-flag"] {
        o.remove(k);
    }
    v
}

/// `qemu-img map --output=json` without what depends on where the clusters lie in the file:
/// host offsets, and whether allocated data reads as zeros because the file has a hole there
/// (which the file system decides per block); runs that are then alike are merged.
fn map_of(s: &Scratch, image: &str) -> Vec<serde_json::Value> {
    let map: serde_json::Value =
        serde_json::from_str(&s.qemu_img(&["map", "--output=json", image])).expect("map JSON");
    let mut out: Vec<serde_json::Value> = Vec::new();
    for e in map.as_array().expect("a list") {
        let mut e = e.clone();
        let o = e.as_object_mut().expect("an object");
        o.remove("offset");
        if o["data"] == true {
            o.remove("zero");
        }
        let len = o
            .remove("length")
            .and_then(|l| l.as_u64())
            .expect("a length");
        let start = o.remove("start").and_then(|l| l.as_u64()).expect("a start");
        match out.last_mut() {
            Some(prev) if prev["kind"] == e => {
                let l = prev["length"].as_u64().expect("a length");
                prev["length"] = (l + len).into();
            }
            _ => out.push(serde_json::json!({"start": start, "length": len, "kind": e})),
        }
    }
    out
}

/// cowimg and qemu-img amend copies of the fixture `q.qcow2` with `-o opts`: the same info,
/// the same map (host offsets aside), the same data, and cowimg's checks clean.
fn amend_both(s: &Scratch, opts: &str, what: &str) {
    std::fs::copy(s.path("q.qcow2"), s.path("c.qcow2")).unwrap();
    s.cowimg_ok(&["amend", "-o", opts, "c.qcow2"]);
    s.qemu_img(&["amend", "-o", opts, "q.qcow2"]);
    assert_eq!(
        info_of(s, "c.qcow2"),
        info_of(s, "q.qcow2"),
        "{what}: {opts}"
    );
    assert_eq!(map_of(s, "c.qcow2"), map_of(s, "q.qcow2"), "{what}: {opts}");
    s.assert_clean("c.qcow2");
    assert!(s.same("c.qcow2", "q.qcow2"), "{what}: {opts}");
}

/// Fixtures for the version changes: with and without a backing file (zero clusters expand
/// to nothing or to zeroed data), 512 B and 2 MiB clusters, preallocated zero clusters, and
/// a snapshot that shares the L2 tables holding zero clusters (the new clusters are then
/// referenced twice).
fn version_fixture(s: &Scratch, compat: &str, cluster: &str, backing: bool, snapshot: bool) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    let o = format!("compat={compat},cluster_size={cluster}");
    a.extend(["-o", &o]);
    if backing {
        s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
        s.qemu_io("base.qcow2", &["write -q -P 0x77 0 4M"]);
        a.extend(["-b", "base.qcow2", "-F", "qcow2"]);
    }
    a.extend(["q.qcow2", "4M"]);
    s.qemu_img(&a);
    s.qemu_io(
        "q.qcow2",
        &["write -q -P 0x11 0 64k", "write -q -P 0x22 2M 64k"],
    );
    if cluster != "2M" {
        // (qemu writes compressed clusters whole only.)
        s.qemu_io("q.qcow2", &["write -q -c -P 0x33 3M 64k"]);
    }
    if compat == "1.1" {
        // An unallocated zero cluster, and a preallocated one (zeroed in place).
        s.qemu_io("q.qcow2", &["write -q -z 1M 128k", "write -q -z 2M 32k"]);
    }
    if snapshot {
        s.qemu_img(&["snapshot", "-c", "s1", "q.qcow2"]);
        if compat == "1.1" {
            s.qemu_io("q.qcow2", &["write -q -z 1536k 64k"]);
        }
    }
}

#[test]
fn compat_up_and_down_as_qemu_img_amend() {
    for (cluster, backing, snapshot) in [
        ("64k", false, false),
        ("64k", true, false),
        ("512", true, true),
        ("2M", false, true),
        ("64k", true, true),
    ] {
        let what = format!("cluster {cluster}, backing {backing}, snapshot {snapshot}");
        let s = Scratch::new();
        version_fixture(&s, "1.1", cluster, backing, snapshot);
        amend_both(&s, "compat=0.10", &what);
        amend_both(&s, "compat=1.1", &what);
        let s = Scratch::new();
        version_fixture(&s, "0.10", cluster, backing, snapshot);
        amend_both(&s, "compat=1.1", &what);
        amend_both(&s, "compat=v2", &what);
    }
}

#[test]
fn upgrade_rewrites_short_snapshot_entries_as_qemu_img() {
    let s = Scratch::new();
    version_fixture(&s, "0.10", "64k", false, true);
    common::shrink_snapshot_entry(&s, "q.qcow2");
    s.assert_clean("q.qcow2");
    amend_both(
        &s,
        "compat=1.1",
        "a v2 snapshot entry without the disk size",
    );
    // Both wrote full v3 entries: a v3 check finds nothing incomplete.
    let r = s.run("qemu-img", &["check", "c.qcow2"]);
    assert!(!r.stdout.contains("incomplete"), "{}", r.stdout);
}

#[test]
fn refcount_bits_as_qemu_img_amend() {
    for cluster in ["512", "64k"] {
        let s = Scratch::new();
        let o = format!("cluster_size={cluster}");
        s.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, "q.qcow2", "16M"]);
        s.qemu_io("q.qcow2", &["write -q -P 0x11 0 3M"]);
        // (qemu-img takes seconds for some of these steps on 64 KiB clusters.)
        let widths: &[&str] = if cluster == "512" {
            &["1", "8", "64", "2", "32", "16", "4"]
        } else {
            &["4", "16"]
        };
        for bits in widths {
            amend_both(&s, &format!("refcount_bits={bits}"), cluster);
        }
        // Compressed clusters share host clusters: counts above 1 in every width that holds them.
        s.qemu_io("q.qcow2", &["write -q -c -P 0x22 8M 256k"]);
        for bits in ["8", "64", "16"] {
            amend_both(&s, &format!("refcount_bits={bits}"), cluster);
        }
        // The new width is used by the next writes, qemu's and cowimg's.
        s.qemu_io("c.qcow2", &["write -q -P 0x33 12M 1M"]);
        s.cowimg_ok(&["amend", "-o", "compat=1.1,refcount_bits=16", "c.qcow2"]);
        s.assert_clean("c.qcow2");
    }
    // Upgrade first, then the width: one command, as qemu-img orders it.
    let s = Scratch::new();
    version_fixture(&s, "0.10", "64k", true, false);
    amend_both(
        &s,
        "compat=1.1,refcount_bits=4",
        "v2 to v3 with 4-bit refcounts",
    );
}

#[test]
fn version_and_width_refusals_match_qemu_img() {
    let s = Scratch::new();
    let make = |name: &str, opts: &str| {
        s.qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, name, "1M"]);
        s.qemu_io(name, &["write -q -P 1 0 64k"]);
    };
    make("v2.qcow2", "compat=0.10");
    make("r8.qcow2", "refcount_bits=8");
    make("xl2.qcow2", "extended_l2=on");
    make("snap.qcow2", "compat=1.1");
    s.qemu_img(&["snapshot", "-c", "s", "snap.qcow2"]);
    make("zstd.qcow2", "compression_type=zstd");
    s.qemu_io("zstd.qcow2", &["write -q -c -P 2 512k 64k"]);
    let cases: &[&[&str]] = &[
        &["-o", "compat=0.9", "v2.qcow2"],
        &["-o", "refcount_bits=3", "v2.qcow2"],
        &["-o", "refcount_bits=128", "v2.qcow2"],
        &["-o", "refcount_bits=x", "v2.qcow2"],
        &["-o", "refcount_bits=8", "v2.qcow2"],
        &["-o", "compat=0.10", "r8.qcow2"],
        &["-o", "compat=0.10", "xl2.qcow2"],
        &["-o", "compat=0.10", "zstd.qcow2"],
        &["-o", "compat=0.10,lazy_refcounts=on", "snap.qcow2"],
        &["-o", "refcount_bits=1", "snap.qcow2"],
    ];
    for case in cases {
        let mut a = vec!["amend"];
        a.extend(*case);
        s.refuses_as_qemu_img(&a);
    }
    for img in [
        "v2.qcow2",
        "r8.qcow2",
        "xl2.qcow2",
        "snap.qcow2",
        "zstd.qcow2",
    ] {
        s.assert_clean(img);
    }
}

#[test]
fn downgrade_with_bitmaps_as_qemu_img() {
    // v2 cannot mark bitmaps consistent: both leave them to be considered inconsistent;
    // qemu-img's result leaks their clusters, cowimg's checks clean.
    let s = Scratch::new();
    version_fixture(&s, "1.1", "64k", false, false);
    s.qemu_img(&["bitmap", "--add", "q.qcow2", "b0"]);
    s.qemu_img(&["bitmap", "--add", "q.qcow2", "b1"]);
    amend_both(&s, "compat=0.10", "with persistent bitmaps");
}
