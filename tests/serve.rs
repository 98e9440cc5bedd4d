//! `cowimg serve` with real NBD clients: qemu-img, qemu-io, nbdinfo, nbdsh and nbdcopy over a
//! Unix socket, hostile bytes, copy-on-read through the server, concurrent clients against a
//! shadow of their acknowledged writes, and kill -9 during writes. Every server is bounded
//! in time (`timeout`) and killed by PID when its test ends; a missing client fails the test.

mod common;
use common::served::{backing, wait_backing, Rng, Served};
use common::Scratch;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use cowimg_nbd::codec::{self, cmd, errno, opt, rep, Request};
use cowimg_nbd::Client;

/// base.qcow2 (16 MiB: 0xab at 0..4M, 0xcd at 9M..10M) under ov.qcow2; `cor` sets the
/// overlay's copy-on-read flag.
fn chain(s: &Scratch, cor: bool) {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]);
    s.qemu_io(
        "base.qcow2",
        &["write -q -P 0xab 0 4M", "write -q -P 0xcd 9M 1M"],
    );
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
    ];
    if cor {
        args.push("--copy-on-read");
    }
    args.push("ov.qcow2");
    s.cowimg_ok(&args);
}

/// `qemu-img compare -U`: the served image is locked by the server.
fn same_shared(s: &Scratch, a: &str, b: &str) -> bool {
    let r = s.run("qemu-img", &["compare", "-U", a, b]);
    assert!(r.status <= 1, "compare {a} {b}: {}{}", r.stdout, r.stderr);
    r.status == 0
}

fn run_ok(s: &Scratch, program: &str, args: &[&str]) -> String {
    let r = s.run(program, args);
    assert_eq!(r.status, 0, "{program} {args:?}: {}{}", r.stdout, r.stderr);
    r.stdout
}

/// (start, length, data, zero) of a qemu-img map, merged where equal.
fn map_shape(json: &str) -> Vec<(u64, u64, bool, bool)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (data, zero) = (e["data"] == true, e["zero"] == true);
        match out.last_mut() {
            Some(l) if l.2 == data && l.3 == zero => l.1 += len,
            _ => out.push((start, len, data, zero)),
        }
    }
    out
}

#[test]
fn qemu_img_and_qemu_io_over_nbd_unix() {
    let s = Scratch::new();
    chain(&s, false);
    s.qemu_io("ov.qcow2", &["write -q -P 0x11 1M 64k"]);
    let srv = Served::start(&s, "ov.qcow2", &[]);
    let url = srv.url();
    let info: serde_json::Value =
        serde_json::from_str(&s.qemu_img(&["info", "--output=json", &url])).unwrap();
    assert_eq!(info["virtual-size"], 16 << 20);
    // The map through the server has the chain's data and zero ranges.
    let remote = map_shape(&s.qemu_img(&["map", "--output=json", &url]));
    let local = map_shape(&s.qemu_img(&["map", "-U", "--output=json", "ov.qcow2"]));
    assert_eq!(remote, local);
    s.qemu_img(&["convert", "-O", "raw", &url, "out.raw"]);
    assert!(same_shared(&s, "out.raw", "ov.qcow2"));
    let r = s.run("qemu-img", &["compare", &url, "base.qcow2"]);
    assert_eq!(r.status, 1, "the overlay's own write differs: {}", r.stdout);
    run_ok(
        &s,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 5M 64k",
            "-c",
            "write -P 0x5b 6M 100",
            "-c",
            "write -z 0 128k",
            "-c",
            "write -z 7M 1000",
            "-c",
            "discard 9M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0x5a 5M 64k",
            "-c",
            "read -P 0x5b 6M 100",
            "-c",
            "read -P 0 0 128k",
            "-c",
            "read -P 0xab 128k 64k",
            "-c",
            "read -P 0 7M 1000",
            // A discard may do nothing; it must never expose older data or lose newer.
            "-c",
            "read -P 0xcd 9M 64k",
            &url,
        ],
    );
    let (status, stderr) = srv.stop();
    assert_eq!(status, 0, "SIGTERM exits 0: {stderr}");
    s.assert_clean("ov.qcow2");
    s.qemu_io(
        "ov.qcow2",
        &[
            "read -q -P 0x5a 5M 64k",
            "read -q -P 0 0 128k",
            "read -q -P 0x11 1M 64k",
            "read -q -P 0xab 128k 64k",
        ],
    );
}

