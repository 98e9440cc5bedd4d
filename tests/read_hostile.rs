//! Bad input: truncated and damaged images, hostile headers, broken backing chains.
//!
//! Every case must end in an error that names the image and the problem, with exit status 1
//! (2 for `compare`), and never in a panic, a hang or a huge allocation: each command runs
//! under a time limit and an address-space limit, so either shows up as a failure.
//! Images are made by qemu-img/qemu-io and then damaged byte by byte.

mod common;
#[path = "common/fixtures.rs"]
mod fixtures;

use common::{Run, Scratch};

/// Address space a command may use (KiB): far more than any valid use here needs, far less
/// than what a hostile size field would make a careless reader allocate.
const MEMORY_KIB: u64 = 1 << 20;
/// Seconds a command may take.
const SECONDS: u64 = 30;

/// Runs cowimg under the limits.
fn cowimg(s: &Scratch, args: &[&str]) -> Run {
    let script = format!("ulimit -v {MEMORY_KIB}; exec timeout {SECONDS} \"$0\" \"$@\"");
    let mut all = vec!["-c", script.as_str(), env!("CARGO_BIN_EXE_cowimg")];
    all.extend_from_slice(args);
    s.run("sh", &all)
}

/// The reading commands, each with the exit status its errors have.
fn commands(image: &str) -> Vec<(Vec<&str>, i32)> {
    vec![
        (vec!["info", image], 1),
        (vec!["info", "--output", "json", image], 1),
        (vec!["info", "--backing-chain", image], 1),
        (vec!["map", "--output", "json", image], 1),
        (vec!["map", image], 1),
        (vec!["convert", "-O", "raw", image, "out.raw"], 1),
        (vec!["compare", image, image], 2),
    ]
}

/// Asserts that a run failed cleanly: the expected status, a message naming `image` and
/// containing every one of `words`, no panic, no signal, and no hint.
fn assert_refused(r: &Run, what: &str, image: &str, status: i32, words: &[&str]) {
    assert_refused_with(r, what, image, status, words, &[])
}

/// The hints after a missing or looping backing file: change the pointer of `image`.
fn repoint(image: &str) -> Vec<String> {
    vec![
        format!("hint: to drop the backing file (what it provided is lost): cowimg rebase -u -b \"\" {image}"),
        format!("hint: to point it at another file: cowimg rebase -u -b NEW -F FMT {image}"),
    ]
}

/// The hint after metadata past the end of the file that `check -r all` repairs.
fn repair(image: &str) -> Vec<String> {
    vec![format!("hint: to repair it: cowimg check -r all {image} (what the missing metadata mapped is lost; the image then reads as qemu reads it)")]
}

/// As [`assert_refused`], the one-line error followed by exactly the lines `hints`.
fn assert_refused_with(
    r: &Run,
    what: &str,
    image: &str,
    status: i32,
    words: &[&str],
    hints: &[String],
) {
    assert!(
        !r.stderr.contains("panicked"),
        "{what}: panic:\n{}",
        r.stderr
    );
    assert_ne!(r.status, 124, "{what}: did not finish in {SECONDS}s");
    assert_eq!(
        r.status, status,
        "{what}: status {} (stdout {:?}, stderr {:?})",
        r.status, r.stdout, r.stderr
    );
    assert!(
        r.stderr.contains(image),
        "{what}: the message does not name {image}: {}",
        r.stderr
    );
    for w in words {
        assert!(
            r.stderr.contains(w),
            "{what}: the message does not say {w:?}: {}",
            r.stderr
        );
    }
    let (error, got): (Vec<&str>, Vec<&str>) =
        r.stderr.lines().partition(|l| !l.starts_with("hint: "));
    assert_eq!(
        error.len(),
        1,
        "{what}: one line of error expected: {}",
        r.stderr
    );
    assert_eq!(got, hints, "{what}: hints");
}

/// Every reading command must refuse `image` with a message containing `words`.
fn all_refuse(s: &Scratch, image: &str, words: &[&str]) {
    for (args, status) in commands(image) {
        let r = cowimg(s, &args);
        assert_refused(&r, &format!("cowimg {args:?}"), image, status, words);
    }
}

/// Commands that need the image's tables (not plain `info`) must refuse it; plain `info`
/// (header only, as qemu-img info) must succeed.
fn data_commands_refuse(s: &Scratch, image: &str, words: &[&str]) {
    data_commands_refuse_with(s, image, words, &[])
}

