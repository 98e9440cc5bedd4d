//! The read matrix: for every fixture of `common/fixtures.rs` (one per on-disk feature, made
//! by qemu-img/qemu-io at test time), cowimg must read exactly what QEMU reads:
//! - `convert -O raw` gives the same bytes as `qemu-img convert -O raw`;
//! - `map --output json` (and the human map) is the same text as qemu-img's;
//! - `info --output json` and `info --backing-chain --output json` carry qemu-img's keys with
//!   qemu-img's values (except `actual-size`, and only the child names under `children`);
//!   cowimg may add keys, and must say when a backing format was probed;
//! - human `info` has qemu-img's lines (cowimg's additions aside);
//! - `compare` gives qemu-img compare's status and stdout on identical, different, longer,
//!   shorter and strict-mode pairs.
//!
//! One test per fixture, so a failure names the feature; each test reports every
//! disagreement it finds, not only the first.

mod common;
#[path = "common/fixtures.rs"]
mod fixtures;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{agree, Scratch};
use serde_json::Value;

macro_rules! matrix {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                differential(stringify!($name));
            }
        )*
        const TESTED: &[&str] = &[$(stringify!($name)),*];
    };
}

matrix!(
    raw_sparse,
    qcow2_v2,
    qcow2_v2_over_raw,
    qcow2_v3,
    qcow2_v3_over_raw,
    qcow2_cluster_512,
    qcow2_cluster_2m,
    qcow2_refcount_1,
    qcow2_refcount_64,
    qcow2_odd_size,
    qcow2_zlib_convert,
    qcow2_zstd_convert,
    qcow2_zlib_convert_512,
    qcow2_zstd_convert_2m,
    qcow2_zlib_write_c,
    qcow2_zstd_write_c,
    qcow2_extended_l2,
    qcow2_extended_l2_32k,
    qcow2_zero_clusters,
    qcow2_v2_zero_over_backing,
    qcow2_snapshot,
    qcow2_bitmap,
    qcow2_dirty_lazy_refcounts,
    qcow2_data_file,
    qcow2_data_file_raw,
    qed_4k_table16,
    qed_over_raw,
    qed_over_qcow2,
    qed_backing_shorter,
    chain_mixed_dirs,
    backing_shorter,
    backing_longer,
    unrecorded_qcow2_over_qcow2,
    unrecorded_qcow2_over_raw,
    unrecorded_v2_over_qcow2,
    raw_odd_size,
    qcow2_over_odd_raw,
    qcow2_prealloc_metadata,
    qcow2_prealloc_falloc,
    qcow2_prealloc_full,
    qcow2_lazy_refcounts_clean,
    qcow2_data_file_subdir,
    qcow2_data_file_absolute,
    qcow2_corrupt_bit,
    qcow2_unknown_compat_and_extension,
    qcow2_extended_l2_2m,
    qcow2_large_sparse,
    qcow2_2m_beyond_2g,
    qcow2_extended_l2_16k,
    qcow2_extended_l2_data_file,
    qcow2_data_file_over_backing,
    qcow2_resized,
    qed_resized,
    qed_need_check,
    qcow2_bitmap_in_use,
    qcow2_over_qcow2_as_raw,
    qcow2_over_file_protocol,
    qed_odd_size,
    chain_mixed_dirs_absolute,
);

#[test]
fn every_fixture_is_in_the_matrix() {
    let mut a: Vec<&str> = fixtures::NAMES.to_vec();
    let mut b: Vec<&str> = TESTED.to_vec();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b);
}

/// Runs every differential check on one fixture and fails with the full list of
/// disagreements.
fn differential(name: &'static str) {
    let f = fixtures::build(name);
    let s = &f.scratch;
    let top = f.top.as_str();
    let mut bad = Vec::new();

    check_convert(s, top, &mut bad);
    check_map(s, top, &mut bad);
    check_info(s, top, &mut bad);
    check_own_output(s, top, &mut bad);
    check_compare(s, top, &mut bad);

    assert!(
        bad.is_empty(),
        "fixture {name}: cowimg disagrees with qemu-img:\n  {}",
        bad.join("\n  ")
    );
}

