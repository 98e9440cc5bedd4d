//! NBD exports as convert destinations (pre-copy block migration), against real servers
//! started here: qemu-nbd on raw and qcow2 files, nbdkit's memory plugin with its log,
//! nozero, delay and error filters. qemu-img is the oracle: after each copy `qemu-img
//! compare SRC EXPORT` says the export reads as SRC (and the file behind qemu-nbd too), and
//! nbdkit's log shows what went over the wire.

mod common;

use common::peers::Server;
use common::Scratch;

/// A 16 MiB qcow2 source: random data at 0 (1 MiB), a pattern at 5 MiB (256 KiB), a zero
/// cluster at 8 MiB (1 MiB), a run of written zeros at 12 MiB (64 KiB), holes elsewhere.
fn source(s: &Scratch) {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "src.qcow2", "16M"]);
    s.write_file("rnd.bin", &common::noise(1 << 20, 0));
    s.qemu_io(
        "src.qcow2",
        &[
            "write -s rnd.bin 0 1M",
            "write -P 0xcd 5M 256k",
            "write -z 8M 1M",
            "write -P 0 12M 64k",
        ],
    );
}

/// Bytes of SRC that hold data (not zeros): what a copy must send as WRITE at most, widened
/// to whole 64 KiB clusters.
const DATA_BYTES: u64 = (1 << 20) + (256 << 10);

/// Fills the export at `url` (of `size` MiB) with 0xee, so that a copy must hide it.
fn fill_garbage(s: &Scratch, url: &str, size_mib: u64) {
    s.qemu(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P 0xee 0 {size_mib}M"),
            url,
        ],
    );
}

/// `qemu-img compare SRC EXPORT` finds them identical (the export may be larger).
fn compares_equal(s: &Scratch, src: &str, url: &str) {
    let out = s.qemu_img(&["compare", "-F", "raw", src, url]);
    assert!(out.contains("Images are identical"), "{out}");
}

/// nbdkit's memory plugin of `size` behind the log filter (logging into `log_name`) and
/// `filters`, with plugin and filter parameters `params`: the server and the log's path.
fn logged_memory(
    s: &Scratch,
    log_name: &str,
    filters: &[&str],
    size: &str,
    params: &[&str],
) -> (Server, std::path::PathBuf) {
    let log = s.path(log_name);
    let logfile = format!("logfile={}", log.display());
    let mut options = vec!["--filter=log"];
    options.extend_from_slice(filters);
    let mut args = vec!["memory", size, &logfile];
    args.extend_from_slice(params);
    (Server::nbdkit(s.dir.path(), &options, &args), log)
}

/// nbdkit's log lines of the requests of one kind (" Write ", " Zero "...; their answers,
/// " ...Write ", are left out), as (connection, line).
fn logged<'a>(log: &'a str, what: &str) -> Vec<(u32, &'a str)> {
    log.lines()
        .filter(|l| l.contains(what))
        .map(|l| (connection(l), l))
        .collect()
}

fn connection(line: &str) -> u32 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("connection="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no connection in {line}"))
}

