//! http(s):// layers against real web servers started here on loopback: nginx (Range,
//! keep-alive, TLS with a CA made by the test) and python's `http.server` (which ignores
//! Range and must be refused). Data is checked against the served file itself.

mod common;

use std::path::Path;
use std::process::Command;

use common::peers::Web;
use common::{noise, Scratch};
use cowimg::remote::http::{Cause, HttpStorage, ATTEMPTS, PIECE};
use cowimg_formats::Storage;

/// Sets a file's mtime: nginx's ETag is mtime and size, so a replaced file must not share
/// the original's second.
fn touch(path: &Path, date: &str) {
    let st = Command::new("touch")
        .args(["-d", date])
        .arg(path)
        .status()
        .expect("run touch");
    assert!(st.success());
}

/// A directory `www` in the scratch dir with `name` holding `data`, dated in the past.
fn serve_file(s: &Scratch, name: &str, data: &[u8]) -> std::path::PathBuf {
    let www = s.path("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join(name), data).unwrap();
    touch(&www.join(name), "2020-01-01 00:00:00");
    www
}

/// Replaces `name` under `www` by a new file (a new inode, as a deployment would).
fn replace(www: &Path, name: &str, data: &[u8], date: &str) {
    let tmp = www.join(format!(".{name}.new"));
    std::fs::write(&tmp, data).unwrap();
    touch(&tmp, date);
    std::fs::rename(&tmp, www.join(name)).unwrap();
}

#[test]
fn storage_reads_exact_ranges_over_a_keep_alive_pool() {
    let s = Scratch::new();
    // Not a multiple of anything: the last piece is short, and reads cross the end.
    let data = noise(3 * PIECE + 1234, 1);
    let www = serve_file(&s, "f.raw", &data);
    let web = Web::nginx(s.dir.path(), &www);
    let st = HttpStorage::open(&web.url("f.raw"), false).unwrap();
    assert_eq!(st.len().unwrap(), data.len() as u64);
    assert_eq!(st.protocol(), "http");
    // The whole file in one read: several pieces in flight.
    let mut all = vec![0u8; data.len()];
    st.read_at(&mut all, 0).unwrap();
    assert!(all == data, "whole read");
    // Unaligned, inside one piece and across pieces.
    for (off, len) in [
        (1000u64, 4096usize),
        (PIECE as u64 - 7, 14),
        (12345, 2 * PIECE + 99),
    ] {
        let mut b = vec![0u8; len];
        st.read_at(&mut b, off).unwrap();
        assert!(
            b[..] == data[off as usize..off as usize + len],
            "{off}+{len}"
        );
    }
    // Across the end: the rest reads as zeros, and nothing past the end is asked for.
    let mut b = vec![0xffu8; 4096];
    let off = data.len() as u64 - 100;
    st.read_at(&mut b, off).unwrap();
    assert!(b[..100] == data[data.len() - 100..] && b[100..].iter().all(|&x| x == 0));
    let mut b = vec![0xffu8; 512];
    st.read_at(&mut b, data.len() as u64 + 4096).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(st);
    let log = web.stop_and_log();
    // Every request: a GET of one range, answered 206, never larger than a piece.
    let mut conns = std::collections::HashSet::new();
    for l in &log {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!((f[0], f[4]), ("GET", "206"), "{l}");
        let range = f[3].trim_matches('"').strip_prefix("bytes=").unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let n = b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1;
        assert!(
            n <= PIECE as u64 && b.parse::<u64>().unwrap() < data.len() as u64,
            "{l}"
        );
        conns.insert(f[6].to_string());
    }
    // The open, 4 + 1 + 1 + 3 + 1 pieces: each a request; connections are reused.
    assert_eq!(log.len(), 11, "{log:#?}");
    assert!(
        conns.len() < log.len(),
        "keep-alive: {conns:?} for {log:#?}"
    );
}

#[test]
fn an_empty_file_has_size_zero() {
    let s = Scratch::new();
    let www = serve_file(&s, "empty.raw", &[]);
    let web = Web::nginx(s.dir.path(), &www);
    let st = HttpStorage::open(&web.url("empty.raw"), false).unwrap();
    assert_eq!(st.len().unwrap(), 0);
    let mut b = [1u8; 16];
    st.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0u8; 16]);
}

