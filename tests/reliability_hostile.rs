//! Hostile inputs and hostile environments that `tests/read_hostile.rs` and
//! `tests/locking.rs` do not already cover (docs/reliability.md lists both): metadata tables
//! that overlap each other, a backing name that names a device, a 1000-deep chain, a full
//! disk (a small tmpfs, and RLIMIT_FSIZE), injected EIO/ENOSPC/EACCES under the formats
//! crate, and permission denied for an unprivileged user.

mod common;
#[path = "common/reliability.rs"]
mod reliability;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use common::Scratch;
use cowimg_formats::{Format, Storage};
use reliability::*;

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// C over A (qcow2, 4 MiB), C holding 64 KiB at 1 MiB; the L1 entry of C is then pointed at
/// one of C's other metadata clusters (`which`: "l1", "reftable", "refblock").
fn overlapping(s: &Scratch, which: &str) -> String {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "A.qcow2", "4M"]);
    s.qemu_io("A.qcow2", &["write -q -P 1 0 4M"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", "C.qcow2",
    ]);
    s.qemu_io("C.qcow2", &["write -q -P 2 1M 64k"]);
    let mut b = s.read_file("C.qcow2");
    let (l1, rt) = (be64(&b, 40) as usize, be64(&b, 48) as usize);
    let target = match which {
        "l1" => l1 as u64,
        "reftable" => rt as u64,
        _ => be64(&b, rt),
    };
    b[l1..l1 + 8].copy_from_slice(&((1u64 << 63) | target).to_be_bytes());
    let name = format!("over-{which}.qcow2");
    s.write_file(&name, &b);
    name
}

/// The QED form: C's first L1 entry points at the L1 table itself.
fn overlapping_qed(s: &Scratch) -> String {
    s.qemu_img(&["create", "-q", "-f", "qed", "A.qed", "4M"]);
    s.qemu_io("A.qed", &["write -q -P 1 0 4M"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qed", "-b", "A.qed", "-F", "qed", "C.qed",
    ]);
    s.qemu_io("C.qed", &["write -q -P 2 1M 64k"]);
    let mut b = s.read_file("C.qed");
    let l1 = u64::from_le_bytes(b[40..48].try_into().unwrap()) as usize;
    b[l1..l1 + 8].copy_from_slice(&(l1 as u64).to_le_bytes());
    s.write_file("over-l1.qed", &b);
    "over-l1.qed".into()
}

/// An L2 table that is another metadata table (the L1 table, the refcount table, a refcount
/// block): reads see what qemu sees, and `check` reports what qemu-img check reports.
#[test]
fn l2_tables_overlapping_metadata_read_as_qemu_reads_them() {
    for which in ["l1", "reftable", "refblock"] {
        let s = Scratch::new();
        let img = overlapping(&s, which);
        let q = s.run("qemu-img", &["convert", "-O", "raw", &img, "q.raw"]);
        let c = s.cowimg(&["convert", "-O", "raw", &img, "c.raw"]);
        assert!(!c.stderr.contains("panicked"), "{which}: {}", c.stderr);
        if q.status == 0 && c.status == 0 {
            assert!(
                s.same("q.raw", "c.raw"),
                "{which}: cowimg reads differently from qemu"
            );
        }
        let qc = s.run("qemu-img", &["check", &img]);
        let cc = s.cowimg(&["check", &img]);
        assert_eq!(
            cc.status, qc.status,
            "{which}: cowimg check {}{}; qemu-img {}{}",
            cc.stdout, cc.stderr, qc.stdout, qc.stderr
        );
        assert_eq!(qc.status, 2, "{which}: the damage is a corruption");
    }
}

/// What cowimg writes must never land on metadata: qemu refuses such writes ("Preventing
/// invalid write on metadata") and marks the image corrupt. Found by this harness: cowimg
/// used to edit an L2 table in place that was also the L1 table or a refcount block (QED: 4
/// corruptions became 32952). The first write now maps the metadata and refuses overlaps
/// (`formats/src/qcow2/overlap.rs`, the QED writer's scan).
#[test]
fn writes_through_an_l2_table_overlapping_metadata_are_refused() {
    for which in ["l1", "refblock", "qed"] {
        let s = Scratch::new();
        let img = if which == "qed" {
            overlapping_qed(&s)
        } else {
            overlapping(&s, which)
        };
        s.qemu_img(&["convert", "-O", "raw", &img, "before.raw"]);
        let before = s.run("qemu-img", &["check", "--output=json", &img]);
        let r = s.cowimg(&["stream", &img]);
        if r.status == 0 {
            assert!(
                s.same("before.raw", &img),
                "{which}: stream changed the guest data"
            );
            let after = s.run("qemu-img", &["check", "--output=json", &img]);
            assert_eq!(
                after.stdout, before.stdout,
                "{which}: stream changed the metadata damage"
            );
        } else {
            assert!(r.stderr.contains(&img), "{which}: {}", r.stderr);
        }
    }
}

