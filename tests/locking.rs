//! cowimg and QEMU never modify the same image at once: cowimg takes QEMU's OFD byte locks.

mod common;
use common::Scratch;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn chain(s: &Scratch) {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "A.qcow2", "16M"]);
    s.qemu_io("A.qcow2", &["write -q -P 1 0 12M"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", "C.qcow2",
    ]);
}

/// qemu-io holding `image` open (read-write unless `-r` is in `extra`) for a few seconds.
fn hold(s: &Scratch, image: &str, extra: &[&str]) -> Child {
    let child = Command::new("qemu-io")
        .args(extra)
        .args(["-c", "sleep 6000", image])
        .current_dir(s.dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-io (install qemu-utils)");
    // Wait until it holds its locks (watching /proc/locks: probing with another qemu-io
    // could itself make the holder fail to start).
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !holds_lock(&s.path(image), 100) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Whether some process holds an OFD lock covering `byte` of the file.
fn holds_lock(path: &std::path::Path, byte: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0);
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[5].rsplit(':').next().and_then(|i| i.parse::<u64>().ok()) == Some(ino)
            && f[6].parse::<u64>().is_ok_and(|a| a <= byte)
            && f[7].parse::<u64>().is_ok_and(|b| b >= byte)
    })
}

#[test]
fn writers_refuse_an_image_qemu_holds_and_readers_need_force_share() {
    let s = Scratch::new();
    chain(&s);
    let mut q = hold(&s, "C.qcow2", &[]);
    let r = s.cowimg(&["stream", "C.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(
        r.stderr.contains("Failed to get \"write\" lock")
            && r.stderr
                .contains("Is another process using the image [C.qcow2]?"),
        "{}",
        r.stderr
    );
    let r = s.cowimg(&["info", "C.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(
        r.stderr.contains("Failed to get shared \"write\" lock"),
        "{}",
        r.stderr
    );
    s.cowimg_ok(&["info", "-U", "C.qcow2"]);
    let r = s.cowimg(&["rebase", "-u", "-b", "", "C.qcow2"]);
    assert_eq!(r.status, 1, "{}{}", r.stdout, r.stderr);
    // Its backing file is only read by qemu-io: cowimg may read it, not write it.
    s.cowimg_ok(&["info", "A.qcow2"]);
    let _ = q.kill();
    let _ = q.wait();
    s.cowimg_ok(&["stream", "C.qcow2"]);
}

#[test]
fn qemu_is_refused_while_cowimg_streams() {
    let s = Scratch::new();
    chain(&s);
    let mut c = Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(["stream", "--speed", "2M", "C.qcow2"])
        .current_dir(s.dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let r = s.run("qemu-io", &["-c", "read 0 512", "C.qcow2"]);
    assert_ne!(r.status, 0, "qemu-io opened an image cowimg is writing");
    assert!(
        format!("{}{}", r.stdout, r.stderr).contains("lock"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    let r = s.run("qemu-img", &["info", "C.qcow2"]);
    assert_ne!(r.status, 0);
    s.qemu_img(&["info", "-U", "C.qcow2"]);
    // Nobody may write the backing file meanwhile either.
    let r = s.run("qemu-io", &["-c", "write 0 512", "A.qcow2"]);
    assert_ne!(
        r.status, 0,
        "qemu-io wrote the backing file of a running stream"
    );
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn a_read_only_qemu_allows_cowimg_readers_only() {
    let s = Scratch::new();
    chain(&s);
    let mut q = hold(&s, "C.qcow2", &["-r"]);
    // qemu-io -r does not share write: info works, writers are refused.
    s.cowimg_ok(&["info", "C.qcow2"]);
    let r = s.cowimg(&["stream", "C.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(
        r.stderr.contains("Failed to get \"write\" lock"),
        "{}",
        r.stderr
    );
    let _ = q.kill();
    let _ = q.wait();
}

#[test]
fn reset_refuses_an_overlay_qemu_holds() {
    let s = Scratch::new();
    chain(&s);
    s.qemu_io("C.qcow2", &["write -q -P 9 0 1M"]);
    let before = s.read_file("C.qcow2");
    let mut q = hold(&s, "C.qcow2", &[]);
    let r = s.cowimg(&["reset", "C.qcow2"]);
    let _ = q.kill();
    let _ = q.wait();
    assert_eq!(r.status, 1, "{}", r.show());
    assert!(
        r.stderr.contains("Failed to get \"write\" lock"),
        "{}",
        r.stderr
    );
    assert_eq!(s.read_file("C.qcow2"), before, "the held overlay changed");
    assert!(!s.path(".C.qcow2.cowimg-partial").exists());
}
