//! `snapshot -c/-a/-d` against `qemu-img snapshot`: the same sequence (create, write with
//! qemu-io, create another, write, apply, delete) on two copies of each image, one driven by
//! qemu-img and one by cowimg. After every step cowimg's copy checks clean with qemu-img (no
//! error, no leak), reads as qemu's copy (`qemu-img compare`), lists the same snapshots (IDs,
//! names, sizes, clocks; the dates differ by nature), and each snapshot reads as qemu's
//! (`qemu-img convert -l`). cowimg also applies and deletes snapshots qemu made, and its
//! messages and exit codes for missing snapshots, QED/raw images and bad options are qemu-img's.

mod common;

use common::Scratch;
use serde_json::Value;

/// Makes `img` as `opts` asks: 8 MiB with some data, compressed data and zeros written by
/// qemu-io, a backing file when `backing`, qemu-made snapshots when `qemu_snapshot`, a
/// persistent bitmap when `bitmap`.
fn fixture(s: &Scratch, img: &str, opts: &str, backing: bool, qemu_snapshot: bool, bitmap: bool) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if backing {
        s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
        s.qemu_io("base.qcow2", &["write -q -P 0x0b 0 8M"]);
        args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
    }
    args.extend([img, "8M"]);
    s.qemu_img(&args);
    let compressed = !opts.contains("extended_l2") || !backing;
    let mut cmds = vec!["write -q -P 0x11 0 1M", "write -q -z 2M 256k"];
    if compressed && opts.contains("2M") {
        cmds.push("write -q -c -P 0x33 4M 2M");
    } else if compressed {
        cmds.push("write -q -c -P 0x33 4M 128k");
    }
    s.qemu_io(img, &cmds);
    if qemu_snapshot {
        s.qemu_img(&["snapshot", "-c", "made-by-qemu", img]);
        s.qemu_io(img, &["write -q -P 0x44 512k 1M"]);
    }
    if bitmap {
        s.qemu_img(&["bitmap", "--add", img, "b0"]);
    }
}

/// The snapshots as `qemu-img info` shows them, dates left out.
fn listed(s: &Scratch, img: &str) -> Vec<Value> {
    let info = s.qemu_info(img);
    let list = info["snapshots"].as_array().cloned().unwrap_or_default();
    list.into_iter()
        .map(|mut sn| {
            let o = sn.as_object_mut().expect("snapshot object");
            o.remove("date-sec");
            o.remove("date-nsec");
            sn
        })
        .collect()
}

/// cowimg's copy `c` and qemu's copy `q` agree after `step`.
fn agree(s: &Scratch, c: &str, q: &str, step: &str) {
    let r = s.run("qemu-img", &["check", c]);
    assert_eq!(
        r.status, 0,
        "{step}: qemu-img check {c}: {}{}",
        r.stdout, r.stderr
    );
    assert!(
        r.stdout.contains("No errors were found"),
        "{step}: {}",
        r.stdout
    );
    assert!(s.same(c, q), "{step}: the active state differs");
    let (lc, lq) = (listed(s, c), listed(s, q));
    assert_eq!(lc, lq, "{step}: the snapshot lists differ");
    for sn in &lq {
        let name = sn["name"].as_str().unwrap();
        let id = sn["id"].as_str().unwrap();
        let (rc, rq) = (format!("c-{id}.raw"), format!("q-{id}.raw"));
        let opt = format!("snapshot.id={id}");
        s.qemu_img(&["convert", "-l", &opt, "-O", "raw", c, &rc]);
        s.qemu_img(&["convert", "-l", &opt, "-O", "raw", q, &rq]);
        assert!(
            s.read_file(&rc) == s.read_file(&rq),
            "{step}: snapshot {id} ({name}) reads differently"
        );
    }
    // cowimg lists the same table for both.
    let (oc, oq) = (
        s.cowimg_ok(&["snapshot", "-l", c]),
        s.qemu_img(&["snapshot", "-l", c]),
    );
    assert_eq!(oc, oq, "{step}: cowimg snapshot -l differs from qemu-img's");
}

/// Runs the same snapshot action on both copies.
fn both(s: &Scratch, c: &str, q: &str, action: &[&str]) {
    let mut a = vec!["snapshot"];
    a.extend(action);
    let mut ca = a.clone();
    ca.push(c);
    s.cowimg_ok(&ca);
    a.push(q);
    s.qemu_img(&a);
}