#[test]
fn a_server_ignoring_range_is_refused_without_reading_the_file() {
    let s = Scratch::new();
    let www = serve_file(&s, "big.raw", &noise(8 << 20, 2));
    let web = Web::python(&www);
    let e = HttpStorage::open(&web.url("big.raw"), false).unwrap_err();
    assert_eq!(e.cause, Cause::RangeIgnored, "{e}");
    assert_eq!(e.attempts, 1);
    assert!(e.to_string().contains(&web.url("big.raw")), "{e}");
}

#[test]
fn errors_name_the_url_the_request_and_the_cause() {
    let s = Scratch::new();
    let www = serve_file(&s, "f.raw", &noise(4096, 3));
    let web = Web::nginx(s.dir.path(), &www);
    let url = web.url("nosuch.raw");
    let e = HttpStorage::open(&url, false).unwrap_err();
    assert_eq!(e.cause, Cause::Status(404));
    assert_eq!(e.attempts, 1, "a 404 is not retried");
    assert_eq!(
        e.to_string(),
        format!(
            "{url}: GET bytes=0-0: the server answered 404 Not Found (no such file on the server)"
        )
    );
    let e = HttpStorage::open(&web.url("f.raw"), true).unwrap_err();
    assert_eq!(e.cause, Cause::ReadOnly);
    // Nothing listens any more: retried with back-off, then refused.
    let url = web.url("f.raw");
    drop(web);
    let e = HttpStorage::open(&url, false).unwrap_err();
    assert_eq!(
        (e.cause.clone(), e.attempts),
        (Cause::Refused, ATTEMPTS),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!("{url}: GET bytes=0-0: connection refused (is the server running?) (after {ATTEMPTS} attempts)")
    );
}

#[test]
fn a_file_replaced_on_the_server_is_an_error_never_mixed_data() {
    let s = Scratch::new();
    let v1 = noise(2 * PIECE, 4);
    let www = serve_file(&s, "f.raw", &v1);
    let web = Web::nginx(s.dir.path(), &www);
    let url = web.url("f.raw");
    let st = HttpStorage::open(&url, false).unwrap();
    let mut b = vec![0u8; 4096];
    st.read_at(&mut b, 0).unwrap();
    assert!(b[..] == v1[..4096]);
    // Same size, new contents and date: a new ETag.
    replace(&www, "f.raw", &noise(2 * PIECE, 5), "2021-01-01 00:00:00");
    let e = st.read_at(&mut b, 8192).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&url) && msg.contains("changed on the server") && msg.contains("ETag"),
        "{msg}"
    );
    // Another size.
    replace(&www, "f.raw", &noise(PIECE, 6), "2022-01-01 00:00:00");
    let e = st.read_at(&mut b, 0).unwrap_err();
    assert!(e.to_string().contains("changed on the server"), "{e}");
    // The original back (its date and size, so its ETag): reads go on as before.
    replace(&www, "f.raw", &v1, "2020-01-01 00:00:00");
    st.read_at(&mut b, PIECE as u64).unwrap();
    assert!(b[..] == v1[PIECE..PIECE + 4096]);
    // Writes never reach the server.
    assert_eq!(
        st.write_at(b"x", 0).unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
}

/// `image` opened without its backing file: qemu's tools here have no curl driver
/// (qemu-block-extra), so they check and write an overlay on an http base this way.
fn alone(image: &str) -> String {
    format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{image}"}},"backing":null}}"#
    )
}

