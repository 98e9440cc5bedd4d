//! Power-loss simulation. A kill keeps the page cache, so it cannot catch a missing or
//! misordered sync; this can. The command runs in process with its image over a recording
//! storage that logs every write, resize and sync cowimg issues to it. From the log, crash
//! states are built: the last synced state plus nothing, any prefix, or random (and torn)
//! subsets of the writes after it, since writes between two syncs may land in any order
//! (see `crash_states`). Every state must satisfy the command's postconditions, checked with
//! qemu-img as the oracle:
//!
//! * stream, rebase, copy-on-read: `qemu-img check` finds no corruption (leaks are allowed),
//!   `qemu-img compare` with the pristine guest data finds no difference, the backing file
//!   is the old or the new one, and running the command again completes: same data, and after
//!   `qemu-img check -r leaks` no qcow2 leak is left (QED leaks cannot be reclaimed, by qemu
//!   either).
//! * check -r all: no more corruptions than before; every cluster reads as before the repair
//!   or as after a complete repair; a second `check -r all` completes the repair.
//!
//! `COWIMG_CRASH_STATES=N` sets the states per scenario (CI: 24); `COWIMG_SEED` the seed.

mod common;
#[path = "common/reliability.rs"]
mod reliability;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

use common::Scratch;
use cowimg::chain::{open_layer, Chain, OpenOptions};
use cowimg_formats::{CheckMode, Format, Storage};
use reliability::*;

/// States tried, over all scenarios of this run (printed by each test).
static STATES: AtomicU64 = AtomicU64::new(0);

fn setup() {
    static ONCE: Once = Once::new();
    // Several commits even in these small images.
    ONCE.call_once(|| std::env::set_var("COWIMG_TEST_BATCH_BYTES", (512u64 << 10).to_string()));
}

fn states_per_scenario() -> usize {
    count("COWIMG_CRASH_STATES", 24) as usize
}

/// The postconditions of a streaming-like command for one crash state written at `state`:
/// no corruption, the pristine guest data, the old or the new backing file, and a re-run
/// (`run`) that completes with the same data, the new backing file, and (qcow2) no leak left
/// once `qemu-img check -r leaks` ran. Returns what was violated.
#[allow(clippy::too_many_arguments)]
fn verify_state(
    s: &Scratch,
    fmt: &str,
    state: &str,
    old: Option<&str>,
    new: Option<&str>,
    copy_on_read: bool,
    run: &dyn Fn(&Chain) -> cowimg::Result<()>,
) -> Result<bool, String> {
    let r = s.run("qemu-img", &["check", state]);
    if r.status != 0 && r.status != 3 {
        return Err(format!("qemu-img check: {}{}", r.stdout, r.stderr));
    }
    if !s.same("pristine.raw", state) {
        return Err("the guest data changed".into());
    }
    let path = s.path(state);
    let b = backing_of(&path);
    if b.as_deref() != old && b.as_deref() != new {
        return Err(format!("backing file {b:?}, expected {old:?} or {new:?}"));
    }
    let switched = b.as_deref() != old;
    {
        let st: Arc<dyn Storage> = Arc::new(file_storage(&path));
        let chain = chain_over(&path, st, copy_on_read);
        run(&chain).map_err(|e| format!("the re-run failed: {e}"))?;
    }
    if !s.same("pristine.raw", state) {
        return Err("the re-run changed the guest data".into());
    }
    if backing_of(&path).as_deref() != new {
        return Err(format!(
            "backing file after the re-run: {:?}",
            backing_of(&path)
        ));
    }
    let r = s.run("qemu-img", &["check", "-r", "leaks", state]);
    if !(r.status == 0 || (fmt == "qed" && r.status == 3)) {
        return Err(format!(
            "qemu-img check -r leaks after the re-run: {}{}",
            r.stdout, r.stderr
        ));
    }
    Ok(switched)
}

/// Runs `run` on a chain whose top is over a recording storage; returns the file before the
/// run and the log.
fn record(
    s: &Scratch,
    top: &str,
    copy_on_read: bool,
    run: &dyn Fn(&Chain) -> cowimg::Result<()>,
) -> (Vec<u8>, Vec<IoOp>) {
    let top_path = s.path(top);
    let initial = std::fs::read(&top_path).unwrap();
    let rec = Arc::new(Recording::new(file_storage(&top_path)));
    {
        let chain = chain_over(&top_path, rec.clone(), copy_on_read);
        run(&chain).unwrap_or_else(|e| panic!("{top}: the recorded run failed: {e}"));
    }
    (initial, rec.take_log())
}

