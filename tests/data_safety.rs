//! The writing engine's data-safety rules, driven through the library: entries decoded as
//! qemu decodes them, cost bounded by what is allocated, leaks of a killed run reclaimed,
//! concurrent writes of any ranges, and no write lost when an image is dropped.

mod common;
use common::Scratch;

use cowimg::chain::{Chain, OpenOptions};

fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// A refcount table entry has no flag bits: bits 56-63 are part of the offset. An entry with
/// them set names a block far past the end of the file (qemu-img check: "refcount block 0 is
/// outside image"), and the writer must see the same block, not the one the low bits name.
#[test]
fn refcount_table_entries_keep_their_high_bits() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "img", "1M"]);
    let mut bytes = s.read_file("img");
    let table = be64(&bytes, 48) as usize;
    let entry = be64(&bytes, table) | (1 << 56);
    bytes[table..table + 8].copy_from_slice(&entry.to_be_bytes());
    s.write_file("img", &bytes);
    let r = s.run("qemu-img", &["check", "img"]);
    assert!(
        r.stderr.contains("refcount block 0 is outside image"),
        "{}",
        r.stderr
    );

    let path = s.path("img").to_string_lossy().into_owned();
    let chain = Chain::open(&path, OpenOptions::write(None)).expect("open for writing");
    let img = &chain.top().image;
    let result = img
        .write(0, &[7u8; 65536], &chain.below(0))
        .and_then(|()| img.commit());
    let err = result.expect_err("a write through a refcount block outside the image must fail");
    assert!(
        err.to_string().contains("refcount block 0"),
        "the error names the block: {err}"
    );
    drop(chain);
    assert_eq!(s.read_file("img"), bytes, "nothing was written");
}

/// What one cowimg run cost: its own peak resident memory (from `wait4`, so runs of other
/// tests do not count) and its wall time.
struct Cost {
    status: i32,
    stdout: String,
    peak_rss: u64,
    secs: f64,
}

fn measured(dir: &std::path::Path, args: &[&str]) -> Cost {
    use std::io::Read;
    let start = std::time::Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run cowimg");
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout).expect("read stdout");
    }
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value, and wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: waits for the child spawned above; both pointers are to live locals.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    Cost {
        status: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
        stdout,
        peak_rss: usage.ru_maxrss as u64 * 1024,
        secs: start.elapsed().as_secs_f64(),
    }
}

fn assert_cheap(c: &Cost, what: &str) {
    eprintln!(
        "{what}: {:.3} s, peak {:.1} MiB",
        c.secs,
        c.peak_rss as f64 / (1 << 20) as f64
    );
    assert_eq!(c.status, 0, "{what} failed");
    assert!(c.peak_rss < 128 << 20, "{what} used {} bytes", c.peak_rss);
    assert!(c.secs < 5.0, "{what} took {:.1} s", c.secs);
}

/// A valid qcow2 image of 1 EiB virtual size holding 4 MiB: map, convert, compare and
/// measure cost what the data costs (qemu-img map needs 7.5 minutes here; cowimg needed more
/// than 24 GB before the walks skipped unallocated L1 ranges in one step).
#[test]
fn exabyte_qcow2_costs_what_its_data_costs() {
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        "big.qcow2",
        "1E",
    ]);
    s.qemu_io(
        "big.qcow2",
        &["write -q -P 7 1G 1M", "write -q -P 9 500T 2M"],
    );
    let map = measured(s.dir.path(), &["map", "--output", "json", "big.qcow2"]);
    assert_cheap(&map, "map");
    let entries: serde_json::Value = serde_json::from_str(&map.stdout).expect("map JSON");
    let data: Vec<(u64, u64)> = entries
        .as_array()
        .expect("an array")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| {
            (
                e["start"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(data, [(1 << 30, 2 << 20), (500 << 40, 2 << 20)]);
    let total: u64 = entries
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, 1 << 60, "the entries cover the whole image");

    let convert = measured(
        s.dir.path(),
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "big.qcow2",
            "copy.qcow2",
        ],
    );
    assert_cheap(&convert, "convert");
    assert_cheap(
        &measured(s.dir.path(), &["compare", "big.qcow2", "copy.qcow2"]),
        "compare",
    );
    assert_cheap(
        &measured(s.dir.path(), &["measure", "-O", "qcow2", "big.qcow2"]),
        "measure",
    );
    s.assert_clean("copy.qcow2");
}