/// qemu-io writes into an overlay on an http base (whole clusters: nothing read below).
fn qemu_write(s: &Scratch, image: &str, cmd: &str) {
    s.qemu("qemu-io", &["-c", cmd, &alone(image)]);
}

/// `cowimg create -q -f qcow2 -b BACKING -F FMT NAME`.
fn overlay(s: &Scratch, backing: &str, fmt: &str, name: &str) {
    s.cowimg_ok(&[
        "create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, name,
    ]);
}

/// A 16 MiB raw disk with data, a written run of zeros and holes, and the same as qcow2,
/// served by nginx from `www`.
fn disk_files(s: &Scratch) -> std::path::PathBuf {
    let www = s.path("www");
    std::fs::create_dir_all(&www).unwrap();
    s.qemu_img(&["create", "-q", "-f", "raw", "www/base.raw", "16M"]);
    s.write_file("rnd.bin", &noise(1 << 20, 7));
    s.qemu(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -s rnd.bin 0 1M",
            "-c",
            "write -P 0xcd 5M 512k",
            "-c",
            "write -P 0 9M 64k",
            "www/base.raw",
        ],
    );
    s.qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "www/base.raw",
        "www/base.qcow2",
    ]);
    for f in ["base.raw", "base.qcow2"] {
        touch(&www.join(f), "2020-01-01 00:00:00");
    }
    www
}

#[test]
fn commands_read_raw_and_qcow2_http_layers_as_the_local_files() {
    let s = Scratch::new();
    let www = disk_files(&s);
    let web = Web::nginx(s.dir.path(), &www);
    let (raw, qcow2) = (web.url("base.raw"), web.url("base.qcow2"));
    // The format is probed over HTTP as for a file.
    let info = s.cowimg_ok(&["info", &qcow2]);
    assert!(
        info.starts_with(&format!("image: {qcow2}\nfile format: qcow2\n"))
            && info.contains("protocol type: http")
            && info.contains("disk size: unavailable"),
        "{info}"
    );
    for (url, fmt) in [(&raw, "raw"), (&qcow2, "qcow2")] {
        s.cowimg_ok(&["convert", "-f", fmt, "-O", "raw", url, "out.raw"]);
        assert!(
            s.read_file("out.raw") == s.read_file("www/base.raw"),
            "{url}"
        );
        assert_eq!(
            s.cowimg(&["compare", url, "www/base.raw"]).stdout,
            "Images are identical.\n"
        );
        assert_eq!(
            s.cowimg_ok(&["checksum", url]).split_whitespace().next(),
            s.cowimg_ok(&["checksum", "www/base.raw"])
                .split_whitespace()
                .next(),
        );
    }
    // A remote qcow2 is mapped and measured from its own metadata, as qemu-img does locally.
    for cmd in [&["map", "--output=json"][..], &["measure", "-O", "qcow2"]] {
        let mut ours = cmd.to_vec();
        ours.push(&qcow2);
        let mut theirs = cmd.to_vec();
        theirs.push("www/base.qcow2");
        assert_eq!(s.cowimg_ok(&ours), s.qemu_img(&theirs), "{cmd:?}");
    }
    // HTTP has no block status: a raw file is all data, as qemu maps a raw NBD export
    // without it (nbdkit's noextents filter) — the oracle for a remote without holes.
    let srv = common::peers::Server::nbdkit(
        s.dir.path(),
        &["--filter=noextents"],
        &["file", www.join("base.raw").to_str().unwrap()],
    );
    assert_eq!(
        s.cowimg_ok(&["map", "--output=json", "-f", "raw", &raw]),
        s.qemu_img(&["map", "--output=json", "-f", "raw", &srv.url])
    );
    // Overlays created by cowimg on either base, -F as recorded.
    for (url, fmt) in [(&raw, "raw"), (&qcow2, "qcow2")] {
        overlay(&s, url, fmt, "ov.qcow2");
        qemu_write(&s, "ov.qcow2", "write -P 0x11 2M 64k");
        let chain = s.cowimg_ok(&["info", "--backing-chain", "ov.qcow2"]);
        assert!(
            chain.contains(&format!(
                "backing file: {url}\nbacking file format: {fmt}\n"
            )) && chain.contains(&format!("image: {url}\nfile format: {fmt}\n"))
                && chain.contains("protocol type: http"),
            "{chain}"
        );
        s.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "www/base.raw",
            "local.qcow2",
        ]);
        s.qemu_io("local.qcow2", &["write -P 0x11 2M 64k"]);
        s.cowimg_ok(&["convert", "-O", "raw", "ov.qcow2", "ov.raw"]);
        s.qemu_img(&["convert", "-O", "raw", "local.qcow2", "local.raw"]);
        assert!(s.read_file("ov.raw") == s.read_file("local.raw"), "{url}");
        std::fs::remove_file(s.path("ov.qcow2")).unwrap();
    }
}

