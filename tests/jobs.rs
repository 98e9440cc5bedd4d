//! Jobs end to end: a running `stream` (and the others) steered with `cowimg job` over its
//! control socket: a live speed change measured, pause -> kill -9 -> rerun, cancel -> rerun,
//! events in order, malformed protocol input, stale and live sockets, the JSON shapes, and
//! `job wait`'s status for a failing job. Each test has its own runtime directory
//! (XDG_RUNTIME_DIR in its scratch dir), and every job it starts is killed by PID on exit.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::peers::Server;
use common::Scratch;
use serde_json::Value;

const COWIMG: &str = env!("CARGO_BIN_EXE_cowimg");
const MIB: u64 = 1 << 20;

/// A job process, killed (by its PID) if the test ends first.
struct Job {
    child: Option<Child>,
}

impl Job {
    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Waits (at most 120 s) for the job to exit: its status, stdout and stderr.
    fn finish(&mut self) -> (i32, String, String) {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                let out = child.wait_with_output().expect("output");
                return (
                    st.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                );
            }
            if start.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!("job did not end within 120 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn runtime(s: &Scratch) -> PathBuf {
    s.dir.path().to_path_buf()
}

fn command(s: &Scratch, args: &[&str]) -> Command {
    let mut c = Command::new(COWIMG);
    c.args(args)
        .current_dir(s.dir.path())
        .env("XDG_RUNTIME_DIR", runtime(s))
        .stdin(Stdio::null());
    c
}

/// Starts `cowimg ARGS` in the background and waits until its control socket answers.
fn start(s: &Scratch, args: &[&str], id: &str) -> Job {
    let child = command(s, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cowimg");
    let job = Job { child: Some(child) };
    let sock = socket(s, id);
    let t = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "job {id} never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    job
}

fn socket(s: &Scratch, id: &str) -> PathBuf {
    runtime(s).join("cowimg").join(format!("{id}.sock"))
}

/// `cowimg ARGS` to the end: status, stdout, stderr.
fn run(s: &Scratch, args: &[&str]) -> (i32, String, String) {
    let out = command(s, args).output().expect("run cowimg");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(s: &Scratch, args: &[&str]) -> String {
    let (st, out, err) = run(s, args);
    assert_eq!(st, 0, "cowimg {args:?}: {out}{err}");
    out
}

fn query(s: &Scratch, id: &str) -> Value {
    serde_json::from_str(&ok(s, &["job", "query", "--output", "json", id])).expect("query JSON")
}

/// A qcow2 overlay `top.qcow2` over `base.qcow2` holding `mib` MiB of data.
fn chain(s: &Scratch, mib: u64) {
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "base.qcow2",
        &format!("{mib}M"),
    ]);
    s.qemu_io("base.qcow2", &[&format!("write -P 0x5c 0 {mib}M")]);
    s.qcow2_overlay("base.qcow2", "top.qcow2");
}

fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("events file")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event {l}: {e}")))
        .collect()
}

