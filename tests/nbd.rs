//! NBD exports as images and backing files, against real servers started here (nbdkit,
//! qemu-nbd; Unix sockets and loopback). qemu-img reads the same URLs and is the oracle: data
//! is compared with `cmp` against its `convert` output, maps against its `map`.

mod common;

use common::peers::Server;
use common::Scratch;
use cowimg_nbd::client::Client;
use cowimg_nbd::codec::state;
use cowimg_nbd::Target;

/// A 32 MiB sparse raw file: random data at 0 (1 MiB), a pattern at 8 MiB (512 KiB), a
/// written run of zeros at 16 MiB, and holes elsewhere.
fn sparse_source(s: &Scratch, name: &str) {
    s.qemu_img(&["create", "-q", "-f", "raw", name, "32M"]);
    s.write_file("rnd.bin", &common::noise(1 << 20, 0));
    s.qemu(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -s rnd.bin 0 1M",
            "-c",
            "write -P 0xcd 8M 512k",
            "-c",
            "write -P 0 16M 64k",
            name,
        ],
    );
}

/// [`sparse_source`] as "src.raw" and, converted by qemu-img, as "base.qcow2".
fn sparse_qcow2(s: &Scratch) {
    sparse_source(s, "src.raw");
    s.qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "src.raw",
        "base.qcow2",
    ]);
}

/// nbdkit serving [`sparse_source`] "src.raw" with its log filter: the server and the log.
fn logged_sparse_export(s: &Scratch) -> (Server, std::path::PathBuf) {
    sparse_source(s, "src.raw");
    let log = s.path("nbdkit.log");
    let logfile = format!("logfile={}", log.display());
    let srv = Server::nbdkit(
        s.dir.path(),
        &["--filter=log"],
        &["file", s.path("src.raw").to_str().unwrap(), &logfile],
    );
    (srv, log)
}

/// cowimg's and qemu-img's raw conversions of `url` (with `fmt`) are byte-identical, and
/// equal to `expect` when given.
fn converts_like_qemu(s: &Scratch, url: &str, fmt: &str, expect: Option<&str>) {
    s.cowimg_ok(&["convert", "-f", fmt, "-O", "raw", url, "ours.raw"]);
    s.qemu_img(&["convert", "-f", fmt, "-O", "raw", url, "qemus.raw"]);
    assert_eq!(
        s.read_file("ours.raw"),
        s.read_file("qemus.raw"),
        "convert of {url}"
    );
    if let Some(e) = expect {
        assert_eq!(s.read_file("ours.raw"), s.read_file(e), "{url} vs {e}");
    }
}

/// `map --output=json` of `image` says what qemu-img map says.
fn maps_like_qemu(s: &Scratch, image: &str, fmt: &[&str]) {
    let mut args = vec!["map", "--output=json"];
    args.extend_from_slice(fmt);
    args.push(image);
    assert_eq!(s.cowimg_ok(&args), s.qemu_img(&args), "map of {image}");
}