/// One streaming-like scenario: `run` does the job on a chain whose top is over the given
/// storage; every crash state of the recorded run must satisfy [`verify_state`].
#[allow(clippy::too_many_arguments)]
fn scenario(
    s: &Scratch,
    label: &str,
    fmt: &str,
    top: &str,
    old: Option<&str>,
    new: Option<&str>,
    copy_on_read: bool,
    seed: u64,
    run: &dyn Fn(&Chain) -> cowimg::Result<()>,
) {
    let (initial, log) = record(s, top, copy_on_read, run);
    let syncs = log.iter().filter(|o| matches!(o, IoOp::Sync)).count();
    assert!(syncs >= 2, "{label}: only {syncs} syncs recorded");
    let state = format!("state.{fmt}");
    let mut rng = Rng::new(seed);
    let mut new_pointer = 0;
    let n = crash_states(
        &initial,
        &log,
        states_per_scenario(),
        &mut rng,
        |what, bytes| {
            std::fs::write(s.path(&state), bytes).unwrap();
            match verify_state(s, fmt, &state, old, new, copy_on_read, run) {
                Ok(switched) => new_pointer += switched as u64,
                Err(e) => panic!("{label} (seed {seed:#x}), {what}: {e}"),
            }
        },
    );
    STATES.fetch_add(n as u64, Ordering::Relaxed);
    eprintln!(
        "{label}: {n} crash states from {} changes and {syncs} syncs ({new_pointer} with the new backing file); {} states so far",
        log.len(),
        STATES.load(Ordering::Relaxed)
    );
}

/// The harness itself: without its syncs, the same run's crash states must break the
/// postconditions (the header switch lands before the data it needs). A harness that
/// passed this run too could not see a missing sync.
#[test]
fn the_harness_catches_a_missing_sync() {
    setup();
    let s = Scratch::new();
    chain_fixture(&s, "qcow2", "");
    let run = |ch: &Chain| stream_in(ch, None, 2);
    let (initial, log) = record(&s, "C.qcow2", false, &run);
    let unsynced: Vec<IoOp> = log
        .into_iter()
        .filter(|o| !matches!(o, IoOp::Sync))
        .collect();
    let mut rng = Rng::new(first_seed(0x5eed_0000));
    let mut broken = 0;
    let n = crash_states(&initial, &unsynced, 40, &mut rng, |_, bytes| {
        s.write_file("state.qcow2", bytes);
        // The re-run may fail on such a state; only the first postconditions are asked.
        let r = s.run("qemu-img", &["check", "state.qcow2"]);
        if (r.status != 0 && r.status != 3) || !s.same("pristine.raw", "state.qcow2") {
            broken += 1;
        }
    });
    assert!(
        broken > 0,
        "none of {n} states of an unsynced run broke anything"
    );
    eprintln!("without syncs, {broken} of {n} crash states break the image");
}