#[test]
fn nbdinfo_and_nbdcopy() {
    let s = Scratch::new();
    chain(&s, false);
    let srv = Served::start(&s, "ov.qcow2", &["-x", "disk", "-D", "the test disk"]);
    let url = format!("nbd+unix:///disk?socket={}", srv.socket.display());
    let list = run_ok(&s, "nbdinfo", &["--list", &url]);
    assert!(list.contains("export=\"disk\""), "{list}");
    assert!(list.contains("the test disk"), "{list}");
    assert!(list.contains("qemu:allocation-depth"), "{list}");
    for can in [
        "multi-conn",
        "fast-zero",
        "cache",
        "trim",
        "zero",
        "fua",
        "flush",
        "write",
    ] {
        let r = s.run("nbdinfo", &["--can", can, &url]);
        assert_eq!(r.status, 0, "can {can}: {}", r.stderr);
    }
    let map = run_ok(&s, "nbdinfo", &["--map", &url]);
    let lines: Vec<&str> = map.lines().map(|l| l.trim()).collect();
    assert!(lines[0].starts_with("0     4194304    0  data"), "{map}");
    assert!(lines[1].contains("3  hole,zero"), "{map}");
    let depth = run_ok(&s, "nbdinfo", &["--map=qemu:allocation-depth", &url]);
    assert!(depth.contains("backing depth 2"), "{depth}");
    assert!(depth.contains("absent"), "{depth}");
    // nbdcopy uses several connections when the server allows it.
    run_ok(&s, "nbdcopy", &["--connections=4", &url, "copy.raw"]);
    assert!(same_shared(&s, "copy.raw", "ov.qcow2"));
    assert_eq!(srv.stop().0, 0);
    // Read-only: writes are not offered.
    let ro = Served::start(&s, "ov.qcow2", &["-r"]);
    let r = s.run("nbdinfo", &["--can", "write", &ro.url()]);
    assert_eq!(r.status, 2, "read-only: {}{}", r.stdout, r.stderr);
    let (status, _) = ro.stop();
    assert_eq!(status, 0);
}

#[test]
fn nbdsh_req_one_fast_zero_cache_and_errors() {
    let s = Scratch::new();
    chain(&s, false);
    let srv = Served::start(&s, "ov.qcow2", &["--copy-on-read"]);
    let script = r#"
import errno
h.set_strict_mode(0)
def depth_at(off, n):
    got = []
    def cb(meta, off, entries, err):
        if meta == "qemu:allocation-depth":
            got.extend(entries)
    h.block_status(n, off, cb)
    return got
def one(off, n):
    got = []
    def cb(meta, off, entries, err):
        if meta == "base:allocation":
            got.extend(entries)
    h.block_status(n, off, cb, flags=nbd.CMD_FLAG_REQ_ONE)
    return got
# REQ_ONE: exactly one extent, no longer than asked.
e = one(0, 8 << 20)
assert e == [4 << 20, 0], e
e = one(4 << 20, 1 << 20)
assert e == [1 << 20, 3], e
# Without: several extents.
assert len(depth_at(0, 16 << 20)) >= 6
# CACHE copies 2 MiB of backing data into the overlay: depth 2 -> 1.
assert depth_at(0, 2 << 20)[:2] == [2 << 20, 2], depth_at(0, 2 << 20)
h.cache(2 << 20, 0)
assert depth_at(0, 2 << 20)[:2] == [2 << 20, 1], depth_at(0, 2 << 20)
# FAST_ZERO: whole clusters are fast; a partial one is ENOTSUP.
h.zero(65536, 4 << 20, nbd.CMD_FLAG_FAST_ZERO)
try:
    h.zero(100, 5 << 20, nbd.CMD_FLAG_FAST_ZERO)
    raise AssertionError("a partial fast zero succeeded")
except nbd.Error as ex:
    assert ex.errnum == errno.ENOTSUP, ex
assert h.pread(100, 5 << 20) == bytes(100)
# Errors: out of range, too large; the connection survives them.
for f in (lambda: h.pread(2, (16 << 20) - 1), lambda: h.pwrite(b"xy", (16 << 20) - 1)):
    try:
        f()
        raise AssertionError("out of range accepted")
    except nbd.Error as ex:
        assert ex.errnum == errno.EINVAL, ex
try:
    h.pread(64 << 20, 0)
    raise AssertionError("a 64 MiB read accepted")
except nbd.Error as ex:
    assert ex.errnum in (errno.EINVAL, errno.ERANGE), ex
assert h.pread(4, 9 << 20) == b"\xcd" * 4
h.pwrite(b"z" * 10, 0, nbd.CMD_FLAG_FUA)
assert h.pread(10, 0) == b"z" * 10
h.flush()
print("ok")
"#;
    // nbdsh runs `python3` from PATH: the system one has libnbd's module (python3-libnbd).
    let connect = format!(
        "h.add_meta_context('base:allocation')\nh.add_meta_context('qemu:allocation-depth')\nh.connect_uri('{}')\n",
        srv.url()
    );
    let out = Command::new("nbdsh")
        .args(["-c", &(connect + script)])
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .output()
        .expect("run nbdsh (libnbd-bin, python3-libnbd)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nbdsh: {text}");
    assert_eq!(text.trim(), "ok");
    let (status, stderr) = srv.stop();
    assert_eq!(status, 0, "{stderr}");
    s.assert_clean("ov.qcow2");
    s.qemu_io("ov.qcow2", &["read -q -P 0x7a 0 10", "read -q -P 0 4M 64k"]);
}

