//! Process kills: `stream` (full and `--base`), `rebase` (safe), `convert`, `create`, `reset`,
//! `check -r all`, `commit`, `resize`, `snapshot -c/-a/-d` and `amend` are killed with SIGKILL, both at
//! every write/sync boundary (the test hook
//! `COWIMG_TEST_KILL_AT_IO=N` kills the process just before its Nth change to a file) and at
//! random moments. After each kill the command's postconditions hold:
//!
//! * stream, rebase: `qemu-img check` finds no corruption (leaks allowed), `qemu-img compare`
//!   with the pristine data finds no difference, the backing file is the old or the new one,
//!   and running the command again completes (same data, new backing file, no qcow2 leak left:
//!   the re-run reclaims what the killed commit counted; QED leaks cannot be reclaimed, by
//!   qemu either).
//! * reset: the overlay is the old one, byte for byte, or an empty one that reads as its
//!   backing file and checks clean; the next run completes and leaves no temporary file.
//! * convert, create: DST is absent, or the previous file untouched, or complete and clean;
//!   the temporary file a kill leaves is removed by the next run. `convert -n`, in place: DST
//!   has no corruption and its backing file is untouched; the next run completes it.
//! * check -r all: no more corruptions than before, every cluster reads as before or as after
//!   a complete repair, and a second `check -r all` finishes the repair.
//!
//! Counts: `COWIMG_KILL_BOUNDARIES=N` boundaries per scenario (CI: 6 plus the probes that find
//! how many there are; a large N visits every boundary), `COWIMG_RANDOM_KILLS=N` kills at
//! random moments per scenario (CI: 2), `COWIMG_SEED` the seed.

mod common;
#[path = "common/reliability.rs"]
mod reliability;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::Scratch;
use cowimg_formats::Format;
use reliability::*;

static KILLS: AtomicU64 = AtomicU64::new(0);

/// How a run of cowimg ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Completed,
    Killed,
    /// Exited with this status (an error; never expected here).
    Failed(i32, String),
}

/// A scenario: a template directory with the fixture, the command, and its postconditions.
struct Scenario {
    label: String,
    template: Scratch,
    args: Vec<String>,
    /// Extra arguments for the run killed at random moments (a rate cap, to stretch it).
    slow: Vec<String>,
    /// Exit statuses of a completed run (check: 3 when leaks remain).
    ok: &'static [i32],
    /// Checks a killed (or completed) run's directory; panics with `what` on a violation.
    verify: Box<dyn Fn(&Scratch, &End, &str)>,
}