fn names(ev: &[Value]) -> Vec<String> {
    ev.iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// The job exits 0, leaving `top.qcow2` clean and reading as `base.qcow2`.
fn ends_well(s: &Scratch, job: &mut Job) {
    let (st, _, err) = job.finish();
    assert_eq!(st, 0, "{err}");
    s.assert_clean("top.qcow2");
    assert!(s.same("base.qcow2", "top.qcow2"));
}

fn kill9(pid: i32) {
    // SAFETY: signalling a child process this test started, by its PID.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
}

/// The achieved rate after `job set-speed` is the new cap's (with a generous window: the
/// machine is shared), and clearly not the old one's.
#[test]
fn set_speed_changes_the_rate_while_the_job_runs() {
    let s = Scratch::new();
    chain(&s, 384);
    let mut job = start(
        &s,
        &["stream", "--speed", "20M", "--job-id", "pull", "top.qcow2"],
        "pull",
    );
    std::thread::sleep(Duration::from_secs(2));
    let rate = |from: &Value, to: &Value, secs: f64| {
        (to["copied"].as_u64().unwrap() - from["copied"].as_u64().unwrap()) as f64 / secs
    };
    let t0 = Instant::now();
    let q0 = query(&s, "pull");
    std::thread::sleep(Duration::from_secs(1));
    let q1 = query(&s, "pull");
    let before = rate(&q0, &q1, t0.elapsed().as_secs_f64());
    assert!(before < 20.0 * MIB as f64 * 1.3, "before: {before}");
    ok(&s, &["job", "set-speed", "pull", "60M"]);
    assert_eq!(query(&s, "pull")["speed"], 60 * MIB);
    std::thread::sleep(Duration::from_millis(500));
    let t1 = Instant::now();
    let q2 = query(&s, "pull");
    std::thread::sleep(Duration::from_secs(3));
    let q3 = query(&s, "pull");
    let after = rate(&q2, &q3, t1.elapsed().as_secs_f64());
    let cap = 60.0 * MIB as f64;
    eprintln!(
        "achieved: {:.2} MiB/s at --speed 20M, {:.2} MiB/s over 3 s after set-speed 60M",
        before / MIB as f64,
        after / MIB as f64
    );
    assert!(
        after > cap * 0.6 && after < cap * 1.2,
        "after set-speed 60M: {:.1} MiB/s (before: {:.1} MiB/s)",
        after / MIB as f64,
        before / MIB as f64
    );
    ends_well(&s, &mut job);
}

/// Paused, the job has committed everything it copied: kill -9 then loses nothing, the
/// stale socket is replaced by the rerun (same explicit id), which copies only the rest.
#[test]
fn pause_then_kill_9_then_rerun_resumes() {
    let s = Scratch::new();
    chain(&s, 64);
    let job = start(
        &s,
        &["stream", "--speed", "16M", "--job-id", "p", "top.qcow2"],
        "p",
    );
    std::thread::sleep(Duration::from_millis(1200));
    let out = ok(&s, &["job", "pause", "p"]);
    assert!(out.contains("is paused"), "{out}");
    let paused = query(&s, "p");
    assert_eq!(paused["status"], "paused");
    let done = paused["copied"].as_u64().unwrap();
    assert!(done > 0 && done < 64 * MIB, "{paused}");
    // Nothing moves while paused.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(query(&s, "p")["copied"].as_u64(), Some(done));
    kill9(job.pid());
    drop(job);
    assert!(socket(&s, "p").exists(), "kill -9 leaves the socket");
    s.assert_clean("top.qcow2");
    let out = ok(
        &s,
        &["stream", "--job-id", "p", "--output", "json", "top.qcow2"],
    );
    let r: Value = serde_json::from_str(&out).expect("result");
    assert_eq!(r["copied"].as_u64().unwrap(), 64 * MIB - done, "{r}");
    assert!(
        !socket(&s, "p").exists(),
        "the socket is removed at the end"
    );
    s.assert_clean("top.qcow2");
    assert!(s.same("base.qcow2", "top.qcow2"));
}

/// `job cancel` takes Ctrl-C's path: the job exits 130 saying what was kept, its events end
/// with `cancelled`, and the rerun finishes the stream with `cur == end`.
#[test]
fn cancel_then_rerun_resumes() {
    let s = Scratch::new();
    chain(&s, 64);
    let ev = s.path("events.jsonl");
    let ev_arg = ev.to_string_lossy().into_owned();
    let mut job = start(
        &s,
        &["stream", "--speed", "16M", "--events", &ev_arg, "top.qcow2"],
        "top.qcow2",
    );
    std::thread::sleep(Duration::from_millis(1000));
    let out = ok(&s, &["job", "cancel", "top.qcow2"]);
    assert!(out.contains("cancelled"), "{out}");
    let (st, _, err) = job.finish();
    assert_eq!(st, 130, "{err}");
    assert!(
        err.contains("interrupted; what was copied is kept"),
        "{err}"
    );
    let ev1 = events(&ev);
    assert_eq!(names(&ev1), ["created", "running", "cancelled"]);
    let kept = ev1[2]["data"]["copied"].as_u64().unwrap();
    assert!(kept > 0 && kept < 64 * MIB);
    s.assert_clean("top.qcow2");
    ok(&s, &["stream", "--events", &ev_arg, "top.qcow2"]);
    let ev2 = events(&ev);
    let last = ev2.last().unwrap();
    assert_eq!(last["event"], "completed");
    assert_eq!(last["data"]["offset"], last["data"]["len"]);
    assert_eq!(last["data"]["len"], 64 * MIB);
    assert_eq!(last["data"]["copied"].as_u64().unwrap(), 64 * MIB - kept);
    s.assert_clean("top.qcow2");
    assert!(s.same("base.qcow2", "top.qcow2"));
}

/// Events come in the order things happen, with non-decreasing timestamps, and the
/// completion event has the totals; `job wait --events` sees the same ending.
#[test]
fn events_come_in_order() {
    let s = Scratch::new();
    chain(&s, 48);
    let mut job = start(
        &s,
        &[
            "stream",
            "--speed",
            "16M",
            "--job-id",
            "e",
            "--events",
            "-",
            "top.qcow2",
        ],
        "e",
    );
    let waiter = command(&s, &["job", "wait", "--events", "e"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("job wait");
    let mut waiter = Job {
        child: Some(waiter),
    };
    std::thread::sleep(Duration::from_millis(300));
    ok(&s, &["job", "set-speed", "e", "24M"]);
    ok(&s, &["job", "pause", "e"]);
    ok(&s, &["job", "resume", "e"]);
    ok(&s, &["job", "set-speed", "e", "0"]);
    let (st, out, err) = job.finish();
    assert_eq!(st, 0, "{err}");
    // The events went to stdout, before the result line.
    let ev: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        names(&ev),
        [
            "created",
            "running",
            "speed-changed",
            "paused",
            "resumed",
            "speed-changed",
            "completed"
        ]
    );
    let stamp = |e: &Value| {
        e["timestamp"]["seconds"].as_u64().unwrap() * 1_000_000
            + e["timestamp"]["microseconds"].as_u64().unwrap()
    };
    assert!(ev.windows(2).all(|w| stamp(&w[0]) <= stamp(&w[1])));
    assert_eq!(ev[2]["data"]["speed"], 24 * MIB);
    assert_eq!(ev[2]["data"]["previous"], 16 * MIB);
    assert_eq!(ev[5]["data"]["speed"], 0);
    let end = &ev[6]["data"];
    assert_eq!(end["offset"], 48 * MIB);
    assert_eq!(end["len"], 48 * MIB);
    assert_eq!(end["copied"], 48 * MIB);
    assert_eq!(end["id"], "e");
    assert!(out.contains("Copied 48 MiB into 'top.qcow2'"), "{out}");
    let (wst, wout, _) = waiter.finish();
    assert_eq!(wst, 0);
    let seen: Vec<Value> = wout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        seen.last().map(|e| &e["event"]),
        Some(&Value::from("completed"))
    );
    assert_eq!(seen.last().map(|e| &e["data"]), Some(end));
}

/// Whatever a client sends, the job answers with an error or closes that connection only;
/// it keeps running and completes.
#[test]
fn malformed_protocol_input_gets_error_replies() {
    let s = Scratch::new();
    chain(&s, 32);
    // Named by a --control path this time.
    let sock = s.path("m.sock");
    let sock_arg = sock.to_string_lossy().into_owned();
    let child = command(
        &s,
        &[
            "stream",
            "--speed",
            "8M",
            "--job-id",
            "m",
            "--control",
            &sock_arg,
            "top.qcow2",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut job = Job { child: Some(child) };
    let t = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !socket(&s, "m").exists(),
        "--control replaces the runtime directory's socket"
    );
    let conn = UnixStream::connect(&sock).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let greeting: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(greeting["cowimg-job"]["version"], 1);
    assert_eq!(greeting["cowimg-job"]["id"], "m");
    let mut ask = |req: &str| -> Value {
        writeln!(w, "{req}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply to {req}: {line} ({e})"))
    };
    for (req, class) in [
        ("this is not json", "GenericError"),
        ("[1,2,3]", "GenericError"),
        ("{\"arguments\":{}}", "GenericError"),
        ("{\"execute\":42}", "GenericError"),
        ("{\"execute\":\"format-disk\"}", "CommandNotFound"),
        ("{\"execute\":\"block-job-set-speed\"}", "GenericError"),
        (
            "{\"execute\":\"block-job-set-speed\",\"arguments\":{\"speed\":-5}}",
            "GenericError",
        ),
        (
            "{\"execute\":\"query-block-jobs\",\"version\":2}",
            "GenericError",
        ),
        (
            "{\"execute\":\"query-block-jobs\",\"arguments\":{\"device\":\"other\"}}",
            "DeviceNotActive",
        ),
        ("{\"execute\":\"block-job-resume\"}", "GenericError"),
        (
            "{\"execute\":\"query-block-jobs\",\"arguments\":7}",
            "GenericError",
        ),
    ] {
        let reply = ask(req);
        assert_eq!(reply["error"]["class"], class, "{req}: {reply}");
        assert!(reply["error"]["desc"]
            .as_str()
            .is_some_and(|d| !d.is_empty()));
    }
    // The id is echoed; the connection still works after all that.
    let reply = ask("{\"execute\":\"query-block-jobs\",\"id\":\"q1\"}");
    assert_eq!(reply["id"], "q1");
    assert_eq!(reply["return"][0]["status"], "running");
    // A line over 64 KiB: an error, and that connection is closed.
    let huge = "x".repeat(100 << 10);
    let reply = ask(&huge);
    assert_eq!(reply["error"]["class"], "GenericError");
    // Clients that vanish mid-line, or mid-wait, do not hurt the job.
    {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(b"{\"execute\":\"query-bl").unwrap();
    }
    {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(b"{\"execute\":\"job-wait\"}\n").unwrap();
    }
    assert_eq!(query(&s, &sock_arg)["status"], "running");
    ok(&s, &["job", "set-speed", &sock_arg, "0"]);
    ends_well(&s, &mut job);
}

/// A socket nobody listens on (a killed job's) is replaced; a live job's id is refused when
/// asked for explicitly, and a default id gets the next free suffix.
#[test]
fn stale_socket_is_replaced_and_a_live_id_refused() {
    let s = Scratch::new();
    chain(&s, 32);
    let dir = runtime(&s).join("cowimg");
    std::fs::create_dir(&dir).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    // A stale socket: bound, then its listener gone.
    drop(std::os::unix::net::UnixListener::bind(dir.join("top.qcow2.sock")).unwrap());
    assert!(UnixStream::connect(dir.join("top.qcow2.sock")).is_err());
    let mut job = start(&s, &["stream", "--speed", "8M", "top.qcow2"], "top.qcow2");
    assert_eq!(query(&s, "top.qcow2")["device"], "top.qcow2");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(socket(&s, "top.qcow2"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
    // Another image of the same file name, in another directory.
    std::fs::create_dir(s.path("other")).unwrap();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "other/top.qcow2", "1M"]);
    let (st, _, err) = run(
        &s,
        &["checksum", "--job-id", "top.qcow2", "other/top.qcow2"],
    );
    assert_eq!(st, 1);
    assert!(
        err.contains("a job with id 'top.qcow2' is already running"),
        "{err}"
    );
    // Without --job-id the second job is top.qcow2-2 (listed while it runs).
    s.qemu_img(&["create", "-q", "-f", "qcow2", "other/base.qcow2", "32M"]);
    s.qemu_io("other/base.qcow2", &["write -P 0x11 0 32M"]);
    std::fs::remove_file(s.path("other/top.qcow2")).unwrap();
    let overlay = "create -q -f qcow2 -b base.qcow2 -F qcow2 other/top.qcow2";
    s.qemu_img(&overlay.split(' ').collect::<Vec<_>>());
    let mut second = start(
        &s,
        &["stream", "--speed", "8M", "other/top.qcow2"],
        "top.qcow2-2",
    );
    let listed: Value =
        serde_json::from_str(&ok(&s, &["job", "list", "--output", "json"])).unwrap();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["top.qcow2", "top.qcow2-2"]);
    ok(&s, &["job", "set-speed", "top.qcow2", "0"]);
    ok(&s, &["job", "set-speed", "top.qcow2-2", "0"]);
    assert_eq!(job.finish().0, 0);
    assert_eq!(second.finish().0, 0);
    let (st, out, _) = run(&s, &["job", "list"]);
    assert_eq!((st, out.as_str()), (0, "No running jobs.\n"));
    let (st, _, err) = run(&s, &["job", "query", "top.qcow2"]);
    assert_eq!(st, 1);
    assert!(err.contains("no running job 'top.qcow2'"), "{err}");
}