/// As [`data_commands_refuse`], each refusal followed by exactly the lines `hints`.
fn data_commands_refuse_with(s: &Scratch, image: &str, words: &[&str], hints: &[String]) {
    for (args, status) in commands(image) {
        let r = cowimg(s, &args);
        let what = format!("cowimg {args:?}");
        if args[0] == "info" && !args.contains(&"--backing-chain") {
            assert!(
                !r.stderr.contains("panicked"),
                "{what}: panic:\n{}",
                r.stderr
            );
            assert_eq!(r.status, 0, "{what}: {}", r.stderr);
        } else if args[0] == "info" {
            assert_eq!(r.status, 0, "{what}: {}", r.stderr);
        } else {
            assert_refused_with(&r, &what, image, status, words, hints);
        }
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn put_le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_le64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A qcow2 image with data in clusters 0-1 and a compressed cluster at 1 MiB (64 KiB
/// clusters: header, refcount table, refcount block, L1, then L2 at 0x40000).
fn qcow2_image(s: &Scratch, name: &str) -> Vec<u8> {
    s.qemu_img(&["create", "-q", "-f", "qcow2", name, "8M"]);
    s.qemu_io(
        name,
        &["write -q -P 0x11 0 128k", "write -q -c -P 0x22 1M 64k"],
    );
    s.read_file(name)
}

/// The L2 table offset (L1 entry 0) of a qcow2 image.
fn l2_offset(b: &[u8]) -> usize {
    let l1 = be64(b, 40) as usize;
    (be64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize
}

/// Writes `b` as `name` after `edit` changed it.
fn damaged(s: &Scratch, name: &str, mut b: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) {
    edit(&mut b);
    s.write_file(name, &b);
}

#[test]
fn truncated_qcow2_headers_are_refused() {
    let s = Scratch::new();
    let b = qcow2_image(&s, "full.qcow2");
    // Inside the fixed header: the magic says qcow2, the rest is missing.
    s.write_file("t50.qcow2", &b[..50]);
    all_refuse(&s, "t50.qcow2", &["qcow2"]);
    // The header cluster only: refcount table and L1 table lie past the end.
    s.write_file("t64k.qcow2", &b[..65536]);
    all_refuse(&s, "t64k.qcow2", &["past the end of the file"]);
}

#[test]
fn truncated_qcow2_data_is_refused_where_it_is_needed() {
    let s = Scratch::new();
    let b = qcow2_image(&s, "full.qcow2");
    let l2 = l2_offset(&b);
    // Up to the L2 table: the header's tables are there, the L2 table is not.
    s.write_file("tl2.qcow2", &b[..l2 + 100]);
    data_commands_refuse_with(
        &s,
        "tl2.qcow2",
        &["L2 table", "past the end of the file"],
        &repair("tl2.qcow2"),
    );
}

#[test]
fn qcow2_tables_past_the_end_are_refused() {
    let s = Scratch::new();
    let b = qcow2_image(&s, "full.qcow2");
    damaged(&s, "l1eof.qcow2", b.clone(), |b| put_be64(b, 40, 1 << 40));
    all_refuse(&s, "l1eof.qcow2", &["L1 table", "past the end of the file"]);
    damaged(&s, "rteof.qcow2", b.clone(), |b| put_be64(b, 48, 1 << 40));
    all_refuse(
        &s,
        "rteof.qcow2",
        &["eference count table", "past the end of the file"],
    );
    damaged(&s, "l2eof.qcow2", b.clone(), |b| {
        let l1 = be64(b, 40) as usize;
        put_be64(b, l1, 0x8000_0000_0000_0000 | 1 << 40);
    });
    data_commands_refuse_with(
        &s,
        "l2eof.qcow2",
        &["L2 table", "past the end of the file"],
        &repair("l2eof.qcow2"),
    );
}

#[test]
fn misaligned_qcow2_offsets_are_refused() {
    let s = Scratch::new();
    let b = qcow2_image(&s, "full.qcow2");
    damaged(&s, "l1mis.qcow2", b.clone(), |b| {
        let v = be64(b, 40);
        put_be64(b, 40, v + 512)
    });
    all_refuse(&s, "l1mis.qcow2", &["L1 table offset invalid"]);
    damaged(&s, "rtmis.qcow2", b.clone(), |b| {
        let v = be64(b, 48);
        put_be64(b, 48, v + 512)
    });
    all_refuse(&s, "rtmis.qcow2", &["eference count table offset invalid"]);
    damaged(&s, "l2mis.qcow2", b.clone(), |b| {
        let l1 = be64(b, 40) as usize;
        let v = be64(b, l1);
        put_be64(b, l1, v + 512);
    });
    data_commands_refuse(&s, "l2mis.qcow2", &["L2 table offset", "unaligned"]);
    damaged(&s, "datamis.qcow2", b.clone(), |b| {
        let l2 = l2_offset(b);
        let v = be64(b, l2);
        put_be64(b, l2, v + 512);
    });
    data_commands_refuse(&s, "datamis.qcow2", &["offset", "unaligned"]);
}

#[test]
fn absurd_qcow2_sizes_are_refused_before_allocating() {
    let s = Scratch::new();
    let b = qcow2_image(&s, "full.qcow2");
    damaged(&s, "l1huge.qcow2", b.clone(), |b| put_be32(b, 36, u32::MAX));
    all_refuse(&s, "l1huge.qcow2", &["L1 table too large"]);
    damaged(&s, "l1small.qcow2", b.clone(), |b| put_be64(b, 24, 1 << 50));
    all_refuse(&s, "l1small.qcow2", &["L1 table is too small"]);
    damaged(&s, "rthuge.qcow2", b.clone(), |b| put_be32(b, 56, u32::MAX));
    all_refuse(&s, "rthuge.qcow2", &["eference count table too large"]);
    damaged(&s, "cbits.qcow2", b.clone(), |b| put_be32(b, 20, 31));
    all_refuse(&s, "cbits.qcow2", &["cluster size"]);
    damaged(&s, "rorder.qcow2", b.clone(), |b| put_be32(b, 96, 7));
    all_refuse(&s, "rorder.qcow2", &["entry width", "64 bits"]);
    damaged(&s, "hdrlen.qcow2", b.clone(), |b| put_be32(b, 100, 1 << 30));
    all_refuse(&s, "hdrlen.qcow2", &["header"]);
    damaged(&s, "extlen.qcow2", b.clone(), |b| {
        // The feature name table's length field.
        let at = be32(b, 100) as usize + 4;
        put_be32(b, at, u32::MAX);
    });
    all_refuse(&s, "extlen.qcow2", &["Header extension too large"]);
    damaged(&s, "snaps.qcow2", b.clone(), |b| {
        put_be32(b, 60, u32::MAX);
        put_be64(b, 64, 0x10000);
    });
    all_refuse(&s, "snaps.qcow2", &["Too many snapshots"]);
    damaged(&s, "snapeof.qcow2", b.clone(), |b| {
        put_be32(b, 60, 3);
        put_be64(b, 64, 1 << 40);
    });
    all_refuse(&s, "snapeof.qcow2", &["Snapshot table"]);
}

#[test]
fn compressed_clusters_past_the_end_are_refused() {
    let s = Scratch::new();
    let b = qcow2_image(&s, "full.qcow2");
    damaged(&s, "ceof.qcow2", b.clone(), |b| {
        let l2 = l2_offset(b);
        let entry = be64(b, l2 + 16 * 8);
        assert_ne!(entry & 1 << 62, 0, "cluster 16 is compressed");
        // Keep the sector count, move the data far past the end (bits 0..54 for 64 KiB).
        put_be64(b, l2 + 16 * 8, (entry & !((1 << 54) - 1)) | 1 << 40);
    });
    for (args, status) in commands("ceof.qcow2") {
        if args[0] == "info" {
            continue;
        }
        let r = cowimg(&s, &args);
        if args[0] == "map" {
            // Only the descriptor is reported: qemu-img map shows it without reading it.
            assert_eq!(
                r.status,
                if args.len() == 2 { 1 } else { 0 },
                "{args:?}: {}",
                r.stderr
            );
            continue;
        }
        assert_refused(
            &r,
            &format!("{args:?}"),
            "ceof.qcow2",
            status,
            &["compressed cluster", "past the end"],
        );
    }
}

#[test]
fn unknown_features_and_encryption_are_refused_by_name() {
    let s = Scratch::new();
    let b = qcow2_image(&s, "full.qcow2");
    // Incompatible bit 9, named by the feature name table? qemu's table names bits 0-4; an
    // unnamed bit is shown by number, as qemu does.
    damaged(&s, "incompat.qcow2", b.clone(), |b| b[78] |= 0x02);
    all_refuse(&s, "incompat.qcow2", &["Unknown incompatible feature: 200"]);
    // A bit the feature name table names is refused by its name.
    damaged(&s, "named.qcow2", b.clone(), |b| {
        b[78] |= 0x02;
        let ext = be32(b, 100) as usize;
        assert_eq!(be32(b, ext), 0x6803_f857, "feature name table first");
        // Rename entry 0 ("dirty bit", incompatible bit 0) to name bit 9.
        b[ext + 8 + 1] = 9;
        b[ext + 8 + 2..ext + 8 + 48].fill(0);
        b[ext + 8 + 2..ext + 8 + 2 + 13].copy_from_slice(b"shiny feature");
    });
    all_refuse(&s, "named.qcow2", &["shiny feature"]);
    // LUKS encryption (made by qemu-img itself).
    let secret = "--object=secret,id=sec0,data=password";
    s.qemu_img(&[
        "create",
        secret,
        "-q",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        "luks.qcow2",
        "8M",
    ]);
    all_refuse(&s, "luks.qcow2", &["encryption", "LUKS"]);
    // The old AES method (crypt_method 1): a header field.
    damaged(&s, "aes.qcow2", b.clone(), |b| put_be32(b, 32, 1));
    all_refuse(&s, "aes.qcow2", &["encryption", "AES"]);
}

#[test]
fn other_formats_are_refused_by_name() {
    let s = Scratch::new();
    for (fmt, opts) in [
        ("vmdk", ""),
        ("vpc", ""),
        ("vhdx", ""),
        ("vdi", ""),
        ("qcow", ""),
        ("parallels", ""),
    ] {
        let name = format!("img.{fmt}");
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name.as_str(), "4M"]);
        s.qemu_img(&args);
        all_refuse(&s, &name, &[&format!("'{fmt}'"), "not supported"]);
    }
    // As a backing file, recorded or probed.
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "img.vmdk", "-F", "vmdk", "ov.qcow2",
    ]);
    chain_refused(&s, "ov.qcow2", &["'vmdk'", "not supported"], &[]);
    s.qemu_img(&[
        "create", "-q", "-f", "qed", "-b", "img.vpc", "-F", "vpc", "ov.qed",
    ]);
    chain_refused(&s, "ov.qed", &["'vpc'", "not supported"], &[]);
}