/// A sparse raw file of 4 EiB (tmpfs holds files that large) with 5 bytes of data: `map`
/// finds the data in one step per extent, not one seek per GiB (2.6 hours).
#[test]
fn exabyte_sparse_raw_maps_in_one_step() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("a scratch dir on /dev/shm (tmpfs)");
    let f = std::fs::File::create(dir.path().join("r.raw")).expect("create");
    f.set_len(4 << 60).expect("a 4 EiB sparse file");
    std::os::unix::fs::FileExt::write_all_at(&f, b"hello", 1 << 40).expect("write");
    drop(f);
    let map = measured(dir.path(), &["map", "--output", "json", "r.raw"]);
    assert_cheap(&map, "map");
    let entries: serde_json::Value = serde_json::from_str(&map.stdout).expect("map JSON");
    let data: Vec<u64> = entries
        .as_array()
        .expect("an array")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["start"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(data, [1 << 40]);
}

/// Image set-ups for the concurrency tests: qemu-img create arguments, and whether the image
/// has a backing file (partial clusters are then completed from it).
const CONCURRENT_SETUPS: &[(&[&str], bool)] = &[
    (&["-f", "qcow2"], false),
    (&["-f", "qcow2"], true),
    (
        &["-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k"],
        true,
    ),
    (&["-f", "qcow2", "-o", "cluster_size=512"], false),
    (&["-f", "qcow2", "-o", "compat=0.10"], true),
    (&["-f", "qed", "-o", "cluster_size=4k,table_size=2"], true),
    (&["-f", "qed"], false),
];

/// The guest range the concurrency tests write: a few clusters of every set-up, so that
/// writers meet in the same clusters all the time.
const SPAN: u64 = 256 << 10;

/// One write of a concurrent round: `byte == 0` is a zero write.
#[derive(Clone, Copy, Debug)]
struct Piece {
    off: u64,
    len: u64,
    byte: u8,
}

/// Runs `rounds` of concurrent writes (one `Vec<Piece>` per thread per round) on a fresh image
/// of `setup`, committing after each round, and hands `check` the image's guest bytes and the
/// shadow of what it read before the round. qemu-img check must be clean after every round.
fn concurrent_rounds(
    setup: usize,
    rounds: &[Vec<Vec<Piece>>],
    check: &dyn Fn(&[u8], &[u8], &[Vec<Piece>]),
) {
    use std::sync::Barrier;
    let (create, backed) = CONCURRENT_SETUPS[setup];
    let s = Scratch::new();
    let mut args = vec!["create", "-q"];
    args.extend_from_slice(create);
    if backed {
        s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
        s.qemu_io("base.qcow2", &["write -q -P 0x5a 0 1M"]);
        args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
    }
    args.extend(["img", "1M"]);
    s.qemu_img(&args);
    let path = s.path("img").to_string_lossy().into_owned();
    for round in rounds {
        s.qemu_img(&["convert", "-O", "raw", "img", "before.raw"]);
        let before = s.read_file("before.raw");
        {
            let chain = Chain::open(&path, OpenOptions::write(None)).expect("open for writing");
            let img = &chain.top().image;
            let below = chain.below(0);
            let start = Barrier::new(round.len());
            std::thread::scope(|scope| {
                for pieces in round {
                    let (img, below, start) = (img, &below, &start);
                    scope.spawn(move || {
                        start.wait();
                        for p in pieces {
                            if p.byte == 0 {
                                img.write_zeroes(p.off, p.len, below).expect("write_zeroes");
                            } else {
                                img.write(p.off, &vec![p.byte; p.len as usize], below)
                                    .expect("write");
                            }
                        }
                    });
                }
            });
            img.commit().expect("commit");
        }
        s.assert_clean("img");
        s.qemu_img(&["convert", "-O", "raw", "img", "after.raw"]);
        check(&before, &s.read_file("after.raw"), round);
    }
}