#[test]
fn stream_of_an_overlay_on_an_http_base_leaves_it_standalone() {
    let s = Scratch::new();
    let www = disk_files(&s);
    let web = Web::nginx(s.dir.path(), &www);
    let url = web.url("base.raw");
    overlay(&s, &url, "raw", "ov.qcow2");
    qemu_write(&s, "ov.qcow2", "write -P 0x22 3M 1M");
    s.cowimg_ok(&["convert", "-O", "raw", "ov.qcow2", "before.raw"]);
    let r = s.cowimg_ok(&["stream", "ov.qcow2"]);
    assert!(r.contains("standalone"), "{r}");
    let log = web.stop_and_log();
    s.assert_clean("ov.qcow2");
    assert!(s.qemu_info("ov.qcow2").get("backing-filename").is_none());
    // Without the server: qemu-img reads the overlay alone, as before the stream.
    s.qemu_img(&["convert", "-O", "raw", "ov.qcow2", "after.raw"]);
    assert!(s.read_file("before.raw") == s.read_file("after.raw"));
    // Only ranged GETs reached the server, each answered 206.
    assert!(!log.is_empty());
    for l in &log {
        assert!(
            l.starts_with("GET /base.raw ") && l.contains("\" 206 "),
            "{l}"
        );
    }
}

#[test]
fn a_base_replaced_mid_stream_stops_the_job_and_a_rerun_finishes() {
    let s = Scratch::new();
    let www = disk_files(&s);
    // Data everywhere, so that the stream has 16 MiB to copy at the capped speed.
    let v1 = noise(16 << 20, 8);
    std::fs::write(www.join("base.raw"), &v1).unwrap();
    touch(&www.join("base.raw"), "2020-01-01 00:00:00");
    let web = Web::nginx(s.dir.path(), &www);
    let url = web.url("base.raw");
    overlay(&s, &url, "raw", "ov.qcow2");
    s.cowimg_ok(&["convert", "-O", "raw", "ov.qcow2", "before.raw"]);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(["stream", "--speed", "4M", "ov.qcow2"])
        .current_dir(s.dir.path())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    // A new version of the file, as a deployment would put it in place: renamed over the old
    // one (kept under another name by a hard link), so the URL never answers 404 meanwhile.
    std::fs::hard_link(www.join("base.raw"), www.join("base.orig")).unwrap();
    replace(&www, "base.raw", &noise(16 << 20, 9), "2021-01-01 00:00:00");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&url) && stderr.contains("changed on the server"),
        "{stderr}"
    );
    // What was committed is the old version's; the image is consistent.
    s.assert_clean(&alone("ov.qcow2"));
    std::fs::rename(www.join("base.orig"), www.join("base.raw")).unwrap();
    s.cowimg_ok(&["convert", "-O", "raw", "ov.qcow2", "mid.raw"]);
    assert!(s.read_file("mid.raw") == s.read_file("before.raw"));
    // With the original back, the rerun finishes.
    s.cowimg_ok(&["stream", "ov.qcow2"]);
    s.assert_clean("ov.qcow2");
    drop(web);
    s.qemu_img(&["convert", "-O", "raw", "ov.qcow2", "after.raw"]);
    assert!(s.read_file("after.raw") == v1);
}