#[test]
fn qed_damage_is_refused() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qed", "q.qed", "8M"]);
    s.qemu_io("q.qed", &["write -q -P 0x11 0 128k"]);
    let b = s.read_file("q.qed");
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    s.write_file("t.qed", &b[..100]);
    all_refuse(&s, "t.qed", &["QED"]);
    damaged(&s, "tsize.qed", b.clone(), |b| put_le32(b, 8, 3));
    all_refuse(&s, "tsize.qed", &["table size"]);
    damaged(&s, "csize.qed", b.clone(), |b| put_le32(b, 4, 1000));
    all_refuse(&s, "csize.qed", &["cluster size"]);
    damaged(&s, "isize.qed", b.clone(), |b| put_le64(b, 48, 1 << 62));
    all_refuse(&s, "isize.qed", &["image size"]);
    damaged(&s, "l1eof.qed", b.clone(), |b| put_le64(b, 40, 1 << 40));
    all_refuse(&s, "l1eof.qed", &["table offset"]);
    damaged(&s, "l1mis.qed", b.clone(), |b| {
        let v = le64(b, 40);
        put_le64(b, 40, v + 512)
    });
    all_refuse(&s, "l1mis.qed", &["table offset"]);
    damaged(&s, "feat.qed", b.clone(), |b| put_le64(b, 16, 0x10));
    all_refuse(&s, "feat.qed", &["QED features: 10"]);
    damaged(&s, "l2eof.qed", b.clone(), |b| {
        let l1 = le64(b, 40) as usize;
        put_le64(b, l1, 1 << 40);
    });
    data_commands_refuse(&s, "l2eof.qed", &["L2 table offset", "invalid"]);
    damaged(&s, "dataeof.qed", b.clone(), |b| {
        let l2 = le64(b, le64(b, 40) as usize) as usize;
        put_le64(b, l2, 1 << 40);
    });
    data_commands_refuse(&s, "dataeof.qed", &["data cluster offset", "invalid"]);
    // A backing name longer than qemu accepts, in a (sparse) header area that holds it.
    damaged(&s, "bname.qed", b.clone(), |b| {
        put_le64(b, 16, 1);
        put_le32(b, 12, 0x8000); // header_size: 2 GiB
        put_le64(b, 40, 0x8000 << 16);
        put_le32(b, 56, 64);
        put_le32(b, 60, 0x7fff_0000);
    });
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(s.path("bname.qed"))
        .unwrap();
    f.set_len((0x8000 << 16) + (4 << 16)).unwrap();
    all_refuse(&s, "bname.qed", &["backing file name too long"]);
}