impl Scenario {
    /// A fresh copy of the template.
    fn fresh(&self) -> Scratch {
        let s = Scratch::new();
        for e in std::fs::read_dir(self.template.dir.path()).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), s.path(&e.file_name().to_string_lossy())).unwrap();
            }
        }
        s
    }

    fn command(&self, s: &Scratch, extra: &[String]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cowimg"));
        c.args(&self.args[..1]).args(extra).args(&self.args[1..]);
        c.current_dir(s.dir.path())
            .env("COWIMG_TEST_BATCH_BYTES", (512u64 << 10).to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    fn end_of(&self, out: std::process::Output) -> End {
        use std::os::unix::process::ExitStatusExt;
        match (out.status.code(), out.status.signal()) {
            (Some(c), _) if self.ok.contains(&c) => End::Completed,
            (_, Some(9)) => End::Killed,
            (code, _) => End::Failed(
                code.unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ),
        }
    }

    /// Kills the command at its `n`th file change and checks the result.
    fn kill_at(&self, n: u64) -> bool {
        let s = self.fresh();
        let out = self
            .command(&s, &[])
            .env("COWIMG_TEST_KILL_AT_IO", n.to_string())
            .output()
            .unwrap();
        let end = self.end_of(out);
        let what = format!("{}: killed at file change {n}", self.label);
        (self.verify)(&s, &end, &what);
        KILLS.fetch_add((end == End::Killed) as u64, Ordering::Relaxed);
        end == End::Completed
    }

    /// How long an uninterrupted run takes (with the `slow` arguments).
    fn duration(&self) -> Duration {
        let s = self.fresh();
        let t = std::time::Instant::now();
        let out = self.command(&s, &self.slow).output().unwrap();
        assert_eq!(
            self.end_of(out),
            End::Completed,
            "{}: an uninterrupted run",
            self.label
        );
        t.elapsed()
    }

    /// Kills the command after `us` microseconds and checks the result.
    fn kill_after(&self, us: u64) -> bool {
        let s = self.fresh();
        let mut child = self.command(&s, &self.slow).spawn().unwrap();
        std::thread::sleep(Duration::from_micros(us));
        let _ = child.kill();
        let end = self.end_of(child.wait_with_output().unwrap());
        let what = format!("{}: SIGKILL after {us} us", self.label);
        (self.verify)(&s, &end, &what);
        KILLS.fetch_add((end == End::Killed) as u64, Ordering::Relaxed);
        end == End::Killed
    }

    /// Every boundary (or a sample of them), then random moments.
    fn run(&self, seed: u64) {
        let mut rng = Rng::new(seed);
        let budget = count("COWIMG_KILL_BOUNDARIES", 6);
        // Probes 1, 2, 4, ... find how many changes a run makes (each probe is a kill too).
        let mut tried = BTreeSet::new();
        let mut n = 1;
        let upper = loop {
            tried.insert(n);
            if self.kill_at(n) {
                break n;
            }
            n *= 2;
            assert!(n < 1 << 24, "{}: never completes", self.label);
        };
        let lower = upper / 2;
        let points: Vec<u64> = if budget >= upper {
            (1..upper).filter(|p| !tried.contains(p)).collect()
        } else {
            (0..budget)
                .map(|_| rng.range(1, upper - 1))
                .filter(|p| !tried.contains(p))
                .collect()
        };
        let mut total = None;
        for p in points {
            if !tried.insert(p) {
                continue;
            }
            if self.kill_at(p) {
                total = Some(total.map_or(p, |t: u64| t.min(p)));
            }
        }
        // Random moments over the span of an uninterrupted run (process start included).
        let span = self.duration().as_micros() as u64;
        let mut random = 0;
        for _ in 0..count("COWIMG_RANDOM_KILLS", 2) {
            random += self.kill_after(rng.range(0, span + span / 10)) as u64;
        }
        eprintln!(
            "{}: {} boundary kills (a run makes {}..{upper} file changes{}), {random} kills at random moments in {} ms; {} kills so far",
            self.label,
            tried.len(),
            lower + 1,
            total
                .map(|t| format!(", completes at {t}"))
                .unwrap_or_default(),
            span / 1000,
            KILLS.load(Ordering::Relaxed)
        );
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|x| x.to_string()).collect()
}

fn cowimg_in(s: &Scratch, a: &[&str]) -> common::Run {
    let r = s.cowimg(a);
    assert!(
        !r.stderr.contains("panicked"),
        "cowimg {a:?} panicked: {}",
        r.stderr
    );
    r
}

/// Postconditions of stream and rebase (see the module doc).
fn verify_streaming(
    fmt: &'static str,
    old: Option<&'static str>,
    new: Option<&'static str>,
    rerun: Vec<String>,
) -> Box<dyn Fn(&Scratch, &End, &str)> {
    Box::new(move |s, end, what| {
        let c = format!("C.{fmt}");
        if let End::Failed(code, err) = end {
            panic!("{what}: exited {code}: {err}");
        }
        let r = s.run("qemu-img", &["check", &c]);
        assert!(
            r.status == 0 || r.status == 3,
            "{what}: qemu-img check: {}{}",
            r.stdout,
            r.stderr
        );
        assert!(s.same("pristine.raw", &c), "{what}: the guest data changed");
        let b = backing_of(&s.path(&c));
        assert!(
            b.as_deref() == old || b.as_deref() == new,
            "{what}: backing file {b:?}"
        );
        if *end == End::Completed {
            assert_eq!(
                b.as_deref(),
                new,
                "{what}: completed, but the backing file is {b:?}"
            );
        }
        let refs: Vec<&str> = rerun.iter().map(|x| x.as_str()).collect();
        let r = cowimg_in(s, &refs);
        assert_eq!(r.status, 0, "{what}: the re-run failed: {}", r.stderr);
        assert!(
            s.same("pristine.raw", &c),
            "{what}: the re-run changed the guest data"
        );
        assert_eq!(
            backing_of(&s.path(&c)).as_deref(),
            new,
            "{what}: backing file after the re-run"
        );
        let r = s.run("qemu-img", &["check", &c]);
        assert!(
            r.status == 0 || (fmt == "qed" && r.status == 3),
            "{what}: qemu-img check (no leak may remain): {}{}",
            r.stdout,
            r.stderr
        );
    })
}

fn streaming(
    label: &str,
    fmt: &'static str,
    opts: &str,
    a: Vec<String>,
    old: &'static str,
    new: Option<&'static str>,
) -> Scenario {
    let template = Scratch::new();
    chain_fixture(&template, fmt, opts);
    let slow = args(&["--speed", "4M"]);
    Scenario {
        label: label.to_string(),
        template,
        args: a.clone(),
        slow,
        ok: &[0],
        verify: verify_streaming(fmt, Some(old), new, a),
    }
}

#[test]
fn stream_killed() {
    let seed = first_seed(0x4b11_0001);
    for (fmt, opts) in [("qcow2", ""), ("qed", "")] {
        let c = if fmt == "qcow2" { "C.qcow2" } else { "C.qed" };
        let b = if fmt == "qcow2" { "B.qcow2" } else { "B.qed" };
        streaming(
            &format!("stream {c}"),
            fmt,
            opts,
            args(&["stream", c]),
            b,
            None,
        )
        .run(seed);
    }
}

#[test]
fn stream_with_base_killed() {
    let seed = first_seed(0x4b11_0002);
    let s = streaming(
        "stream --base A.qcow2 C.qcow2 (32k extended L2)",
        "qcow2",
        "extended_l2=on,cluster_size=32k",
        args(&["stream", "--base", "A.qcow2", "C.qcow2"]),
        "B.qcow2",
        Some("A.qcow2"),
    );
    s.run(seed);
}

#[test]
fn rebase_killed() {
    let seed = first_seed(0x4b11_0003);
    for fmt in ["qcow2", "qed"] {
        let (c, b, n) = if fmt == "qcow2" {
            ("C.qcow2", "B.qcow2", "N.qcow2")
        } else {
            ("C.qed", "B.qed", "N.qed")
        };
        let s = streaming(
            &format!("rebase -b {n} {c}"),
            fmt,
            "",
            args(&["rebase", "-b", n, "-F", fmt, c]),
            b,
            Some(n),
        );
        s.run(seed);
    }
}

/// The temporary file `create`/`convert` write beside DST.
fn partial(dst: &str) -> String {
    format!(".{dst}.cowimg-partial")
}

/// Postconditions of convert and create: DST absent, the previous file untouched, or complete
/// (`complete` checks that); a second run completes and removes the temporary file.
fn verify_output(
    dst: &'static str,
    previous: Option<Vec<u8>>,
    complete: fn(&Scratch, &str),
    rerun: Vec<String>,
) -> Box<dyn Fn(&Scratch, &End, &str)> {
    Box::new(move |s, end, what| {
        if let End::Failed(code, err) = end {
            panic!("{what}: exited {code}: {err}");
        }
        let p = s.path(dst);
        match (p.exists(), &previous) {
            (false, None) => assert_ne!(*end, End::Completed, "{what}: completed without {dst}"),
            (false, Some(_)) => panic!("{what}: the previous {dst} is gone"),
            (true, prev) => {
                let now = std::fs::read(&p).unwrap();
                if prev.as_ref() != Some(&now) {
                    complete(s, what);
                } else {
                    assert_ne!(
                        *end,
                        End::Completed,
                        "{what}: completed, but {dst} is the previous file"
                    );
                }
            }
        }
        if *end == End::Completed {
            assert!(
                !s.path(&partial(dst)).exists(),
                "{what}: a completed run left its temporary file"
            );
        }
        let refs: Vec<&str> = rerun.iter().map(|x| x.as_str()).collect();
        let r = cowimg_in(s, &refs);
        assert_eq!(r.status, 0, "{what}: the next run failed: {}", r.stderr);
        complete(s, what);
        assert!(
            !s.path(&partial(dst)).exists(),
            "{what}: the next run left the temporary file"
        );
        let left: Vec<String> = std::fs::read_dir(s.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("cowimg-partial"))
            .collect();
        assert!(left.is_empty(), "{what}: leftovers {left:?}");
    })
}

#[test]
fn convert_killed() {
    let seed = first_seed(0x4b11_0004);
    for (out_fmt, previous) in [("qcow2", false), ("qed", true), ("raw", false)] {
        let template = Scratch::new();
        chain_fixture(&template, "qcow2", "");
        let dst: &'static str = match out_fmt {
            "qcow2" => "out.qcow2",
            "qed" => "out.qed",
            _ => "out.raw",
        };
        let prev = previous.then(|| {
            template.qemu_img(&["create", "-q", "-f", out_fmt, dst, "1M"]);
            template.read_file(dst)
        });
        let complete: fn(&Scratch, &str) = match out_fmt {
            "raw" => {
                |s, what| assert!(s.same("pristine.raw", "out.raw"), "{what}: out.raw differs")
            }
            "qed" => |s, what| {
                assert!(s.same("pristine.raw", "out.qed"), "{what}: out.qed differs");
                s.assert_clean("out.qed")
            },
            _ => |s, what| {
                assert!(
                    s.same("pristine.raw", "out.qcow2"),
                    "{what}: out.qcow2 differs"
                );
                s.assert_clean("out.qcow2")
            },
        };
        let a = args(&["convert", "-O", out_fmt, "C.qcow2", dst]);
        let sc = Scenario {
            label: format!(
                "convert -O {out_fmt} C.qcow2 {dst}{}",
                if previous {
                    " (over an existing file)"
                } else {
                    ""
                }
            ),
            template,
            args: a.clone(),
            slow: vec![],
            ok: &[0],
            verify: verify_output(dst, prev, complete, a),
        };
        sc.run(seed);
    }
}