fn check_convert(s: &Scratch, top: &str, bad: &mut Vec<String>) {
    s.qemu_img(&["convert", "-O", "raw", top, "ref.raw"]);
    let r = s.cowimg(&["convert", "-O", "raw", top, "mine.raw"]);
    if r.status != 0 {
        bad.push(format!(
            "convert -O raw failed ({}): {}",
            r.status,
            r.stderr.trim()
        ));
        return;
    }
    if let Some(diff) = first_difference(&s.path("ref.raw"), &s.path("mine.raw")) {
        bad.push(format!("convert -O raw: {diff}"));
    }
}

/// Compares two (possibly large, sparse) files piece by piece.
fn first_difference(a: &Path, b: &Path) -> Option<String> {
    let (la, lb) = (len(a), len(b));
    if la != lb {
        return Some(format!("{} bytes, qemu-img's {} bytes", lb, la));
    }
    let (fa, fb) = (File::open(a).expect("open"), File::open(b).expect("open"));
    let mut x = vec![0u8; 16 << 20];
    let mut y = vec![0u8; 16 << 20];
    let mut pos = 0;
    while pos < la {
        let n = (la - pos).min(x.len() as u64) as usize;
        fa.read_exact_at(&mut x[..n], pos).expect("read");
        fb.read_exact_at(&mut y[..n], pos).expect("read");
        if let Some(i) = x[..n].iter().zip(&y[..n]).position(|(p, q)| p != q) {
            return Some(format!("first difference at offset {}", pos + i as u64));
        }
        pos += n as u64;
    }
    None
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).expect("stat").len()
}

fn check_map(s: &Scratch, top: &str, bad: &mut Vec<String>) {
    // Whole image, and an unaligned window from a third in.
    let size = len(&s.path("ref.raw"));
    let (from, length) = ((size / 3 + 1234).to_string(), (size / 3).to_string());
    for (mine, theirs) in [
        (
            vec!["map", "--output", "json", top],
            vec!["map", "--output=json", top],
        ),
        (vec!["map", top], vec!["map", top]),
        (
            vec![
                "map",
                "--output",
                "json",
                "--start-offset",
                &from,
                "--max-length",
                &length,
                top,
            ],
            vec![
                "map",
                "--output=json",
                "--start-offset",
                &from,
                "--max-length",
                &length,
                top,
            ],
        ),
    ] {
        // The human form fails on compressed clusters (no host offset to show): then both
        // must fail alike, after the same lines.
        let want = s.run("qemu-img", &theirs);
        let r = s.cowimg(&mine);
        if (r.status, &r.stdout, r.stderr.is_empty())
            != (want.status, &want.stdout, want.stderr.is_empty())
        {
            bad.push(format!(
                "{mine:?}: status {} {}\n--- cowimg\n{}--- qemu-img (status {} {})\n{}",
                r.status, r.stderr, r.stdout, want.status, want.stderr, want.stdout
            ));
        }
    }
}

fn check_info(s: &Scratch, top: &str, bad: &mut Vec<String>) {
    for chain in [false, true] {
        let mut theirs = vec!["info", "--output=json"];
        let mut mine = vec!["info", "--output", "json"];
        if chain {
            theirs.push("--backing-chain");
            mine.push("--backing-chain");
        }
        theirs.push(top);
        mine.push(top);
        let want: Value = serde_json::from_str(&s.qemu_img(&theirs)).expect("qemu-img info JSON");
        let r = s.cowimg(&mine);
        if r.status != 0 {
            bad.push(format!(
                "{mine:?} failed ({}): {}",
                r.status,
                r.stderr.trim()
            ));
            continue;
        }
        let got: Value = match serde_json::from_str(&r.stdout) {
            Ok(v) => v,
            Err(e) => {
                bad.push(format!("{mine:?}: not JSON ({e}): {}", r.stdout));
                continue;
            }
        };
        let before = bad.len();
        agree(if chain { "chain" } else { "info" }, &want, &got, bad);
        if chain {
            probed_said(&want, &got, bad);
        }
        if bad.len() > before {
            bad.push(format!(
                "--- cowimg {mine:?}\n{}--- qemu-img\n{want:#}",
                r.stdout
            ));
        }
    }
    for chain in [false, true] {
        let mut args = vec!["info"];
        if chain {
            args.push("--backing-chain");
        }
        args.push(top);
        let want = s.qemu_img(&args);
        let r = s.cowimg(&args);
        let (w, g) = (human_lines(&want, false), human_lines(&r.stdout, true));
        if r.status != 0 || w != g {
            bad.push(format!(
                "{args:?}: status {} {}\n--- cowimg\n{}--- qemu-img\n{want}",
                r.status, r.stderr, r.stdout
            ));
        }
        // An image that does not record its backing file's format: cowimg says what it
        // probed, in the plain and in the chain view.
        let unrecorded = want.contains("backing file: ") && !want.contains("backing file format: ");
        if unrecorded && !r.stdout.contains("(probed") {
            bad.push(format!(
                "{args:?}: the backing format was probed but info does not say so:\n{}",
                r.stdout
            ));
        }
    }
}