/// Threads write disjoint byte ranges that share clusters and subclusters: the result is
/// exactly the shadow, whatever the interleaving.
fn disjoint_round(
    cuts: &[u64],
    owners: &[usize],
    zero: &[bool],
    threads: usize,
) -> Vec<Vec<Piece>> {
    let mut points: Vec<u64> = cuts.iter().map(|c| c % SPAN).collect();
    points.extend([0, SPAN]);
    points.sort_unstable();
    points.dedup();
    let mut round = vec![Vec::new(); threads];
    for (i, w) in points.windows(2).enumerate() {
        let byte = if zero[i % zero.len()] {
            0
        } else {
            (i % 250) as u8 + 1
        };
        round[owners[i % owners.len()] % threads].push(Piece {
            off: w[0],
            len: w[1] - w[0],
            byte,
        });
    }
    round
}

fn expect_shadow(before: &[u8], after: &[u8], round: &[Vec<Piece>]) {
    let mut shadow = before.to_vec();
    for p in round.iter().flatten() {
        shadow[p.off as usize..(p.off + p.len) as usize].fill(p.byte);
    }
    if let Some(at) = (0..shadow.len()).find(|&i| shadow[i] != after[i]) {
        panic!(
            "byte {at} reads {:#x}, written {:#x} (round {round:?})",
            after[at], shadow[at]
        );
    }
}

/// Overlapping writes have no order, but every byte must read what one of the writes that
/// covered it wrote: never the old content, never another range's bytes.
fn expect_one_of_the_writers(before: &[u8], after: &[u8], round: &[Vec<Piece>]) {
    for (at, (&old, &now)) in before.iter().zip(after).enumerate() {
        let at = at as u64;
        let writers: Vec<u8> = round
            .iter()
            .flatten()
            .filter(|p| p.off <= at && at < p.off + p.len)
            .map(|p| p.byte)
            .collect();
        if writers.is_empty() {
            assert_eq!(now, old, "byte {at}, written by nobody, changed");
        } else {
            assert!(
                writers.contains(&now),
                "byte {at} reads {now:#x}, written {writers:?}"
            );
        }
    }
}

mod concurrent {
    use super::*;
    use proptest::prelude::*;

    fn threads() -> impl Strategy<Value = usize> {
        2usize..=4
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, .. ProptestConfig::default() })]

        /// Disjoint ranges, same clusters: the image equals the shadow.
        #[test]
        fn disjoint_writes_in_shared_clusters(
            setup in 0usize..CONCURRENT_SETUPS.len(),
            rounds in prop::collection::vec(
                (
                    prop::collection::vec(0u64..SPAN, 1..24),
                    prop::collection::vec(0usize..4, 1..8),
                    prop::collection::vec(prop::bool::weighted(0.2), 1..5),
                    threads(),
                ),
                1..3,
            ),
        ) {
            let rounds: Vec<_> = rounds
                .iter()
                .map(|(cuts, owners, zero, n)| disjoint_round(cuts, owners, zero, *n))
                .collect();
            concurrent_rounds(setup, &rounds, &expect_shadow);
        }

        /// Overlapping ranges: each byte reads one of its writers' bytes.
        #[test]
        fn overlapping_writes(
            setup in 0usize..CONCURRENT_SETUPS.len(),
            pieces in prop::collection::vec(
                prop::collection::vec((0u64..SPAN, 1u64..(96 << 10), prop::bool::weighted(0.2)), 1..6),
                2..=4,
            ),
        ) {
            let mut byte = 0u8;
            let round: Vec<Vec<Piece>> = pieces
                .iter()
                .map(|t| {
                    t.iter()
                        .map(|&(off, len, zero)| {
                            byte = byte % 250 + 1;
                            Piece { off, len: len.min(SPAN - off), byte: if zero { 0 } else { byte } }
                        })
                        .collect()
                })
                .collect();
            concurrent_rounds(setup, &[round], &expect_one_of_the_writers);
        }
    }
}