fn handshake(sock: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    codec::decode_greeting(&g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let go = codec::GoRequest {
        export: String::new(),
        infos: vec![],
    };
    s.write_all(
        &codec::OptionRequest {
            code: opt::GO,
            data: go.encode(),
        }
        .encode(),
    )
    .unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let h = codec::OptionReplyHeader::decode(&h).unwrap();
        std::io::copy(&mut (&mut s).take(h.len as u64), &mut std::io::sink()).unwrap();
        if h.reply == rep::ACK {
            return s;
        }
    }
}

fn request(s: &mut UnixStream, kind: u16, offset: u64, len: u32) -> u32 {
    let r = Request {
        flags: 0,
        kind,
        cookie: 42,
        offset,
        len,
    };
    s.write_all(&r.encode()).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    match codec::ReplyHeader::decode(&h).unwrap() {
        Some((codec::ReplyHeader::Simple { error, cookie: 42 }, 16)) => error,
        other => panic!("unexpected reply {other:?}"),
    }
}

#[test]
fn hostile_requests_do_not_take_the_server_down() {
    let s = Scratch::new();
    chain(&s, false);
    let srv = Served::start(&s, "ov.qcow2", &[]);
    let mut c = handshake(&srv.socket);
    assert_eq!(request(&mut c, cmd::READ, 16 << 20, 1), errno::EINVAL);
    assert_eq!(request(&mut c, cmd::READ, u64::MAX - 1, 4), errno::EINVAL);
    assert_eq!(request(&mut c, cmd::READ, 0, u32::MAX), errno::EINVAL);
    assert_eq!(request(&mut c, cmd::CACHE, u64::MAX, 1), errno::EINVAL);
    assert_eq!(
        request(&mut c, cmd::WRITE_ZEROES, (16 << 20) - 1, 2),
        errno::EINVAL
    );
    assert_eq!(request(&mut c, 1000, 0, 0), errno::EINVAL);
    // A 4 GiB write cannot be answered without reading its data: a hang-up, nothing
    // allocated.
    let huge = Request {
        flags: 0,
        kind: cmd::WRITE,
        cookie: 1,
        offset: 0,
        len: u32::MAX,
    };
    c.write_all(&huge.encode()).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap_or(0), 0, "hung up");
    let mut c = handshake(&srv.socket);
    c.write_all(&[0x55; 28]).unwrap();
    assert_eq!(c.read(&mut b).unwrap_or(0), 0, "bad magic: hung up");
    // Garbage instead of a handshake, and a client that leaves mid-request.
    let mut g = UnixStream::connect(&srv.socket).unwrap();
    g.write_all(&[0xff; 64]).unwrap();
    drop(g);
    let mut c = handshake(&srv.socket);
    c.write_all(&huge.encode()[..10]).unwrap();
    drop(c);
    // Still serving, and nothing was written.
    let info = s.qemu_img(&["info", &srv.url()]);
    assert!(info.contains("16 MiB"), "{info}");
    let (status, stderr) = srv.stop();
    assert_eq!(status, 0, "{stderr}");
    assert!(stderr.contains("broke the NBD protocol"), "{stderr}");
    s.assert_clean("ov.qcow2");
    assert!(s.same("ov.qcow2", "base.qcow2"));
}