/// `convert -n` writes into an existing image in place (qcow2 and QED over a backing file
/// whose data the source's zeros must hide, and raw larger than the source). Killed at any
/// point, DST is free of corruption (leaks allowed) and its backing file untouched; running
/// again makes DST read as the source (a raw DST keeps its bytes past the source's size).
#[test]
fn convert_in_place_killed() {
    let seed = first_seed(0x4b11_0008);
    for fmt in ["qcow2", "qed", "raw"] {
        let template = Scratch::new();
        chain_fixture(&template, "qcow2", "");
        let dst: &'static str = match fmt {
            "qcow2" => "out.qcow2",
            "qed" => "out.qed",
            _ => "out.raw",
        };
        if fmt == "raw" {
            template.write_file(dst, &vec![0x5a; 12 << 20]);
        } else {
            template.qemu_img(&["create", "-q", "-f", "qcow2", "W.qcow2", "8M"]);
            template.qemu_io("W.qcow2", &["write -q -P 0x66 0 8M"]);
            template.qemu_img(&[
                "create", "-q", "-f", fmt, "-b", "W.qcow2", "-F", "qcow2", dst,
            ]);
            template.qemu_io(dst, &["write -q -P 0x5a 0 4M"]);
        }
        let backing = (fmt != "raw").then(|| template.read_file("W.qcow2"));
        let reads_as_source = move |s: &Scratch| -> bool {
            if fmt == "raw" {
                let b = s.read_file(dst);
                b[..8 << 20] == s.read_file("pristine.raw")[..]
                    && b[8 << 20..].iter().all(|&x| x == 0x5a)
            } else {
                s.same("pristine.raw", dst)
            }
        };
        let no_corruption = move |s: &Scratch, what: &str| {
            if fmt != "raw" {
                let r = s.run("qemu-img", &["check", dst]);
                assert!(
                    r.status == 0 || r.status == 3,
                    "{what}: qemu-img check {dst}: {}{}",
                    r.stdout,
                    r.stderr
                );
            }
        };
        let a = args(&["convert", "-n", "-O", fmt, "C.qcow2", dst]);
        let rerun = a.clone();
        let verify: Box<dyn Fn(&Scratch, &End, &str)> = Box::new(move |s, end, what| {
            if let End::Failed(code, err) = end {
                panic!("{what}: exited {code}: {err}");
            }
            no_corruption(s, what);
            if *end == End::Completed {
                assert!(reads_as_source(s), "{what}: completed, {dst} differs");
            }
            let refs: Vec<&str> = rerun.iter().map(|x| x.as_str()).collect();
            let r = cowimg_in(s, &refs);
            assert_eq!(r.status, 0, "{what}: the next run failed: {}", r.stderr);
            assert!(
                reads_as_source(s),
                "{what}: after the next run, {dst} differs"
            );
            no_corruption(s, what);
            if let Some(b) = &backing {
                assert!(
                    s.read_file("W.qcow2") == *b,
                    "{what}: the backing file changed"
                );
            }
        });
        let sc = Scenario {
            label: format!("convert -n -O {fmt} C.qcow2 {dst}"),
            template,
            args: a,
            slow: vec![],
            ok: &[0],
            verify,
        };
        sc.run(seed);
    }
}

