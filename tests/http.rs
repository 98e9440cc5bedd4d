//! http(s):// layers against real web servers started here on loopback: nginx (Range,
//! keep-alive, TLS with a CA made by the test) and python's `http.server` (which ignores
//! Range and must be refused). Data is checked against the served file itself.

mod common;

use std::path::Path;
use std::process::Command;

use common::peers::Web;
use common::Scratch;
use cowimg::remote::http::{Cause, HttpStorage, ATTEMPTS, PIECE};
use cowimg_formats::Storage;

/// Deterministic bytes that differ at every offset a test reads (`seed` tells versions apart).
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

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
    let data = pattern(3 * PIECE + 1234, 1);
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
    let www = serve_file(&s, "big.raw", &pattern(8 << 20, 2));
    let web = Web::python(&www);
    let e = HttpStorage::open(&web.url("big.raw"), false).unwrap_err();
    assert_eq!(e.cause, Cause::RangeIgnored, "{e}");
    assert_eq!(e.attempts, 1);
    assert!(e.to_string().contains(&web.url("big.raw")), "{e}");
}

#[test]
fn errors_name_the_url_the_request_and_the_cause() {
    let s = Scratch::new();
    let www = serve_file(&s, "f.raw", &pattern(4096, 3));
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
    let v1 = pattern(2 * PIECE, 4);
    let www = serve_file(&s, "f.raw", &v1);
    let web = Web::nginx(s.dir.path(), &www);
    let url = web.url("f.raw");
    let st = HttpStorage::open(&url, false).unwrap();
    let mut b = vec![0u8; 4096];
    st.read_at(&mut b, 0).unwrap();
    assert!(b[..] == v1[..4096]);
    // Same size, new contents and date: a new ETag.
    replace(&www, "f.raw", &pattern(2 * PIECE, 5), "2021-01-01 00:00:00");
    let e = st.read_at(&mut b, 8192).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&url) && msg.contains("changed on the server") && msg.contains("ETag"),
        "{msg}"
    );
    // Another size.
    replace(&www, "f.raw", &pattern(PIECE, 6), "2022-01-01 00:00:00");
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