/// The JSON of `job list` and `job query`: query-block-jobs' entries (times, speeds and
/// progress redacted: they depend on the machine).
#[test]
fn list_and_query_json_shape() {
    let s = Scratch::new();
    chain(&s, 32);
    let mut job = start(
        &s,
        &[
            "rebase",
            "-b",
            "",
            "--speed",
            "8M",
            "--job-id",
            "shape",
            "top.qcow2",
        ],
        "shape",
    );
    ok(&s, &["job", "pause", "shape"]);
    let redact = |mut v: Value| {
        for key in ["elapsed", "current-speed", "eta", "offset", "copied"] {
            if v.get(key).is_some() {
                v[key] = "[redacted]".into();
            }
        }
        v
    };
    let list: Value = serde_json::from_str(&ok(&s, &["job", "list", "--output", "json"])).unwrap();
    let list: Vec<Value> = list
        .as_array()
        .unwrap()
        .iter()
        .cloned()
        .map(redact)
        .collect();
    insta::assert_json_snapshot!("list", list);
    let q = redact(query(&s, "shape"));
    insta::assert_json_snapshot!("query", q);
    let human = ok(&s, &["job", "query", "shape"]);
    assert!(
        human.starts_with("Job 'shape': rebase of 'top.qcow2', paused\ncur/end:  "),
        "{human}"
    );
    ok(&s, &["job", "resume", "shape"]);
    // `job wait` connects while the job still runs at its cap (32 MiB at 8M: seconds), and
    // only then is the cap lifted: a job that ended before `wait` connected would be gone.
    let (wst, wout, _) = std::thread::scope(|scope| {
        let waiter = scope.spawn(|| run(&s, &["job", "wait", "shape"]));
        std::thread::sleep(std::time::Duration::from_millis(500));
        ok(&s, &["job", "set-speed", "shape", "0"]);
        waiter.join().expect("job wait thread")
    });
    assert_eq!(wst, 0, "{wout}");
    assert!(
        wout.starts_with("Job 'shape' completed: 33554432 of 33554432 done"),
        "{wout}"
    );
    assert_eq!(job.finish().0, 0);
    assert!(s.same("top.qcow2", "base.qcow2"));
    s.assert_clean("top.qcow2");
}