/// The value of `key=0x...` in a log line.
fn hex(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=0x")[..]))
        .map(|v| u64::from_str_radix(v, 16).unwrap())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

#[test]
fn into_qemu_nbd_raw_file_over_tcp_and_qcow2_file_over_unix() {
    let s = Scratch::new();
    source(&s);
    // A raw file full of old bytes, which the copy must hide.
    s.write_file("dst.raw", &vec![0xeeu8; 16 << 20]);
    let (srv, _) = Server::qemu_nbd_tcp("disk", &["-t", "-f", "raw"], &s.path("dst.raw"));
    s.cowimg_ok(&["convert", "-O", "raw", "src.qcow2", &srv.url]);
    compares_equal(&s, "src.qcow2", &srv.url);
    drop(srv);
    s.qemu_img(&["convert", "-O", "raw", "src.qcow2", "want.raw"]);
    let got = s.read_file("dst.raw");
    assert!(
        got[..16 << 20] == s.read_file("want.raw")[..],
        "dst.raw reads as SRC"
    );
    assert!(got[16 << 20..].iter().all(|&b| b == 0xee), "past SRC kept");

    // A qcow2 file holding old data, in the legacy form naming the export, with -n.
    s.qemu_img(&["create", "-q", "-f", "qcow2", "dst.qcow2", "16M"]);
    s.qemu_io("dst.qcow2", &["write -P 0xee 0 16M"]);
    let srv = Server::qemu_nbd_unix(
        s.dir.path(),
        "disk",
        &["-t", "-f", "qcow2"],
        &s.path("dst.qcow2"),
    );
    let legacy = format!(
        "nbd:unix:{}:exportname=disk",
        srv.socket.as_ref().unwrap().display()
    );
    s.cowimg_ok(&["convert", "-n", "-O", "raw", "src.qcow2", &legacy]);
    compares_equal(&s, "src.qcow2", &srv.url);
    drop(srv);
    s.assert_clean("dst.qcow2");
    let out = s.qemu_img(&["compare", "src.qcow2", "dst.qcow2"]);
    assert!(out.contains("Images are identical"), "{out}");
    // The zeros reached the qcow2 file as zeroing, not as data: qemu-nbd turned the
    // WRITE_ZEROES into zero clusters, so the old data is not allocated there any more.
    let map: serde_json::Value =
        serde_json::from_str(&s.qemu_img(&["map", "--output=json", "dst.qcow2"])).unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == serde_json::json!(true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        data <= DATA_BYTES,
        "{data} bytes of data in dst.qcow2: {map}"
    );
}

#[test]
fn zeros_go_as_write_zeroes_and_data_as_pipelined_writes_on_several_connections() {
    let s = Scratch::new();
    source(&s);
    // The delay keeps each write in flight long enough for the log to show the pipelining.
    let (srv, log) = logged_memory(
        &s,
        "nbdkit.log",
        &["--filter=delay"],
        "32M",
        &["wdelay=5ms"],
    );
    // Only over SRC's range: qemu-img compare wants the rest of a larger export zero.
    fill_garbage(&s, &srv.url, 16);
    std::fs::write(&log, "").unwrap();
    s.cowimg_ok(&["convert", "src.qcow2", &srv.url]);
    // What cowimg sent, before other clients add theirs.
    let log = std::fs::read_to_string(&log).unwrap();
    compares_equal(&s, "src.qcow2", &srv.url);
    // The memory plugin deallocated what was zeroed: nbdinfo shows holes there.
    let map = s.qemu("nbdinfo", &["--map", &srv.url]);
    let holes: u64 = map
        .lines()
        .filter(|l| l.contains("hole,zero"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    // SRC's 16 MiB less its data were zeroed; the export's last 16 MiB are left as they were.
    assert!(
        holes >= (16 << 20) - DATA_BYTES - (64 << 10),
        "{holes} bytes of holes:\n{map}"
    );
    drop(srv);
    let zeros = logged(&log, " Zero ");
    assert!(!zeros.is_empty(), "no WRITE_ZEROES:\n{log}");
    assert!(
        zeros.iter().all(|(_, l)| l.contains("fast=1")),
        "FAST_ZERO offered, not used:\n{log}"
    );
    let zeroed: u64 = zeros.iter().map(|(_, l)| hex(l, "count")).sum();
    assert!(
        zeroed >= (16 << 20) - DATA_BYTES - (64 << 10),
        "{zeroed}:\n{log}"
    );
    let writes = logged(&log, " Write ");
    let written: u64 = writes.iter().map(|(_, l)| hex(l, "count")).sum();
    assert!(
        written > 0 && written <= DATA_BYTES + (128 << 10),
        "{written} bytes written (zeros sent as data?):\n{log}"
    );
    // Pipelined: some write started before the one before it was answered.
    let (mut in_flight, mut most) = (0, 0);
    for l in log.lines().filter(|l| l.contains("Write ")) {
        in_flight += if l.contains(" ...Write ") { -1 } else { 1 };
        most = most.max(in_flight);
    }
    assert!(most >= 2, "one write at a time:\n{log}");
    // The flush comes last, after every write was answered (connections opened in the
    // background may still join later, and leave).
    let last = log
        .lines()
        .rev()
        .find(|l| ["Write ", "Zero ", "Flush "].iter().any(|w| l.contains(w)))
        .unwrap();
    assert!(last.contains("...Flush"), "{last}");
}

#[test]
fn multi_conn_spreads_writes_and_target_is_zero_skips_zeros() {
    let s = Scratch::new();
    // 24 MiB of data: long enough for the connections opened in the background to join.
    s.qemu_img(&["create", "-q", "-f", "raw", "big.raw", "32M"]);
    s.qemu_io("big.raw", &["write -P 0x5a 0 24M"]);
    let (srv, log) = logged_memory(
        &s,
        "nbdkit.log",
        &["--filter=delay"],
        "32M",
        &["wdelay=10ms"],
    );
    s.cowimg_ok(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-f",
        "raw",
        "big.raw",
        &srv.url,
    ]);
    compares_equal(&s, "big.raw", &srv.url);
    drop(srv);
    let log = std::fs::read_to_string(&log).unwrap();
    let writes = logged(&log, " Write ");
    let conns: std::collections::BTreeSet<u32> = writes.iter().map(|(c, _)| *c).collect();
    assert!(
        conns.len() >= 2,
        "multi-conn offered, writes on {conns:?}:\n{log}"
    );
    // The export is known to be zero: nothing was zeroed.
    assert!(logged(&log, " Zero ").is_empty(), "{log}");
}

#[test]
fn refused_write_zeroes_fall_back() {
    let s = Scratch::new();
    source(&s);
    // No WRITE_ZEROES at all: zeros are written as data.
    let (srv, log) = logged_memory(&s, "nozero.log", &["--filter=nozero"], "16M", &[]);
    fill_garbage(&s, &srv.url, 16);
    s.cowimg_ok(&["convert", "-n", "src.qcow2", &srv.url]);
    compares_equal(&s, "src.qcow2", &srv.url);
    drop(srv);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(logged(&log, " Zero ").is_empty(), "{log}");
    let written: u64 = logged(&log, " Write ")
        .iter()
        .map(|(_, l)| hex(l, "count"))
        .sum();
    // The garbage fill plus SRC whole, zeros included.
    assert!(written >= 2 * (16 << 20), "{written}:\n{log}");

    // FAST_ZERO offered but always refused: tried once per worker at most (each may ask
    // before the first refusal is in), then plain WRITE_ZEROES.
    let (srv, log) = logged_memory(
        &s,
        "slow.log",
        &["--filter=nozero"],
        "16M",
        &["zeromode=plugin", "fastzeromode=slow"],
    );
    fill_garbage(&s, &srv.url, 16);
    s.cowimg_ok(&["convert", "-n", "--jobs", "2", "src.qcow2", &srv.url]);
    compares_equal(&s, "src.qcow2", &srv.url);
    drop(srv);
    let log = std::fs::read_to_string(&log).unwrap();
    let zeros = logged(&log, " Zero ");
    let fast = zeros.iter().filter(|(_, l)| l.contains("fast=1")).count();
    let plain = zeros.iter().filter(|(_, l)| l.contains("fast=0")).count();
    assert!(
        (1..=2).contains(&fast) && plain >= 1,
        "{fast} fast, {plain} plain:\n{log}"
    );
    let refusals = log.matches("error=ENOTSUP").count();
    assert_eq!(refusals, fast, "{log}");
}

#[test]
fn a_write_error_fails_naming_the_export() {
    let s = Scratch::new();
    source(&s);
    let srv = Server::nbdkit(
        s.dir.path(),
        &["--filter=error"],
        &["memory", "16M", "error=EIO", "error-pwrite-rate=1"],
    );
    let r = s.cowimg(&["convert", "src.qcow2", &srv.url]);
    assert_eq!(r.status, 1, "{}", r.show());
    assert!(
        r.stderr.contains(&srv.url) && r.stderr.contains("EIO") && r.stderr.contains("write"),
        "{}",
        r.stderr
    );
    // qemu-img fails the same copy too.
    let q = s.run("qemu-img", &["convert", "-n", "src.qcow2", &srv.url]);
    assert_eq!(q.status, 1, "{}", q.show());
}

#[test]
fn read_only_small_and_qcow2_destinations_are_refused_as_qemu_img_refuses_them() {
    let s = Scratch::new();
    source(&s);
    let ro = Server::nbdkit(s.dir.path(), &["-r"], &["memory", "16M"]);
    for args in [
        &["convert", "src.qcow2"][..],
        &["convert", "-n", "src.qcow2"][..],
    ] {
        let mut a = args.to_vec();
        a.push(&ro.url);
        let r = s.cowimg(&a);
        assert_eq!(r.status, 1, "{}", r.show());
        assert!(
            r.stderr.contains(&ro.url) && r.stderr.contains("read-only"),
            "{}",
            r.stderr
        );
        let q = s.run("qemu-img", &a);
        assert_eq!(q.status, 1, "qemu-img {a:?}: {}", q.show());
    }
    let small = Server::nbdkit(s.dir.path(), &[], &["memory", "8M"]);
    // qemu-img's words, with -n and without it, then the sizes.
    for (n, words) in [
        (true, "output file is smaller than input file".to_string()),
        (
            false,
            format!(
                "{}: error while converting raw: Cannot grow NBD nodes",
                small.url
            ),
        ),
    ] {
        let mut a = vec!["convert"];
        if n {
            a.push("-n");
        }
        a.extend(["src.qcow2", &small.url]);
        let r = s.cowimg(&a);
        assert_eq!(r.status, 1, "{}", r.show());
        assert!(r.stderr.contains(&words), "{}", r.stderr);
        assert!(r.stderr.contains("holds 8388608 bytes"), "{}", r.stderr);
        let q = s.run("qemu-img", &a);
        assert_eq!(q.status, 1, "{}", q.show());
        assert!(q.stderr.contains(&words), "qemu-img: {}", q.stderr);
    }
    // The export is left untouched by the refusals.
    let map = s.qemu("nbdinfo", &["--map", &small.url]);
    assert_eq!(map.lines().count(), 1, "{map}");
    assert!(map.contains("hole,zero"), "{map}");
    let big = Server::nbdkit(s.dir.path(), &[], &["memory", "16M"]);
    for fmt in ["qcow2", "qed"] {
        let r = s.cowimg(&["convert", "-O", fmt, "src.qcow2", &big.url]);
        assert_eq!(r.status, 1, "{}", r.show());
        assert!(
            r.stderr.contains("NBD export") && r.stderr.contains("-O raw"),
            "{}",
            r.stderr
        );
    }
    let r = s.cowimg(&["convert", "-o", "preallocation=full", "src.qcow2", &big.url]);
    assert_eq!(r.status, 1, "{}", r.show());
    // As qemu-img: --target-is-zero needs -n.
    let r = s.cowimg(&["convert", "--target-is-zero", "src.qcow2", &big.url]);
    let q = s.run(
        "qemu-img",
        &["convert", "--target-is-zero", "src.qcow2", &big.url],
    );
    assert_eq!(r.status, 1, "{}", r.show());
    assert_eq!(q.status, 1, "{}", q.show());
    assert!(
        r.stderr
            .contains("--target-is-zero requires use of -n flag"),
        "{}",
        r.stderr
    );
    assert!(
        q.stderr
            .contains("--target-is-zero requires use of -n flag"),
        "{}",
        q.stderr
    );
}

/// A raw base behind qemu-nbd (on a Unix socket) and `ov.qcow2` over it with some writes;
/// the server and what the overlay reads (`want.raw`).
fn overlay_on_served_raw_base(s: &Scratch, base: &str, ov: &str) -> Server {
    s.qemu_img(&["create", "-q", "-f", "raw", base, "16M"]);
    s.qemu_io(base, &["write -P 0x11 0 4M"]);
    let srv = Server::qemu_nbd_unix(s.dir.path(), "base", &["-t", "-f", "raw"], &s.path(base));
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &srv.url, "-F", "raw", ov,
    ]);
    s.qemu_io(
        ov,
        &[
            "write -P 0x22 1M 1M",
            "write -z 2M 512k",
            "write -P 0x33 8M 64k",
        ],
    );
    srv
}