/// An image dropped without `commit` keeps its writes: dropping commits what is staged.
#[test]
fn dropping_an_image_commits_its_writes() {
    for format in ["qcow2", "qed"] {
        let s = Scratch::new();
        s.qemu_img(&["create", "-q", "-f", format, "img", "4M"]);
        let path = s.path("img").to_string_lossy().into_owned();
        {
            let chain = Chain::open(&path, OpenOptions::write(None)).expect("open for writing");
            let img = &chain.top().image;
            img.write(65536, &[0x42; 70_000], &chain.below(0))
                .expect("write");
            img.write_zeroes(1 << 20, 1 << 20, &chain.below(0))
                .expect("write_zeroes");
        }
        s.assert_clean("img");
        let r = s.run(
            "qemu-io",
            &["-c", "read -q -P 0x42 65536 70000", "-f", format, "img"],
        );
        assert_eq!(r.status, 0, "{format}: {}{}", r.stdout, r.stderr);
        assert!(
            !r.stdout.contains("Pattern verification failed"),
            "{format}: the write was lost: {}",
            r.stdout
        );
    }
}

/// A `stream` killed at any write or sync boundary, then run again to the end, leaves no
/// leaked cluster (`qemu-img check` exits 0, without `-r leaks`) and a file within one cluster
/// of a clean run's: the re-run reclaims what the killed commit counted but never referenced.
#[test]
fn a_killed_commit_leaks_nothing_after_the_rerun() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "A", "64M"]);
    s.qemu_io("A", &["write -q -P 0x11 0 8M", "write -q -P 0x12 20M 8M"]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "-b", "A", "-F", "qcow2", "C"]);
    s.qemu_io("C", &["write -q -P 0x31 4M 64k"]);
    s.qemu_img(&["convert", "-O", "raw", "C", "c.raw"]);
    let pristine = s.read_file("C");
    let stream = |kill_at: Option<u64>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cowimg"));
        cmd.args(["stream", "C"]).current_dir(s.dir.path());
        if let Some(n) = kill_at {
            cmd.env("COWIMG_TEST_KILL_AT_IO", n.to_string());
        }
        cmd.output().expect("run cowimg stream").status
    };
    assert!(stream(None).success());
    let clean_len = s.read_file("C").len() as u64;
    let mut killed_inside_commit = 0;
    for n in 1.. {
        s.write_file("C", &pristine);
        if stream(Some(n)).success() {
            break;
        }
        let after_kill = s.run("qemu-img", &["check", "C"]);
        assert!(
            after_kill.status == 0 || after_kill.status == 3,
            "kill at {n}: {}",
            after_kill.stdout
        );
        if after_kill.status == 3 {
            killed_inside_commit += 1;
        }
        assert!(stream(None).success(), "kill at {n}: the re-run fails");
        let r = s.run("qemu-img", &["check", "C"]);
        assert_eq!(r.status, 0, "kill at {n}: after the re-run: {}", r.stdout);
        assert!(s.same("c.raw", "C"), "kill at {n}: content changed");
        let len = s.read_file("C").len() as u64;
        assert!(
            len <= clean_len + 65536,
            "kill at {n}: {len} bytes after the re-run, a clean run makes {clean_len}"
        );
    }
    assert!(killed_inside_commit > 0, "some kill fell inside a commit");
}