#[test]
fn create_killed() {
    let seed = first_seed(0x4b11_0005);
    for (fmt, previous) in [("qcow2", false), ("qed", true)] {
        let template = Scratch::new();
        template.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "3G"]);
        let dst: &'static str = if fmt == "qcow2" {
            "new.qcow2"
        } else {
            "new.qed"
        };
        let prev = previous.then(|| {
            template.qemu_img(&["create", "-q", "-f", "qcow2", dst, "1M"]);
            template.qemu_io(dst, &["write -q -P 7 0 64k"]);
            template.read_file(dst)
        });
        let complete: fn(&Scratch, &str) = |s, what| {
            let dst = if s.path("new.qcow2").exists() {
                "new.qcow2"
            } else {
                "new.qed"
            };
            s.assert_clean(dst);
            let info = s.qemu_info(dst);
            assert_eq!(info["virtual-size"], 3u64 << 30, "{what}: {info}");
            assert_eq!(info["backing-filename"], "base.qcow2", "{what}: {info}");
        };
        // Large L1 tables: several file changes even for create.
        let a = args(&[
            "create",
            "-q",
            "-f",
            fmt,
            "--force",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=4096",
            dst,
        ]);
        let sc = Scenario {
            label: format!("create -f {fmt} {dst}"),
            template,
            args: a.clone(),
            slow: vec![],
            ok: &[0],
            verify: verify_output(dst, prev, complete, a),
        };
        sc.run(seed);
    }
}