#[test]
fn commit_into_an_nbd_base_writes_it_as_qemu_img_commit_does() {
    let s = Scratch::new();
    let srv = overlay_on_served_raw_base(&s, "base.raw", "ov.qcow2");
    s.qemu_img(&["convert", "-O", "raw", "ov.qcow2", "want.raw"]);
    s.cowimg_ok(&["commit", "ov.qcow2"]);
    compares_equal(&s, "want.raw", &srv.url);
    s.assert_clean("ov.qcow2");
    drop(srv);
    // The same chain committed by qemu-img leaves the same bytes in its base.
    let srv = overlay_on_served_raw_base(&s, "qbase.raw", "qov.qcow2");
    s.qemu_img(&["commit", "qov.qcow2"]);
    drop(srv);
    assert!(
        s.read_file("base.raw") == s.read_file("want.raw"),
        "cowimg's base"
    );
    assert!(
        s.read_file("base.raw") == s.read_file("qbase.raw"),
        "qemu-img's base"
    );

    // A qcow2 image inside an export cannot take allocating writes: refused before any.
    s.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "16M"]);
    let srv = Server::qemu_nbd_unix(s.dir.path(), "b", &["-t", "-f", "raw"], &s.path("b.qcow2"));
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &srv.url,
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    s.qemu_io("top.qcow2", &["write -P 0x22 1M 1M"]);
    let before = s.read_file("b.qcow2");
    let r = s.cowimg(&["commit", "top.qcow2"]);
    assert_eq!(r.status, 1, "{}", r.show());
    assert!(
        r.stderr.contains(&srv.url)
            && r.stderr.contains("fixed size")
            && r.stderr.contains("qemu-nbd -f qcow2"),
        "{}",
        r.stderr
    );
    drop(srv);
    assert!(s.read_file("b.qcow2") == before, "the base was written");
}
