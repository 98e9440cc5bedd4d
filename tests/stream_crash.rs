//! Interrupting `stream` at any moment never corrupts the image or changes what it reads, and
//! running it again finishes the job, copying only what was left.

mod common;
use common::Scratch;
use std::process::Command;
use std::time::Duration;

/// A <- B <- C with 24 MiB of non-zero data to copy into C, in pieces spread over the disk.
fn chain(s: &Scratch, fmt: &str) {
    let (a, b, c) = (format!("A.{fmt}"), format!("B.{fmt}"), format!("C.{fmt}"));
    s.qemu_img(&["create", "-q", "-f", fmt, &a, "64M"]);
    s.qemu_io(&a, &["write -q -P 0x11 0 8M", "write -q -P 0x12 20M 8M"]);
    s.qemu_img(&["create", "-q", "-f", fmt, "-b", &a, "-F", fmt, &b]);
    s.qemu_io(&b, &["write -q -P 0x21 40M 8M", "write -q -z 2M 1M"]);
    s.qemu_img(&["create", "-q", "-f", fmt, "-b", &b, "-F", fmt, &c]);
    s.qemu_io(&c, &["write -q -P 0x31 4M 64k"]);
    s.qemu_img(&["convert", "-O", "raw", &c, "c.raw"]);
}

/// What the image must look like after any interruption: no corruption (leaks are fine:
/// `check -r leaks` reclaims them), same guest data, backing file unchanged.
fn assert_intact(s: &Scratch, fmt: &str) {
    let c = format!("C.{fmt}");
    let check = s.run("qemu-img", &["check", &c]);
    assert!(
        check.status == 0 || check.status == 3,
        "qemu-img check after a crash: {}{}",
        check.stdout,
        check.stderr
    );
    assert!(s.same("c.raw", &c), "content changed after a crash");
    let info = s.qemu_info(&c);
    assert_eq!(
        info["backing-filename"],
        format!("B.{fmt}"),
        "backing file changed before the end"
    );
}

/// Data already copied into C (C's own 64 KiB write excluded), from qemu-img map.
fn copied_so_far(s: &Scratch, c: &str) -> u64 {
    let map: serde_json::Value =
        serde_json::from_str(&s.qemu_img(&["map", "--output=json", c])).unwrap();
    let own: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    own - (64 << 10)
}

/// Runs the stream again: it completes, and copies exactly what was not yet copied.
fn resume(s: &Scratch, fmt: &str) -> u64 {
    let c = format!("C.{fmt}");
    let before = copied_so_far(s, &c);
    let out = s.cowimg_ok(&["stream", "--output", "json", &c]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("result JSON");
    assert!(s.same("c.raw", &c));
    // Leaks of the kill (qcow2: only if it fell between two syncs of a commit) are reclaimed
    // by the resumed run itself, before it allocates anything.
    s.assert_clean(&c);
    assert!(s.qemu_info(&c).get("backing-filename").is_none());
    let copied = v["copied"].as_u64().expect("copied");
    assert_eq!(
        before + copied,
        TOTAL,
        "{fmt}: {before} were copied before the interruption, {copied} after"
    );
    copied
}

/// Bytes a complete stream copies: 24 MiB of data, less B's zeroed 1 MiB of A and C's own 64 KiB.
const TOTAL: u64 = (23 << 20) - (64 << 10);

#[test]
fn fault_hook_at_several_points() {
    for fmt in ["qcow2", "qed"] {
        for n in [1u64, 3, 5, 8, 11] {
            let s = Scratch::new();
            chain(&s, fmt);
            let r = Command::new(env!("CARGO_BIN_EXE_cowimg"))
                .args(["stream", &format!("C.{fmt}")])
                .current_dir(s.dir.path())
                .env("COWIMG_TEST_ABORT_AFTER_CHUNKS", n.to_string())
                .env("COWIMG_TEST_BATCH_BYTES", (4u64 << 20).to_string())
                .output()
                .unwrap();
            assert!(!r.status.success(), "the hook should have aborted the run");
            assert_intact(&s, fmt);
            let copied = resume(&s, fmt);
            // Batches of 4 MiB: by the 8th chunk at least one batch was committed.
            if n >= 8 {
                assert!(
                    copied < TOTAL,
                    "{fmt} n={n}: nothing of the first run was kept"
                );
            }
        }
    }
}

#[test]
fn sigkill_at_random_moments() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for fmt in ["qcow2", "qed"] {
        for _ in 0..4 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let s = Scratch::new();
            chain(&s, fmt);
            let mut child = Command::new(env!("CARGO_BIN_EXE_cowimg"))
                .args(["stream", "--speed", "16M", &format!("C.{fmt}")])
                .current_dir(s.dir.path())
                .env("COWIMG_TEST_BATCH_BYTES", (2u64 << 20).to_string())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(50 + seed % 1300));
            let _ = child.kill();
            let _ = child.wait();
            let c = format!("C.{fmt}");
            if s.qemu_info(&c).get("backing-filename").is_none() {
                // It finished before the kill: then it must be complete.
                assert!(s.same("c.raw", &c));
                continue;
            }
            assert_intact(&s, fmt);
            let copied = resume(&s, fmt);
            assert!(copied <= TOTAL);
        }
    }
}

#[test]
fn sigterm_stops_cleanly_and_says_how_to_resume() {
    let s = Scratch::new();
    chain(&s, "qcow2");
    let child = Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(["stream", "--speed", "4M", "C.qcow2"])
        .current_dir(s.dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: sending a signal to our own child.
    unsafe { libc_kill(child.id() as i32, 15) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run the same command again"));
    // A clean stop commits what it copied: no leaks at all.
    s.assert_clean("C.qcow2");
    assert!(s.same("c.raw", "C.qcow2"));
    let copied = resume(&s, "qcow2");
    assert!(copied < TOTAL, "the interrupted run's copy was kept");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
