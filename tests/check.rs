//! `cowimg check` against `qemu-img check` on a corpus of damaged images that qemu-img and
//! qemu-io make, damaged by byte edits at offsets computed from the headers.
//!
//! For every image: cowimg's exit code and JSON counts equal qemu-img's; after `cowimg check
//! -r all` (and `-r leaks`) the image is no worse for qemu-img than after qemu-img's own
//! repair of a copy, is not marked corrupt, and reads the same guest data, except the ranges
//! cowimg reports lost (mappings it dropped on purpose, see docs/check.md).

mod common;
#[path = "common/fixtures.rs"]
mod fixtures;

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::Scratch;
use cowimg_formats::{qcow2, qed, CheckMode, FileStorage, Image, Storage, ZerosBelow};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Reading and poking images

fn be64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().expect("8 bytes"))
}

fn le64(b: &[u8], at: u64) -> u64 {
    u64::from_le_bytes(b[at as usize..at as usize + 8].try_into().expect("8 bytes"))
}

fn poke(s: &Scratch, img: &str, at: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(s.path(img))
        .expect("open image to damage it");
    f.write_all_at(bytes, at).expect("poke");
}

fn truncate(s: &Scratch, img: &str, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(s.path(img))
        .expect("open")
        .set_len(len)
        .expect("truncate");
}

fn copy(s: &Scratch, from: &str, to: &str) {
    fs::copy(s.path(from), s.path(to)).expect("copy image");
}

/// Where a qcow2 image keeps things, read from its header and first table entries.
struct Q2 {
    cs: u64,
    refcount_order: u32,
    l1: u64,
    reftable: u64,
    refblock: u64,
    l2: u64,
}

impl Q2 {
    fn read(s: &Scratch, img: &str) -> Q2 {
        let b = s.read_file(img);
        let cs = 1u64 << u32::from_be_bytes(b[20..24].try_into().expect("4"));
        let l1 = be64(&b, 40);
        let reftable = be64(&b, 48);
        let refcount_order = if u32::from_be_bytes(b[4..8].try_into().expect("4")) >= 3 {
            u32::from_be_bytes(b[96..100].try_into().expect("4"))
        } else {
            4
        };
        Q2 {
            cs,
            refcount_order,
            l1,
            reftable,
            refblock: be64(&b, reftable) & !0x1ff,
            l2: be64(&b, l1) & 0x00ff_ffff_ffff_fe00,
        }
    }

    /// File offset of L2 entry `i` of the first L2 table.
    fn l2e(&self, i: u64) -> u64 {
        self.l2 + 8 * i
    }

    /// File offset of the 16-bit refcount of host cluster `c` (first refcount block).
    fn rc(&self, c: u64) -> u64 {
        assert_eq!(self.refcount_order, 4, "fixtures use 16-bit refcounts");
        self.refblock + 2 * c
    }

    fn data_cluster(&self, s: &Scratch, img: &str, i: u64) -> u64 {
        (be64(&s.read_file(img), self.l2e(i)) & 0x00ff_ffff_ffff_fe00) / self.cs
    }
}

/// The reference record's qcow2 fixture: 64 MiB, 0xaa on [0, 128k), 0xbb on [1M, 1M+64k).
fn base_qcow2(s: &Scratch, name: &str, opts: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    for o in opts {
        args.extend(["-o", o]);
    }
    args.extend([name, "64M"]);
    s.qemu_img(&args);
    s.qemu_io(
        name,
        &["write -q -P 0xaa 0 128k", "write -q -P 0xbb 1M 64k"],
    );
}

/// The same for QED.
fn base_qed(s: &Scratch, name: &str) {
    s.qemu_img(&["create", "-q", "-f", "qed", name, "64M"]);
    s.qemu_io(
        name,
        &["write -q -P 0xaa 0 128k", "write -q -P 0xbb 1M 64k"],
    );
}

/// QED layout: (cluster size, L1 offset, first L2 table offset).
fn qed_layout(s: &Scratch, img: &str) -> (u64, u64, u64) {
    let b = s.read_file(img);
    let cs = u64::from(u32::from_le_bytes(b[4..8].try_into().expect("4")));
    let l1 = le64(&b, 40);
    (cs, l1, le64(&b, l1))
}

// ---------------------------------------------------------------------------------------------
// The damaged corpus

/// Makes damaged image `name` (and returns the format).
fn make(s: &Scratch, name: &str) -> &'static str {
    let img = name.to_string();
    if name.ends_with(".qed") {
        base_qed(s, &img);
        let (cs, l1, l2) = qed_layout(s, &img);
        let l2e = |i: u64| l2 + 8 * i;
        let data0 = le64(&s.read_file(&img), l2e(0));
        let first_free = fs::metadata(s.path(&img)).expect("size").len();
        match name.trim_end_matches(".qed") {
            "d-leak" => poke(s, &img, l2e(16), &0u64.to_le_bytes()),
            "d-l2eof" => poke(s, &img, l2e(0), &(first_free * 256).to_le_bytes()),
            "d-l2mis" => poke(s, &img, l2e(0), &(data0 + 0x200).to_le_bytes()),
            "d-l1eof" => poke(s, &img, l1, &(first_free * 256).to_le_bytes()),
            "d-l1mis" => poke(s, &img, l1, &(l2 + 0x200).to_le_bytes()),
            "d-dup" => poke(s, &img, l2e(16), &data0.to_le_bytes()),
            "d-table-twice" => poke(s, &img, l1 + 8, &l2.to_le_bytes()),
            // An entry far past the image's end whose "table" is the L1 table itself.
            "d-l1-garbage" => poke(s, &img, l1 + 8 * 5000, &l1.to_le_bytes()),
            "d-needcheck" => poke(s, &img, 16, &2u64.to_le_bytes()),
            "d-needcheck-eof" => {
                poke(s, &img, 16, &2u64.to_le_bytes());
                poke(s, &img, l2e(0), &(first_free * 256).to_le_bytes());
            }
            "d-truncated" => truncate(s, &img, first_free - cs / 2),
            // A partial last cluster ending inside a sector: qemu sees whole sectors, so a
            // whole cluster (a leak).
            "d-partial-tail" => truncate(s, &img, first_free + cs - 125),
            "d-clean" => {}
            other => panic!("unknown QED scenario {other}"),
        }
        return "qed";
    }
    if let Some(kind) = name.strip_prefix("x-") {
        // Extended L2 (16-byte entries: descriptor, then the subcluster bitmap).
        base_qcow2(s, &img, &["extended_l2=on"]);
        let q = Q2::read(s, &img);
        let bitmap_at = |i: u64| q.l2 + 16 * i + 8;
        let b0 = be64(&s.read_file(&img), bitmap_at(0));
        match kind.trim_end_matches(".qcow2") {
            "clean" => {}
            // Subcluster 0 of guest cluster 0 marked allocated and zero at once.
            "both" => poke(s, &img, bitmap_at(0), &(b0 | 1 << 32).to_be_bytes()),
            // An unallocated cluster claiming allocated subclusters.
            "unalloc" => poke(s, &img, bitmap_at(5), &0b101u64.to_be_bytes()),
            other => panic!("unknown extended L2 scenario {other}"),
        }
        return "qcow2";
    }
    base_qcow2(s, &img, &[]);
    let q = Q2::read(s, &img);
    let cs = q.cs;
    let len = fs::metadata(s.path(&img)).expect("size").len();
    let d0 = q.data_cluster(s, &img, 0);
    let copied = |host: u64| (host | 1 << 63).to_be_bytes();
    match name.trim_end_matches(".qcow2") {
        "clean" => {}
        "leak" => poke(s, &img, q.l2e(16), &0u64.to_be_bytes()),
        "rc0" => poke(s, &img, q.rc(d0), &0u16.to_be_bytes()),
        "rc2" => poke(s, &img, q.rc(d0), &2u16.to_be_bytes()),
        "l2eof" => poke(s, &img, q.l2e(0), &copied(len * 512)),
        "l2mis" => poke(s, &img, q.l2e(0), &copied(d0 * cs + 0x200)),
        "l1eof" => poke(s, &img, q.l1, &copied(len * 512)),
        "l1mis" => {
            // As in the reference: the file grows with zeros, the L1 entry points into them.
            truncate(s, &img, len + 2 * cs);
            poke(s, &img, q.l1, &copied(len + 0x200));
        }
        "dup" => poke(s, &img, q.l2e(16), &copied(d0 * cs)),
        "copied" => poke(s, &img, q.l2e(0), &(d0 * cs).to_be_bytes()),
        "rtmis" => poke(s, &img, q.reftable, &(q.refblock + 0x200).to_be_bytes()),
        "dirty" => poke(s, &img, 72, &1u64.to_be_bytes()),
        "corruptbit" => poke(s, &img, 72, &2u64.to_be_bytes()),
        "overlap" => poke(s, &img, q.l2e(0), &copied(q.reftable)),
        "reserved" => poke(
            s,
            &img,
            q.l2e(1),
            &(be64(&s.read_file(&img), q.l2e(1)) | 0x100).to_be_bytes(),
        ),
        "truncated" => truncate(s, &img, len - cs),
        "l2-truncated" => truncate(s, &img, q.l2),
        other => panic!("unknown qcow2 scenario {other}"),
    }
    "qcow2"
}

