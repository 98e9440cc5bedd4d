//! `cowimg serve --stream`: the background stream while clients read and write, the backing
//! switch at its end (to none, or to `--base`, also on a read-only export), the instant-on
//! chain (template served by qemu-nbd behind nbdkit's delay filter), SIGTERM and kill -9
//! during the stream, and the rerun that resumes. Every server is bounded in time and killed
//! by PID (tests/common/served.rs, tests/common/peers.rs); a missing peer fails the test.

mod common;
use common::peers::Server;
use common::served::{backing, wait_backing, Rng, Served};
use common::Scratch;

use std::time::Duration;

/// qemu-io -f raw on the served export (a URL) or a raw shadow file, each command with
/// -c; the commands must succeed.
fn qemu_io_raw(s: &Scratch, target: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(target);
    s.qemu("qemu-io", &args);
}

/// Whether the served export reads exactly as the raw file `want` (`qemu-img compare`).
fn assert_serves(s: &Scratch, url: &str, want: &str, what: &str) {
    let r = s.run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", url, want],
    );
    assert_eq!(r.status, 0, "{what}: {}{}", r.stdout, r.stderr);
}

/// The bytes the message "copied X (N bytes)" of a completed stream names.
fn copied_bytes(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("stream completed"))
        .unwrap_or_else(|| panic!("no completion message: {stderr}"));
    let open = line.find('(').expect("(N bytes)") + 1;
    let close = line[open..].find(" bytes)").expect("N bytes)") + open;
    line[open..close].parse().expect("a byte count")
}

/// base.qcow2 (24 MiB: 0x11 at 0..8M, 0x22 at 12M..20M) under ov.qcow2.
fn two_layers(s: &Scratch) {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "24M"]);
    s.qemu_io(
        "base.qcow2",
        &["write -q -P 0x11 0 8M", "write -q -P 0x22 12M 8M"],
    );
    s.qcow2_overlay("base.qcow2", "ov.qcow2");
}

/// Client writes that cover partial clusters, whole clusters, zeroes and the image's end.
const WRITES: &[&str] = &[
    "write -q -P 0x33 1M 64k",
    "write -q -P 0x44 5M 2M",
    "write -q -z 13M 1M",
    "write -q -P 0x55 10000 3000",
    "write -q -P 0x66 24572k 4k",
];

#[test]
fn stream_completes_while_qemu_io_reads_and_writes() {
    let s = Scratch::new();
    two_layers(&s);
    // 16 MiB of data at 4 MiB/s: the clients run while the stream does.
    let srv = Served::start(&s, "ov.qcow2", &["--stream", "--speed", "4M"]);
    let url = srv.url();
    qemu_io_raw(&s, &url, WRITES);
    qemu_io_raw(
        &s,
        &url,
        &[
            "read -q -P 0x11 16k 1008k",
            "read -q -P 0x33 1M 64k",
            "read -q -P 0x22 15M 1M",
            "read -q -P 0 8M 4M",
            "flush",
        ],
    );
    assert_eq!(
        backing(&s, "ov.qcow2").as_deref(),
        Some("base.qcow2"),
        "the clients ran while the stream did"
    );
    wait_backing(&s, "ov.qcow2", None, 60);
    // Served on after the switch, through the shorter chain.
    qemu_io_raw(
        &s,
        &url,
        &["read -q -P 0x22 14M 1M", "write -q -P 0x77 20M 1M"],
    );
    let (status, stderr) = srv.stop();
    assert_eq!(status, 0, "{stderr}");
    assert!(stderr.contains("it is now standalone"), "{stderr}");
    assert!(s.qemu_info("ov.qcow2")["backing-filename"].is_null());
    s.assert_clean("ov.qcow2");
    s.qemu_img(&["convert", "-O", "raw", "base.qcow2", "shadow.raw"]);
    let mut all: Vec<&str> = WRITES.to_vec();
    all.push("write -q -P 0x77 20M 1M");
    qemu_io_raw(&s, "shadow.raw", &all);
    assert!(
        s.same("ov.qcow2", "shadow.raw"),
        "image != template + writes"
    );
}