#[test]
fn client_operations_against_nbdkit_memory() {
    let s = Scratch::new();
    let srv = Server::nbdkit(s.dir.path(), &[], &["memory", "8M"]);
    let t = Target::parse(&srv.url).unwrap().unwrap();
    let c = Client::connect(&t).unwrap();
    let info = c.info().clone();
    assert_eq!(info.size, 8 << 20);
    assert!(
        info.structured && info.base_allocation.is_some(),
        "{info:?}"
    );
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    // Unaligned to anything, larger than one request piece: split and pipelined.
    c.write(1000, &data, true).unwrap();
    c.write_zeroes(1 << 20, 64 << 10, true, true).unwrap();
    c.trim(6 << 20, 1 << 20).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; 4 << 20];
    c.read(0, &mut back).unwrap();
    let mut want = vec![0u8; 4 << 20];
    want[1000..1000 + data.len()].copy_from_slice(&data);
    want[1 << 20..(1 << 20) + (64 << 10)].fill(0);
    assert!(back == want, "read back what was written");
    // The memory plugin reports what was never written as hole+zero.
    let ext = c.block_status(4 << 20, 4 << 20).unwrap().unwrap();
    assert_eq!(ext.iter().map(|e| u64::from(e.len)).sum::<u64>(), 4 << 20);
    assert!(ext.iter().all(|e| e.flags & state::ZERO != 0), "{ext:?}");
    // The whole map as nbdinfo (libnbd) reads it: "OFFSET LENGTH FLAGS DESCRIPTION" lines.
    let mut ours = Vec::new();
    let mut pos = 0u64;
    while pos < info.size {
        for e in c
            .block_status(pos, (info.size - pos) as u32)
            .unwrap()
            .unwrap()
        {
            ours.push((pos, u64::from(e.len), e.flags));
            pos += u64::from(e.len);
        }
    }
    let theirs: Vec<(u64, u64, u32)> = s
        .qemu("nbdinfo", &["--map", &srv.url])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(ours, theirs);
    drop(c);
    // qemu-img reads what the client wrote.
    s.qemu_img(&["convert", "-f", "raw", "-O", "raw", &srv.url, "q.raw"]);
    assert!(s.read_file("q.raw")[..4 << 20] == want[..]);
}

#[test]
fn raw_exports_read_map_and_compare_as_in_qemu() {
    let s = Scratch::new();
    sparse_source(&s, "src.raw");
    let src = s.path("src.raw");
    for options in [&[][..], &["--filter=noextents"][..], &["--no-sr"][..]] {
        let srv = Server::nbdkit(s.dir.path(), options, &["file", src.to_str().unwrap()]);
        converts_like_qemu(&s, &srv.url, "raw", Some("src.raw"));
        maps_like_qemu(&s, &srv.url, &["-f", "raw"]);
        assert_eq!(
            s.cowimg(&["compare", &srv.url, "src.raw"]).stdout,
            "Images are identical.\n"
        );
        let info = s.cowimg_ok(&["info", &srv.url]);
        assert!(info.contains("protocol type: nbd") && info.contains("disk size: unavailable"));
    }
}

#[test]
fn qemu_nbd_exports_of_qcow2_over_tcp_and_unix_in_every_url_form() {
    let s = Scratch::new();
    sparse_qcow2(&s);
    let base = s.path("base.qcow2");
    // qemu-nbd opens the qcow2 and exports guest bytes (raw for the client).
    let (tcp, port) = Server::qemu_nbd_tcp("base", &["-r", "-t", "-f", "qcow2"], &base);
    let unix = Server::qemu_nbd_unix(s.dir.path(), "base", &["-r", "-t", "-f", "qcow2"], &base);
    let sock = unix.socket.clone().unwrap();
    for url in [
        tcp.url.clone(),
        format!("nbd:127.0.0.1:{port}:exportname=base"),
        unix.url.clone(),
        format!("nbd:unix:{}:exportname=base", sock.display()),
    ] {
        converts_like_qemu(&s, &url, "raw", Some("src.raw"));
        maps_like_qemu(&s, &url, &["-f", "raw"]);
    }
    // A missing export is refused by the server, and the message says so.
    let r = s.cowimg(&["info", &format!("nbd://127.0.0.1:{port}/nosuch")]);
    assert!(r.stderr.contains("export not found"), "{}", r.stderr);

    // The qcow2 file's own bytes as the export: a remote qcow2, read with -f qcow2.
    let file = Server::qemu_nbd_unix(s.dir.path(), "", &["-r", "-t", "-f", "raw"], &base);
    converts_like_qemu(&s, &file.url, "qcow2", Some("src.raw"));
    for cmd in [
        &["info", "-f", "qcow2"][..],
        &["check", "-f", "qcow2"],
        &["measure", "-f", "qcow2", "-O", "qcow2"],
    ] {
        let mut args = cmd.to_vec();
        args.push(&file.url);
        assert_eq!(s.cowimg_ok(&args), s.qemu_img(&args), "{args:?}");
    }
}