/// A <- B <- C over 32 MiB with small pieces of data scattered over every 2 MiB chunk, so
/// that a stream makes many commits (epochs) of several writes each.
fn scattered_chain(s: &Scratch, fmt: &str) {
    let n = |x: &str| format!("{x}.{fmt}");
    s.qemu_img(&["create", "-q", "-f", fmt, &n("A"), "32M"]);
    let a: Vec<String> = (0..24u64)
        .map(|i| format!("write -q -P {} {} 96k", 0x40 + i, i * (1331 << 10)))
        .collect();
    s.qemu_io(&n("A"), &a.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    s.qemu_img(&["create", "-q", "-f", fmt, "-b", &n("A"), "-F", fmt, &n("B")]);
    let b: Vec<String> = (0..12u64)
        .map(|i| {
            if i % 3 == 0 {
                format!("write -q -z {} 64k", i * (2711 << 10))
            } else {
                format!("write -q -P {} {} 40k", 0x80 + i, i * (2711 << 10) + 4096)
            }
        })
        .collect();
    s.qemu_io(&n("B"), &b.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    s.qemu_img(&["create", "-q", "-f", fmt, "-b", &n("B"), "-F", fmt, &n("C")]);
    s.qemu_io(
        &n("C"),
        &["write -q -P 0x31 3M 64k", "write -q -P 0x32 17M 8k"],
    );
    s.qemu_img(&["convert", "-O", "raw", &n("C"), "pristine.raw"]);
}

#[test]
fn stream_of_scattered_data_survives_power_loss() {
    setup();
    let seed = first_seed(0x5eed_0006);
    for fmt in ["qcow2", "qed"] {
        let s = Scratch::new();
        scattered_chain(&s, fmt);
        let c = format!("C.{fmt}");
        let label = format!("stream {c} (scattered)");
        scenario(
            &s,
            &label,
            fmt,
            &c,
            Some(&format!("B.{fmt}")),
            None,
            false,
            seed,
            &|ch| stream_in(ch, None, 2),
        );
    }
}

#[test]
fn stream_survives_power_loss() {
    setup();
    let seed = first_seed(0x5eed_0001);
    for (fmt, opts) in [
        ("qcow2", ""),
        ("qed", ""),
        ("qcow2", "compat=0.10,cluster_size=4k"),
    ] {
        let s = Scratch::new();
        chain_fixture(&s, fmt, opts);
        let c = format!("C.{fmt}");
        let label = format!("stream {c} ({opts})");
        scenario(
            &s,
            &label,
            fmt,
            &c,
            Some(&format!("B.{fmt}")),
            None,
            false,
            seed,
            &|ch| stream_in(ch, None, 2),
        );
    }
}

#[test]
fn stream_with_base_survives_power_loss() {
    setup();
    let seed = first_seed(0x5eed_0002);
    for (fmt, opts) in [("qcow2", "extended_l2=on,cluster_size=32k"), ("qed", "")] {
        let s = Scratch::new();
        chain_fixture(&s, fmt, opts);
        let (a, c) = (format!("A.{fmt}"), format!("C.{fmt}"));
        let label = format!("stream --base {a} {c} ({opts})");
        scenario(
            &s,
            &label,
            fmt,
            &c,
            Some(&format!("B.{fmt}")),
            Some(&a),
            false,
            seed,
            &|ch| {
                stream_in(
                    ch,
                    Some(
                        1 + ch.layers[1..]
                            .iter()
                            .position(|l| l.filename.ends_with(&a))
                            .unwrap(),
                    ),
                    2,
                )
            },
        );
    }
}

#[test]
fn rebase_survives_power_loss() {
    setup();
    let seed = first_seed(0x5eed_0003);
    for (fmt, opts) in [("qcow2", ""), ("qed", "")] {
        let s = Scratch::new();
        chain_fixture(&s, fmt, opts);
        let (c, nn) = (format!("C.{fmt}"), format!("N.{fmt}"));
        let f = Format::from_name(fmt).unwrap();
        let label = format!("rebase -b {nn} {c}");
        scenario(
            &s,
            &label,
            fmt,
            &c,
            Some(&format!("B.{fmt}")),
            Some(&nn),
            false,
            seed,
            &|ch| rebase_in(ch, Some((&nn, f)), 2),
        );
    }
}

#[test]
fn copy_on_read_survives_power_loss() {
    setup();
    let seed = first_seed(0x5eed_0004);
    for fmt in ["qcow2", "qed"] {
        let s = Scratch::new();
        chain_fixture(&s, fmt, "");
        let (b, f) = (format!("B.{fmt}"), format!("F.{fmt}"));
        s.cowimg_ok(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-b",
            &b,
            "-F",
            fmt,
            "--copy-on-read",
            &f,
        ]);
        s.qemu_io(&f, &["write -q -P 0x55 2M 64k"]);
        s.qemu_img(&["convert", "-O", "raw", &f, "pristine.raw"]);
        let label = format!("copy-on-read of {f}");
        // Reads in 700 KiB pieces: fills of every shape, committed when the chain finishes.
        scenario(&s, &label, fmt, &f, Some(&b), Some(&b), true, seed, &|ch| {
            read_all(ch, 700 << 10).map(|_| ())
        });
        // Everything below is in F now.
        let map: serde_json::Value =
            serde_json::from_str(&s.qemu_img(&["map", "--output=json", &f])).unwrap();
        assert!(
            map.as_array()
                .unwrap()
                .iter()
                .all(|e| e["depth"] == 0 || e["data"] == false),
            "{fmt}: {map}"
        );
    }
}

#[test]
fn check_repair_survives_power_loss() {
    setup();
    let seed = first_seed(0x5eed_0005);
    // The third case's repair moves the snapshot table (an incomplete v3 entry).
    for (fmt, snapshot) in [("qcow2", false), ("qed", false), ("qcow2", true)] {
        let s = Scratch::new();
        let name = if snapshot {
            damaged_snapshot_table(&s)
        } else {
            damaged(&s, fmt)
        };
        let format = Format::from_name(fmt).unwrap();
        let cs = 64 << 10;
        let before_bytes = s.read_file(&name);
        let before_corruptions = corruptions(&s, &name);
        assert!(before_corruptions > 0, "{fmt}: the damage is not seen");
        let before = clusters(&before_bytes, format, cs);
        // The recorded repair, on the file.
        let rec = Arc::new(Recording::new(file_storage(&s.path(&name))));
        {
            let layer = open_layer(rec.clone(), &name, Some(format), true, true).unwrap();
            layer.image.check(CheckMode::RepairAll).unwrap();
        }
        let log = rec.take_log();
        let full = clusters(&s.read_file(&name), format, cs);
        let state_name = format!("state.{fmt}");
        let mut rng = Rng::new(seed);
        let label = format!("check -r all {name} (seed {seed:#x})");
        let n = crash_states(
            &before_bytes,
            &log,
            states_per_scenario(),
            &mut rng,
            |what, bytes| {
                let what = format!("{label}, {what}");
                s.write_file(&state_name, bytes);
                let c = corruptions(&s, &state_name);
                assert!(
                    c <= before_corruptions,
                    "{what}: {c} corruptions, {before_corruptions} before the repair"
                );
                let now = clusters(bytes, format, cs);
                assert_eq!(now.len(), before.len(), "{what}: the image no longer opens");
                for (i, ((b, f), n)) in before.iter().zip(&full).zip(&now).enumerate() {
                    if b.is_some() {
                        assert!(
                            n == b || n == f,
                            "{what}: cluster {i} reads neither as before nor as repaired"
                        );
                    }
                }
                // A second repair finishes the job.
                {
                    let layer = open_layer(
                        Arc::new(file_storage(&s.path(&state_name))),
                        &state_name,
                        Some(format),
                        true,
                        true,
                    )
                    .unwrap();
                    layer
                        .image
                        .check(CheckMode::RepairAll)
                        .unwrap_or_else(|e| panic!("{what}: the second repair failed: {e}"));
                }
                let r = s.run("qemu-img", &["check", &state_name]);
                assert!(
                    r.status == 0 || (fmt == "qed" && r.status == 3),
                    "{what}: after a second repair: {}{}",
                    r.stdout,
                    r.stderr
                );
                let again = clusters(&s.read_file(&state_name), format, cs);
                for (i, (f, a)) in full.iter().zip(&again).enumerate() {
                    if f.is_some() {
                        assert_eq!(f, a, "{what}: cluster {i} after the second repair differs from a complete repair");
                    }
                }
            },
        );
        STATES.fetch_add(n as u64, Ordering::Relaxed);
        eprintln!(
            "{label}: {n} crash states from {} changes; {} states so far",
            log.len(),
            STATES.load(Ordering::Relaxed)
        );
    }
}

/// Copy-on-read through an image opened the ordinary way (the command path) agrees with the
/// recording path used above (guards the harness itself).
#[test]
fn recording_storage_changes_nothing() {
    setup();
    let s = Scratch::new();
    chain_fixture(&s, "qcow2", "");
    std::fs::copy(s.path("C.qcow2"), s.path("C2.qcow2")).unwrap();
    let rec = Arc::new(Recording::new(file_storage(&s.path("C.qcow2"))));
    stream_in(&chain_over(&s.path("C.qcow2"), rec.clone(), false), None, 1).unwrap();
    let c2 = s.path("C2.qcow2").to_string_lossy().into_owned();
    stream_in(
        &Chain::open(&c2, OpenOptions::write(None)).unwrap(),
        None,
        1,
    )
    .unwrap();
    assert!(s.same("C.qcow2", "C2.qcow2"));
    s.assert_clean("C.qcow2");
    assert!(!rec.take_log().is_empty());
}