/// What is not storage is refused, as an image or as a backing file, the same way for every
/// command: a character device (`/dev/zero` reads forever, `/dev/null` reads nothing; qemu
/// reads both as 0-byte images) and a pseudo-file whose length the kernel cannot tell
/// (`/proc/self/mem`, which cowimg used to read as a 0-byte image; qemu refuses it with the
/// same message).
#[test]
fn a_backing_file_that_is_a_device_or_pseudo_file_is_refused() {
    let s = Scratch::new();
    for (dev, why) in [
        ("/dev/zero", "not a regular file or block device"),
        ("/dev/null", "not a regular file or block device"),
        (
            "/proc/self/mem",
            "Could not refresh total sector count: Invalid argument",
        ),
    ] {
        s.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-u", "-b", dev, "-F", "raw", "ov.qcow2", "8M",
        ]);
        for args in [
            vec!["info", "--backing-chain", "ov.qcow2"],
            vec!["map", "ov.qcow2"],
            vec!["stream", "ov.qcow2"],
            vec!["convert", "-O", "raw", "ov.qcow2", "o.raw"],
            vec!["info", "-f", "raw", dev],
            vec!["convert", "-f", "raw", "-O", "raw", dev, "o.raw"],
        ] {
            let r = s.cowimg(&args);
            assert_eq!(r.status, 1, "{dev} {args:?}: {}{}", r.stdout, r.stderr);
            assert!(
                r.stderr.contains(&format!("Could not open '{dev}'")) && r.stderr.contains(why),
                "{dev} {args:?}: {}",
                r.stderr
            );
        }
    }
}

/// `n` tiny qcow2 images d0000 <- d0001 <- ... (512-byte clusters, made by patching the
/// backing name of one qemu-made overlay: 1000 qemu-img runs would take a minute). Layer i
/// holds byte `i` at guest offset `i * 512` when `i % 50 == 0` (d0000: 0xaa at 0); see
/// [`deep_chain_contents`].
fn deep_chain(s: &Scratch, n: usize) -> String {
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "d0000.qcow2",
        "4M",
    ]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        "d0000.qcow2",
        "-F",
        "qcow2",
        "tmpl.qcow2",
        "4M",
    ]);
    let t = s.read_file("tmpl.qcow2");
    let off = u64::from_be_bytes(t[8..16].try_into().unwrap()) as usize;
    assert_eq!(&t[off..off + 11], b"d0000.qcow2");
    for i in 1..n {
        let name = format!("d{i:04}.qcow2");
        s.write_file(&name, &t);
        if i % 50 == 0 {
            // Written while its backing file is still d0000 (qemu-io opens the whole chain).
            s.qemu_io(
                &name,
                &[&format!("write -q -P {} {} 512", i % 256, i * 512)],
            );
        }
        let mut b = s.read_file(&name);
        b[off..off + 11].copy_from_slice(format!("d{:04}.qcow2", i - 1).as_bytes());
        s.write_file(&name, &b);
    }
    s.qemu_io("d0000.qcow2", &["write -q -P 0xaa 0 512"]);
    format!("d{:04}.qcow2", n - 1)
}

/// What the top of a [`deep_chain`] of `n` images reads.
fn deep_chain_contents(n: usize) -> Vec<u8> {
    let mut want = vec![0u8; 4 << 20];
    want[..512].fill(0xaa);
    for i in (50..n).step_by(50) {
        want[i * 512..(i + 1) * 512].fill((i % 256) as u8);
    }
    want
}