#[test]
fn qemu_nbd_with_allocation_depth_exports_a_chain_that_reads_and_maps_as_in_qemu() {
    let s = Scratch::new();
    sparse_qcow2(&s);
    s.qcow2_overlay("base.qcow2", "top.qcow2");
    s.qemu_io("top.qcow2", &["write -P 0x5a 4M 128k", "write -z 8M 64k"]);
    s.qemu_img(&["convert", "-O", "raw", "top.qcow2", "chain.raw"]);
    // -A adds the qemu:allocation-depth context beside base:allocation; the client asks
    // for base:allocation only and must get its answers, not the other context's.
    let srv = Server::qemu_nbd_unix(
        s.dir.path(),
        "top",
        &["-r", "-t", "-A", "-f", "qcow2"],
        &s.path("top.qcow2"),
    );
    converts_like_qemu(&s, &srv.url, "raw", Some("chain.raw"));
    maps_like_qemu(&s, &srv.url, &["-f", "raw"]);
    // And as the backing file of a local overlay, streamed into it.
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &srv.url, "-F", "raw", "ov.qcow2",
    ]);
    s.cowimg_ok(&["stream", "ov.qcow2"]);
    s.assert_clean("ov.qcow2");
    s.qemu_img(&["convert", "-O", "raw", "ov.qcow2", "ov.raw"]);
    assert_eq!(s.read_file("ov.raw"), s.read_file("chain.raw"));
}

#[test]
fn overlays_on_an_nbd_backing_read_map_and_stream_without_writing_the_base() {
    let s = Scratch::new();
    let (srv, log) = logged_sparse_export(&s);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &srv.url, "-F", "raw", "ov.qcow2",
    ]);
    s.qemu_io("ov.qcow2", &["write -P 0x11 4M 64k"]);
    assert_eq!(
        s.cowimg_ok(&["info", "--backing-chain", "ov.qcow2"]),
        s.qemu_img(&["info", "--backing-chain", "ov.qcow2"])
    );
    maps_like_qemu(&s, "ov.qcow2", &[]);
    converts_like_qemu(&s, "ov.qcow2", "qcow2", None);
    s.qemu_img(&["convert", "-O", "raw", "ov.qcow2", "before.raw"]);
    let r = s.cowimg_ok(&["stream", "ov.qcow2"]);
    assert!(r.contains("standalone"), "{r}");
    s.assert_clean("ov.qcow2");
    assert!(s.qemu_info("ov.qcow2").get("backing-filename").is_none());
    s.qemu_img(&["convert", "-O", "raw", "ov.qcow2", "after.raw"]);
    assert_eq!(s.read_file("before.raw"), s.read_file("after.raw"));
    drop(srv);
    // Only reads, block status and the like reached the server: the base is never written.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains(" Read ") && log.contains(" Extents "), "{log}");
    for w in [" Write ", " Zero ", " Trim ", " Flush "] {
        assert!(!log.contains(w), "{w} in {log}");
    }
}

#[test]
fn latency_and_faults() {
    let s = Scratch::new();
    sparse_source(&s, "src.raw");
    let src = s.path("src.raw");
    let slow = Server::nbdkit(
        s.dir.path(),
        &["--filter=delay"],
        &["file", src.to_str().unwrap(), "rdelay=2ms"],
    );
    converts_like_qemu(&s, &slow.url, "raw", Some("src.raw"));
    drop(slow);
    // Every read fails: a clean error naming the export and the cause; no output left.
    let bad = Server::nbdkit(
        s.dir.path(),
        &["--filter=error"],
        &[
            "file",
            src.to_str().unwrap(),
            "error=EIO",
            "error-pread-rate=1",
        ],
    );
    let r = s.cowimg(&["convert", "-O", "raw", &bad.url, "out.raw"]);
    assert_eq!(r.status, 1, "{}", r.show());
    assert!(
        r.stderr.contains(&bad.url) && r.stderr.contains("EIO"),
        "{}",
        r.stderr
    );
    assert!(!s.path("out.raw").exists());
    // A server that goes away: the error says the connection is gone, and names the export.
    let srv = Server::nbdkit(s.dir.path(), &[], &["file", src.to_str().unwrap()]);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &srv.url, "-F", "raw", "ov.qcow2",
    ]);
    let url = srv.url.clone();
    drop(srv);
    let r = s.cowimg(&["map", "ov.qcow2"]);
    assert_eq!(r.status, 1, "{}", r.show());
    assert!(
        r.stderr.contains(&url) && r.stderr.contains("cannot connect"),
        "{}",
        r.stderr
    );
}