const QCOW2_CORPUS: &[&str] = &[
    "clean.qcow2",
    "leak.qcow2",
    "rc0.qcow2",
    "rc2.qcow2",
    "l2eof.qcow2",
    "l2mis.qcow2",
    "l1eof.qcow2",
    "l1mis.qcow2",
    "dup.qcow2",
    "copied.qcow2",
    "rtmis.qcow2",
    "dirty.qcow2",
    "corruptbit.qcow2",
    "overlap.qcow2",
    "reserved.qcow2",
    "x-clean.qcow2",
    "x-both.qcow2",
    "x-unalloc.qcow2",
    "truncated.qcow2",
    "l2-truncated.qcow2",
];

const QED_CORPUS: &[&str] = &[
    "d-clean.qed",
    "d-leak.qed",
    "d-l2eof.qed",
    "d-l2mis.qed",
    "d-l1eof.qed",
    "d-l1mis.qed",
    "d-dup.qed",
    "d-table-twice.qed",
    "d-l1-garbage.qed",
    "d-needcheck.qed",
    "d-needcheck-eof.qed",
    "d-truncated.qed",
    "d-partial-tail.qed",
];

/// A lazy-refcounts image whose writer died (qemu-io abort): dirty bit set, refcounts stale.
fn make_lazy_crash(s: &Scratch, name: &str) {
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        name,
        "64M",
    ]);
    let r = s.run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 512",
            "-c",
            "abort",
            name,
        ],
    );
    assert_ne!(r.status, 0, "qemu-io abort should kill qemu-io");
    let b = s.read_file(name);
    assert_eq!(
        be64(&b, 72) & 1,
        1,
        "the crash must leave the dirty bit set"
    );
}

/// A QED image whose allocating writer died: need-check left set.
fn make_qed_crash(s: &Scratch, name: &str) {
    s.qemu_img(&["create", "-q", "-f", "qed", name, "64M"]);
    let r = s.run(
        "qemu-io",
        &[
            "-f",
            "qed",
            "-c",
            "write -P 0x5a 0 512",
            "-c",
            "abort",
            name,
        ],
    );
    assert_ne!(r.status, 0, "qemu-io abort should kill qemu-io");
}

// ---------------------------------------------------------------------------------------------
// Running both tools

/// `check --output=json`: exit status and the JSON object (Null when nothing was printed).
fn json_check(s: &Scratch, program: &str, args: &[&str]) -> (i32, Value) {
    let r = s.run(program, args);
    assert!(
        !r.stderr.contains("panicked"),
        "{program} {args:?} panicked: {}",
        r.stderr
    );
    let v = serde_json::from_str(&r.stdout).unwrap_or(Value::Null);
    (r.status, v)
}

fn qemu_check(s: &Scratch, img: &str) -> (i32, Value) {
    json_check(s, "qemu-img", &["check", "--output=json", img])
}

fn cowimg_check(s: &Scratch, img: &str, extra: &[&str]) -> (i32, Value) {
    let exe = env!("CARGO_BIN_EXE_cowimg");
    json_check(
        s,
        exe,
        &[&["check", "--output", "json"][..], extra, &[img]].concat(),
    )
}

/// qemu's keys only (cowimg's `lost-data` and the file name aside).
fn counts(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("filename");
        o.remove("lost-data");
    }
    v
}

/// How bad an exit status of `check` is: clean < leaks < corruptions < could not check.
fn severity(status: i32) -> u8 {
    match status {
        0 => 0,
        3 => 1,
        2 => 2,
        _ => 3,
    }
}

fn corrupt_bit(s: &Scratch, img: &str) -> bool {
    s.qemu_info(img)["format-specific"]["data"]["corrupt"]
        .as_bool()
        .unwrap_or(false)
}

/// Guest data as qemu reads it (None when qemu cannot read the image).
fn guest_data(s: &Scratch, img: &str, out: &str) -> Option<Vec<u8>> {
    let r = s.run("qemu-img", &["convert", "-O", "raw", img, out]);
    (r.status == 0).then(|| s.read_file(out))
}