/// `job wait` exits with the job's status: 1 for a job that failed, with its message; the
/// `error` event carries it too.
#[test]
fn wait_exits_with_a_failing_jobs_status() {
    let s = Scratch::new();
    let trigger = s.path("fail-now");
    let nbd = Server::nbdkit(
        s.dir.path(),
        &["--filter=error"],
        &[
            "pattern",
            "64M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            &format!("error-pread-file={}", trigger.display()),
        ],
    );
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &nbd.url,
        "-F",
        "raw",
        "top.qcow2",
    ]);
    let ev = s.path("ev.jsonl");
    let mut job = start(
        &s,
        &[
            "stream",
            "--speed",
            "8M",
            "--job-id",
            "f",
            "--events",
            &ev.to_string_lossy(),
            "top.qcow2",
        ],
        "f",
    );
    let waiter = command(&s, &["job", "wait", "f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut waiter = Job {
        child: Some(waiter),
    };
    std::thread::sleep(Duration::from_millis(700));
    std::fs::write(&trigger, b"").unwrap();
    let (st, _, err) = job.finish();
    assert_eq!(st, 1, "{err}");
    let (wst, _, werr) = waiter.finish();
    assert_eq!(wst, 1, "{werr}");
    assert!(
        werr.contains("job 'f' failed: ") && werr.contains("EIO"),
        "{werr}"
    );
    let ev = events(&ev);
    let last = ev.last().unwrap();
    assert_eq!(last["event"], "error");
    assert!(last["data"]["error"].as_str().unwrap().contains("EIO"));
    s.assert_clean("top.qcow2");
}