#[test]
fn holes_are_not_read_and_block_status_is_asked_once() {
    let s = Scratch::new();
    let (srv, log) = logged_sparse_export(&s);
    s.cowimg_ok(&["convert", "-O", "raw", &srv.url, "out.raw"]);
    drop(srv);
    assert_eq!(s.read_file("out.raw"), s.read_file("src.raw"));
    let log = std::fs::read_to_string(&log).unwrap();
    // Each line: "connection=N Read id=I offset=0x... count=0x... ...".
    let read: u64 = log
        .lines()
        .filter(|l| l.contains(" Read "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("count=0x"))
        })
        .map(|c| u64::from_str_radix(c, 16).unwrap())
        .sum();
    // The data (1.56 MiB of 32 MiB) plus the format probe, cut into whole requests.
    assert!(read > 0 && read <= 2 << 20, "{read} bytes read:\n{log}");
    let status = log.lines().filter(|l| l.contains(" Extents ")).count();
    assert!(
        (1..=2).contains(&status),
        "{status} block status requests:\n{log}"
    );
}

#[test]
fn stream_down_to_an_nbd_base_named_in_another_form() {
    let s = Scratch::new();
    sparse_source(&s, "src.raw");
    let srv = Server::nbdkit(
        s.dir.path(),
        &[],
        &["file", s.path("src.raw").to_str().unwrap()],
    );
    let sock = srv.socket.clone().unwrap();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &srv.url,
        "-F",
        "raw",
        "mid.qcow2",
    ]);
    s.qemu_io("mid.qcow2", &["write -P 0x22 2M 1M"]);
    s.qcow2_overlay("mid.qcow2", "top.qcow2");
    s.qemu_io("top.qcow2", &["write -P 0x33 2560k 64k"]);
    s.qemu_img(&["convert", "-O", "raw", "top.qcow2", "before.raw"]);
    // The base as the legacy form of the same export.
    let legacy = format!("nbd:unix:{}", sock.display());
    s.cowimg_ok(&["stream", "--base", &legacy, "top.qcow2"]);
    s.assert_clean("top.qcow2");
    let info = s.qemu_info("top.qcow2");
    // The base is recorded by its canonical name, as qemu's stream job records it.
    let canonical = Target::parse(&srv.url).unwrap().unwrap().to_string();
    assert_eq!(
        info["backing-filename"],
        serde_json::json!(canonical),
        "{info}"
    );
    s.qemu_img(&["convert", "-O", "raw", "top.qcow2", "after.raw"]);
    assert_eq!(s.read_file("before.raw"), s.read_file("after.raw"));
}

/// Bytes read through nbdkit's log filter, from its log file.
fn bytes_read(log: &std::path::Path) -> u64 {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains(" Read "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("count=0x"))
        })
        .map(|c| u64::from_str_radix(c, 16).unwrap())
        .sum()
}

/// nbdkit serving "base.raw" of `s` on `sock`, logging to `log`.
fn base_server(s: &Scratch, sock: &std::path::Path, log: &str) -> Server {
    let _ = std::fs::remove_file(sock);
    let logfile = format!("logfile={}", s.path(log).display());
    Server::nbdkit_at(
        sock,
        &["--filter=log"],
        &["file", s.path("base.raw").to_str().unwrap(), &logfile],
    )
}