/// qemu has no fixed depth limit (only its open-file limit); cowimg opens up to 4096 images,
/// without recursion (a deep chain must not overflow a worker's stack), and refuses a deeper
/// one by name. The old limit refused anything beyond 257 images.
#[test]
fn a_4096_deep_chain_works_and_a_deeper_one_is_refused_by_name() {
    let s = Scratch::new();
    let top = deep_chain(&s, 4097);
    for args in [
        vec!["info", "--backing-chain", &top],
        vec!["map", &top],
        vec!["convert", "-O", "raw", &top, "o.raw"],
        vec!["stream", &top],
    ] {
        let r = s.cowimg(&args);
        assert_eq!(r.status, 1, "{args:?}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains("more than 4096 images"),
            "{args:?}: {}",
            r.stderr
        );
    }
    s.cowimg_ok(&["info", &top]);
    // One image fewer is within the limit: read, mapped and copied through all 4096 layers.
    let top = "d4095.qcow2";
    s.cowimg_ok(&["convert", "-O", "raw", top, "c.raw"]);
    assert!(s.read_file("c.raw") == deep_chain_contents(4096));
    let map = s.cowimg_ok(&["map", "--output", "json", top]);
    // d0050 lies 4045 layers below the top.
    assert!(map.contains("\"depth\": 4045"), "{map}");
    s.cowimg_ok(&["stream", "--base", "d2000.qcow2", top]);
    // Read back by cowimg: qemu-img compare through 2000 layers is too slow for a test
    // (qemu-img map takes 16 s for 1000).
    s.cowimg_ok(&["convert", "-O", "raw", top, "s.raw"]);
    assert!(s.read_file("s.raw") == deep_chain_contents(4096));
    s.assert_clean(top);

    // A 300-deep chain, as qemu-img reads it.
    let s = Scratch::new();
    let top = deep_chain(&s, 300);
    s.qemu_img(&["convert", "-O", "raw", &top, "q.raw"]);
    s.cowimg_ok(&["convert", "-O", "raw", &top, "c.raw"]);
    assert!(s.same("q.raw", "c.raw"));
    assert!(s.read_file("q.raw") == deep_chain_contents(300));
    s.cowimg_ok(&["stream", &top]);
    assert!(s.same("q.raw", &top));
    s.assert_clean(&top);
}

/// After a failed stream: no corruption, the same guest data, the old backing file.
fn assert_consistent(s: &Scratch, image: &str, raw: &str, backing: &str, what: &str) {
    let r = s.run("qemu-img", &["check", image]);
    assert!(
        r.status == 0 || r.status == 3,
        "{what}: qemu-img check: {}{}",
        r.stdout,
        r.stderr
    );
    assert!(s.same(raw, image), "{what}: the guest data changed");
    assert_eq!(s.qemu_info(image)["backing-filename"], backing, "{what}");
}

