//! An in-process mutation fuzzer for CI, beside the coverage-guided cargo-fuzz targets in
//! `fuzz/` (whose bodies, `fuzz/src/targets.rs`, it shares). Seed images are made by
//! `scripts/fuzz-seeds.sh` (qemu-img and qemu-io); each input is a seed with a few random
//! mutations (bit flips, interesting values in header fields and table entries, copied,
//! inserted and deleted ranges, truncation) and goes through header parsing (qcow2, QED),
//! map/read, the writing engine (writes, zero writes, commit, header change) and check
//! (read-only, then `-r all` and a read-only pass on the repaired copy).
//!
//! Failures: a panic, an input that takes longer than [`HANG`], or a single allocation over
//! [`ALLOC_LIMIT`] (this binary's allocator aborts then, naming the size). The input is saved
//! under `target/fuzz-failures/`; minimized, it belongs in `testdata/fuzz/`, where
//! [`regressions`] runs every file through every target.
//!
//! `COWIMG_FUZZ_SECONDS` (CI: 20) and `COWIMG_SEED` set the run.

mod common;
#[path = "common/reliability.rs"]
mod reliability;
#[allow(dead_code)]
#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Scratch;
use cowimg_formats::Format;
use reliability::{count, first_seed, Rng};

/// The largest single allocation a fuzzed image may cause: well above what any valid image
/// of these sizes needs (tables are capped at 32 MiB), far below what a trusted size field
/// would make a careless reader ask for.
const ALLOC_LIMIT: usize = 256 << 20;
/// Longest one input may take through every target.
const HANG: Duration = Duration::from_secs(20);

struct Capped;

// SAFETY: forwards to the system allocator; only refuses (aborts on) oversized requests.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        check_size(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        check_size(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        check_size(new);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

/// The input being run, and a file descriptor to dump it to if the allocator must abort.
static CURRENT: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static DUMP_FD: AtomicI32 = AtomicI32::new(-1);

fn check_size(n: usize) {
    if n > ALLOC_LIMIT {
        let msg = format!(
            "over-allocation: {n} bytes in one allocation; the input is in target/fuzz-failures/over-allocation.bin\n"
        );
        // SAFETY: writing buffers we own to open descriptors; nothing else is touched.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        let fd = DUMP_FD.load(Ordering::SeqCst);
        if let (true, Ok(input)) = (fd >= 0, CURRENT.try_lock()) {
            // SAFETY: as above.
            unsafe { libc::write(fd, input.as_ptr().cast(), input.len()) };
        }
        std::process::abort();
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

/// Runs one input through every target.
fn all_targets(data: &[u8]) -> targets::CheckOutcome {
    targets::header(data, Format::Qcow2);
    targets::header(data, Format::Qed);
    targets::map_read(data);
    targets::write(data);
    targets::check(data)
}

/// Offsets worth hitting in an image: the header fields, and every place the image's own
/// tables point at (L1, refcount table, the first entries of both).
fn hot_offsets(d: &[u8]) -> Vec<usize> {
    let mut v: Vec<usize> = (0..112).step_by(4).collect();
    let be64 = |at: usize| {
        d.get(at..at + 8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
            .unwrap_or(0)
    };
    let le64 = |at: usize| {
        d.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .unwrap_or(0)
    };
    let mut tables = Vec::new();
    if d.starts_with(b"QFI\xfb") {
        tables.extend([be64(40), be64(48), be64(64)]);
        let l2 = be64(be64(40) as usize) & 0x00ff_ffff_ffff_fe00;
        let rb = be64(be64(48) as usize);
        tables.extend([l2, rb]);
    } else if d.starts_with(b"QED\0") {
        tables.push(le64(40));
        tables.push(le64(le64(40) as usize));
    }
    for t in tables {
        if (t as usize) < d.len() {
            v.extend((0..64).step_by(8).map(|i| t as usize + i));
        }
    }
    v.retain(|&o| o < d.len());
    v
}

const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x1ff,
    0x200,
    0xfff,
    0x1000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 56,
    1 << 62,
    1 << 63,
    u64::MAX,
];

/// One to four random mutations of `seed`.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..rng.range(1, 4) {
        if d.is_empty() {
            d.push(0);
        }
        let hot = hot_offsets(&d);
        let at = if !hot.is_empty() && rng.chance(2, 3) {
            *rng.pick(&hot)
        } else {
            rng.below(d.len() as u64) as usize
        };
        match rng.below(9) {
            0 => d[at] ^= 1 << rng.below(8),
            1 => d[at] = rng.next() as u8,
            2 | 3 => {
                // An interesting value, 1/2/4/8 bytes, either byte order.
                let v = *rng.pick(INTERESTING) ^ if rng.chance(1, 4) { rng.below(16) } else { 0 };
                let w = *rng.pick(&[1usize, 2, 4, 8]);
                let bytes = if rng.chance(1, 2) {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                let src = if bytes[0] == 0 && w < 8 {
                    &bytes[8 - w..]
                } else {
                    &bytes[..w]
                };
                let end = (at + w).min(d.len());
                d[at..end].copy_from_slice(&src[..end - at]);
            }
            4 => {
                // Copy a range over another (a table entry where another belongs).
                let len = rng.range(1, 64) as usize;
                let from = rng.below(d.len() as u64) as usize;
                let piece: Vec<u8> = d[from..(from + len).min(d.len())].to_vec();
                let end = (at + piece.len()).min(d.len());
                d[at..end].copy_from_slice(&piece[..end - at]);
            }
            5 => {
                let len = rng.range(1, 512) as usize;
                d.splice(at..at, std::iter::repeat(rng.next() as u8).take(len));
            }
            6 => {
                let len = rng.range(1, 512) as usize;
                d.drain(at..(at + len).min(d.len()));
            }
            7 => d.truncate(at.max(1)),
            _ => d.resize(d.len() + rng.range(1, 8192) as usize, 0),
        }
    }
    d
}

/// The seed images (made by scripts/fuzz-seeds.sh).
fn seeds(s: &Scratch) -> Vec<(String, Vec<u8>)> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fuzz-seeds.sh");
    let dir = s.path("seeds");
    let r = s.run("bash", &[script, &dir.to_string_lossy()]);
    assert_eq!(r.status, 0, "{script}: {}{}", r.stdout, r.stderr);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    assert!(v.len() >= 10, "only {} seeds", v.len());
    v
}