/// Guest bytes the overlay itself holds (depth 0 data), from qemu-img map.

#[test]
fn reads_through_serve_fill_the_overlay_by_its_flag() {
    let s = Scratch::new();
    chain(&s, true);
    // --no-copy-on-read overrides the flag: reads leave the overlay empty.
    let srv = Served::start(&s, "ov.qcow2", &["--no-copy-on-read", "-r"]);
    s.qemu_img(&["convert", "-O", "raw", &srv.url(), "a.raw"]);
    assert_eq!(srv.stop().0, 0);
    assert_eq!(s.own_data("ov.qcow2"), 0);
    // The flag: every byte read from the base is copied, and the overlay then equals it.
    let srv = Served::start(&s, "ov.qcow2", &["-r"]);
    s.qemu_img(&["convert", "-O", "raw", &srv.url(), "b.raw"]);
    let (status, stderr) = srv.stop();
    assert_eq!(status, 0, "{stderr}");
    s.assert_clean("ov.qcow2");
    assert_eq!(
        s.own_data("ov.qcow2"),
        5 << 20,
        "the base's data, in the overlay"
    );
    assert!(s.same("ov.qcow2", "base.qcow2"));
    assert!(s.same("b.raw", "base.qcow2"));
    // The overlay holds it all: without its base it still reads the same.
    s.qemu_img(&["rebase", "-u", "-b", "", "ov.qcow2"]);
    assert!(s.same("ov.qcow2", "base.qcow2"));
}

/// A small deterministic generator (xorshift), so that a failure can be replayed.
fn base_bytes() -> Vec<u8> {
    let mut v = vec![0u8; 16 << 20];
    v[..4 << 20].fill(0xab);
    v[9 << 20..10 << 20].fill(0xcd);
    v
}

const BLOCK: u64 = 4096;

#[test]
fn concurrent_writers_and_copy_on_read_fills_match_a_shadow() {
    // A fill that replaced a client write would show in some rounds only: several rounds.
    for round in 0..4 {
        stress_round(round, false);
    }
}

#[test]
fn concurrent_writers_fills_and_a_capped_stream_match_a_shadow() {
    // The stream copies every cluster the writers and readers race for; a copy that
    // replaced an acknowledged write would show in some rounds only.
    for round in 10..13 {
        stress_round(round, true);
    }
}