fn sequence(opts: &str, backing: bool, qemu_snapshot: bool, bitmap: bool) {
    let s = Scratch::new();
    let label = format!("{opts} backing={backing} qemu-snapshot={qemu_snapshot} bitmap={bitmap}");
    fixture(&s, "q.qcow2", opts, backing, qemu_snapshot, bitmap);
    std::fs::copy(s.path("q.qcow2"), s.path("c.qcow2")).unwrap();
    let (c, q) = ("c.qcow2", "q.qcow2");
    both(&s, c, q, &["-c", "s1"]);
    agree(&s, c, q, &format!("{label}: -c s1"));
    for img in [c, q] {
        s.qemu_io(img, &["write -q -P 0x22 64k 1536k", "write -q -z 4M 64k"]);
    }
    agree(&s, c, q, &format!("{label}: written after s1"));
    both(&s, c, q, &["-c", "s2"]);
    for img in [c, q] {
        s.qemu_io(img, &["write -q -P 0x55 6M 1M", "discard -q 0 64k"]);
    }
    agree(&s, c, q, &format!("{label}: -c s2, written"));
    // By ID, as qemu-img accepts for -a.
    let s1 = if qemu_snapshot { "2" } else { "1" };
    both(&s, c, q, &["-a", s1]);
    agree(&s, c, q, &format!("{label}: -a {s1}"));
    both(&s, c, q, &["-d", "s2"]);
    agree(&s, c, q, &format!("{label}: -d s2"));
    if qemu_snapshot {
        // A snapshot qemu made: applied and deleted by cowimg.
        both(&s, c, q, &["-a", "made-by-qemu"]);
        agree(&s, c, q, &format!("{label}: -a made-by-qemu"));
        both(&s, c, q, &["-d", "made-by-qemu"]);
        agree(&s, c, q, &format!("{label}: -d made-by-qemu"));
    }
    both(&s, c, q, &["-d", "s1"]);
    agree(&s, c, q, &format!("{label}: -d s1"));
    // cowimg reads qemu's image after qemu's -a/-d as qemu does.
    let r = s.cowimg(&["compare", c, q]);
    assert_eq!(
        r.status, 0,
        "{label}: cowimg compare: {}{}",
        r.stdout, r.stderr
    );
}

#[test]
fn sequence_v3() {
    sequence("", false, false, false);
}

#[test]
fn sequence_v2() {
    sequence("compat=0.10", false, false, false);
}

#[test]
fn sequence_extended_l2() {
    sequence("extended_l2=on", false, false, false);
}

#[test]
fn sequence_small_clusters() {
    sequence("cluster_size=512", false, false, false);
}

#[test]
fn sequence_2m_clusters() {
    sequence("cluster_size=2M", false, false, false);
}

#[test]
fn sequence_backing() {
    sequence("", true, false, false);
    sequence("extended_l2=on", true, false, false);
}

#[test]
fn sequence_over_qemu_snapshots() {
    sequence("", false, true, false);
    sequence("compat=0.10,cluster_size=4k", false, true, false);
}

#[test]
fn sequence_refcount_bits() {
    sequence("refcount_bits=64", false, false, false);
}

/// Narrow refcounts that cannot count the new references: qemu-img fails half-way (leaks
/// left); cowimg refuses before changing anything.
#[test]
fn too_narrow_refcounts_are_refused_unchanged() {
    let s = Scratch::new();
    fixture(&s, "c.qcow2", "refcount_bits=2", false, false, false);
    std::fs::copy(s.path("c.qcow2"), s.path("q.qcow2")).unwrap();
    let before = s.read_file("c.qcow2");
    let r = s.cowimg(&["snapshot", "-c", "s1", "c.qcow2"]);
    assert_eq!(r.status, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .starts_with("cowimg: Could not create snapshot 's1': ")
            && r.stderr.contains("refcount_bits=2"),
        "{}",
        r.stderr
    );
    assert!(s.read_file("c.qcow2") == before, "the image was changed");
    s.assert_clean("c.qcow2");
    assert_eq!(
        s.run("qemu-img", &["snapshot", "-c", "s1", "q.qcow2"])
            .status,
        1
    );
}

