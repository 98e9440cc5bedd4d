//! Reproducible outputs (the README's promise): every file cowimg writes is byte-identical
//! across runs and `--jobs` values for the same input and options. Each command runs on fresh
//! copies of one fixture with several `--jobs` values (and twice with the most workers, the
//! likeliest to finish out of order), with small commit batches as well as the default; the
//! files must be equal byte for byte (`cmp`), and correct for qemu-img.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Scratch;

const JOBS: [&str; 5] = ["1", "2", "3", "8", "8"];
/// Commit batch sizes: the default, and small batches (several commits, refcount blocks and
/// tables allocated between them).
const BATCHES: [Option<&str>; 2] = [None, Some("1048576")];

/// A chain `A <- B <- C` of format `fmt` (24 MiB) with data in many 2 MiB copy windows:
/// constant and pseudo-random data, zero writes, writes not aligned to clusters; and `N`, an
/// unrelated image to rebase onto.
fn chain(fmt: &str, opts: &str) -> Scratch {
    let s = Scratch::new();
    let mut noise = vec![0u8; 3 << 20];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8 & 0x3f;
    }
    s.write_file("noise.raw", &noise);
    let create = |name: &str, backing: Option<&str>| {
        let mut a = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        if let Some(b) = backing {
            a.extend(["-b", b, "-F", fmt]);
        }
        a.extend([name, "24M"]);
        s.qemu_img(&a);
    };
    let n = |x: &str| format!("{x}.{fmt}");
    create(&n("A"), None);
    let mut writes: Vec<String> = (0..11)
        .map(|i| format!("write -q -P {} {}k 1500k", 0x40 + i, i * 2176))
        .collect();
    writes.push("write -q -z 9M 600k".into());
    // Data that compresses a little (6 bits of entropy per byte).
    writes.push("write -q -s noise.raw 13M 3M".into());
    s.qemu_io(
        &n("A"),
        &writes.iter().map(|w| w.as_str()).collect::<Vec<_>>(),
    );
    create(&n("B"), Some(&n("A")));
    s.qemu_io(
        &n("B"),
        &[
            "write -q -P 0x21 1M 700k",
            "write -q -z 3M 512k",
            "write -q -P 0x23 4612k 9k",
            "write -q -P 0x24 17M 3M",
        ],
    );
    create(&n("C"), Some(&n("B")));
    s.qemu_io(
        &n("C"),
        &[
            "write -q -P 0x31 2M 64k",
            "write -q -P 0x32 6M 4k",
            "write -q -z 18M 1M",
        ],
    );
    create(&n("N"), None);
    s.qemu_io(
        &n("N"),
        &["write -q -P 0x41 0 1M", "write -q -P 0x44 6M 1M"],
    );
    s
}

/// A fresh directory holding copies of `template`'s files.
fn copy_of(template: &Scratch) -> Scratch {
    let s = Scratch::new();
    for e in std::fs::read_dir(template.dir.path()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), s.path(&e.file_name().to_string_lossy())).unwrap();
    }
    s
}