/// The guest ranges a cowimg repair reported lost.
fn lost_ranges(v: &Value) -> Vec<(u64, u64)> {
    v["lost-data"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|l| {
                    (
                        l["offset"].as_u64().expect("offset"),
                        l["length"].as_u64().expect("length"),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn mask(data: &mut [u8], ranges: &[(u64, u64)]) {
    for &(o, l) in ranges {
        let a = (o as usize).min(data.len());
        let b = ((o + l) as usize).min(data.len());
        data[a..b].fill(0);
    }
}

/// Repairs a copy with each tool and compares what qemu-img thinks of the results.
fn compare_repair(s: &Scratch, img: &str, mode: &str, reference: &[u8]) {
    let q = format!("q-{mode}-{img}");
    let c = format!("c-{mode}-{img}");
    copy(s, img, &q);
    copy(s, img, &c);
    s.run("qemu-img", &["check", "-r", mode, &q]);
    let (status, report) = cowimg_check(s, &c, &["-r", mode]);
    assert!(
        matches!(status, 0..=3),
        "cowimg check -r {mode} {img}: exit {status}"
    );
    let (qs, _) = qemu_check(s, &q);
    let (cs, cv) = qemu_check(s, &c);
    assert!(
        severity(cs) <= severity(qs),
        "{img} after -r {mode}: qemu-img check says {cs} for cowimg's repair, {qs} for qemu's ({cv})"
    );
    if !corrupt_bit(s, &q) {
        assert!(
            !corrupt_bit(s, &c),
            "{img} after cowimg -r {mode} is marked corrupt"
        );
    }
    assert!(
        !corrupt_bit(s, &c) || mode == "leaks",
        "{img}: corrupt bit left by cowimg -r {mode}"
    );
    // Guest data: what qemu reads after its own repair, or (where qemu cannot read its
    // result) the data before the damage; ranges cowimg reported lost aside.
    let lost = lost_ranges(&report);
    let theirs = guest_data(s, &q, &format!("{q}.raw"));
    let Some(mut mine) = guest_data(s, &c, &format!("{c}.raw")) else {
        // Only where qemu's own repair left the image unreadable too (-r leaks keeps
        // corrupt mappings, as qemu's does).
        assert!(
            theirs.is_none() && mode == "leaks",
            "qemu-img cannot read {img} after cowimg -r {mode}"
        );
        return;
    };
    let mut theirs = theirs.unwrap_or_else(|| reference.to_vec());
    mask(&mut mine, &lost);
    mask(&mut theirs, &lost);
    assert!(
        mine == theirs,
        "{img} after -r {mode}: guest data differs from qemu-img's repair (lost: {lost:?})"
    );
    // Lost ranges read as zeros (no backing file here).
    let mut again = guest_data(s, &c, &format!("{c}.raw2")).expect("readable");
    let before = again.clone();
    mask(&mut again, &lost);
    assert_eq!(
        again, before,
        "{img}: ranges reported lost do not read as zeros"
    );
    // A second repair finds nothing more to do.
    if status == 0 {
        let (again, v) = cowimg_check(s, &c, &["-r", mode]);
        assert_eq!(again, 0, "{img}: second cowimg -r {mode}: {v}");
        assert!(
            v.get("corruptions-fixed").is_none() && v.get("leaks-fixed").is_none(),
            "{img}: {v}"
        );
    }
}

fn corpus_case(name: &str) {
    let s = Scratch::new();
    let ext = if name.ends_with(".qed") {
        "qed"
    } else {
        "qcow2"
    };
    let clean = format!("ref.{ext}");
    if ext == "qed" {
        base_qed(&s, &clean);
    } else if name.starts_with("x-") {
        base_qcow2(&s, &clean, &["extended_l2=on"]);
    } else {
        base_qcow2(&s, &clean, &[]);
    }
    let reference = guest_data(&s, &clean, "ref.raw").expect("clean fixture reads");
    make(&s, name);
    let (qs, qv) = qemu_check(&s, name);
    let (cs, cv) = cowimg_check(&s, name, &[]);
    assert_eq!(
        (cs, counts(&cv)),
        (qs, counts(&qv)),
        "read-only check of {name}"
    );
    for mode in ["leaks", "all"] {
        compare_repair(&s, name, mode, &reference);
    }
}

/// The snapshot table as stored: (entry count, table bytes of `len`).
fn snapshot_table(s: &Scratch, img: &str, len: usize) -> (u32, Vec<u8>) {
    let b = s.read_file(img);
    let n = u32::from_be_bytes(b[60..64].try_into().expect("4 bytes"));
    let at = be64(&b, 64) as usize;
    (n, b[at..at + len].to_vec())
}

/// A v3 snapshot table entry with only 8 bytes of extra data (no disk size): qemu-img check
/// counts a corruption and `-r all` rewrites the table; cowimg must count it the same and
/// write the same table, leaving every snapshot's data as it was.
#[test]
fn incomplete_snapshot_entry_is_counted_and_rewritten_as_qemu_does() {
    let s = Scratch::new();
    let img = "snap.qcow2";
    base_qcow2(&s, img, &[]);
    s.qemu_img(&["snapshot", "-c", "first", img]);
    s.qemu_io(img, &["write -q -P 0xcc 0 64k"]);
    let table_len = common::shrink_snapshot_entry(&s, img);

    let snap_data = |name: &str, out: &str| {
        s.qemu_img(&[
            "convert",
            "-O",
            "raw",
            "-l",
            "snapshot.name=first",
            name,
            out,
        ]);
        s.read_file(out)
    };
    let before = snap_data(img, "before-snap.raw");
    let active = guest_data(&s, img, "before.raw").expect("reads");

    let (qs, qv) = qemu_check(&s, img);
    let (cs, cv) = cowimg_check(&s, img, &[]);
    assert_eq!((cs, counts(&cv)), (qs, counts(&qv)));
    assert_eq!((cs, cv["corruptions"].as_u64()), (2, Some(1)));
    let r = s.cowimg(&["check", img]);
    assert!(
        r.stderr
            .contains("ERROR snapshot table entry 0 is incomplete"),
        "{}",
        r.stderr
    );

    // -r leaks leaves it (a corruption); -r all rewrites the table as qemu does.
    let (status, _) = cowimg_check(&s, img, &["-r", "leaks"]);
    assert_eq!(status, 2);
    copy(&s, img, "qemu.qcow2");
    s.run("qemu-img", &["check", "-r", "all", "qemu.qcow2"]);
    let r = s.cowimg(&["check", "-r", "all", img]);
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("Repairing snapshot table entry 0 is incomplete"),
        "{}",
        r.stderr
    );
    s.assert_clean(img);
    assert_eq!(
        snapshot_table(&s, img, table_len),
        snapshot_table(&s, "qemu.qcow2", table_len)
    );
    assert_eq!(snap_data(img, "after-snap.raw"), before);
    assert_eq!(guest_data(&s, img, "after.raw").expect("reads"), active);
}

/// The same on a lazy-refcounts image left dirty by a killed writer: the repair that clears
/// the dirty bit must also move the table (and not recurse into a repair of its own).
#[test]
fn incomplete_snapshot_entry_of_a_dirty_image_is_repaired() {
    let s = Scratch::new();
    let img = "dirty.qcow2";
    base_qcow2(&s, img, &["lazy_refcounts=on"]);
    s.qemu_img(&["snapshot", "-c", "first", img]);
    common::shrink_snapshot_entry(&s, img);
    poke(&s, img, 72, &1u64.to_be_bytes());
    let active = guest_data(&s, img, "before.raw").expect("reads");
    let r = s.cowimg(&["check", "-r", "all", img]);
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    s.assert_clean(img);
    assert_eq!(guest_data(&s, img, "after.raw").expect("reads"), active);
}

/// Reliability finding 2: a snapshot table that overlaps the header (found by the fuzzer).
/// One `check -r all` must leave no more errors than qemu-img's own repair, and a second
/// pass must find nothing more to change.
#[test]
fn repair_of_overlapping_tables_converges_in_one_pass() {
    let s = Scratch::new();
    let input = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/fuzz/check-repair-overlapping-tables.bin");
    fs::copy(&input, s.path("c.qcow2")).expect("copy the fuzz input");
    fs::copy(&input, s.path("q.qcow2")).expect("copy the fuzz input");
    s.run("qemu-img", &["check", "-r", "all", "q.qcow2"]);
    let (_, by_qemu) = qemu_check(&s, "q.qcow2");
    s.cowimg(&["check", "-r", "all", "c.qcow2"]);
    let (_, once) = qemu_check(&s, "c.qcow2");
    let errors =
        |v: &Value| v["corruptions"].as_u64().unwrap_or(0) + v["leaks"].as_u64().unwrap_or(0);
    assert!(
        errors(&once) <= errors(&by_qemu),
        "cowimg leaves {once}, qemu-img {by_qemu}"
    );
    let after_one = s.read_file("c.qcow2");
    s.cowimg(&["check", "-r", "all", "c.qcow2"]);
    assert_eq!(qemu_check(&s, "c.qcow2").1, once);
    assert!(
        s.read_file("c.qcow2") == after_one,
        "a second repair changed the image"
    );
}

/// The damaged images the differential check fuzzer once found cowimg and qemu-img to
/// disagree on (testdata/fuzz): exit codes and counts must now be qemu-img's.
#[test]
fn fuzz_found_images_check_as_qemu_checks_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/fuzz");
    let mut compared = 0;
    for e in fs::read_dir(&dir).expect("testdata/fuzz") {
        let path = e.expect("entry").path();
        let s = Scratch::new();
        fs::copy(&path, s.path("img")).expect("copy");
        let (qs, qv) = qemu_check(&s, "img");
        if qv.is_null() {
            continue; // qemu-img cannot open it: nothing to compare
        }
        let (cs, cv) = cowimg_check(&s, "img", &[]);
        assert_eq!((cs, counts(&cv)), (qs, counts(&qv)), "{}", path.display());
        compared += 1;
    }
    assert!(compared >= 4, "only {compared} inputs compared");
}

#[test]
fn qcow2_corpus_matches_qemu_and_repairs_no_worse() {
    for name in QCOW2_CORPUS {
        corpus_case(name);
    }
}

#[test]
fn qed_corpus_matches_qemu_and_repairs_no_worse() {
    for name in QED_CORPUS {
        corpus_case(name);
    }
}

#[test]
fn crashed_writers_match_qemu_and_repair() {
    let s = Scratch::new();
    make_lazy_crash(&s, "lazy.qcow2");
    make_qed_crash(&s, "crash.qed");
    for img in ["lazy.qcow2", "crash.qed"] {
        let (qs, qv) = qemu_check(&s, img);
        let (cs, cv) = cowimg_check(&s, img, &[]);
        assert_eq!(
            (cs, counts(&cv)),
            (qs, counts(&qv)),
            "read-only check of {img}"
        );
    }
    // qemu's -r leaks refuses to rebuild refcounts: so does cowimg's (exit 1, no summary).
    copy(&s, "lazy.qcow2", "lazy-l.qcow2");
    let r = s.cowimg(&["check", "-r", "leaks", "lazy-l.qcow2"]);
    assert_eq!(r.status, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("ERROR need to rebuild refcount structures"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("Check failed"), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);

    copy(&s, "lazy.qcow2", "lazy-a.qcow2");
    let r = s.cowimg(&["check", "-r", "all", "lazy-a.qcow2"]);
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("Rebuilding refcount structure"),
        "{}",
        r.stderr
    );
    assert!(
        r.stdout.contains("Double checking the fixed image now..."),
        "{}",
        r.stdout
    );
    s.assert_clean("lazy-a.qcow2");
    assert_eq!(
        be64(&s.read_file("lazy-a.qcow2"), 72) & 1,
        0,
        "dirty bit cleared"
    );
    let r = s.run(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x5a 0 512", "lazy-a.qcow2"],
    );
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
}

/// cowimg writes into a dirty (lazy refcounts) image or a QED image with need-check only
/// after repairing it, as qemu does when it opens one read-write.
#[test]
fn writers_repair_dirty_images_first() {
    let s = Scratch::new();
    make_lazy_crash(&s, "lazy.qcow2");
    make_qed_crash(&s, "crash2.qed");
    for (img, fmt) in [("lazy.qcow2", "qcow2"), ("crash2.qed", "qed")] {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(s.path(img))
            .expect("open");
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file, s.path(img)));
        let image: Box<dyn Image> = match fmt {
            "qcow2" => Box::new(
                qcow2::Qcow2::open(
                    storage,
                    qcow2::OpenOptions {
                        writable: true,
                        ..Default::default()
                    },
                )
                .expect("open"),
            ),
            _ => Box::new(qed::Qed::open(storage, true).expect("open")),
        };
        image
            .write(4 << 20, &[0x77u8; 65536], &ZerosBelow)
            .expect("write repairs first");
        image.commit().expect("commit");
        drop(image);
        s.assert_clean(img);
        let r = s.run(
            "qemu-io",
            &[
                "-f",
                fmt,
                "-c",
                "read -P 0x5a 0 512",
                "-c",
                "read -P 0x77 4M 64k",
                img,
            ],
        );
        assert_eq!(r.status, 0, "{img}: {}{}", r.stdout, r.stderr);
        assert!(!r.stdout.contains("failed"), "{img}: {}", r.stdout);
    }
    let h = s.read_file("lazy.qcow2");
    assert_eq!(be64(&h, 72) & 1, 0, "dirty bit cleared by the repair");
    let h = s.read_file("crash2.qed");
    assert_eq!(le64(&h, 16) & 2, 0, "need-check cleared by the repair");
}