/// Progress lines (`-p` on a log) show the cap in force and a rate over the last seconds: after
/// `job set-speed`, both follow the new cap.
#[test]
fn progress_shows_the_new_cap_after_set_speed() {
    let s = Scratch::new();
    chain(&s, 64);
    let mut job = start(
        &s,
        &[
            "stream",
            "-p",
            "--speed",
            "4M",
            "--job-id",
            "pg",
            "top.qcow2",
        ],
        "pg",
    );
    std::thread::sleep(Duration::from_millis(2500));
    ok(&s, &["job", "set-speed", "pg", "24M"]);
    let (st, _, err) = job.finish();
    assert_eq!(st, 0, "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("/100%)")).collect();
    let at = |l: &str| -> f64 {
        let rate = l.split(" at ").nth(1).and_then(|r| r.split("/s").next());
        let (num, unit) = rate.and_then(|r| r.split_once(' ')).expect("a rate");
        let scale = match unit {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => MIB as f64,
            "GiB" => 1024.0 * MIB as f64,
            u => panic!("unit {u} in {l}"),
        };
        num.parse::<f64>().expect("a number") * scale
    };
    let before: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("(cap 4.00 MiB/s)"))
        .collect();
    let after: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("(cap 24.00 MiB/s)"))
        .collect();
    assert!(before.len() >= 2, "{err}");
    assert!(!after.is_empty(), "no line shows the new cap: {err}");
    assert!(
        before.iter().all(|l| at(l) <= 4.0 * MIB as f64 * 1.01),
        "{err}"
    );
    assert!(
        after.iter().any(|l| at(l) > 6.0 * MIB as f64),
        "the rate does not follow the new cap: {err}"
    );
    s.assert_clean("top.qcow2");
}