#[test]
fn qcow2_backing_name_damage_is_refused() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "8M"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2",
    ]);
    let b = s.read_file("ov.qcow2");
    damaged(&s, "blen.qcow2", b.clone(), |b| put_be32(b, 16, 5000));
    all_refuse(&s, "blen.qcow2", &["Backing file name too long"]);
    damaged(&s, "boff.qcow2", b.clone(), |b| put_be64(b, 8, 1 << 20));
    all_refuse(&s, "boff.qcow2", &["Invalid backing file offset"]);
}

/// Commands that open the backing chain refuse a broken one; plain `info` (which does not
/// open backing files, as qemu-img info) still works.
fn chain_refused(s: &Scratch, image: &str, words: &[&str], hints: &[String]) {
    for (args, status) in commands(image) {
        let r = cowimg(s, &args);
        let what = format!("cowimg {args:?}");
        if args[0] == "info" && !args.contains(&"--backing-chain") {
            assert_eq!(r.status, 0, "{what}: {}", r.stderr);
        } else {
            assert_refused_with(&r, &what, image, status, words, hints);
        }
    }
}

#[test]
fn backing_loops_are_refused() {
    let s = Scratch::new();
    // Self: created over a placeholder, then pointed at itself without checking.
    s.qemu_img(&["create", "-q", "-f", "qcow2", "self.qcow2", "8M"]);
    s.qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        "self.qcow2",
    ]);
    chain_refused(&s, "self.qcow2", &["loop"], &repoint("self.qcow2"));
    // A -> B -> A.
    s.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "8M"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
    ]);
    s.qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"]);
    // The hint names the image whose pointer closes the loop.
    chain_refused(&s, "a.qcow2", &["loop"], &repoint("b.qcow2"));
    chain_refused(&s, "b.qcow2", &["loop"], &repoint("a.qcow2"));
    // The same file by another name (a symlink) is the same image.
    std::os::unix::fs::symlink("c.qcow2", s.path("link.qcow2")).unwrap();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "c.qcow2", "8M"]);
    s.qemu_img(&["rebase", "-u", "-b", "link.qcow2", "-F", "qcow2", "c.qcow2"]);
    chain_refused(&s, "c.qcow2", &["loop"], &repoint("c.qcow2"));
    // QED over itself (format probed).
    s.qemu_img(&["create", "-q", "-f", "qed", "q.qed", "8M"]);
    s.qemu_img(&["rebase", "-u", "-b", "q.qed", "-F", "qed", "q.qed"]);
    chain_refused(&s, "q.qed", &["loop"], &repoint("q.qed"));
}