#[test]
fn corrupt_bit_blocks_writes_until_repaired() {
    let s = Scratch::new();
    make(&s, "corruptbit.qcow2");
    // Read-only check works and is clean, as qemu's.
    assert_eq!(cowimg_check(&s, "corruptbit.qcow2", &[]).0, 0);
    let open = |repair: bool| {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(s.path("corruptbit.qcow2"))
            .expect("open");
        let storage: Arc<dyn Storage> =
            Arc::new(FileStorage::new(file, s.path("corruptbit.qcow2")));
        qcow2::Qcow2::open(
            storage,
            qcow2::OpenOptions {
                writable: true,
                repair,
                ..Default::default()
            },
        )
    };
    assert!(
        open(false).is_err(),
        "a corrupt image must not open read-write for writing"
    );
    let img = open(true).expect("opens for repair");
    assert!(
        img.write(0, &[1u8; 512], &ZerosBelow).is_err(),
        "no guest writes before the repair"
    );
    drop(img);
    let r = s.cowimg(&["check", "-r", "all", "corruptbit.qcow2"]);
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    assert!(!corrupt_bit(&s, "corruptbit.qcow2"));
    assert!(open(false).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Clean images of many features

#[test]
fn clean_images_of_many_features_check_clean() {
    let s = Scratch::new();
    s.write_file(
        "pattern.raw",
        &(0..4u32 << 20)
            .map(|i| (i / 4096 % 7) as u8 * (i % 3 != 0) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut images: Vec<String> = Vec::new();
    let mut q = |name: &str, opts: &str, cmds: &[&str]| {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name, "64M"]);
        s.qemu_img(&args);
        if !cmds.is_empty() {
            s.qemu_io(name, cmds);
        }
        images.push(name.to_string());
    };
    let writes = [
        "write -q -P 0x11 0 100k",
        "write -q -P 0x22 3M 64k",
        "write -q -z 5M 1M",
        "write -q -P 3 63M 1k",
    ];
    q("v3.qcow2", "", &writes);
    q("v2.qcow2", "compat=0.10", &writes);
    q("c512.qcow2", "cluster_size=512", &writes);
    q("c4k.qcow2", "cluster_size=4k", &writes);
    q("c2m.qcow2", "cluster_size=2M", &writes);
    q("rc1.qcow2", "refcount_bits=1", &writes);
    q("rc8.qcow2", "refcount_bits=8", &writes);
    q("rc64.qcow2", "refcount_bits=64", &writes);
    q(
        "extl2.qcow2",
        "extended_l2=on",
        &[&writes[..], &["write -q -P 5 8M 4k", "write -q -z 8M 2k"]].concat(),
    );
    q("lazy.qcow2", "lazy_refcounts=on", &writes);
    q("prealloc.qcow2", "preallocation=metadata", &writes);
    q("data.qcow2", "data_file=data.raw", &writes);
    q("snap.qcow2", "", &writes[..2]);
    s.qemu_img(&["snapshot", "-c", "s1", "snap.qcow2"]);
    s.qemu_io(
        "snap.qcow2",
        &["write -q -P 0x33 0 64k", "write -q -P 0x44 10M 128k"],
    );
    s.qemu_img(&["snapshot", "-c", "s2", "snap.qcow2"]);
    s.qemu_io("snap.qcow2", &["write -q -P 0x55 10M 64k"]);
    q("bitmap.qcow2", "", &writes[..1]);
    s.qemu_img(&["bitmap", "--add", "bitmap.qcow2", "b0"]);
    s.qemu_io("bitmap.qcow2", &["write -q -P 0x66 20M 1M"]);
    q(
        "overlay.qcow2",
        "backing_file=v3.qcow2,backing_fmt=qcow2",
        &["write -q -P 0x77 1M 64k"],
    );
    for (name, extra) in [("zlib.qcow2", ""), ("zstd.qcow2", "compression_type=zstd")] {
        let mut args = vec!["convert", "-c", "-O", "qcow2"];
        if !extra.is_empty() {
            args.extend(["-o", extra]);
        }
        args.extend(["pattern.raw", name]);
        s.qemu_img(&args);
        images.push(name.to_string());
    }
    for (name, opts) in [
        ("d.qed", ""),
        ("d4k.qed", "cluster_size=4k,table_size=2"),
        ("d16.qed", "table_size=16"),
        ("dov.qed", "backing_file=v3.qcow2,backing_fmt=qcow2"),
    ] {
        let mut args = vec!["create", "-q", "-f", "qed"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name, "64M"]);
        s.qemu_img(&args);
        s.qemu_io(
            name,
            &[
                "write -q -P 0x11 0 100k",
                "write -q -P 0x22 3M 64k",
                "write -q -z 5M 1M",
            ],
        );
        images.push(name.to_string());
    }
    for img in &images {
        let (qs, qv) = qemu_check(&s, img);
        assert_eq!(qs, 0, "qemu-img check {img}: {qv}");
        let (cs, cv) = cowimg_check(&s, img, &[]);
        assert_eq!((cs, counts(&cv)), (qs, counts(&qv)), "check of clean {img}");
        let r = s.cowimg(&["check", img]);
        assert!(r.stderr.is_empty(), "{img}: {}", r.stderr);
        assert_eq!(
            r.stdout,
            s.qemu_img(&["check", img]),
            "human output for {img}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Command-line behaviour

#[test]
fn raw_missing_and_bad_arguments() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let r = s.cowimg(&["check", "r.raw"]);
    assert_eq!(r.status, 63);
    assert!(
        r.stderr
            .contains("This image format does not support checks"),
        "{}",
        r.stderr
    );
    let r = s.cowimg(&["check", "--output", "json", "r.raw"]);
    assert_eq!((r.status, r.stdout.as_str()), (63, ""));
    let r = s.cowimg(&["check", "nonexistent.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(
        r.stderr.contains("Could not open 'nonexistent.qcow2'"),
        "{}",
        r.stderr
    );
    base_qcow2(&s, "a.qcow2", &[]);
    let r = s.cowimg(&["check", "-r", "bogus", "a.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(
        r.stderr
            .contains("--repair (-r) expects 'leaks' or 'all' not 'bogus'"),
        "{}",
        r.stderr
    );
    // -q: nothing on stdout, same status; problem lines still on stderr.
    make(&s, "leak.qcow2");
    let r = s.cowimg(&["check", "-q", "leak.qcow2"]);
    assert_eq!((r.status, r.stdout.as_str()), (3, ""));
    assert!(r.stderr.contains("Leaked cluster"), "{}", r.stderr);
    // A missing backing file: qemu-img check cannot open the image, nor can cowimg.
    s.qemu_img(&[
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "missing.qcow2",
        "-F",
        "qcow2",
        "nob.qcow2",
        "64M",
    ]);
    let r = s.cowimg(&["check", "nob.qcow2"]);
    assert_eq!(r.status, 1);
    // qemu's line first, unchanged; then what to do about it.
    assert_eq!(
        r.stderr,
        "cowimg: Could not open 'nob.qcow2': Could not open backing file: Could not open 'missing.qcow2': No such file or directory\n\
         hint: to drop the backing file (what it provided is lost): cowimg rebase -u -b \"\" nob.qcow2\n\
         hint: to point it at another file: cowimg rebase -u -b NEW -F FMT nob.qcow2\n"
    );
    // A writer holds the image: check -r refuses, check -U reads.
    let mut child = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "a.qcow2"])
        .current_dir(s.dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let r = s.cowimg(&["check", "-r", "all", "a.qcow2"]);
    assert_eq!(r.status, 1, "{}", r.stderr);
    assert!(r.stderr.contains("lock"), "{}", r.stderr);
    assert_eq!(s.cowimg(&["check", "-U", "a.qcow2"]).status, 0);
    drop(child.stdin.take());
    child.wait().expect("qemu-io exits");
}

/// Human and JSON output of a clean, a leaky and a corrupt image, before and after repair.
#[test]
fn output_snapshots() {
    let s = Scratch::new();
    let mut settings = insta::Settings::clone_current();
    settings.add_filter(r"/tmp/[^\s']*/", "[TMP]/");
    settings.add_filter(&regex_escape(&s.dir.path().to_string_lossy()), "[TMP]");
    let _guard = settings.bind_to_scope();
    for name in ["clean.qcow2", "leak.qcow2", "l2eof.qcow2", "d-l2eof.qed"] {
        make(&s, name);
        copy(&s, name, &format!("r-{name}"));
        copy(&s, name, &format!("j-{name}"));
        let stem = name.replace('.', "_");
        let show = |r: &common::Run| {
            format!(
                "exit: {}\n--- stdout\n{}--- stderr\n{}",
                r.status, r.stdout, r.stderr
            )
        };
        insta::assert_snapshot!(format!("{stem}_human"), show(&s.cowimg(&["check", name])));
        insta::assert_snapshot!(
            format!("{stem}_json"),
            show(&s.cowimg(&["check", "--output", "json", name]))
        );
        insta::assert_snapshot!(
            format!("{stem}_repair_human"),
            show(&s.cowimg(&["check", "-r", "all", &format!("r-{name}")]))
        );
        insta::assert_snapshot!(
            format!("{stem}_repair_json"),
            show(&s.cowimg(&[
                "check",
                "-r",
                "all",
                "--output",
                "json",
                &format!("j-{name}")
            ]))
        );
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            if ".+*?()|[]{}^$\\-".contains(c) {
                format!("\\{c}")
            } else {
                c.to_string()
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Hostile images

/// Random damage to the metadata of real images: cowimg never panics, gives a status of
/// 0..=3 (or a clear open error), and when its repair reports a clean image, qemu-img agrees.
#[test]
fn hostile_images_never_panic() {
    let s = Scratch::new();
    base_qcow2(&s, "h.qcow2", &[]);
    s.qemu_img(&["snapshot", "-c", "s1", "h.qcow2"]);
    s.qemu_io("h.qcow2", &["write -q -P 0xcc 64k 64k"]);
    base_qed(&s, "h.qed");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..120 {
        let src = if round % 3 == 2 { "h.qed" } else { "h.qcow2" };
        let img = format!(
            "x{round}.{}",
            if src.ends_with("qed") { "qed" } else { "qcow2" }
        );
        copy(&s, src, &img);
        let mut data = s.read_file(&img);
        let meta_end = (data.len() as u64).min(0xc0000);
        for _ in 0..1 + next() % 4 {
            // Mostly whole 8-byte entries (the realistic damage), sometimes single bytes.
            let at = next() % meta_end;
            if next() % 2 == 0 {
                let at = (at & !7) as usize;
                let v = match next() % 4 {
                    0 => next(),
                    1 => next() & 0x00ff_ffff_ffff_fe00,
                    2 => (next() % 64) << 16,
                    _ => 0,
                };
                if at + 8 <= data.len() {
                    data[at..at + 8].copy_from_slice(&v.to_be_bytes());
                }
            } else {
                data[at as usize] ^= 1 << (next() % 8);
            }
        }
        fs::write(s.path(&img), &data).expect("write damaged image");
        let r = s.cowimg(&["check", &img]);
        assert!(!r.stderr.contains("panicked"), "{img}: {}", r.stderr);
        assert!(
            matches!(r.status, 0..=3),
            "{img}: exit {}: {}",
            r.status,
            r.stderr
        );
        let r = s.cowimg(&["check", "-r", "all", "--output", "json", &img]);
        assert!(!r.stderr.contains("panicked"), "{img} -r all: {}", r.stderr);
        assert!(
            matches!(r.status, 0..=3),
            "{img} -r all: exit {}: {}",
            r.status,
            r.stderr
        );
        if r.status == 0 {
            let q = s.run("qemu-img", &["check", &img]);
            assert_eq!(
                q.status, 0,
                "{img}: cowimg repaired it but qemu-img says: {}{}",
                q.stdout, q.stderr
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Interrupted repairs

/// Storage that simulates a crash after a number of writes: with `lose_unsynced`, the writes
/// since the last sync are lost too (power failure); otherwise they all reached the disk.
#[derive(Debug)]
struct Crashing {
    inner: FileStorage,
    budget: Mutex<u64>,
    lose_unsynced: bool,
    pending: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl Crashing {
    fn spend(&self) -> io::Result<()> {
        let mut b = self.budget.lock().expect("lock");
        if *b == 0 {
            return Err(io::Error::other("simulated crash"));
        }
        *b -= 1;
        Ok(())
    }
}

impl Storage for Crashing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)?;
        for (at, data) in self.pending.lock().expect("lock").iter() {
            let (a, b) = (
                offset.max(*at),
                (offset + buf.len() as u64).min(at + data.len() as u64),
            );
            if a < b {
                buf[(a - offset) as usize..(b - offset) as usize]
                    .copy_from_slice(&data[(a - at) as usize..(b - at) as usize]);
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.spend()?;
        if self.lose_unsynced {
            self.pending
                .lock()
                .expect("lock")
                .push((offset, buf.to_vec()));
            Ok(())
        } else {
            self.inner.write_at(buf, offset)
        }
    }
    fn sync(&self) -> io::Result<()> {
        self.spend()?;
        for (at, data) in self.pending.lock().expect("lock").drain(..) {
            self.inner.write_at(&data, at)?;
        }
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        let pending = self.pending.lock().expect("lock");
        let end = pending
            .iter()
            .map(|(a, d)| a + d.len() as u64)
            .max()
            .unwrap_or(0);
        Ok(self.inner.len()?.max(end))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.spend()?;
        self.inner.set_len(len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// Interrupts `check -r all` after every possible number of writes: the image is never
/// worse for qemu-img than before, and keeps its guest data (outside reported losses).
#[test]
fn interrupted_repairs_leave_the_image_no_worse() {
    let s = Scratch::new();
    for name in [
        "leak.qcow2",
        "rc0.qcow2",
        "rtmis.qcow2",
        "l2eof.qcow2",
        "dup.qcow2",
        "d-l2eof.qed",
        "d-dup.qed",
    ] {
        make(&s, name);
        let (before, _) = qemu_check(&s, name);
        let data_before = guest_data(&s, name, "before.raw");
        // Lost ranges of a complete repair (masked in the comparisons).
        copy(&s, name, "full.img");
        let (_, full) = cowimg_check(&s, "full.img", &["-r", "all"]);
        let lost = lost_ranges(&full);
        for lose_unsynced in [false, true] {
            let mut done = false;
            for budget in 0..400u64 {
                let img = format!("i-{name}");
                copy(&s, name, &img);
                let file = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(s.path(&img))
                    .expect("open");
                let storage = Arc::new(Crashing {
                    inner: FileStorage::new(file, s.path(&img)),
                    budget: Mutex::new(budget),
                    lose_unsynced,
                    pending: Mutex::new(Vec::new()),
                });
                let finished = {
                    let image: Box<dyn Image> = if name.ends_with(".qed") {
                        Box::new(qed::Qed::open(storage, true).expect("open"))
                    } else {
                        let opts = qcow2::OpenOptions {
                            writable: true,
                            repair: true,
                            ..Default::default()
                        };
                        Box::new(qcow2::Qcow2::open(storage, opts).expect("open"))
                    };
                    image.check(CheckMode::RepairAll).is_ok()
                };
                let (after, v) = qemu_check(&s, &img);
                assert!(
                    severity(after) <= severity(before),
                    "{name} interrupted after {budget} writes (lose unsynced: {lose_unsynced}): qemu-img check {after} (was {before}): {v}"
                );
                if let (Some(mut want), Some(mut got)) =
                    (data_before.clone(), guest_data(&s, &img, "after.raw"))
                {
                    mask(&mut want, &lost);
                    mask(&mut got, &lost);
                    assert!(
                        want == got,
                        "{name} interrupted after {budget} writes: guest data changed"
                    );
                }
                if finished {
                    done = true;
                    break;
                }
            }
            assert!(
                done,
                "{name}: the repair never finished within the write budget"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scale

/// Memory and time follow the host file, not the virtual size: a 1 TiB image holding some
/// data spread over its whole range checks in well under a few seconds.
#[test]
fn large_sparse_image_checks_fast() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "big.qcow2", "1T"]);
    let cmds: Vec<String> = (0..32u64)
        .map(|i| format!("write -q -P {} {} 4M", i + 1, i * (32u64 << 30) + (7 << 20)))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
    s.qemu_io("big.qcow2", &refs);
    let t = std::time::Instant::now();
    let (cs, cv) = cowimg_check(&s, "big.qcow2", &[]);
    let took = t.elapsed();
    let (qs, qv) = qemu_check(&s, "big.qcow2");
    assert_eq!((cs, counts(&cv)), (qs, counts(&qv)));
    assert!(
        took.as_secs_f64() < 3.0,
        "check of a 1 TiB sparse image took {took:?}"
    );
}

/// Images qemu-img refuses to open, or whose check fails, each made from a clean image by one
/// edit. Returns (name, what was done).
fn refused_by_qemu(s: &Scratch) -> Vec<(String, &'static str)> {
    base_qcow2(s, "clean.qcow2", &[]);
    let clean = s.read_file("clean.qcow2");
    let mut out = Vec::new();
    let mut save = |name: &str, what: &'static str, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = clean.clone();
        edit(&mut b);
        s.write_file(name, &b);
        out.push((name.to_string(), what));
    };
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let autoclear = |b: &mut Vec<u8>, bit: u64| {
        let v = be64(b, 88) | bit;
        b[88..96].copy_from_slice(&v.to_be_bytes());
    };
    // Snapshot table offsets qemu's table validation refuses, though there are no snapshots.
    save(
        "snap_unaligned.qcow2",
        "no snapshots, table offset not cluster-aligned",
        &|b| put64(b, 64, 0x12345),
    );
    save(
        "snap_i64.qcow2",
        "no snapshots, table offset beyond i64",
        &|b| put64(b, 64, 1 << 63),
    );
    save(
        "snap1_unaligned.qcow2",
        "one snapshot at an unaligned offset",
        &|b| {
            put32(b, 60, 1);
            put64(b, 64, 0x12345);
        },
    );
    save("dfraw.qcow2", "data-file-raw bit, no data file", &|b| {
        autoclear(b, 2)
    });
    let bitmaps = |count: u32, reserved: u32, size: u64, offset: u64| {
        let mut e = Vec::new();
        e.extend_from_slice(&count.to_be_bytes());
        e.extend_from_slice(&reserved.to_be_bytes());
        e.extend_from_slice(&size.to_be_bytes());
        e.extend_from_slice(&offset.to_be_bytes());
        e
    };
    for (name, what, ext, bit) in [
        (
            "bm_zero.qcow2",
            "bitmaps extension with zero bitmaps",
            bitmaps(0, 0, 0, 0),
            true,
        ),
        (
            "bm_unaligned.qcow2",
            "bitmap directory unaligned",
            bitmaps(1, 0, 4096, 0x123),
            true,
        ),
        (
            "bm_reserved.qcow2",
            "bitmaps extension reserved field",
            bitmaps(1, 7, 4096, 0x10000),
            true,
        ),
        (
            "bm_many.qcow2",
            "too many bitmaps",
            bitmaps(70000, 0, 4096, 0x10000),
            true,
        ),
        (
            "bm_huge_dir.qcow2",
            "bitmap directory too large",
            bitmaps(1, 0, 1 << 30, 0x10000),
            true,
        ),
        (
            "bm_short.qcow2",
            "bitmaps extension too short",
            bitmaps(1, 0, 0, 0)[..8].to_vec(),
            true,
        ),
        (
            "bm_short_stale.qcow2",
            "short bitmaps extension, no autoclear bit",
            bitmaps(1, 0, 0, 0)[..8].to_vec(),
            false,
        ),
    ] {
        save(name, what, &|b| {
            fixtures::add_extension(b, 0x2385_2875, &ext);
            if bit {
                autoclear(b, 1);
            }
        });
    }
    save(
        "ext_huge.qcow2",
        "extension longer than the header cluster",
        &|b| {
            fixtures::add_extension(b, 0x1234_5678, &[1, 2, 3, 4]);
            let at = be32_at(b, 100) as usize;
            put32(b, at + 4, 1 << 20);
        },
    );
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "nobacking.qcow2",
        "64M",
    ]);
    out.push(("nobacking.qcow2".into(), "backing file missing"));
    // A v2 image whose backing name starts 4 bytes after the fixed header: an extension
    // header cannot fit before it.
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "base.qcow2",
        "64M",
    ]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "v2.qcow2",
    ]);
    let mut b = s.read_file("v2.qcow2");
    let name_at = be64(&b, 8) as usize;
    let len = be32_at(&b, 16) as usize;
    let name = b[name_at..name_at + len].to_vec();
    b[72..name_at + len].fill(0);
    b[76..76 + len].copy_from_slice(&name);
    b[8..16].copy_from_slice(&76u64.to_be_bytes());
    s.write_file("v2_ext_cut.qcow2", &b);
    out.push((
        "v2_ext_cut.qcow2".into(),
        "extension header cut by the backing name",
    ));
    out
}

fn be32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// What qemu-img refuses, cowimg refuses with the same status and message (`check`, `check
/// -r all`, `map`); nothing qemu cannot open is called clean.
#[test]
fn images_qemu_cannot_open_are_refused_as_qemu_refuses_them() {
    let s = Scratch::new();
    for (img, what) in refused_by_qemu(&s) {
        for args in [vec!["check"], vec!["check", "-r", "all"], vec!["map"]] {
            let (q, c) = (format!("q-{img}"), format!("c-{img}"));
            copy(&s, &img, &q);
            copy(&s, &img, &c);
            let mut qa = args.clone();
            qa.push(&q);
            let mut ca = args.clone();
            ca.push(&c);
            let qr = s.run("qemu-img", &qa);
            let cr = s.cowimg(&ca);
            let _ = (fs::remove_file(s.path(&q)), fs::remove_file(s.path(&c)));
            assert_ne!(qr.status, 0, "qemu-img {qa:?} accepts {img} ({what})");
            let want = qr.stderr.replace("qemu-img", "cowimg").replace(&q, &c);
            // qemu's message exactly, then cowimg's hint lines: only a missing backing file
            // has one (a new pointer), which names the image.
            let (said, hints): (Vec<&str>, Vec<&str>) =
                cr.stderr.lines().partition(|l| !l.starts_with("hint: "));
            let said: String = said.iter().map(|l| format!("{l}\n")).collect();
            assert_eq!(
                (cr.status, said.as_str()),
                (qr.status, want.as_str()),
                "{img} ({what}), {args:?}: qemu-img said {}{}",
                qr.stdout,
                qr.stderr
            );
            let want_hints = if img == "nobacking.qcow2" {
                vec![
                    format!("hint: to drop the backing file (what it provided is lost): cowimg rebase -u -b \"\" {c}"),
                    format!("hint: to point it at another file: cowimg rebase -u -b NEW -F FMT {c}"),
                ]
            } else {
                vec![]
            };
            assert_eq!(hints, want_hints, "{img} ({what}), {args:?}");
        }
    }
}

/// A qcow2 file cut short in or before an L2 table: qemu reads the missing table part as zeros
/// (its entries unallocated) and qemu-img check -r all leaves the image as it is. cowimg
/// refuses to read it and hints `check -r all`; running exactly the hinted command makes the
/// image check clean (qemu-img and cowimg) and read byte for byte as qemu read it, with a
/// backing file too (the lost ranges read from it, as in qemu).
#[test]
fn cut_l2_tables_are_repaired_as_the_hint_says() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    s.qemu_io("base.qcow2", &["write -q -P 0x11 0 4M"]);
    // 4 KiB clusters: an L2 table of 512 entries maps 2 MiB. Entries 0..8 and 256..264 of
    // the first table are used (bytes 0..64 and 2048..2112 of it).
    let cases: &[(&str, bool, u64)] = &[
        ("before the table", false, 0),
        ("inside the used entries", false, 40),
        ("inside the table, between the used entries", false, 1024),
        ("before the table, over a backing file", true, 0),
        ("inside the table, over a backing file", true, 1024),
    ];
    for (i, &(what, backing, cut)) in cases.iter().enumerate() {
        let img = format!("t{i}.qcow2");
        let mut create = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k"];
        if backing {
            create.extend(["-b", "base.qcow2", "-F", "qcow2", &img]);
        } else {
            create.extend([img.as_str(), "4M"]);
        }
        s.qemu_img(&create);
        s.qemu_io(&img, &["write -q -P 0x55 0 32k", "write -q -P 0x66 1M 32k"]);
        let l2 = Q2::read(&s, &img).l2;
        fs::OpenOptions::new()
            .write(true)
            .open(s.path(&img))
            .unwrap()
            .set_len(l2 + cut)
            .unwrap();
        let q = format!("q{i}.qcow2");
        copy(&s, &img, &q);
        s.run("qemu-img", &["check", "-r", "all", &q]);
        assert_eq!(s.read_file(&q), s.read_file(&img), "{what}: qemu's repair");
        s.qemu_img(&["convert", "-O", "raw", &q, "qemu.raw"]);

        let r = s.cowimg(&["convert", "-O", "raw", &img, "c.raw"]);
        assert_eq!(r.status, 1, "{what}: {}", r.stderr);
        let lines: Vec<&str> = r.stderr.lines().collect();
        let hint = format!(
            "hint: to repair it: cowimg check -r all {img} (what the missing metadata mapped is lost; the image then reads as qemu reads it)"
        );
        assert_eq!(
            lines,
            [
                format!(
                    "cowimg: {img}: image is corrupt: L2 table at {l2:#x} lies past the end of the file ({} bytes)",
                    l2 + cut
                ),
                hint.clone()
            ],
            "{what}"
        );
        // The hinted command, as printed.
        let cmd = hint["hint: to repair it: cowimg ".len()..]
            .split(" (")
            .next()
            .unwrap();
        let r = s.cowimg(&cmd.split(' ').collect::<Vec<_>>());
        assert_eq!(r.status, 0, "{what}: {}{}", r.stdout, r.stderr);
        if i == 2 {
            insta::assert_snapshot!("cut_l2_table_repair", r.show());
        }
        s.assert_clean(&img);
        s.cowimg_ok(&["check", &img]);
        s.cowimg_ok(&["convert", "-O", "raw", &img, "c.raw"]);
        assert!(
            s.read_file("c.raw") == s.read_file("qemu.raw"),
            "{what}: cowimg reads the repaired image otherwise than qemu read the cut one"
        );
        s.qemu_img(&["convert", "-O", "raw", &img, "q2.raw"]);
        assert!(
            s.read_file("q2.raw") == s.read_file("qemu.raw"),
            "{what}: qemu reads the repaired image otherwise than the cut one"
        );
    }
}

/// An image marked corrupt (qemu's corrupt bit) is refused by every command that writes, with
/// qemu-img's first line and a hint naming the repair; running exactly the hinted command
/// clears it (as qemu-img check -r all does), and the command then succeeds with the image
/// checking clean and holding its data.
#[test]
fn images_marked_corrupt_are_repaired_as_the_hint_says() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    s.qemu_io("base.qcow2", &["write -q -P 0x22 0 1M"]);
    let commands: &[&[&str]] = &[
        &["resize", "IMG", "2M"],
        &["amend", "--copy-on-read=on", "IMG"],
        &["stream", "IMG"],
        &["commit", "-d", "IMG"],
        &["rebase", "-u", "-b", "", "IMG"],
    ];
    for (i, cmd) in commands.iter().enumerate() {
        let img = format!("c{i}.qcow2");
        s.qcow2_overlay("base.qcow2", &img);
        s.qemu_io(&img, &["write -q -P 0x55 64k 64k"]);
        // The corrupt bit: incompatible feature bit 1 (header bytes 72..80).
        let mut b = s.read_file(&img);
        b[79] |= 2;
        s.write_file(&img, &b);
        let args: Vec<&str> = cmd
            .iter()
            .map(|a| if *a == "IMG" { img.as_str() } else { a })
            .collect();
        let r = s.cowimg(&args);
        assert_eq!(r.status, 1, "{cmd:?}: {}", r.show());
        let theirs = s.run("qemu-img", &["resize", &img, "2M"]);
        assert_eq!(
            r.stderr
                .lines()
                .next()
                .map(|l| l.replacen("cowimg: ", "", 1)),
            theirs
                .stderr
                .lines()
                .next()
                .map(|l| l.replacen("qemu-img: ", "", 1)),
            "{cmd:?}: qemu-img's words"
        );
        let hint = r
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("hint: to repair it: cowimg "))
            .unwrap_or_else(|| panic!("{cmd:?}: no repair hint in {}", r.stderr));
        assert_eq!(hint, format!("check -r all {img}"), "{cmd:?}");
        assert_eq!(s.read_file(&img), b, "{cmd:?}: refused, nothing written");
        s.cowimg_ok(&hint.split(' ').collect::<Vec<_>>());
        s.cowimg_ok(&args);
        s.assert_clean(&img);
        s.qemu_img(&["convert", "-O", "raw", &img, "got.raw"]);
        let got = s.read_file("got.raw");
        // (rebase -u -b "" drops the base: its part then reads zeros.)
        let below = if cmd[0] == "rebase" { 0 } else { 0x22 };
        assert!(got[..64 << 10].iter().all(|&x| x == below), "{cmd:?}");
        assert!(
            got[64 << 10..128 << 10].iter().all(|&x| x == 0x55),
            "{cmd:?}"
        );
    }
}