/// Lines of human `info` output that both tools must print alike: the disk-size lines
/// (allocation on the host) and cowimg's own additions are left out.
fn human_lines(text: &str, cowimg: bool) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("disk size:"))
        .filter(|l| !(cowimg && (l.starts_with("copy-on-read:") || l.contains("(probed"))))
        .map(str::to_string)
        .collect()
}

/// In the chain view, an image whose backing format qemu had to probe carries cowimg's
/// "probed-backing-filename-format", naming the format the next element has.
fn probed_said(want: &Value, got: &Value, bad: &mut Vec<String>) {
    let (Some(w), Some(g)) = (want.as_array(), got.as_array()) else {
        return;
    };
    for (i, e) in w.iter().enumerate() {
        if e.get("backing-filename").is_some() && e.get("backing-filename-format").is_none() {
            let expected = w.get(i + 1).map(|n| n["format"].clone());
            let said = g
                .get(i)
                .and_then(|m| m.get("probed-backing-filename-format"))
                .cloned();
            if said != expected {
                bad.push(format!(
                    "chain[{i}].probed-backing-filename-format: {said:?}, backing is {expected:?}"
                ));
            }
        }
    }
}

/// What cowimg writes from the fixture (convert to qcow2 and QED) must read, in qemu, as the
/// fixture does, and pass qemu-img check.
fn check_own_output(s: &Scratch, top: &str, bad: &mut Vec<String>) {
    for fmt in ["qcow2", "qed"] {
        let out = format!("own.{fmt}");
        let r = s.cowimg(&["convert", "-O", fmt, top, &out]);
        if r.status != 0 {
            bad.push(format!(
                "convert -O {fmt} failed ({}): {}",
                r.status,
                r.stderr.trim()
            ));
            continue;
        }
        // Formats given: the reference's bytes may start with an image magic (a qcow2 file
        // used as a raw backing), and must not be probed.
        let cmp = s.run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", fmt, "ref.raw", &out],
        );
        if cmp.status != 0 {
            bad.push(format!(
                "qemu-img compare ref.raw {out}: {}{}",
                cmp.stdout, cmp.stderr
            ));
        }
        let check = s.run("qemu-img", &["check", &out]);
        if check.status != 0 {
            bad.push(format!(
                "qemu-img check {out}: {}{}",
                check.stdout, check.stderr
            ));
        }
    }
}