fn failure_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn mutated_images_fail_cleanly() {
    let s = Scratch::new();
    let seeds = seeds(&s);
    let n_seeds = seeds.len();
    let secs = count("COWIMG_FUZZ_SECONDS", 20);
    let seed = first_seed(0xf022_0001);
    // The worker publishes the input it is on; the watchdog here sees a hang.
    let current: Arc<Mutex<(u64, Instant, Vec<u8>)>> =
        Arc::new(Mutex::new((0, Instant::now(), Vec::new())));
    let execs = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let unconverged = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    {
        use std::os::unix::io::IntoRawFd;
        let f = std::fs::File::create(failure_dir().join("over-allocation.bin")).unwrap();
        DUMP_FD.store(f.into_raw_fd(), Ordering::SeqCst);
    }
    let worker = {
        let (current, execs, failures, unconverged) = (
            current.clone(),
            execs.clone(),
            failures.clone(),
            unconverged.clone(),
        );
        std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut i = 0u64;
            while Instant::now() < deadline {
                let (name, base) = rng.pick(&seeds).clone();
                let input = mutate(&base, &mut rng);
                *current.lock().unwrap() = (i, Instant::now(), input.clone());
                // For the allocator, which aborts the process on an over-allocation.
                CURRENT.lock().unwrap().clone_from(&input);
                match std::panic::catch_unwind(|| all_targets(&input)) {
                    Ok(out) => {
                        if out.corruptions_after_repair.is_some_and(|c| c > 0) {
                            unconverged.fetch_add(1, Ordering::Relaxed);
                            if std::env::var("COWIMG_FUZZ_SAVE_UNCONVERGED").is_ok() {
                                let path = failure_dir().join(format!(
                                    "unconverged-{seed:x}-{i}-{}.bin",
                                    out.corruptions_after_second_repair
                                        .map_or("x".into(), |c| c.to_string())
                                ));
                                std::fs::write(&path, &input).unwrap();
                            }
                        }
                    }
                    Err(e) => {
                        let msg = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        let path = failure_dir().join(format!("panic-{seed:x}-{i}.bin"));
                        std::fs::write(&path, &input).unwrap();
                        failures.lock().unwrap().push(format!(
                            "input {i} (from {name}) panicked: {msg}; saved as {}",
                            path.display()
                        ));
                    }
                }
                execs.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        let cur = current.lock().unwrap();
        if cur.1.elapsed() > HANG {
            let path = failure_dir().join(format!("hang-{seed:x}-{}.bin", cur.0));
            std::fs::write(&path, &cur.2).unwrap();
            panic!(
                "input {} took more than {HANG:?}; saved as {}",
                cur.0,
                path.display()
            );
        }
    }
    worker.join().unwrap();
    let _ = std::fs::remove_file(failure_dir().join("over-allocation.bin"));
    let n = execs.load(Ordering::Relaxed);
    eprintln!(
        "{n} inputs in {secs} s ({} per second) from {} seeds; {} repairs left corruptions for a second pass",
        n / secs.max(1),
        n_seeds,
        unconverged.load(Ordering::Relaxed)
    );
    let f = failures.lock().unwrap();
    assert!(
        f.is_empty(),
        "{} failures (seed {seed:#x}):\n{}",
        f.len(),
        f.join("\n")
    );
}

/// Every unmodified seed goes through every target (and opens).
#[test]
fn seeds_open() {
    let s = Scratch::new();
    for (name, data) in seeds(&s) {
        let out = all_targets(&data);
        if name != "t1.qed" {
            assert!(out.opened, "{name} does not open");
            assert_eq!(out.corruptions_before, 0, "{name}");
        }
    }
}

/// Inputs the fuzzers once failed on (minimized), from testdata/fuzz/.
#[test]
fn regressions() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/fuzz");
    let entries: Vec<_> = std::fs::read_dir(&dir).expect("testdata/fuzz").collect();
    assert!(!entries.is_empty(), "no inputs in {}", dir.display());
    for e in entries {
        let p = e.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        let started = Instant::now();
        let r = std::panic::catch_unwind(|| all_targets(&data));
        assert!(r.is_ok(), "{} panics", p.display());
        assert!(
            started.elapsed() < HANG,
            "{} takes {:?}",
            p.display(),
            started.elapsed()
        );
    }
}