#[test]
fn read_only_export_streams_down_to_base() {
    let s = Scratch::new();
    two_layers(&s);
    std::fs::rename(s.path("ov.qcow2"), s.path("mid.qcow2")).unwrap();
    s.qemu_io(
        "mid.qcow2",
        &["write -q -P 0x88 6M 4M", "write -q -z 14M 1M"],
    );
    s.qcow2_overlay("mid.qcow2", "ov.qcow2");
    s.qemu_io("ov.qcow2", &["write -q -P 0x99 7M 64k"]);
    s.qemu_img(&["convert", "-O", "raw", "ov.qcow2", "want.raw"]);
    let (mid, base) = (s.read_file("mid.qcow2"), s.read_file("base.qcow2"));
    let srv = Served::start(
        &s,
        "ov.qcow2",
        &["-r", "--stream", "--base", "base.qcow2", "--speed", "8M"],
    );
    let url = srv.url();
    let r = s.run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &url]);
    assert!(
        r.stdout.contains("Operation not permitted") || r.status != 0,
        "a read-only export refuses writes: {}{}",
        r.stdout,
        r.stderr
    );
    wait_backing(&s, "ov.qcow2", Some("base.qcow2"), 60);
    assert_serves(&s, &url, "want.raw", "served data after the switch");
    let (status, stderr) = srv.stop();
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stderr.contains("its backing file is now 'base.qcow2'"),
        "{stderr}"
    );
    let info = s.qemu_info("ov.qcow2");
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    s.assert_clean("ov.qcow2");
    assert!(s.same("ov.qcow2", "want.raw"));
    assert!(
        s.read_file("mid.qcow2") == mid && s.read_file("base.qcow2") == base,
        "the layers below are never written"
    );
}

#[test]
fn instant_on_from_a_slow_nbd_template() {
    let s = Scratch::new();
    // The template: data, holes, and data again.
    s.qemu_img(&["create", "-q", "-f", "raw", "template.raw", "16M"]);
    qemu_io_raw(
        &s,
        "template.raw",
        &["write -q -P 0x5a 0 6M", "write -q -P 0xa5 8M 4M"],
    );
    let template = s.path("template.raw");
    let qemu_nbd = Server::qemu_nbd_unix(s.dir.path(), "", &["-r", "-t", "-f", "raw"], &template);
    let socket = qemu_nbd
        .socket
        .as_ref()
        .expect("a socket")
        .display()
        .to_string();
    let slow = Server::nbdkit(
        s.dir.path(),
        &["-r", "--filter=delay"],
        &["nbd", &format!("socket={socket}"), "rdelay=2ms"],
    );
    // The two commands of the recipe (docs/recipes.md).
    s.cowimg_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &slow.url,
        "-F",
        "raw",
        "--copy-on-read",
        "ov.qcow2",
    ]);
    let srv = Served::start(&s, "ov.qcow2", &["--stream", "--speed", "4M"]);
    let url = srv.url();
    // The client starts at once: reads come through (and are copied), writes land locally.
    qemu_io_raw(
        &s,
        &url,
        &[
            "read -q -P 0x5a 0 64k",
            "write -q -P 0x42 2M 100k",
            "read -q -P 0xa5 11M 1M",
            "write -q -P 0x43 9M 4k",
            "flush",
        ],
    );
    assert!(
        backing(&s, "ov.qcow2").is_some(),
        "the client ran during the stream"
    );
    wait_backing(&s, "ov.qcow2", None, 60);
    // The template servers go; the served image reads on, holes included (which the old
    // chain would read from the template).
    drop(slow);
    drop(qemu_nbd);
    s.qemu_img(&["create", "-q", "-f", "raw", "shadow.raw", "16M"]);
    qemu_io_raw(
        &s,
        "shadow.raw",
        &[
            "write -q -P 0x5a 0 6M",
            "write -q -P 0xa5 8M 4M",
            "write -q -P 0x42 2M 100k",
            "write -q -P 0x43 9M 4k",
        ],
    );
    assert_serves(
        &s,
        &url,
        "shadow.raw",
        "served data once the template is gone",
    );
    let (status, stderr) = srv.stop();
    assert_eq!(status, 0, "{stderr}");
    assert!(s.qemu_info("ov.qcow2")["backing-filename"].is_null());
    s.assert_clean("ov.qcow2");
    assert!(s.same("ov.qcow2", "shadow.raw"));
}