#[test]
fn reset_killed() {
    let seed = first_seed(0x4b11_0008);
    for (fmt, opts) in [("qcow2", "extended_l2=on,cluster_size=32k"), ("qed", "")] {
        let template = Scratch::new();
        chain_fixture(&template, fmt, opts);
        let c: &'static str = if fmt == "qcow2" { "C.qcow2" } else { "C.qed" };
        let prev = template.read_file(c);
        let complete: fn(&Scratch, &str) = |s, what| {
            let (c, b) = if s.path("C.qcow2").exists() {
                ("C.qcow2", "B.qcow2")
            } else {
                ("C.qed", "B.qed")
            };
            s.assert_clean(c);
            assert!(s.same(c, b), "{what}: the reset {c} does not read as {b}");
            let info = s.qemu_info(c);
            assert_eq!(info["backing-filename"], b, "{what}: {info}");
            assert_eq!(info["virtual-size"], 8u64 << 20, "{what}: {info}");
        };
        let a = args(&["reset", c]);
        let sc = Scenario {
            label: format!("reset {c}"),
            template,
            args: a.clone(),
            slow: vec![],
            ok: &[0],
            verify: verify_output(c, Some(prev), complete, a),
        };
        sc.run(seed);
    }
}

#[test]
fn check_repair_killed() {
    let seed = first_seed(0x4b11_0006);
    for fmt in ["qcow2", "qed"] {
        let template = Scratch::new();
        let name: &'static str = if fmt == "qcow2" { "D.qcow2" } else { "D.qed" };
        assert_eq!(damaged(&template, fmt), name);
        let format = Format::from_name(fmt).unwrap();
        let cs = 64 << 10;
        let before_bytes = template.read_file(name);
        let before_corruptions = corruptions(&template, name);
        let before = clusters(&before_bytes, format, cs);
        let full = {
            let s = Scratch::new();
            s.write_file(name, &before_bytes);
            cowimg_in(&s, &["check", "-r", "all", name]);
            clusters(&s.read_file(name), format, cs)
        };
        let verify: Box<dyn Fn(&Scratch, &End, &str)> = Box::new(move |s, end, what| {
            if let End::Failed(code, err) = end {
                panic!("{what}: exited {code}: {err}");
            }
            let c = corruptions(s, name);
            assert!(
                c <= before_corruptions,
                "{what}: {c} corruptions, {before_corruptions} before"
            );
            let now = clusters(&s.read_file(name), format, cs);
            assert_eq!(now.len(), before.len(), "{what}: the image no longer opens");
            for (i, ((b, f), n)) in before.iter().zip(&full).zip(&now).enumerate() {
                if b.is_some() {
                    assert!(
                        n == b || n == f,
                        "{what}: cluster {i} reads neither as before nor as repaired"
                    );
                }
            }
            let r = cowimg_in(s, &["check", "-r", "all", name]);
            assert!(
                r.status == 0 || (fmt == "qed" && r.status == 3),
                "{what}: the second repair: {}{}",
                r.stdout,
                r.stderr
            );
            let r = s.run("qemu-img", &["check", name]);
            assert!(
                r.status == 0 || (fmt == "qed" && r.status == 3),
                "{what}: after the second repair: {}{}",
                r.stdout,
                r.stderr
            );
            assert_eq!(
                clusters(&s.read_file(name), format, cs),
                full,
                "{what}: differs from a complete repair"
            );
        });
        let sc = Scenario {
            label: format!("check -r all {name}"),
            template,
            args: args(&["check", "-r", "all", name]),
            slow: vec![],
            // 3: leaks remain (QED's cannot be reclaimed).
            ok: if fmt == "qed" { &[0, 3] } else { &[0] },
            verify,
        };
        sc.run(seed);
    }
}