fn check_compare(s: &Scratch, top: &str, bad: &mut Vec<String>) {
    let size = len(&s.path("ref.raw"));
    s.qemu_img(&["convert", "-O", "qcow2", top, "ref.qcow2"]);
    // Copies of the reference (sparse, as the images may be large): one byte changed in
    // the middle, one near the end; longer with a zero tail, longer with data in the tail,
    // shorter.
    let variant = |name: &str, new_len: u64, flip: Option<u64>| {
        let copy = s.run("cp", &["--sparse=always", "ref.raw", name]);
        assert_eq!(copy.status, 0, "cp: {}", copy.stderr);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(s.path(name))
            .expect("open");
        f.set_len(new_len).expect("set_len");
        if let Some(at) = flip {
            let mut byte = [0u8];
            f.read_exact_at(&mut byte, at).expect("read");
            byte[0] ^= 0x41;
            f.write_all_at(&byte, at).expect("write");
        }
    };
    variant("mid.raw", size, Some(size * 3 / 8 + 777));
    variant("end.raw", size, Some(size - 3));
    variant("longer.raw", size + (1 << 20), None);
    variant("longer-data.raw", size + (1 << 20), Some(size + 1000));
    variant("shorter.raw", size - (64 << 10), None);

    let pairs: Vec<Vec<&str>> = vec![
        vec![top, "ref.raw"],
        vec!["ref.raw", top],
        vec![top, "ref.qcow2"],
        vec![top, top],
        vec![top, "mid.raw"],
        vec![top, "end.raw"],
        vec![top, "longer.raw"],
        vec!["longer-data.raw", top],
        vec![top, "shorter.raw"],
        vec!["-s", top, "ref.raw"],
        vec!["-s", top, "ref.qcow2"],
        vec!["-s", top, top],
        vec!["-s", top, "longer.raw"],
        vec!["-s", top, "own.qcow2"],
        vec!["-s", "own.qed", top],
    ];
    for p in pairs {
        let args = [&["compare"][..], &p].concat();
        let theirs = s.run("qemu-img", &args);
        let mine = s.cowimg(&args);
        if (mine.status, &mine.stdout) != (theirs.status, &theirs.stdout) {
            bad.push(format!(
                "{args:?}: cowimg {} {:?} {}, qemu-img {} {:?} {}",
                mine.status,
                mine.stdout,
                mine.stderr.trim(),
                theirs.status,
                theirs.stdout,
                theirs.stderr.trim()
            ));
        }
    }
}

/// Degenerate inputs: empty images, windows past the end or of no length.
#[test]
fn empty_images_and_windows() {
    let s = Scratch::new();
    s.write_file("e.raw", b"");
    s.qemu_img(&["create", "-q", "-f", "qcow2", "e.qcow2", "0"]);
    s.qemu_img(&["create", "-q", "-f", "qed", "e.qed", "0"]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "s.qcow2", "1M"]);
    let mut bad = Vec::new();
    for image in ["e.raw", "e.qcow2", "e.qed"] {
        check_map_args(&s, &[image], &mut bad);
        for other in ["e.raw", "e.qcow2", "e.qed", "s.qcow2"] {
            for strict in [false, true] {
                let mut args = vec!["compare"];
                if strict {
                    args.push("-s");
                }
                args.extend([image, other]);
                let (mine, theirs) = (s.cowimg(&args), s.run("qemu-img", &args));
                if (mine.status, &mine.stdout) != (theirs.status, &theirs.stdout) {
                    bad.push(format!(
                        "{args:?}: cowimg {} {:?}, qemu-img {} {:?}",
                        mine.status, mine.stdout, theirs.status, theirs.stdout
                    ));
                }
            }
        }
    }
    check_map_args(&s, &["--start-offset", "2097152", "s.qcow2"], &mut bad);
    check_map_args(
        &s,
        &["--start-offset", "524288", "--max-length", "0", "s.qcow2"],
        &mut bad,
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// `map ARGS` in both output forms must print what qemu-img prints.
fn check_map_args(s: &Scratch, args: &[&str], bad: &mut Vec<String>) {
    for json in [false, true] {
        let mut mine = vec!["map"];
        let mut theirs = vec!["map"];
        if json {
            mine.extend(["--output", "json"]);
            theirs.push("--output=json");
        }
        mine.extend_from_slice(args);
        theirs.extend_from_slice(args);
        let (m, t) = (s.cowimg(&mine), s.run("qemu-img", &theirs));
        if (m.status, &m.stdout) != (t.status, &t.stdout) {
            bad.push(format!(
                "{mine:?}: cowimg {} {:?} {}, qemu-img {} {:?} {}",
                m.status, m.stdout, m.stderr, t.status, t.stdout, t.stderr
            ));
        }
    }
}