#[test]
fn missing_and_unreadable_backing_files_are_refused() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "8M"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2",
    ]);
    std::fs::remove_file(s.path("base.raw")).unwrap();
    chain_refused(
        &s,
        "ov.qcow2",
        &["base.raw", "No such file or directory"],
        &repoint("ov.qcow2"),
    );
    // A directory.
    std::fs::create_dir(s.path("base.raw")).unwrap();
    // There but unusable: a new pointer is not the fix, no hint says so.
    chain_refused(&s, "ov.qcow2", &["base.raw", "Is a directory"], &[]);
    std::fs::remove_dir(s.path("base.raw")).unwrap();
    // A FIFO: nothing to read (and opening must not block).
    let fifo = s.run("mkfifo", &["base.raw"]);
    assert_eq!(fifo.status, 0, "mkfifo: {}", fifo.stderr);
    chain_refused(&s, "ov.qcow2", &["base.raw", "not a regular file"], &[]);
    std::fs::remove_file(s.path("base.raw")).unwrap();
    // A path through a file.
    s.write_file("plain", b"x");
    s.qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "plain/base.raw",
        "-F",
        "raw",
        "ov.qcow2",
    ]);
    chain_refused(
        &s,
        "ov.qcow2",
        &["plain/base.raw", "Not a directory"],
        &repoint("ov.qcow2"),
    );
    // The QED form of a missing backing file.
    s.qemu_img(&["create", "-q", "-f", "raw", "b2.raw", "8M"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qed", "-b", "b2.raw", "-F", "raw", "ov.qed",
    ]);
    std::fs::remove_file(s.path("b2.raw")).unwrap();
    chain_refused(
        &s,
        "ov.qed",
        &["b2.raw", "No such file or directory"],
        &repoint("ov.qed"),
    );
}