/// Copy-on-read: `convert --copy-on-read` of an image flagged copy-on-read fills it from its
/// backing file as it reads. Killed at any point, the flagged image is free of corruption, reads as before
/// and keeps its backing file; the next convert completes (and the output is complete).
#[test]
fn copy_on_read_killed() {
    let seed = first_seed(0x4b11_0007);
    for fmt in ["qcow2", "qed"] {
        let template = Scratch::new();
        chain_fixture(&template, fmt, "");
        let (b, f) = (format!("B.{fmt}"), format!("F.{fmt}"));
        template.cowimg_ok(&[
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
        template.qemu_io(&f, &["write -q -P 0x55 2M 64k"]);
        template.qemu_img(&["convert", "-O", "raw", &f, "pristine.raw"]);
        let a = args(&["convert", "--copy-on-read", "-O", "raw", &f, "out.raw"]);
        let label = format!("convert --copy-on-read -O raw {f}");
        let rerun = a.clone();
        let verify: Box<dyn Fn(&Scratch, &End, &str)> = Box::new(move |s, end, what| {
            if let End::Failed(code, err) = end {
                panic!("{what}: exited {code}: {err}");
            }
            let r = s.run("qemu-img", &["check", &f]);
            assert!(
                r.status == 0 || r.status == 3,
                "{what}: qemu-img check: {}{}",
                r.stdout,
                r.stderr
            );
            assert!(
                s.same("pristine.raw", &f),
                "{what}: the flagged image reads differently"
            );
            assert_eq!(
                backing_of(&s.path(&f)).as_deref(),
                Some(b.as_str()),
                "{what}"
            );
            if *end == End::Completed {
                assert!(
                    s.same("pristine.raw", "out.raw"),
                    "{what}: completed, out.raw differs"
                );
            } else if s.path("out.raw").exists() {
                assert!(
                    s.same("pristine.raw", "out.raw"),
                    "{what}: a partial out.raw is visible"
                );
            }
            let refs: Vec<&str> = rerun.iter().map(|x| x.as_str()).collect();
            let r = cowimg_in(s, &refs);
            assert_eq!(r.status, 0, "{what}: the next run failed: {}", r.stderr);
            assert!(
                s.same("pristine.raw", "out.raw") && s.same("pristine.raw", &f),
                "{what}: after the next run"
            );
            let r = s.run("qemu-img", &["check", &f]);
            assert!(
                r.status == 0 || (fmt == "qed" && r.status == 3),
                "{what}: qemu-img check (no leak may remain): {}{}",
                r.stdout,
                r.stderr
            );
        });
        let sc = Scenario {
            label,
            template,
            args: a,
            slow: vec![],
            ok: &[0],
            verify,
        };
        sc.run(seed);
    }
}

/// A kill between two runs of convert leaves a temporary file; a run of create for another
/// destination in the same directory leaves it alone, and the next convert to the same
/// destination removes it.
#[test]
fn leftover_temporary_files_are_removed_by_the_next_run() {
    let s = Scratch::new();
    chain_fixture(&s, "qcow2", "");
    let out = Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(["convert", "-O", "qcow2", "C.qcow2", "o.qcow2"])
        .current_dir(s.dir.path())
        .env("COWIMG_TEST_KILL_AT_IO", "5")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(s.path(&partial("o.qcow2")).exists());
    assert!(!Path::new(&s.path("o.qcow2")).exists());
    s.cowimg_ok(&["create", "-q", "-f", "qcow2", "other.qcow2", "1M"]);
    assert!(s.path(&partial("o.qcow2")).exists());
    s.cowimg_ok(&["convert", "-O", "qcow2", "C.qcow2", "o.qcow2"]);
    assert!(!s.path(&partial("o.qcow2")).exists());
    assert!(s.same("pristine.raw", "o.qcow2"));
}

/// `qemu-img check` of `image` finds no corruption (leaks are allowed after a kill).
fn no_corruption(s: &Scratch, image: &str, what: &str) {
    let r = s.run("qemu-img", &["check", image]);
    assert!(
        r.status == 0 || r.status == 3,
        "{what}: qemu-img check {image}: {}{}",
        r.stdout,
        r.stderr
    );
}

/// commit (into the backing file, TOP emptied; and -b into the bottom, TOP kept): killed at
/// any point, no image is corrupt and TOP reads as before through its chain (the base is
/// written below the layers that mask it, and TOP is emptied only after the base is synced);
/// the re-run finishes: the base then reads what TOP read, and no qcow2 leak remains.
#[test]
fn commit_killed() {
    let seed = first_seed(0x4b11_0008);
    for (fmt, base, extra) in [
        ("qcow2", "B", &[][..]),
        ("qed", "B", &[][..]),
        ("qcow2", "A", &["-b", "A.qcow2"][..]),
    ] {
        let template = Scratch::new();
        chain_fixture(&template, fmt, "");
        let (c, b) = (format!("C.{fmt}"), format!("{base}.{fmt}"));
        let mut a = args(&["commit"]);
        a.extend(args(extra));
        a.push(c.clone());
        let rerun = a.clone();
        let label = format!("{}", a.join(" "));
        let verify: Box<dyn Fn(&Scratch, &End, &str)> = Box::new(move |s, end, what| {
            if let End::Failed(code, err) = end {
                panic!("{what}: exited {code}: {err}");
            }
            for img in [&c, &b] {
                no_corruption(s, img, what);
            }
            assert!(s.same("pristine.raw", &c), "{what}: TOP reads differently");
            let refs: Vec<&str> = rerun.iter().map(|x| x.as_str()).collect();
            let r = cowimg_in(s, &refs);
            assert_eq!(r.status, 0, "{what}: the re-run failed: {}", r.stderr);
            assert!(s.same("pristine.raw", &c), "{what}: after the re-run, TOP");
            assert!(s.same("pristine.raw", &b), "{what}: after the re-run, BASE");
            if fmt == "qcow2" {
                s.assert_clean(&c);
                s.assert_clean(&b);
            }
        });
        Scenario {
            label,
            template,
            args: a,
            slow: args(&["--speed", "4M"]),
            ok: &[0],
            verify,
        }
        .run(seed);
    }
}

/// resize: growing a 512-byte-cluster qcow2 image (a new L1 table), shrinking it (clusters
/// past the end dropped) and growing QED and raw. Killed at any point, the image is not
/// corrupt and has its old size or its new one, reading as before within the smaller of
/// them (and zeros past); the re-run (to the new size) finishes, clean.
#[test]
fn resize_killed() {
    let seed = first_seed(0x4b11_0009);
    for (fmt, opts, change, new) in [
        ("qcow2", "cluster_size=512", "+64M", 72u64 << 20),
        ("qcow2", "cluster_size=512", "3M", 3 << 20),
        ("qcow2", "compat=0.10", "+1G", 1032 << 20),
        ("qed", "", "+1G", 1032 << 20),
    ] {
        let template = Scratch::new();
        chain_fixture(&template, fmt, opts);
        let img = format!("A.{fmt}");
        template.qemu_img(&["convert", "-O", "raw", &img, "pristine.raw"]);
        let mut short = template.read_file("pristine.raw");
        short.truncate((3 << 20).min(short.len()));
        template.write_file("short.raw", &short);
        let shrink = new < 8 << 20;
        let mut a = args(&["resize"]);
        if shrink {
            a.push("--shrink".into());
        }
        a.push(img.clone());
        // The re-run names the new size itself: a relative change would apply twice.
        let mut rerun = a.clone();
        rerun.push(new.to_string());
        a.push(change.to_string());
        let label = format!("{} ({opts})", a.join(" "));
        let verify: Box<dyn Fn(&Scratch, &End, &str)> = Box::new(move |s, end, what| {
            if let End::Failed(code, err) = end {
                panic!("{what}: exited {code}: {err}");
            }
            no_corruption(s, &img, what);
            let size = s.qemu_info(&img)["virtual-size"].as_u64().unwrap();
            assert!(size == 8 << 20 || size == new, "{what}: size {size}");
            let want = if size < 8 << 20 {
                "short.raw"
            } else {
                "pristine.raw"
            };
            assert!(s.same(want, &img), "{what}: the data changed");
            let refs: Vec<&str> = rerun.iter().map(|x| x.as_str()).collect();
            let r = cowimg_in(s, &refs);
            assert_eq!(r.status, 0, "{what}: the re-run failed: {}", r.stderr);
            let size = s.qemu_info(&img)["virtual-size"].as_u64().unwrap();
            assert_eq!(size, new, "{what}: size after the re-run");
            let want = if shrink { "short.raw" } else { "pristine.raw" };
            assert!(s.same(want, &img), "{what}: after the re-run");
            if fmt == "qcow2" {
                s.assert_clean(&img);
            }
        });
        Scenario {
            label,
            template,
            args: a,
            slow: vec![],
            ok: &[0],
            verify,
        }
        .run(seed);
    }
}

/// `qemu-img check` of `image` finds at worst leaks and OFLAG_COPIED mismatches: the one
/// window every snapshot change has, qemu's too, between a COPIED flag and the refcount it
/// describes (safe: a cleared flag only makes the next write copy the cluster).
fn at_worst_copied_flags(s: &Scratch, image: &str, what: &str) {
    let r = s.run("qemu-img", &["check", image]);
    let text = format!("{}{}", r.stdout, r.stderr);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("ERROR")).collect();
    assert!(
        matches!(r.status, 0 | 2 | 3) && errors.iter().all(|l| l.contains("OFLAG_COPIED")),
        "{what}: qemu-img check {image}: {text}"
    );
}

/// snapshot -c/-a/-d on a 512-byte-cluster image (many L2 tables) with a snapshot qemu made:
/// killed at any point, qemu-img check finds no corruption beyond the COPIED window, the
/// active disk reads as before or as after, every snapshot listed reads as it did, and a
/// re-run (or `check -r all` once a delete is through) leaves the image clean and complete.
#[test]
fn snapshot_killed() {
    let seed = first_seed(0x4b11_000a);
    for action in ["-c", "-a", "-d"] {
        let template = Scratch::new();
        let img = "A.qcow2";
        template.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            img,
            "8M",
        ]);
        template.qemu_io(
            img,
            &["write -q -P 0x11 0 3M", "write -q -c -P 0x12 5M 64k"],
        );
        template.qemu_img(&["snapshot", "-c", "old", img]);
        template.qemu_img(&["convert", "-O", "raw", img, "old.raw"]);
        template.qemu_io(img, &["write -q -P 0x21 1M 3M", "write -q -z 7M 512k"]);
        template.qemu_img(&["convert", "-O", "raw", img, "now.raw"]);
        let name = if action == "-c" { "new" } else { "old" };
        let a = args(&["snapshot", action, name, img]);
        let label = a.join(" ");
        let verify: Box<dyn Fn(&Scratch, &End, &str)> = Box::new(move |s, end, what| {
            if let End::Failed(code, err) = end {
                panic!("{what}: exited {code}: {err}");
            }
            at_worst_copied_flags(s, img, what);
            let after = if action == "-a" { "old.raw" } else { "now.raw" };
            assert!(
                s.same("now.raw", img) || s.same(after, img),
                "{what}: the active disk reads as neither before nor after"
            );
            let listed = s.cowimg_ok(&["snapshot", "-l", img]);
            let has = |n: &str| {
                listed
                    .lines()
                    .any(|l| l.split_whitespace().nth(1) == Some(n))
            };
            for (n, want) in [("old", "old.raw"), ("new", "now.raw")] {
                if has(n) {
                    let opt = format!("snapshot.name={n}");
                    s.qemu_img(&["convert", "-l", &opt, "-O", "raw", img, "sn.raw"]);
                    assert!(
                        s.read_file("sn.raw") == s.read_file(want),
                        "{what}: snapshot {n}"
                    );
                }
            }
            // Finish: the same command while it has something to do, else a repair.
            let pending = match action {
                "-c" => !has("new"),
                "-d" => has("old"),
                _ => true,
            };
            let r = if pending {
                cowimg_in(s, &["snapshot", action, name, img])
            } else {
                cowimg_in(s, &["check", "-r", "all", img])
            };
            assert_eq!(r.status, 0, "{what}: finishing failed: {}", r.stderr);
            s.assert_clean(img);
            assert!(
                s.same(after, img),
                "{what}: after finishing, the active disk"
            );
            let listed = s.cowimg_ok(&["snapshot", "-l", img]);
            let names: Vec<&str> = listed
                .lines()
                .skip(2)
                .filter_map(|l| l.split_whitespace().nth(1))
                .collect();
            let want: &[&str] = match action {
                "-c" => &["old", "new"],
                "-d" => &[],
                _ => &["old"],
            };
            assert_eq!(names, want, "{what}: the snapshots after finishing");
        });
        Scenario {
            label,
            template,
            args: a,
            slow: vec![],
            ok: &[0],
            verify,
        }
        .run(seed);
    }
}