/// A stream at 8 MiB/s of an overlay on a 24 MiB export: about 3 s, long enough to stop the
/// server under it.
fn slow_stream_setup(s: &Scratch) -> std::path::PathBuf {
    s.write_file("base.raw", &common::noise(24 << 20, 11));
    let sock = s.path("base.sock");
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let srv = base_server(s, &sock, "setup.log");
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &url, "-F", "raw", "ov.qcow2",
    ]);
    drop(srv);
    sock
}

#[test]
fn a_server_restarted_mid_stream_is_reconnected_and_the_stream_finishes() {
    let s = Scratch::new();
    let sock = slow_stream_setup(&s);
    let first = base_server(&s, &sock, "first.log");
    let r = std::thread::scope(|scope| {
        let stream = scope.spawn(|| s.cowimg(&["stream", "--speed", "8M", "ov.qcow2"]));
        std::thread::sleep(std::time::Duration::from_millis(1000));
        // The server goes away mid-stream and comes back on the same socket.
        drop(first);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let second = base_server(&s, &sock, "second.log");
        let r = stream.join().unwrap();
        drop(second);
        r
    });
    assert_eq!(r.status, 0, "{}", r.show());
    let (before, after) = (
        bytes_read(&s.path("first.log")),
        bytes_read(&s.path("second.log")),
    );
    assert!(
        before > 0 && after > 0 && before < 24 << 20,
        "read {before} bytes before the restart, {after} after"
    );
    // Standalone and the base's bytes, and clean.
    assert!(!s.qemu_img(&["info", "ov.qcow2"]).contains("backing file"));
    s.qemu_img(&["convert", "-O", "raw", "ov.qcow2", "out.raw"]);
    assert!(s.read_file("out.raw") == s.read_file("base.raw"));
    s.assert_clean("ov.qcow2");
}

#[test]
fn a_server_gone_for_good_fails_the_stream_after_retries_and_a_rerun_resumes() {
    let s = Scratch::new();
    let sock = slow_stream_setup(&s);
    let first = base_server(&s, &sock, "first.log");
    let r = std::thread::scope(|scope| {
        let stream = scope.spawn(|| s.cowimg(&["stream", "--speed", "8M", "ov.qcow2"]));
        std::thread::sleep(std::time::Duration::from_millis(1500));
        drop(first);
        stream.join().unwrap()
    });
    assert_eq!(r.status, 1, "{}", r.show());
    assert!(
        r.stderr.contains(&format!("socket={}", sock.display()))
            && r.stderr.contains("Connection refused")
            && r.stderr.contains("(after 4 attempts)"),
        "{}",
        r.stderr
    );
    // What was committed stays, the image is consistent (qemu-img check opens the backing
    // file: once the server is back), and the backing file is kept.
    assert!(s.qemu_img(&["info", "ov.qcow2"]).contains("backing file"));
    let again = base_server(&s, &sock, "again.log");
    s.assert_clean("ov.qcow2");
    // Back again: the rerun copies only the rest.
    let copied = s.own_data("ov.qcow2");
    assert!(copied > 0, "nothing was committed before the server went");
    let _ = std::fs::remove_file(s.path("again.log"));
    s.cowimg_ok(&["stream", "ov.qcow2"]);
    drop(again);
    let rest = bytes_read(&s.path("again.log"));
    assert!(
        rest < (24 << 20) - copied + (1 << 20),
        "the rerun read {rest} bytes, {copied} were already copied"
    );
    s.qemu_img(&["convert", "-O", "raw", "ov.qcow2", "out.raw"]);
    assert!(s.read_file("out.raw") == s.read_file("base.raw"));
    s.assert_clean("ov.qcow2");
}