/// Writers of random patterns (each owning every third 4 KiB block, so that they share
/// every cluster) and readers (whose reads fill) on a served overlay of a full base; with
/// `stream`, `--stream` runs under a cap meanwhile. The served data, and the image when
/// the server is done, must equal a shadow of the acknowledged writes.
fn stress_round(round: u64, stream: bool) {
    let s = Scratch::new();
    // A base with data everywhere: every first read of a cluster is a fill.
    s.qemu_img(&["create", "-q", "-f", "qcow2", "full.qcow2", "16M"]);
    s.qemu_io("full.qcow2", &["write -q -P 0x3c 0 16M"]);
    s.cowimg_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "full.qcow2",
        "-F",
        "qcow2",
        "--copy-on-read",
        "ov.qcow2",
    ]);
    let extra: &[&str] = if stream {
        &["--stream", "--speed", "3M"]
    } else {
        &[]
    };
    let srv = Served::start(&s, "ov.qcow2", extra);
    const WRITERS: u64 = 3;
    let size = 16u64 << 20;
    let base = vec![0x3cu8; size as usize];
    let shadows: Vec<Vec<u8>> = std::thread::scope(|sc| {
        // Readers fill the overlay in large reads while writers write small random ranges
        // of the same clusters; then random reads.
        for r in 0..2u64 {
            let target = srv.target();
            sc.spawn(move || {
                let c = Client::connect(&target).expect("connect");
                let mut buf = vec![0u8; 1 << 20];
                // Large reads: each fill copies a long range while writes land in it. (Not
                // with the stream, which would then find everything filled already.)
                for k in (0..size >> 20).filter(|_| !stream) {
                    let k = (k + r * 8) % (size >> 20);
                    c.read(k << 20, &mut buf).expect("read");
                }
                let mut rng = Rng(0x9e37_79b9 + r + 100 * round);
                // Fewer with the stream, which must find much to copy still.
                for _ in 0..if stream { 12 } else { 100 } {
                    let len = 1 + rng.below(256 << 10);
                    let off = rng.below(size - len);
                    c.read(off, &mut buf[..len as usize]).expect("read");
                }
            });
        }
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let target = srv.target();
                let mut shadow = base.clone();
                sc.spawn(move || {
                    // Writer w owns the 4 KiB blocks b with b % WRITERS == w: the writers
                    // share every cluster, but the final content of each byte is known.
                    let c = Client::connect(&target).expect("connect");
                    let mut rng = Rng(0x1234_5678 + w + 100 * round);
                    let blocks = size / BLOCK;
                    let mut write = |rng: &mut Rng, i: u64, b: u64| {
                        let within = rng.below(BLOCK);
                        let len = 1 + rng.below(BLOCK - within);
                        let off = b * BLOCK + within;
                        let data: Vec<u8> = (0..len).map(|k| (w * 64 + i + k) as u8).collect();
                        c.write(off, &data, i % 50 == 0).expect("write");
                        shadow[off as usize..(off + len) as usize].copy_from_slice(&data);
                    };
                    // With the stream, fewer and paced: some clusters stay for the stream to copy,
                    // and writes land before, during and after the copy of theirs.
                    for i in 0..if stream { 150 } else { 600u64 } {
                        let b = rng.below(blocks / WRITERS) * WRITERS + w;
                        write(&mut rng, i, b);
                        if stream {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    shadow
                })
            })
            .collect();
        writers
            .into_iter()
            .map(|h| h.join().expect("writer"))
            .collect()
    });
    // Each byte as its owner (or the base) left it.
    let mut want = base;
    for b in 0..size / BLOCK {
        let (a, e) = ((b * BLOCK) as usize, ((b + 1) * BLOCK) as usize);
        want[a..e].copy_from_slice(&shadows[(b % WRITERS) as usize][a..e]);
    }
    if stream {
        // The writers ran while the stream did (16 MiB at 3 MiB/s takes over 5 s).
        assert!(
            backing(&s, "ov.qcow2").is_some(),
            "round {round}: the stream ended before the writers did"
        );
        wait_backing(&s, "ov.qcow2", None, 60);
    }
    let c = Client::connect(&srv.target()).expect("connect");
    let mut got = vec![0u8; size as usize];
    for (i, piece) in got.chunks_mut(4 << 20).enumerate() {
        c.read(i as u64 * (4 << 20), piece).expect("read");
    }
    drop(c);
    let bad = (0..size / BLOCK)
        .filter(|&b| {
            got[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize]
                != want[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize]
        })
        .count();
    assert_eq!(
        bad, 0,
        "round {round}: 4 KiB blocks of the served image that differ from the shadow"
    );
    let (status, stderr) = srv.stop();
    assert_eq!(status, 0, "{stderr}");
    if stream {
        assert!(stderr.contains("stream completed"), "{stderr}");
        assert!(
            !stderr.contains("copied 0 B"),
            "the stream copied nothing: {stderr}"
        );
    }
    s.assert_clean("ov.qcow2");
    s.write_file("want.raw", &want);
    assert!(
        s.same("ov.qcow2", "want.raw"),
        "the image differs from the shadow"
    );
}