/// Runs cowimg in `s` with `args`, the commit batch `batch`, and insists that it succeeds.
fn cowimg(s: &Scratch, args: &[&str], batch: Option<&str>) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cowimg"));
    c.args(args).current_dir(s.dir.path());
    if let Some(b) = batch {
        c.env("COWIMG_TEST_BATCH_BYTES", b);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "cowimg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that every file equals the first, byte for byte, naming the first difference.
fn assert_identical(what: &str, files: &[PathBuf]) {
    let first = std::fs::read(&files[0]).unwrap();
    for f in &files[1..] {
        let other = std::fs::read(f).unwrap();
        if other != first {
            let at = first
                .iter()
                .zip(&other)
                .position(|(a, b)| a != b)
                .unwrap_or(first.len().min(other.len()));
            panic!(
                "{what}: {} differs from {} at byte {at} (lengths {} and {})",
                f.display(),
                files[0].display(),
                first.len(),
                other.len()
            );
        }
    }
}

/// Copies `path` into `keep` as `name`, to compare after its scratch directory is gone.
fn keep(keep: &Scratch, path: &Path, name: String) -> PathBuf {
    let to = keep.path(&name);
    std::fs::copy(path, &to).unwrap();
    to
}

#[test]
fn convert_outputs_are_the_same_whatever_the_run_and_jobs() {
    let src = chain("qcow2", "");
    src.qemu_img(&["convert", "-O", "raw", "C.qcow2", "pristine.raw"]);
    let cases: [(&str, &[&str]); 6] = [
        ("qcow2", &[]),
        ("qcow2", &["-o", "extended_l2=on,cluster_size=32k"]),
        ("qcow2", &["-c"]),
        ("qcow2", &["-c", "-o", "compression_type=zstd"]),
        ("qed", &[]),
        ("raw", &[]),
    ];
    for (fmt, opts) in cases {
        for batch in BATCHES {
            let mut outs = Vec::new();
            for (i, jobs) in JOBS.iter().enumerate() {
                let out = format!("out-{i}.{fmt}");
                let mut a = vec!["convert", "--jobs", jobs, "-O", fmt];
                a.extend(opts);
                a.extend(["C.qcow2", &out]);
                cowimg(&src, &a, batch);
                outs.push(src.path(&out));
            }
            let what = format!("convert -O {fmt} {opts:?} (batch {batch:?})");
            assert!(
                src.same("pristine.raw", &format!("out-0.{fmt}")),
                "{what}: wrong data"
            );
            if fmt != "raw" {
                src.assert_clean(&format!("out-0.{fmt}"));
            }
            assert_identical(&what, &outs);
            for o in outs {
                std::fs::remove_file(o).unwrap();
            }
        }
    }
}

/// `stream` and `rebase` change C in place: each run gets fresh copies of the chain.
fn in_place(fmt: &str, opts: &str, command: &[&str]) {
    let template = chain(fmt, opts);
    let c = format!("C.{fmt}");
    template.qemu_img(&["convert", "-O", "raw", &c, "pristine.raw"]);
    let kept = Scratch::new();
    for batch in BATCHES {
        let mut outs = Vec::new();
        for (i, jobs) in JOBS.iter().enumerate() {
            let s = copy_of(&template);
            let mut a = vec![command[0], "--jobs", jobs];
            a.extend(&command[1..]);
            a.push(&c);
            cowimg(&s, &a, batch);
            if i == 0 {
                assert!(s.same("pristine.raw", &c), "{command:?}: wrong data");
                s.assert_clean(&c);
            }
            outs.push(keep(&kept, &s.path(&c), format!("{i}-{c}")));
        }
        assert_identical(
            &format!("{fmt} {opts}: {command:?} (batch {batch:?})"),
            &outs,
        );
        for o in outs {
            std::fs::remove_file(o).unwrap();
        }
    }
}

#[test]
fn stream_outputs_are_the_same_whatever_the_run_and_jobs() {
    for (fmt, opts) in [
        ("qcow2", ""),
        ("qcow2", "extended_l2=on,cluster_size=32k"),
        ("qed", ""),
    ] {
        in_place(fmt, opts, &["stream"]);
        let base = format!("A.{fmt}");
        in_place(fmt, opts, &["stream", "--base", &base]);
    }
}

#[test]
fn rebase_outputs_are_the_same_whatever_the_run_and_jobs() {
    for fmt in ["qcow2", "qed"] {
        let n = format!("N.{fmt}");
        in_place(fmt, "", &["rebase", "-b", &n, "-F", fmt]);
    }
}

#[test]
fn create_outputs_are_the_same_on_every_run() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1G"]);
    let cases: [&[&str]; 5] = [
        &["-f", "qcow2"],
        &[
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,lazy_refcounts=on,refcount_bits=4",
        ],
        &[
            "-f",
            "qcow2",
            "--copy-on-read",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ],
        &["-f", "qed", "-b", "base.qcow2", "-F", "qcow2"],
        &["-f", "raw"],
    ];
    for opts in cases {
        let mut outs = Vec::new();
        for i in 0..3 {
            let out = format!("new-{i}.img");
            let mut a = vec!["create", "-q"];
            a.extend(opts);
            a.push(&out);
            if !opts.contains(&"-b") {
                a.push("3G");
            }
            cowimg(&s, &a, None);
            outs.push(s.path(&out));
        }
        assert_identical(&format!("create {opts:?}"), &outs);
        for o in outs {
            std::fs::remove_file(o).unwrap();
        }
    }
}

/// `commit` writes TOP's data into its backing file and empties TOP: both files must come out
/// the same whatever the run and `--jobs`, and the chain above must read as before.
#[test]
fn commit_outputs_are_the_same_whatever_the_run_and_jobs() {
    for (fmt, opts) in [
        ("qcow2", ""),
        ("qcow2", "extended_l2=on,cluster_size=32k"),
        ("qed", ""),
    ] {
        let template = chain(fmt, opts);
        let (b, c) = (format!("B.{fmt}"), format!("C.{fmt}"));
        template.qemu_img(&["convert", "-O", "raw", &c, "pristine.raw"]);
        let kept = Scratch::new();
        for batch in BATCHES {
            let (mut bs, mut cs) = (Vec::new(), Vec::new());
            for (i, jobs) in JOBS.iter().enumerate() {
                let s = copy_of(&template);
                cowimg(&s, &["commit", "--jobs", jobs, &c], batch);
                if i == 0 {
                    assert!(
                        s.same("pristine.raw", &c),
                        "{fmt} {opts}: commit changed C's data"
                    );
                    assert!(s.same("pristine.raw", &b), "{fmt} {opts}: B lacks C's data");
                    s.assert_clean(&b);
                    s.assert_clean(&c);
                }
                bs.push(keep(&kept, &s.path(&b), format!("{i}-{b}")));
                cs.push(keep(&kept, &s.path(&c), format!("{i}-{c}")));
            }
            let what = format!("{fmt} {opts}: commit (batch {batch:?})");
            assert_identical(&format!("{what}, the base"), &bs);
            assert_identical(&format!("{what}, the top"), &cs);
            for o in bs.into_iter().chain(cs) {
                std::fs::remove_file(o).unwrap();
            }
        }
    }
}

/// `resize` (growing, with each preallocation mode, and shrinking qcow2) gives the same file
/// on every run.
#[test]
fn resize_outputs_are_the_same_on_every_run() {
    for fmt in ["qcow2", "qed"] {
        let template = chain(fmt, "");
        let c = format!("C.{fmt}");
        let kept = Scratch::new();
        let mut cases: Vec<Vec<&str>> = vec![vec!["resize", &c, "+40M"]];
        // QED cannot shrink (qemu refuses as well).
        if fmt == "qcow2" {
            cases.push(vec!["resize", "--shrink", &c, "20M"]);
            cases.push(vec!["resize", "--preallocation=metadata", &c, "+8M"]);
            cases.push(vec!["resize", "--preallocation=full", &c, "+8M"]);
        }
        for case in cases {
            let outs: Vec<PathBuf> = (0..3)
                .map(|i| {
                    let s = copy_of(&template);
                    cowimg(&s, &case, None);
                    if i == 0 {
                        s.assert_clean(&c);
                    }
                    keep(&kept, &s.path(&c), format!("{i}-{c}"))
                })
                .collect();
            assert_identical(&format!("{fmt}: {case:?}"), &outs);
        }
    }
}