#[test]
fn speed_caps_the_bytes_read_over_the_network_not_only_those_stored() {
    let s = Scratch::new();
    // 2 MiB of data, then 14 MiB of written zeros: the server reports all of it as data, so
    // all 16 MiB cross the network, although only 2 MiB are stored.
    let mut base = common::noise(2 << 20, 5);
    base.resize(16 << 20, 0);
    s.write_file("base.raw", &base);
    let sock = s.path("base.sock");
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let srv = base_server(&s, &sock, "base.log");
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &url, "-F", "raw", "ov.qcow2",
    ]);
    let t = std::time::Instant::now();
    s.cowimg_ok(&["stream", "--speed", "8M", "ov.qcow2"]);
    let took = t.elapsed().as_secs_f64();
    drop(srv);
    assert!(bytes_read(&s.path("base.log")) >= 16 << 20);
    // Charged for what was stored (2 MiB) it would take a quarter of a second; for the
    // network's 16 MiB at 8 MiB/s, two seconds.
    assert!(took >= 1.5, "took {took:.2} s");
    s.qemu_img(&["convert", "-O", "raw", "ov.qcow2", "out.raw"]);
    assert!(s.read_file("out.raw") == base);
    s.assert_clean("ov.qcow2");
}

#[test]
fn a_server_restarted_on_another_export_size_stops_the_stream_before_mixing() {
    let s = Scratch::new();
    let sock = slow_stream_setup(&s);
    let first = base_server(&s, &sock, "first.log");
    let r = std::thread::scope(|scope| {
        let stream = scope.spawn(|| s.cowimg(&["stream", "--speed", "8M", "ov.qcow2"]));
        std::thread::sleep(std::time::Duration::from_millis(1000));
        drop(first);
        // Back on the same socket, but with another file: 32 MiB instead of 24.
        s.write_file("other.raw", &common::noise(32 << 20, 12));
        let _ = std::fs::remove_file(&sock);
        let second =
            Server::nbdkit_at(&sock, &[], &["file", s.path("other.raw").to_str().unwrap()]);
        let r = stream.join().unwrap();
        drop(second);
        r
    });
    assert_eq!(r.status, 1, "{}", r.show());
    assert!(r.stderr.contains("the export changed"), "{}", r.stderr);
    // Nothing of the other file was stored: with the first server back, the image reads as
    // the base and the rerun finishes.
    let again = base_server(&s, &sock, "again.log");
    s.assert_clean("ov.qcow2");
    s.cowimg_ok(&["stream", "ov.qcow2"]);
    drop(again);
    s.qemu_img(&["convert", "-O", "raw", "ov.qcow2", "out.raw"]);
    assert!(s.read_file("out.raw") == s.read_file("base.raw"));
}

/// The connections that served `Read`s, from nbdkit's log filter.
fn read_connections(log: &std::path::Path) -> std::collections::BTreeSet<u32> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(" Read "))
        .map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("connection="))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no connection in {l}"))
        })
        .collect()
}

#[test]
fn reads_spread_over_connections_only_when_the_server_allows_multi_conn() {
    let s = Scratch::new();
    // 24 MiB of data 2 ms a read away: long enough for the background connections to join.
    s.qemu_img(&["create", "-q", "-f", "raw", "big.raw", "32M"]);
    s.qemu_io("big.raw", &["write -P 0x5a 0 24M"]);
    for (mode, several) in [("emulate", true), ("disable", false)] {
        let log = s.path(&format!("{mode}.log"));
        let srv = Server::nbdkit(
            s.dir.path(),
            &["--filter=log", "--filter=multi-conn", "--filter=delay"],
            &[
                "file",
                s.path("big.raw").to_str().unwrap(),
                &format!("logfile={}", log.display()),
                &format!("multi-conn-mode={mode}"),
                "delay-read=2ms",
            ],
        );
        s.cowimg_ok(&["convert", "-f", "raw", "-O", "raw", &srv.url, "out.raw"]);
        assert_eq!(s.read_file("out.raw"), s.read_file("big.raw"), "{mode}");
        drop(srv);
        let conns = read_connections(&log);
        if several {
            assert!(conns.len() >= 2, "multi-conn offered, reads on {conns:?}");
        } else {
            assert_eq!(conns.len(), 1, "no multi-conn, reads on {conns:?}");
        }
        std::fs::remove_file(s.path("out.raw")).unwrap();
    }
}