/// base.qcow2 full of varied data (16 MiB) under ov.qcow2, and its raw copy want.raw.
fn full_chain(s: &Scratch) {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]);
    let cmds: Vec<String> = (0..16)
        .map(|i| format!("write -q -P {} {i}M 1M", 0x20 + i))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
    s.qemu_io("base.qcow2", &refs);
    s.qcow2_overlay("base.qcow2", "ov.qcow2");
    s.qemu_img(&["convert", "-O", "raw", "base.qcow2", "want.raw"]);
}

#[test]
fn sigterm_during_the_stream_commits_and_a_rerun_copies_the_rest() {
    let s = Scratch::new();
    full_chain(&s);
    let srv = Served::start(&s, "ov.qcow2", &["--stream", "--speed", "4M"]);
    std::thread::sleep(Duration::from_millis(1500));
    let (status, stderr) = srv.stop();
    assert_eq!(status, 0, "{stderr}");
    assert!(stderr.contains("stream interrupted"), "{stderr}");
    assert_eq!(backing(&s, "ov.qcow2").as_deref(), Some("base.qcow2"));
    s.assert_clean("ov.qcow2");
    assert!(s.same("ov.qcow2", "want.raw"));
    let done = s.own_data("ov.qcow2");
    assert!(
        done > 0 && done < 16 << 20,
        "part of the stream is committed ({done} bytes)"
    );
    // The rerun copies exactly what is left.
    let srv = Served::start(&s, "ov.qcow2", &["--stream"]);
    wait_backing(&s, "ov.qcow2", None, 60);
    let (status, stderr) = srv.stop();
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(copied_bytes(&stderr), (16 << 20) - done, "{stderr}");
    s.assert_clean("ov.qcow2");
    assert!(s.same("ov.qcow2", "want.raw"));
}

#[test]
fn kill_9_during_the_stream_keeps_the_image_clean_and_a_rerun_finishes() {
    let mut rng = Rng(0x5eed_0017);
    for round in 0..3 {
        let s = Scratch::new();
        full_chain(&s);
        let base = s.read_file("base.qcow2");
        // Small batches: several commits, so that the kill lands between and inside them.
        let srv = Served::start_env(
            &s,
            "ov.qcow2",
            &["--stream", "--speed", "4M"],
            &[("COWIMG_TEST_BATCH_BYTES", "1048576")],
        );
        // A client writes meanwhile: acknowledged after a flush, it must survive.
        qemu_io_raw(&s, &srv.url(), &["write -q -P 0xee 3M 70k", "flush"]);
        let moment = 200 + rng.below(2500);
        std::thread::sleep(Duration::from_millis(moment));
        srv.kill9();
        assert_eq!(
            backing(&s, "ov.qcow2").as_deref(),
            Some("base.qcow2"),
            "round {round}: killed at {moment} ms, during the stream"
        );
        let r = s.run("qemu-img", &["check", "ov.qcow2"]);
        // Leaked clusters (written, never referenced) are allowed after a crash; errors not.
        assert!(
            (r.status == 0 || r.status == 3) && !r.stdout.contains("ERROR"),
            "round {round}, killed at {moment} ms: {}{}",
            r.stdout,
            r.stderr
        );
        qemu_io_raw(&s, "want.raw", &["write -q -P 0xee 3M 70k"]);
        assert!(
            s.same("ov.qcow2", "want.raw"),
            "round {round}: data after the kill at {moment} ms"
        );
        let srv = Served::start(&s, "ov.qcow2", &["--stream"]);
        wait_backing(&s, "ov.qcow2", None, 60);
        let (status, stderr) = srv.stop();
        assert_eq!(status, 0, "{stderr}");
        // Finished by a clean run: no error and no leak.
        s.assert_clean("ov.qcow2");
        assert!(
            s.same("ov.qcow2", "want.raw"),
            "round {round}: after the rerun"
        );
        assert!(
            s.read_file("base.qcow2") == base,
            "the base is never written"
        );
    }
}