/// The fields qemu-img writes into a new entry: next free ID, no VM state, the disk size in
/// the extra data, zero clocks; the same name twice is allowed (qemu-img allows it).
#[test]
fn create_fills_fields_as_qemu() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "c.qcow2", "3M"]);
    std::fs::copy(s.path("c.qcow2"), s.path("q.qcow2")).unwrap();
    for name in ["a", "a", "1", ""] {
        both(&s, "c.qcow2", "q.qcow2", &["-c", name]);
    }
    assert_eq!(listed(&s, "c.qcow2"), listed(&s, "q.qcow2"));
    // -d finds by name only, the first of that name: "1" is the third snapshot, not ID 1.
    for name in ["1", "a"] {
        both(&s, "c.qcow2", "q.qcow2", &["-d", name]);
        assert_eq!(listed(&s, "c.qcow2"), listed(&s, "q.qcow2"), "-d {name}");
    }
    let r = s.cowimg(&["snapshot", "-d", "4", "c.qcow2"]);
    assert_eq!(
        r.stderr,
        "cowimg: Could not delete snapshot '4': snapshot not found\n"
    );
    assert_eq!(r.status, 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for sn in s.qemu_info("c.qcow2")["snapshots"].as_array().unwrap() {
        let date = sn["date-sec"].as_u64().unwrap();
        assert!(date <= now && date + 600 > now, "date {date}, now {now}");
        // qemu-img takes the time in microseconds.
        assert_eq!(sn["date-nsec"].as_u64().unwrap() % 1000, 0);
    }
    s.assert_clean("c.qcow2");
}

/// Applying a snapshot taken before a resize restores its size.
#[test]
fn apply_restores_the_size() {
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "q.qcow2",
        "1M",
    ]);
    s.qemu_io("q.qcow2", &["write -q -P 0x66 0 1M"]);
    std::fs::copy(s.path("q.qcow2"), s.path("c.qcow2")).unwrap();
    both(&s, "c.qcow2", "q.qcow2", &["-c", "small"]);
    for img in ["c.qcow2", "q.qcow2"] {
        s.qemu_img(&["resize", "-q", img, "300M"]);
        s.qemu_io(img, &["write -q -P 0x77 299M 1M"]);
    }
    both(&s, "c.qcow2", "q.qcow2", &["-a", "small"]);
    assert_eq!(s.qemu_info("c.qcow2")["virtual-size"], 1 << 20);
    agree(&s, "c.qcow2", "q.qcow2", "-a small");
}

/// Missing snapshots, formats without snapshots and mixed actions: qemu-img's messages and
/// exit codes (the program name aside).
#[test]
fn errors_match_qemu_img() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    s.qemu_img(&["create", "-q", "-f", "qed", "a.qed", "1M"]);
    s.qemu_img(&["create", "-q", "-f", "raw", "a.raw", "1M"]);
    let cases: &[&[&str]] = &[
        &["-a", "nope", "a.qcow2"],
        &["-d", "nope", "a.qcow2"],
        &["-c", "x", "a.qed"],
        &["-a", "x", "a.qed"],
        &["-d", "x", "a.qed"],
        &["-f", "raw", "-c", "x", "a.raw"],
        &["-f", "raw", "-a", "x", "a.raw"],
        &["-f", "raw", "-d", "x", "a.raw"],
        &["-l", "-c", "x", "a.qcow2"],
        &["-U", "-c", "x", "a.qcow2"],
    ];
    for case in cases {
        let mut a = vec!["snapshot"];
        a.extend(*case);
        s.refuses_as_qemu_img(&a);
    }
    // Nothing was changed by the refusals.
    s.assert_clean("a.qcow2");
    assert!(listed(&s, "a.qcow2").is_empty());
}

/// An image with a persistent bitmap: applying a snapshot is refused as qemu-img refuses
/// it; creating and deleting work. cowimg does not maintain bitmaps, so its first change
/// marks them stale (the autoclear bit, as the specification asks).
#[test]
fn with_bitmap() {
    let s = Scratch::new();
    fixture(&s, "q.qcow2", "", false, true, true);
    std::fs::copy(s.path("q.qcow2"), s.path("c.qcow2")).unwrap();
    let c = s.cowimg(&["snapshot", "-a", "made-by-qemu", "c.qcow2"]);
    let q = s.run("qemu-img", &["snapshot", "-a", "made-by-qemu", "q.qcow2"]);
    assert_eq!(
        (c.status, c.stderr),
        (q.status, q.stderr.replace("qemu-img", "cowimg"))
    );
    both(&s, "c.qcow2", "q.qcow2", &["-c", "s1"]);
    agree(&s, "c.qcow2", "q.qcow2", "bitmap: -c s1");
    both(&s, "c.qcow2", "q.qcow2", &["-d", "made-by-qemu"]);
    agree(&s, "c.qcow2", "q.qcow2", "bitmap: -d made-by-qemu");
}