#[test]
fn refused_servers_and_missing_files_are_clear_errors() {
    let s = Scratch::new();
    let www = disk_files(&s);
    let py = Web::python(&www);
    let r = s.cowimg(&["info", &py.url("base.raw")]);
    assert_eq!(r.status, 1);
    assert_eq!(
        r.stderr,
        format!("cowimg: Could not open '{}': GET bytes=0-0: the server ignores Range requests (it answered 200 with the whole file); cowimg reads only servers that answer byte ranges (206)\n", py.url("base.raw"))
    );
    let web = Web::nginx(s.dir.path(), &www);
    let missing = web.url("nosuch.qcow2");
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-u", "-b", &missing, "-F", "raw", "ov.qcow2", "16M",
    ]);
    let r = s.cowimg(&["map", "ov.qcow2"]);
    assert_eq!(r.status, 1);
    assert_eq!(
        r.stderr,
        format!("cowimg: Could not open 'ov.qcow2': Could not open backing file: Could not open '{missing}': GET bytes=0-0: the server answered 404 Not Found (no such file on the server)\n")
    );
    // An http layer is never written: commit into it is refused before anything is done.
    overlay(&s, &web.url("base.raw"), "raw", "ov2.qcow2");
    let r = s.cowimg(&["commit", "ov2.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(r.stderr.contains("read-only"), "{}", r.stderr);
    let url = web.url("base.raw");
    drop(web);
    let r = s.cowimg(&["info", &url]);
    assert_eq!(
        r.stderr,
        format!("cowimg: Could not open '{url}': GET bytes=0-0: connection refused (is the server running?) (after {ATTEMPTS} attempts)\n")
    );
}

/// cowimg with `SSL_CERT_FILE` set (or removed when `None`).
fn cowimg_with_ca(s: &Scratch, ca: Option<&Path>, args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cowimg"));
    cmd.args(args).current_dir(s.dir.path());
    match ca {
        Some(p) => cmd.env("SSL_CERT_FILE", p),
        None => cmd.env_remove("SSL_CERT_FILE"),
    };
    let out = cmd.output().expect("run cowimg");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn https_with_a_test_ca_given_by_ssl_cert_file_or_ca_file() {
    let s = Scratch::new();
    let www = disk_files(&s);
    let pki = s.path("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let (ca, cert, key) = common::peers::make_test_ca(&pki);
    let web = Web::nginx_tls(
        s.dir.path(),
        &www,
        common::peers::Tls {
            cert: &cert,
            key: &key,
        },
    );
    let url = web.url("base.qcow2");
    assert!(url.starts_with("https://127.0.0.1:"));
    // Trusting the test CA: the remote qcow2 reads as the local file.
    let (st, err) = cowimg_with_ca(&s, Some(&ca), &["convert", "-O", "raw", &url, "out.raw"]);
    assert_eq!(st, 0, "{err}");
    assert!(s.read_file("out.raw") == s.read_file("www/base.raw"));
    let (st, _) = cowimg_with_ca(&s, Some(&ca), &["compare", &url, "www/base.raw"]);
    assert_eq!(st, 0);
    // The system's roots do not know the test CA: refused, saying why and what to do.
    let (st, err) = cowimg_with_ca(&s, None, &["info", &url]);
    assert_eq!(st, 1, "{err}");
    assert!(
        err.contains(&url)
            && err.contains("TLS failure")
            && err.contains("certificate is not trusted")
            && err.contains("SSL_CERT_FILE"),
        "{err}"
    );
    // A CA file that is not one is an error, not a silent fallback to other roots.
    s.write_file("bad.pem", b"not a certificate\n");
    let (st, err) = cowimg_with_ca(&s, Some(&s.path("bad.pem")), &["info", &url]);
    assert_eq!(st, 1);
    assert!(
        err.contains("bad.pem") && err.contains("no PEM certificate"),
        "{err}"
    );
    // --ca-file, before or after the command, trusts the test CA with no variable set, and
    // wins over SSL_CERT_FILE.
    let ca = ca.to_str().unwrap();
    let (st, err) = cowimg_with_ca(
        &s,
        None,
        &["--ca-file", ca, "compare", &url, "www/base.raw"],
    );
    assert_eq!(st, 0, "{err}");
    let (st, err) = cowimg_with_ca(
        &s,
        Some(&s.path("bad.pem")),
        &["info", "--ca-file", ca, &url],
    );
    assert_eq!(st, 0, "{err}");
    let (st, err) = cowimg_with_ca(
        &s,
        Some(Path::new(ca)),
        &["info", "--ca-file", "bad.pem", &url],
    );
    assert_eq!(st, 1);
    assert!(
        err.contains("bad.pem") && err.contains("no PEM certificate"),
        "{err}"
    );
}

/// A Range server in python that fails on purpose: request N (counting from 1, the open
/// being 1) in `fail_503` is answered 503, in `cut` gets half its body and a closed
/// connection. Everything else is a correct 206 with a fixed ETag.
const FLAKY_SERVER: &str = r#"
import http.server, os, sys
port, path = int(sys.argv[1]), sys.argv[2]
fail_503 = {int(x) for x in sys.argv[3].split(",") if x}
cut = {int(x) for x in sys.argv[4].split(",") if x}
data = open(path, "rb").read()
count = 0
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        global count
        count += 1
        if count in fail_503:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        a, b = self.headers["Range"].split("=")[1].split("-")
        a, b = int(a), min(int(b), len(data) - 1)
        body = data[a:b + 1]
        self.send_response(206)
        self.send_header("Content-Range", "bytes %d-%d/%d" % (a, b, len(data)))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        if count in cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

/// Runs [`FLAKY_SERVER`] on a free port; returns the child and the URL.
fn flaky_server(
    s: &Scratch,
    file: &str,
    fail_503: &str,
    cut: &str,
) -> (std::process::Child, String) {
    s.write_file("flaky.py", FLAKY_SERVER.as_bytes());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("timeout")
        .args([
            "60",
            "/usr/bin/python3",
            "flaky.py",
            &port.to_string(),
            file,
            fail_503,
            cut,
        ])
        .current_dir(s.dir.path())
        .spawn()
        .expect("run python3");
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed().as_secs() < 20,
            "the python server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (child, format!("http://127.0.0.1:{port}/{file}"))
}

#[test]
fn a_503_and_a_connection_cut_mid_body_are_retried() {
    let s = Scratch::new();
    let data = noise(3 * PIECE, 10);
    s.write_file("f.raw", &data);
    // Request 1 opens; of the reads that follow (format probe, pieces), the first gets a 503
    // and the second is cut half way: both are tried again, and the copy is exact.
    let (mut child, url) = flaky_server(&s, "f.raw", "2", "3");
    s.cowimg_ok(&["convert", "-O", "raw", &url, "out.raw"]);
    assert!(s.read_file("out.raw") == data);
    // SAFETY: signalling the `timeout` we started, by its PID.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
    // A server that keeps failing: the error says how often it was tried.
    let (mut child, url) = flaky_server(&s, "f.raw", "2,3,4,5,6,7,8,9,10", "");
    let r = s.cowimg(&["convert", "-O", "raw", &url, "out2.raw"]);
    assert_eq!(r.status, 1);
    assert!(
        r.stderr.contains(&url)
            && r.stderr.contains("503 Service Unavailable")
            && r.stderr.contains(&format!("after {ATTEMPTS} attempts")),
        "{}",
        r.stderr
    );
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
}