/// amend -o compat=0.10 (zero clusters expanded over a backing file, on 512-byte clusters:
/// one commit per L2 table), -o compat=1.1 (with a short snapshot entry, so the table is
/// rewritten before the header) and -o refcount_bits=64 (new structures, one switch):
/// killed at any point, the image is not corrupt, reads as before, and has the old value or
/// the new one; the re-run finishes, clean (no leak).
#[test]
fn amend_killed() {
    let seed = first_seed(0x4b11_000b);
    for (opts, change, key, old, new) in [
        ("cluster_size=512", "compat=0.10", "compat", "1.1", "0.10"),
        ("compat=0.10", "compat=1.1", "compat", "0.10", "1.1"),
        (
            "cluster_size=512",
            "refcount_bits=64",
            "refcount-bits",
            "16",
            "64",
        ),
    ] {
        let template = Scratch::new();
        chain_fixture(&template, "qcow2", opts);
        let img = "B.qcow2";
        if change == "compat=1.1" {
            template.qemu_img(&["snapshot", "-c", "s1", img]);
            common::shrink_snapshot_entry(&template, img);
        }
        template.qemu_img(&["convert", "-O", "raw", img, "pristine.raw"]);
        let a = args(&["amend", "-o", change, img]);
        let label = format!("{} ({opts})", a.join(" "));
        let value = move |s: &Scratch| -> String {
            let v = &s.qemu_info(img)["format-specific"]["data"][key];
            v.as_str().map_or_else(|| v.to_string(), str::to_string)
        };
        let rerun = a.clone();
        let verify: Box<dyn Fn(&Scratch, &End, &str)> = Box::new(move |s, end, what| {
            if let End::Failed(code, err) = end {
                panic!("{what}: exited {code}: {err}");
            }
            no_corruption(s, img, what);
            let v = value(s);
            assert!(v == old || v == new, "{what}: {key} is {v}");
            assert!(s.same("pristine.raw", img), "{what}: the data changed");
            let refs: Vec<&str> = rerun.iter().map(|x| x.as_str()).collect();
            let r = cowimg_in(s, &refs);
            assert_eq!(r.status, 0, "{what}: the re-run failed: {}", r.stderr);
            assert_eq!(value(s), new, "{what}: {key} after the re-run");
            assert!(s.same("pristine.raw", img), "{what}: after the re-run");
            s.assert_clean(img);
        });
        Scenario {
            label,
            template,
            args: a,
            slow: vec![],
            ok: &[0],
            verify,
        }
        .run(seed);
    }
}