/// `cowimg job ARGS` with the scratch directory as the runtime directory: status, stdout
/// and stderr.
fn job(s: &Scratch, args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["job"];
    a.extend(args);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(&a)
        .env("XDG_RUNTIME_DIR", s.dir.path())
        .current_dir(s.dir.path())
        .output()
        .expect("run cowimg job");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `job query --output json ID`, once the job listens (up to 20 s).
fn job_query(s: &Scratch, id: &str) -> serde_json::Value {
    let t = std::time::Instant::now();
    loop {
        let (st, out, err) = job(s, &["query", "--output", "json", id]);
        if st == 0 {
            return serde_json::from_str(&out).expect("query JSON");
        }
        assert!(t.elapsed() < Duration::from_secs(20), "job {id}: {err}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn event_names(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("events file")
        .lines()
        .map(|l| {
            let e: serde_json::Value = serde_json::from_str(l).expect("an event");
            e["event"].as_str().unwrap_or("?").to_string()
        })
        .collect()
}

/// serve's background stream is a job like `stream`: queried, paused (the server keeps
/// serving; nothing is copied), resumed, re-capped, waited for; its events in order; and at
/// its end the image is standalone while still served.
#[test]
fn serve_stream_is_a_job_steered_while_clients_read() {
    let s = Scratch::new();
    two_layers(&s);
    let ev = s.path("events.jsonl");
    let ev_arg = ev.to_string_lossy().into_owned();
    let dir = s.dir.path().to_string_lossy().into_owned();
    let srv = Served::start_env(
        &s,
        "ov.qcow2",
        &[
            "--stream", "--speed", "2M", "--job-id", "srv", "--events", &ev_arg,
        ],
        &[("XDG_RUNTIME_DIR", &dir)],
    );
    let q = job_query(&s, "srv");
    assert_eq!(q["type"], "stream", "{q}");
    assert_eq!(q["speed"], 2 << 20, "{q}");
    assert!(
        q["device"].as_str().unwrap_or("").ends_with("ov.qcow2"),
        "{q}"
    );
    std::thread::sleep(Duration::from_millis(700));
    let (st, out, err) = job(&s, &["pause", "srv"]);
    assert_eq!(st, 0, "{out}{err}");
    let paused = job_query(&s, "srv");
    assert_eq!(paused["status"], "paused", "{paused}");
    let copied = paused["copied"].as_u64().expect("copied");
    assert!(copied > 0 && copied < 16 << 20, "{paused}");
    // Paused, the stream copies nothing, and clients are served as before.
    let url = srv.url();
    qemu_io_raw(
        &s,
        &url,
        &["read -q -P 0x22 15M 1M", "read -q -P 0x11 0 1M"],
    );
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(job_query(&s, "srv")["copied"].as_u64(), Some(copied));
    for verb in [&["resume", "srv"][..], &["set-speed", "srv", "0"]] {
        let (st, out, err) = job(&s, verb);
        assert_eq!(st, 0, "{verb:?}: {out}{err}");
    }
    let (st, out, err) = job(&s, &["wait", "srv"]);
    assert_eq!(st, 0, "{out}{err}");
    assert!(out.contains("completed"), "{out}");
    wait_backing(&s, "ov.qcow2", None, 30);
    // Still served, and what it serves reads as the chain did.
    let r = s.run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &url, "base.qcow2"],
    );
    assert_eq!(r.status, 0, "after the stream: {}{}", r.stdout, r.stderr);
    let (st, err) = srv.stop();
    assert_eq!(st, 0, "{err}");
    assert_eq!(
        event_names(&ev),
        [
            "created",
            "running",
            "paused",
            "resumed",
            "speed-changed",
            "completed"
        ]
    );
    s.assert_clean("ov.qcow2");
    assert!(s.same("base.qcow2", "ov.qcow2"));
    assert!(
        !s.path("cowimg/srv.sock").exists(),
        "the control socket is removed"
    );
}

/// `job cancel` stops serve's stream only: what it copied is committed, the backing file
/// stays, clients are still served; `serve --stream` again copies only the rest.
#[test]
fn serve_stream_job_cancel_keeps_serving_and_the_rerun_resumes() {
    let s = Scratch::new();
    two_layers(&s);
    let dir = s.dir.path().to_string_lossy().into_owned();
    let env = [("XDG_RUNTIME_DIR", dir.as_str())];
    let srv = Served::start_env(
        &s,
        "ov.qcow2",
        &["--stream", "--speed", "2M", "--job-id", "c"],
        &env,
    );
    job_query(&s, "c");
    std::thread::sleep(Duration::from_millis(700));
    let (st, out, err) = job(&s, &["cancel", "c"]);
    assert_eq!(st, 0, "{out}{err}");
    assert!(out.contains("cancelled"), "{out}");
    let url = srv.url();
    qemu_io_raw(&s, &url, &["read -q -P 0x22 12M 8M"]);
    assert_eq!(backing(&s, "ov.qcow2").as_deref(), Some("base.qcow2"));
    let (st, err) = srv.stop();
    assert_eq!(st, 0, "{err}");
    assert!(err.contains("stream interrupted"), "{err}");
    s.assert_clean("ov.qcow2");
    let kept = s.own_data("ov.qcow2");
    assert!(kept > 0 && kept < 16 << 20, "kept {kept}");
    let srv = Served::start_env(&s, "ov.qcow2", &["--stream"], &env);
    wait_backing(&s, "ov.qcow2", None, 30);
    let (st, err) = srv.stop();
    assert_eq!(st, 0, "{err}");
    assert_eq!(copied_bytes(&err), (16 << 20) - kept, "{err}");
    s.assert_clean("ov.qcow2");
    assert!(s.same("base.qcow2", "ov.qcow2"));
}

/// `job pause` of serve's stream commits what it copied: kill -9 of the server then loses
/// nothing, and `serve --stream` again copies exactly the rest.
#[test]
fn serve_stream_paused_then_killed_then_rerun_copies_the_rest() {
    let s = Scratch::new();
    two_layers(&s);
    let dir = s.dir.path().to_string_lossy().into_owned();
    let env = [("XDG_RUNTIME_DIR", dir.as_str())];
    let srv = Served::start_env(
        &s,
        "ov.qcow2",
        &["--stream", "--speed", "2M", "--job-id", "pk"],
        &env,
    );
    job_query(&s, "pk");
    std::thread::sleep(Duration::from_millis(700));
    let (st, out, err) = job(&s, &["pause", "pk"]);
    assert_eq!(st, 0, "{out}{err}");
    let copied = job_query(&s, "pk")["copied"].as_u64().expect("copied");
    assert!(copied > 0 && copied < 16 << 20, "{copied}");
    srv.kill9();
    s.assert_clean("ov.qcow2");
    assert_eq!(s.own_data("ov.qcow2"), copied);
    // The stale control socket is replaced by the rerun's job of the same id.
    let srv = Served::start_env(&s, "ov.qcow2", &["--stream", "--job-id", "pk"], &env);
    wait_backing(&s, "ov.qcow2", None, 30);
    let (st, err) = srv.stop();
    assert_eq!(st, 0, "{err}");
    assert_eq!(copied_bytes(&err), (16 << 20) - copied, "{err}");
    s.assert_clean("ov.qcow2");
    assert!(s.same("base.qcow2", "ov.qcow2"));
}