/// A small tmpfs mounted for the test (the machine runs as root), unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: std::path::PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).unwrap();
        let r = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "mounting a tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&r.stderr)
        );
        Tmpfs(at)
    }

    fn resize(&self, size: &str) {
        let r = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// ENOSPC mid-stream: C lives on a 3 MiB tmpfs and the stream needs more. The stream fails
/// naming the cause, C stays consistent and reads as before, and once there is room the same
/// command finishes the job.
#[test]
fn a_full_disk_mid_stream_leaves_the_image_consistent_and_resumable() {
    for fmt in ["qcow2", "qed"] {
        let s = Scratch::new();
        chain_fixture(&s, fmt, "");
        let fs = Tmpfs::mount(s.path("small"), "3M");
        let c = format!("small/C.{fmt}");
        std::fs::copy(s.path(&format!("C.{fmt}")), s.path(&c)).unwrap();
        s.qemu_img(&["rebase", "-u", "-b", &format!("../B.{fmt}"), "-F", fmt, &c]);
        let r = s.cowimg(&["stream", &c]);
        assert_eq!(r.status, 1, "{fmt}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains("No space left on device") && r.stderr.contains(&c),
            "{fmt}: {}",
            r.stderr
        );
        assert_consistent(
            &s,
            &c,
            "pristine.raw",
            &format!("../B.{fmt}"),
            &format!("{fmt} after ENOSPC"),
        );
        fs.resize("64M");
        s.cowimg_ok(&["stream", &c]);
        assert!(s.same("pristine.raw", &c));
        let r = s.run("qemu-img", &["check", "-r", "leaks", &c]);
        assert!(
            r.status == 0 || (fmt == "qed" && r.status == 3),
            "{fmt}: {}{}",
            r.stdout,
            r.stderr
        );
        assert!(s.qemu_info(&c).get("backing-filename").is_none());
    }
}

/// ENOSPC in a parallel compressing convert: four workers, one of them hits the full disk
/// while the others wait for their turn to store. The error shown is the real cause (the
/// file, the offset, "No space left on device"), every time, never only "another copy worker
/// failed" (which the waiting workers used to report first, in about half of the runs).
#[test]
fn a_full_disk_under_parallel_convert_reports_the_real_cause_every_time() {
    let s = Scratch::new();
    // Incompressible data: the copy needs far more than the disk holds.
    let mut rng = Rng::new(12);
    let data: Vec<u8> = (0..(32 << 20) / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    s.write_file("src.raw", &data);
    let fs = Tmpfs::mount(s.path("small"), "4M");
    for run in 0..12 {
        let r = s.cowimg(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "--jobs",
            "4",
            "src.raw",
            "small/out.qcow2",
        ]);
        assert_eq!(r.status, 1, "run {run}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr
                .contains("small/out.qcow2: writing guest data at offset 0x")
                && r.stderr.contains("No space left on device")
                && !r.stderr.contains("another copy worker failed"),
            "run {run}: {}",
            r.stderr
        );
        // A failed convert leaves nothing behind, so every run starts on an empty disk.
        assert_eq!(std::fs::read_dir(&fs.0).unwrap().count(), 0, "run {run}");
    }
}

/// The file-size limit (RLIMIT_FSIZE through prlimit, SIGXFSZ ignored so that writes fail
/// with EFBIG instead of killing the process): the same postconditions as a full disk.
#[test]
fn a_file_size_limit_mid_stream_leaves_the_image_consistent_and_resumable() {
    let s = Scratch::new();
    chain_fixture(&s, "qcow2", "");
    let len = std::fs::metadata(s.path("C.qcow2")).unwrap().len();
    let limit = (len + (1 << 20)).to_string();
    let script = "trap '' XFSZ; exec prlimit --fsize=\"$1\" \"$2\" stream C.qcow2";
    let r = s.run(
        "sh",
        &["-c", script, "sh", &limit, env!("CARGO_BIN_EXE_cowimg")],
    );
    assert_eq!(r.status, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("File too large") && r.stderr.contains("C.qcow2"),
        "{}",
        r.stderr
    );
    assert_consistent(&s, "C.qcow2", "pristine.raw", "B.qcow2", "after EFBIG");
    s.cowimg_ok(&["stream", "C.qcow2"]);
    assert!(s.same("pristine.raw", "C.qcow2"));
    s.qemu_img(&["check", "-r", "leaks", "C.qcow2"]);
    s.assert_clean("C.qcow2");
}

/// I/O errors injected under the formats crate (EIO, ENOSPC, EACCES on the n-th write; EIO
/// on the n-th sync) during stream and rebase: the command returns the error, the file is
/// consistent and reads as before, and a run without the fault completes.
#[test]
fn injected_io_errors_leave_the_image_consistent_and_resumable() {
    std::env::set_var("COWIMG_TEST_BATCH_BYTES", (512u64 << 10).to_string());
    let mut tried = 0;
    for fmt in ["qcow2", "qed"] {
        let f = Format::from_name(fmt).unwrap();
        let template = Scratch::new();
        chain_fixture(&template, fmt, "");
        let faults = [
            Fault::WritesFrom {
                n: 1,
                errno: libc::EIO,
            },
            Fault::WritesFrom {
                n: 3,
                errno: libc::EIO,
            },
            Fault::WritesFrom {
                n: 7,
                errno: libc::ENOSPC,
            },
            Fault::WritesFrom {
                n: 12,
                errno: libc::EACCES,
            },
            Fault::SyncsFrom { n: 1 },
            Fault::SyncsFrom { n: 2 },
            Fault::SyncsFrom { n: 4 },
        ];
        for fault in faults {
            for op in ["stream", "rebase"] {
                let s = Scratch::new();
                for e in std::fs::read_dir(template.dir.path()).unwrap() {
                    let e = e.unwrap();
                    std::fs::copy(e.path(), s.path(&e.file_name().to_string_lossy())).unwrap();
                }
                let c = format!("C.{fmt}");
                let n = format!("N.{fmt}");
                let what = format!("{op} {c} with {fault:?}");
                let failing = Arc::new(Failing::new(file_storage(&s.path(&c)), fault));
                let run = |st: Arc<dyn Storage>| {
                    let chain = chain_over(&s.path(&c), st, false);
                    if op == "stream" {
                        stream_in(&chain, None, 2)
                    } else {
                        rebase_in(&chain, Some((&n, f)), 2)
                    }
                };
                let r = run(failing.clone());
                if !failing.fired.load(std::sync::atomic::Ordering::SeqCst) {
                    // The run made fewer writes or syncs than the fault waits for.
                    r.unwrap_or_else(|e| panic!("{what}: failed without a fault: {e}"));
                    continue;
                }
                let e = r.expect_err(&format!("{what}: succeeded"));
                assert!(
                    e.to_string().contains(&c),
                    "{what}: the error does not name the image: {e}"
                );
                assert_consistent(&s, &c, "pristine.raw", &format!("B.{fmt}"), &what);
                run(Arc::new(file_storage(&s.path(&c))))
                    .unwrap_or_else(|e| panic!("{what}: the run after it: {e}"));
                assert!(s.same("pristine.raw", &c), "{what}");
                tried += 1;
            }
        }
    }
    eprintln!("{tried} injected faults");
}

/// EIO reading a backing file: the error names it; the image is not changed.
#[test]
fn read_errors_in_a_backing_file_are_reported() {
    let s = Scratch::new();
    chain_fixture(&s, "qcow2", "");
    let top = s.path("C.qcow2").to_string_lossy().into_owned();
    let ro =
        cowimg::chain::Chain::open(&top, cowimg::chain::OpenOptions::read(None, true)).unwrap();
    let mut layers = ro.layers;
    let b_name = layers[1].filename.clone();
    let failing: Arc<dyn Storage> = Arc::new(Failing::new(
        file_storage(&s.path("B.qcow2")),
        Fault::ReadsFrom { n: 1 },
    ));
    // The header read succeeds at open only if the fault starts later; open it first.
    let opened = cowimg::chain::open_layer(
        Arc::new(file_storage(&s.path("B.qcow2"))),
        &b_name,
        Some(Format::Qcow2),
        false,
        false,
    )
    .unwrap();
    drop(opened);
    let failing_layer =
        match cowimg::chain::open_layer(failing, &b_name, Some(Format::Qcow2), false, false) {
            Ok(l) => l,
            Err(e) => {
                // Failing at open is also a clean refusal.
                assert!(e.to_string().contains("B.qcow2"), "{e}");
                return;
            }
        };
    layers[1] = failing_layer;
    layers[0] = cowimg::chain::open_layer(
        Arc::new(file_storage(&s.path("C.qcow2"))),
        &top,
        Some(Format::Qcow2),
        true,
        false,
    )
    .unwrap();
    let chain = cowimg::chain::Chain::from_layers(layers);
    let e = stream_in(&chain, None, 2).expect_err("stream over an unreadable backing file");
    assert!(e.to_string().contains("B.qcow2"), "{e}");
    drop(chain);
    let r = s.run("qemu-img", &["check", "C.qcow2"]);
    assert!(r.status == 0 || r.status == 3, "{}", r.stdout);
    assert!(s.same("pristine.raw", "C.qcow2"));
}

/// Permission denied, for an unprivileged user (root ignores file modes: the commands run
/// under `setpriv` as nobody): an image it may not write, a backing file it may not read, a
/// destination directory it may not write into.
#[test]
fn permission_denied_is_reported_and_changes_nothing() {
    let s = Scratch::new();
    chain_fixture(&s, "qcow2", "");
    let dir = s.dir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["A.qcow2", "B.qcow2", "C.qcow2", "pristine.raw"] {
        std::fs::set_permissions(s.path(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // A copy nobody can run wherever the checkout lies (its directories may be private).
    std::fs::copy(env!("CARGO_BIN_EXE_cowimg"), s.path("cowimg-bin")).unwrap();
    std::fs::set_permissions(s.path("cowimg-bin"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin_path = s.path("cowimg-bin");
    let bin = bin_path.to_str().unwrap();
    let as_nobody = |args: &[&str]| {
        let mut a = vec!["--reuid=65534", "--regid=65534", "--clear-groups", bin];
        a.extend_from_slice(args);
        let r = s.run("setpriv", &a);
        assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
        r
    };
    let before = s.read_file("C.qcow2");
    // The image is not writable by nobody.
    let r = as_nobody(&["stream", "C.qcow2"]);
    assert_eq!(r.status, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("C.qcow2") && r.stderr.contains("Permission denied"),
        "{}",
        r.stderr
    );
    assert!(s.read_file("C.qcow2") == before);
    // Reading works, writing into the (root-owned) directory does not.
    let r = as_nobody(&["convert", "-O", "qcow2", "C.qcow2", "out.qcow2"]);
    assert_eq!(r.status, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);
    assert!(!s.path("out.qcow2").exists() && !s.path(".out.qcow2.cowimg-partial").exists());
    // A backing file nobody may read.
    std::fs::set_permissions(s.path("A.qcow2"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(s.path("C.qcow2"), std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [
        vec!["stream", "C.qcow2"],
        vec!["info", "--backing-chain", "C.qcow2"],
        vec!["map", "C.qcow2"],
    ] {
        let r = as_nobody(&args);
        assert_eq!(r.status, 1, "{args:?}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains("A.qcow2") && r.stderr.contains("Permission denied"),
            "{args:?}: {}",
            r.stderr
        );
    }
    assert!(s.read_file("C.qcow2") == before);
}