/// Differential check on mutated images: cowimg's read-only check against qemu-img check's
/// counts (corruptions, leaks) on the same bytes. CI compares about a hundred inputs (300
/// mutations; qemu-img cannot open many); long runs:
/// `COWIMG_SEED=S COWIMG_FUZZ_DIFF_INPUTS=N cargo test --release --test reliability_fuzz check_agrees -- --nocapture`.
#[test]
fn check_agrees_with_qemu_on_mutated_images() {
    use cowimg_formats::CheckMode;
    let s = Scratch::new();
    let seeds = seeds(&s);
    let n = count("COWIMG_FUZZ_DIFF_INPUTS", 300);
    let seed = first_seed(0xf022_0002);
    let mut rng = Rng::new(seed);
    let mut kinds: std::collections::BTreeMap<String, (u64, String)> = Default::default();
    let mut compared = 0;
    for i in 0..n {
        let (name, base) = rng.pick(&seeds).clone();
        let input = mutate(&base, &mut rng);
        let Some(img) = targets::open(&input, None, false, false) else {
            continue;
        };
        let Ok(mine) = img.check(CheckMode::ReadOnly) else {
            continue;
        };
        let file = s.path("in.img");
        std::fs::write(&file, &input).unwrap();
        let fmt = if input.starts_with(b"QED\0") {
            "qed"
        } else {
            "qcow2"
        };
        let r = s.run("qemu-img", &["check", "-f", fmt, "--output=json", "in.img"]);
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&r.stdout) else {
            continue;
        };
        compared += 1;
        let theirs = (
            v["corruptions"].as_u64().unwrap_or(0),
            v["leaks"].as_u64().unwrap_or(0),
        );
        if (mine.corruptions, mine.leaks) != theirs {
            let q = s.run("qemu-img", &["check", "-f", fmt, "in.img"]);
            // Classify by the first line qemu-img prints that cowimg does not.
            let first = q
                .stderr
                .lines()
                .find(|l| !mine.messages.iter().any(|m| m == l))
                .unwrap_or("(counts only)")
                .to_string();
            let key: String = first
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .take(60)
                .collect();
            let e = kinds.entry(key).or_insert((0, String::new()));
            e.0 += 1;
            if e.1.is_empty() {
                let path = failure_dir().join(format!("checkdiff-{seed:x}-{i}.bin"));
                std::fs::write(&path, &input).unwrap();
                e.1 = format!(
                    "from {name}: cowimg {}/{} (corruptions/leaks), qemu-img {}/{}; {}",
                    mine.corruptions,
                    mine.leaks,
                    theirs.0,
                    theirs.1,
                    path.display()
                );
            }
        }
    }
    let total: u64 = kinds.values().map(|k| k.0).sum();
    eprintln!(
        "{compared} inputs compared, {total} disagreements in {} kinds:",
        kinds.len()
    );
    for (k, (c, ex)) in &kinds {
        eprintln!("  {c:5}  {k}\n         {ex}");
    }
    assert!(
        kinds.is_empty(),
        "cowimg check disagrees with qemu-img check"
    );
}