#[test]
fn kill_9_during_writes_keeps_the_image_clean_and_flushed_writes() {
    let s = Scratch::new();
    chain(&s, true);
    let srv = Served::start(&s, "ov.qcow2", &[]);
    let c = Client::connect(&srv.target()).expect("connect");
    for i in 0..32u64 {
        c.write(i * 300_000, &[0x61; 70_000], false).expect("write");
    }
    c.flush().expect("flush");
    // More writes and copy-on-read fills, unflushed, while the server is killed.
    let target = srv.target();
    let busy = std::thread::spawn(move || {
        let c = Client::connect(&target).expect("connect");
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..10_000u64 {
            // Writes above the flushed ones (which end below 10 MiB); reads anywhere.
            let r = if i % 2 == 0 {
                c.write(
                    (10 << 20) + (i * 777_777) % (5 << 20),
                    &[0x62; 50_000],
                    false,
                )
            } else {
                c.read((i * 777_777) % (15 << 20), &mut buf)
            };
            if r.is_err() {
                return i;
            }
        }
        10_000
    });
    std::thread::sleep(Duration::from_millis(150));
    srv.kill9();
    let done = busy.join().expect("busy client");
    assert!(
        done > 2,
        "the server was killed while requests ran ({done} done)"
    );
    drop(c);
    let r = s.run("qemu-img", &["check", "ov.qcow2"]);
    // Leaked clusters (written, never referenced) are allowed after a crash; errors not.
    assert!(r.status == 0 || r.status == 3, "{}{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("ERROR"), "{}", r.stdout);
    let cmds: Vec<String> = (0..32u64)
        .map(|i| format!("read -q -P 0x61 {} 70000", i * 300_000))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
    s.qemu_io("ov.qcow2", &refs);
    // The base is never written.
    s.write_file("base.raw", &base_bytes());
    assert!(s.same("base.qcow2", "base.raw"));
}

#[test]
fn sigterm_with_a_client_connected_commits_its_writes_and_exits_0() {
    let s = Scratch::new();
    chain(&s, false);
    let srv = Served::start(&s, "ov.qcow2", &[]);
    let c = Client::connect(&srv.target()).expect("connect");
    // Acknowledged but never flushed: the shutdown commits it.
    c.write(3 << 20, &[0x71; 70_000], false).expect("write");
    let (status, stderr) = srv.stop();
    assert_eq!(status, 0, "{stderr}");
    assert!(c.read(0, &mut [0; 1]).is_err(), "the connection was closed");
    s.assert_clean("ov.qcow2");
    s.qemu_io(
        "ov.qcow2",
        &["read -q -P 0x71 3M 70000", "read -q -P 0xab 0 3M"],
    );
    assert!(!s.path("ov.qcow2.sock").exists(), "the socket is removed");
}

#[test]
fn a_client_that_sends_nothing_is_dropped_after_the_handshake_limit() {
    let s = Scratch::new();
    chain(&s, false);
    // One slot: the silent client holds it until the limit drops it.
    let srv = Served::start(&s, "ov.qcow2", &["-e", "1", "--handshake-limit", "1"]);
    let mut silent = UnixStream::connect(&srv.socket).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = std::time::Instant::now();
    // The server's greeting, then nothing from us: the server must hang up.
    let mut buf = [0u8; 256];
    let mut got = 0;
    loop {
        match silent.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("the silent client was not dropped within 10 s: {e}"),
        }
    }
    let waited = t.elapsed();
    assert!(got > 0, "the server greeted the client first");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "dropped after {waited:?}, the limit being 1 s"
    );
    // The slot is free again; a client that has finished its handshake may idle past it.
    let c = Client::connect(&srv.target()).expect("connect");
    std::thread::sleep(Duration::from_millis(1500));
    let mut data = vec![0u8; 4096];
    c.read(0, &mut data)
        .expect("an idle client after its handshake is kept");
    assert!(data.iter().all(|&b| b == 0xab));
    drop(c);
    let (status, stderr) = srv.stop();
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stderr.contains("no handshake within 1 s (--handshake-limit): dropped"),
        "{stderr}"
    );
}