#[test]
fn a_missing_data_file_is_refused() {
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=d.raw",
        "df.qcow2",
        "8M",
    ]);
    std::fs::remove_file(s.path("d.raw")).unwrap();
    all_refuse(
        &s,
        "df.qcow2",
        &["Could not open data file 'd.raw': No such file or directory"],
    );
}

#[test]
fn protocols_are_refused() {
    let s = Scratch::new();
    all_refuse(&s, "json:{}", &["protocols", "not supported"]);
    all_refuse(&s, "ftp://localhost:1/x", &["protocols", "not supported"]);
    // HTTP is supported too: a server nobody runs is an error naming the URL and the cause.
    all_refuse(
        &s,
        "http://localhost:1/x",
        &["'http://localhost:1/x'", "connection refused"],
    );
    // NBD is supported: an export nobody serves is an error naming the server.
    all_refuse(
        &s,
        "nbd://localhost:1/x",
        &["localhost port 1", "Connection refused"],
    );
    // As a backing file name, also from an image in another directory (a protocol name is
    // not relative to the image's directory).
    std::fs::create_dir(s.path("d")).unwrap();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "nbd://localhost:1/x",
        "-F",
        "raw",
        "d/ov.qcow2",
        "1M",
    ]);
    chain_refused(
        &s,
        "d/ov.qcow2",
        &[
            "'nbd://localhost:1/x'",
            "cannot connect to localhost port 1",
        ],
        &[],
    );
}

/// Virtual sizes that are not a multiple of 512: qemu counts disks in whole sectors, a qcow2
/// size field rounded down (only a damaged header has such a field), a raw file rounded up
/// (the tail reads as zeros). info, map, convert and compare give exactly qemu-img's answers.
#[test]
fn sizes_not_a_multiple_of_512_read_as_qemu_reads_them() {
    let s = Scratch::new();
    let b = qcow2_image(&s, "full.qcow2");
    let mut images = Vec::new();
    // 1M + 700 cuts the compressed cluster at 1 MiB; 8M + 1000 lies past the written data.
    for size in [300u64, 1000, (1 << 20) + 700, (8 << 20) + 1000] {
        let name = format!("q{size}.qcow2");
        damaged(&s, &name, b.clone(), |b| put_be64(b, 24, size));
        images.push(name);
    }
    for len in [1usize, 1000, (1 << 20) + 7] {
        let name = format!("r{len}.raw");
        s.write_file(&name, &vec![0x5a; len]);
        images.push(name);
    }
    s.write_file("other.raw", &vec![0x5a; 4096]);
    for img in &images {
        let img = img.as_str();
        let json = |r: Run| -> serde_json::Value {
            assert_eq!(r.status, 0, "{img}: {}", r.stderr);
            serde_json::from_str(&r.stdout).expect("info JSON")
        };
        let (q, c) = (
            json(s.run("qemu-img", &["info", "--output=json", img])),
            json(cowimg(&s, &["info", "--output", "json", img])),
        );
        assert_eq!(c["virtual-size"], q["virtual-size"], "{img}: info");
        for (qa, ca) in [
            (
                vec!["map", "--output=json", img],
                vec!["map", "--output", "json", img],
            ),
            (vec!["map", img], vec!["map", img]),
            (
                vec!["compare", img, "full.qcow2"],
                vec!["compare", img, "full.qcow2"],
            ),
            (
                vec!["compare", "-s", img, "other.raw"],
                vec!["compare", "-s", img, "other.raw"],
            ),
        ] {
            let (qr, cr) = (s.run("qemu-img", &qa), cowimg(&s, &ca));
            assert_eq!(
                (cr.status, cr.stdout.as_str()),
                (qr.status, qr.stdout.as_str()),
                "{img}: cowimg {ca:?} (stderr {})",
                cr.stderr
            );
        }
        s.qemu_img(&["convert", "-O", "raw", img, "q.raw"]);
        let r = cowimg(&s, &["convert", "-O", "raw", img, "c.raw"]);
        assert_eq!(r.status, 0, "{img}: {}", r.stderr);
        assert!(
            s.read_file("q.raw") == s.read_file("c.raw"),
            "{img}: convert gives {} bytes, qemu-img {}",
            s.read_file("c.raw").len(),
            s.read_file("q.raw").len()
        );
        let r = cowimg(&s, &["compare", img, "q.raw"]);
        assert_eq!(
            (r.status, r.stdout.as_str()),
            (0, "Images are identical.\n"),
            "{img}: {}",
            r.stderr
        );
    }
}
