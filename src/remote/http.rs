//! Remote layers over HTTP(S): a file on a web server as the read-only [`Storage`] under a
//! format, so that a chain's layer (raw bytes, or a qcow2/QED image) may be an
//! `http://` or `https://` URL, as qemu's curl driver allows.
//!
//! * **Pinned on open.** One `GET` of byte 0 (`Range: bytes=0-0`) learns the size (the total
//!   of `Content-Range`), the validator (`ETag`, else `Last-Modified`) and that the server
//!   answers byte ranges at all. Every later answer must carry the same size and validator,
//!   and each request sends `If-Range` with it, so a file replaced on the server is an error
//!   naming the URL, never data of two versions mixed in one image.
//! * **Ranges only.** A server that answers a `Range` request with `200` and the whole body
//!   (python's `http.server`) is refused, its body left unread. Each `206` must be exactly the
//!   range asked for, and a body cut short is an error.
//! * **Many requests in flight.** Reads are cut into [`PIECE`]-sized `Range` requests, up to
//!   [`IN_FLIGHT`] at once per read, over the agent's pool of keep-alive connections; the copy
//!   workers of `convert` and `stream` read from several threads at once on top of that.
//! * **Faults.** Dropped connections, timeouts and `5xx` answers are retried [`ATTEMPTS`] times
//!   in all, with a doubling back-off; `4xx`, TLS failures, a changed file and a server ignoring
//!   ranges are not (retrying cannot help). Errors name the URL, the request and the cause.
//! * **TLS** (rustls): the system's roots (`SSL_CERT_FILE` when set, else the distribution's
//!   bundle, else Mozilla's roots built in); there is no way to turn verification off.
//! * **Read-only.** HTTP has no writes that qemu or cowimg use; opening to write is refused.

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cowimg_formats::Storage;
use ureq::http::{header, HeaderMap, StatusCode};
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

/// The size of one `Range` request: a round trip's worth of data at LAN and WAN speeds, and
/// small enough that one copy chunk (2 MiB) is several requests in flight.
pub const PIECE: usize = 512 << 10;
/// Requests one read keeps in flight at most (qemu's curl driver runs 8 per image; two copy
/// workers with four each match it).
pub const IN_FLIGHT: usize = 4;
/// Attempts per request before a transient fault (dropped connection, timeout, `5xx`) is an
/// error.
pub const ATTEMPTS: u32 = 4;
/// The first back-off after a transient fault; it doubles with each further attempt.
const BACKOFF: Duration = Duration::from_millis(250);
/// Keep-alive connections kept per host (copy workers times [`IN_FLIGHT`]).
const POOL: usize = 16;

/// Whether `name` is an `http://` or `https://` URL (the scheme is case-insensitive, as in
/// URLs generally).
pub fn is_http_url(name: &str) -> bool {
    let lower = |n: usize| name.get(..n).map(|s| s.to_ascii_lowercase());
    lower(7).as_deref() == Some("http://") || lower(8).as_deref() == Some("https://")
}

/// A failed HTTP operation: which URL, which request, and why.
#[derive(Debug, Clone)]
pub struct HttpError {
    /// The URL as given.
    pub url: String,
    /// The request, e.g. `GET bytes=0-524287`.
    pub op: String,
    /// What went wrong.
    pub cause: Cause,
    /// Attempts made (more than one when the cause was transient).
    pub attempts: u32,
}

/// Why an HTTP operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// Nothing listens on the port.
    Refused,
    /// The host name does not resolve.
    HostNotFound,
    /// No answer in time (what was being waited for).
    Timeout(String),
    /// The connection broke or could not be made (the system's words).
    Connection(String),
    /// The TLS handshake failed; `untrusted` when the server's certificate has no trusted
    /// issuer.
    Tls {
        /// rustls' words.
        message: String,
        /// The certificate has no trusted issuer.
        untrusted: bool,
    },
    /// The server answered with an error status.
    Status(u16),
    /// The server answered a `Range` request with the whole file.
    RangeIgnored,
    /// The file on the server is not the one opened (size or validator differ).
    Changed(String),
    /// An answer that breaks HTTP's rules for ranges (wrong `Content-Range`, short body...).
    Protocol(String),
    /// The URL itself is unusable.
    BadUrl(String),
    /// The CA file (`--ca-file`, `SSL_CERT_FILE`) cannot be used.
    CaFile(String),
    /// A write was asked of a read-only HTTP layer.
    ReadOnly,
}

impl Cause {
    /// Faults that another attempt may cure.
    fn transient(&self) -> bool {
        match self {
            Cause::Refused | Cause::Timeout(_) | Cause::Connection(_) => true,
            Cause::Status(s) => *s >= 500 || *s == 408 || *s == 429,
            _ => false,
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Refused => write!(f, "connection refused (is the server running?)"),
            Cause::HostNotFound => write!(f, "host not found"),
            Cause::Timeout(what) => write!(f, "timed out ({what})"),
            Cause::Connection(e) => write!(f, "connection failed: {e}"),
            Cause::Tls { message, untrusted } => {
                write!(f, "TLS failure: {message}")?;
                if *untrusted {
                    write!(f, " (the server's certificate is not trusted: name the CA that signed it with --ca-file PATH or SSL_CERT_FILE=PATH)")?;
                }
                Ok(())
            }
            Cause::Status(s) => {
                let reason = StatusCode::from_u16(*s)
                    .ok()
                    .and_then(|c| c.canonical_reason())
                    .unwrap_or("");
                write!(f, "the server answered {s} {reason}")?;
                match s {
                    404 => write!(f, " (no such file on the server)"),
                    416 => write!(f, " (the range lies outside the file)"),
                    _ => Ok(()),
                }
            }
            Cause::RangeIgnored => write!(
                f,
                "the server ignores Range requests (it answered 200 with the whole file); cowimg reads only servers that answer byte ranges (206)"
            ),
            Cause::Changed(what) => write!(
                f,
                "the file changed on the server since it was opened ({what}); nothing read after the change was used: run the command again"
            ),
            Cause::Protocol(what) => write!(f, "bad answer: {what}"),
            Cause::BadUrl(what) => write!(f, "invalid URL: {what}"),
            Cause::CaFile(what) => write!(f, "{what}"),
            Cause::ReadOnly => write!(
                f,
                "an http(s) layer is read-only: this command would write into it"
            ),
        }
    }
}

impl HttpError {
    /// The request and the cause, without the URL (for messages that name it already).
    pub fn brief(&self) -> String {
        let mut s = format!("{}: {}", self.op, self.cause);
        if self.attempts > 1 {
            s.push_str(&format!(" (after {} attempts)", self.attempts));
        }
        s
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.url, self.brief())
    }
}

impl std::error::Error for HttpError {}

impl From<HttpError> for io::Error {
    fn from(e: HttpError) -> io::Error {
        io::Error::other(e.to_string())
    }
}

/// What identifies the version of the file that was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pin {
    size: u64,
    etag: Option<String>,
    last_modified: Option<String>,
}

impl Pin {
    /// The `If-Range` value: a strong ETag, else the date (weak ETags may not be used).
    fn if_range(&self) -> Option<&str> {
        match &self.etag {
            Some(e) if !e.starts_with("W/") => Some(e),
            _ => self.last_modified.as_deref(),
        }
    }

    /// Differences between this pin and an answer's validators (those it carries).
    fn mismatch(&self, headers: &HeaderMap) -> Option<String> {
        let etag = text(headers, header::ETAG);
        let date = text(headers, header::LAST_MODIFIED);
        match (&self.etag, etag) {
            (Some(a), Some(b)) if *a != b => return Some(format!("ETag {a} is now {b}")),
            _ => {}
        }
        match (&self.last_modified, date) {
            (Some(a), Some(b)) if *a != b => Some(format!("Last-Modified {a} is now {b}")),
            _ => None,
        }
    }
}

fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

/// A parsed `Content-Range`: the first and last byte (none for `*`), and the total (none
/// for `*`).
type ContentRange = (Option<(u64, u64)>, Option<u64>);

/// `Content-Range: bytes START-END/TOTAL` (or `bytes */TOTAL` on a 416): (range, total).
fn content_range(headers: &HeaderMap) -> Option<ContentRange> {
    let v = text(headers, header::CONTENT_RANGE)?;
    let rest = v.strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let range = match range.trim() {
        "*" => None,
        r => {
            let (a, b) = r.split_once('-')?;
            let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            if a > b {
                return None;
            }
            Some((a, b))
        }
    };
    Some((range, total))
}

/// A file on an HTTP(S) server, read with `Range` requests.
#[derive(Debug)]
pub struct HttpStorage {
    url: String,
    path: PathBuf,
    https: bool,
    agent: ureq::Agent,
    pin: Pin,
    /// Body bytes received ([`Storage::transferred`]), retried requests included.
    transferred: std::sync::atomic::AtomicU64,
}

/// The CA file named for this process ([`set_ca_file`]).
static CA_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Trusts the certificates of the PEM file `path` (and no others) for every https layer
/// opened from now on in this process, over `SSL_CERT_FILE` and the system's bundle: the
/// CLI's `--ca-file`. The first call wins; a file that cannot be read, or holds no
/// certificate, fails each https open with that reason.
///
/// ```no_run
/// cowimg::remote::http::set_ca_file(std::path::Path::new("/etc/cowimg/test-ca.pem"));
/// ```
pub fn set_ca_file(path: &Path) {
    let _ = CA_FILE.set(path.to_path_buf());
}

/// Where the TLS roots come from: the CA file given by [`set_ca_file`], else `SSL_CERT_FILE`
/// (the convention OpenSSL, curl and rustls' native-certs share), which replaces the system's
/// bundle; without any, Mozilla's roots.
fn root_certs() -> Result<RootCerts, Cause> {
    const BUNDLES: [&str; 5] = [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/ca-bundle.pem",
        "/etc/pki/tls/cacert.pem",
        "/etc/ssl/cert.pem",
    ];
    let named = CA_FILE
        .get()
        .map(|p| p.clone().into_os_string())
        .or_else(|| std::env::var_os("SSL_CERT_FILE"));
    let (path, explicit) = match named {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => match BUNDLES.iter().map(Path::new).find(|p| p.is_file()) {
            Some(p) => (p.to_path_buf(), false),
            None => return Ok(RootCerts::WebPki),
        },
    };
    let bad = |what: String| Cause::CaFile(format!("the CA file {} {what}", path.display()));
    let pem = std::fs::read(&path).map_err(|e| bad(format!("cannot be read: {e}")))?;
    let mut certs: Vec<Certificate<'static>> = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            // A distribution's bundle with one odd entry still serves; a CA file named on
            // purpose must be right.
            Err(e) if explicit => return Err(bad(format!("is not valid PEM: {e}"))),
            Err(_) => {}
        }
    }
    if certs.is_empty() {
        if explicit {
            return Err(bad("holds no PEM certificate".into()));
        }
        return Ok(RootCerts::WebPki);
    }
    Ok(RootCerts::new_with_certs(&certs))
}

/// Sorts a client error into a [`Cause`].
fn classify(e: ureq::Error) -> Cause {
    match e {
        ureq::Error::Io(e) => io_cause(&e),
        ureq::Error::Timeout(t) => Cause::Timeout(t.to_string()),
        ureq::Error::HostNotFound => Cause::HostNotFound,
        ureq::Error::BadUri(u) => Cause::BadUrl(u),
        ureq::Error::Http(e) => Cause::BadUrl(e.to_string()),
        ureq::Error::Rustls(e) => tls_cause(e.to_string()),
        ureq::Error::Tls(m) => tls_cause(m.to_string()),
        ureq::Error::StatusCode(s) => Cause::Status(s),
        ureq::Error::TooManyRedirects => Cause::Protocol("too many redirects".into()),
        ureq::Error::Protocol(e) => Cause::Protocol(e.to_string()),
        other => Cause::Connection(other.to_string()),
    }
}

fn tls_cause(message: String) -> Cause {
    let untrusted = message.contains("UnknownIssuer") || message.contains("not trusted");
    Cause::Tls { message, untrusted }
}

fn io_cause(e: &io::Error) -> Cause {
    let msg = e.to_string();
    // rustls reports handshake failures as I/O errors carrying its own error.
    if msg.contains("peer certificate") || msg.contains("peer sent") || msg.contains("TLS") {
        return tls_cause(msg);
    }
    // ureq resolves names itself and reports a failed lookup as an I/O error.
    if msg.contains("lookup address") {
        return Cause::HostNotFound;
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Cause::Refused,
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Cause::Timeout(msg),
        _ => Cause::Connection(crate::chain::os_text(e)),
    }
}

/// The file's size from the `206` answer to `Range: bytes=0-0`, its one byte read so that
/// the connection goes back to the pool.
fn first_byte_total(resp: ureq::http::Response<ureq::Body>) -> Result<u64, Cause> {
    let total = match content_range(resp.headers()) {
        Some((Some((0, 0)), Some(total))) => total,
        Some((_, None)) => {
            return Err(Cause::Protocol(
                "the server does not say how long the file is (Content-Range total '*')".into(),
            ))
        }
        _ => {
            let got = text(resp.headers(), header::CONTENT_RANGE).unwrap_or_default();
            return Err(Cause::Protocol(format!(
                "Content-Range {got:?} does not answer bytes 0-0"
            )));
        }
    };
    let mut body = resp.into_body();
    let mut one = Vec::with_capacity(2);
    body.as_reader()
        .take(2)
        .read_to_end(&mut one)
        .map_err(|e| io_cause(&e))?;
    if one.len() != 1 {
        return Err(Cause::Protocol(format!(
            "{} body bytes for a 1-byte range",
            one.len()
        )));
    }
    Ok(total)
}

impl HttpStorage {
    /// Opens `url` and pins the file: its size and validator. With `writable` the open is
    /// refused: HTTP layers are read-only.
    pub fn open(url: &str, writable: bool) -> Result<HttpStorage, HttpError> {
        let fail = |op: &str, cause| HttpError {
            url: url.to_string(),
            op: op.to_string(),
            cause,
            attempts: 1,
        };
        if writable {
            return Err(fail("open", Cause::ReadOnly));
        }
        let tls = TlsConfig::builder()
            .root_certs(root_certs().map_err(|c| fail("TLS setup", c))?)
            .build();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Byte ranges must address the file's own bytes.
            .accept_encoding(ureq::config::AutoHeaderValue::None)
            .user_agent(concat!("cowimg/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls)
            .max_idle_connections(POOL)
            .max_idle_connections_per_host(POOL)
            .timeout_connect(Some(Duration::from_secs(10)))
            // A server silent this long with a request outstanding is given up (retried).
            .timeout_per_read(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        let mut storage = HttpStorage {
            url: url.to_string(),
            path: PathBuf::from(url),
            https: url
                .get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("https://")),
            agent,
            pin: Pin {
                size: 0,
                etag: None,
                last_modified: None,
            },
            transferred: Default::default(),
        };
        storage.pin = storage.retrying("GET bytes=0-0", || storage.probe())?;
        Ok(storage)
    }

    /// The pinned size in bytes.
    pub fn size(&self) -> u64 {
        self.pin.size
    }

    /// Runs `f` until it succeeds, fails for good, or [`ATTEMPTS`] are spent.
    fn retrying<T>(
        &self,
        op: &str,
        mut f: impl FnMut() -> Result<T, Cause>,
    ) -> Result<T, HttpError> {
        let mut wait = BACKOFF;
        let mut attempt = 1;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(cause) if cause.transient() && attempt < ATTEMPTS => {
                    std::thread::sleep(wait);
                    wait *= 2;
                    attempt += 1;
                }
                Err(cause) => {
                    return Err(HttpError {
                        url: self.url.clone(),
                        op: op.to_string(),
                        cause,
                        attempts: attempt,
                    })
                }
            }
        }
    }

    /// The open request: byte 0, which tells the size, the validators, and whether ranges
    /// are answered (a `HEAD` would not, and signed object-store URLs often refuse it).
    fn probe(&self) -> Result<Pin, Cause> {
        let resp = self
            .agent
            .get(&self.url)
            .header(header::RANGE, "bytes=0-0")
            .call()
            .map_err(classify)?;
        let headers = resp.headers().clone();
        let size = match resp.status().as_u16() {
            206 => first_byte_total(resp)?,
            // An empty file has no byte 0: "bytes */0".
            416 => match content_range(&headers) {
                Some((None, Some(0))) => 0,
                _ => return Err(Cause::Status(416)),
            },
            // An empty file again: servers (nginx) answer the whole of it, which is nothing,
            // so no byte can land at a wrong offset.
            200 if text(&headers, header::CONTENT_LENGTH).as_deref() == Some("0") => 0,
            // The body is dropped unread: the connection closes instead of carrying the file.
            200 => return Err(Cause::RangeIgnored),
            s => return Err(Cause::Status(s)),
        };
        Ok(Pin {
            size,
            etag: text(&headers, header::ETAG),
            last_modified: text(&headers, header::LAST_MODIFIED),
        })
    }

    /// Reads `buf.len()` bytes at `offset` (inside the file) with one `Range` request.
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<(), Cause> {
        let last = offset + buf.len() as u64 - 1;
        let mut req = self
            .agent
            .get(&self.url)
            .header(header::RANGE, format!("bytes={offset}-{last}"));
        if let Some(v) = self.pin.if_range() {
            req = req.header(header::IF_RANGE, v);
        }
        let resp = req.call().map_err(classify)?;
        let headers = resp.headers();
        if let Some(what) = self.pin.mismatch(headers) {
            return Err(Cause::Changed(what));
        }
        match resp.status().as_u16() {
            206 => {}
            // With If-Range sent, a 200 is the server saying the validator no longer matches
            // (the file changed); the pin check above names the change when it can.
            200 if self.pin.if_range().is_some() => {
                return Err(Cause::Changed(
                    "the server no longer answers ranges of the version opened".into(),
                ))
            }
            200 => return Err(Cause::RangeIgnored),
            416 => {
                return Err(match content_range(headers) {
                    Some((_, Some(t))) if t != self.pin.size => {
                        Cause::Changed(format!("its size was {} bytes, now {t}", self.pin.size))
                    }
                    _ => Cause::Status(416),
                })
            }
            s => return Err(Cause::Status(s)),
        }
        match content_range(headers) {
            Some((Some((a, b)), Some(t))) if a == offset && b == last && t == self.pin.size => {}
            Some((_, Some(t))) if t != self.pin.size => {
                return Err(Cause::Changed(format!(
                    "its size was {} bytes, now {t}",
                    self.pin.size
                )))
            }
            _ => {
                return Err(Cause::Protocol(format!(
                    "Content-Range {:?} does not answer bytes {offset}-{last}",
                    text(headers, header::CONTENT_RANGE).unwrap_or_default()
                )))
            }
        }
        let mut body = resp.into_body();
        let mut reader = body.as_reader();
        let mut got = 0;
        while got < buf.len() {
            match reader.read(&mut buf[got..]) {
                Ok(0) => {
                    // The connection ended early: a dropped connection, worth another try.
                    return Err(Cause::Connection(format!(
                        "the body ended after {got} of {} bytes",
                        buf.len()
                    )));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_cause(&e)),
            }
        }
        // Reaching the end returns the connection to the pool; more is a broken answer.
        let mut extra = [0u8; 1];
        match reader.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(Cause::Protocol(format!(
                "more than the {} bytes asked for",
                buf.len()
            ))),
            Err(e) => Err(io_cause(&e)),
        }
    }

    fn fetch_piece(&self, offset: u64, buf: &mut [u8]) -> Result<(), HttpError> {
        let op = format!("GET bytes={}-{}", offset, offset + buf.len() as u64 - 1);
        self.retrying(&op, || self.fetch(offset, buf))?;
        self.transferred
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl Storage for HttpStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Past the end of the file reads as zeros, as past the end of a local file.
        let inside = self.pin.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        if head.len() <= PIECE {
            return Ok(self.fetch_piece(offset, head)?);
        }
        // Pieces taken in order by up to IN_FLIGHT threads, each on its own connection.
        let pieces: Vec<(u64, &mut [u8])> = head
            .chunks_mut(PIECE)
            .enumerate()
            .map(|(i, c)| (offset + (i * PIECE) as u64, c))
            .collect();
        let threads = pieces.len().min(IN_FLIGHT);
        let queue = Mutex::new(pieces.into_iter());
        let failed = AtomicBool::new(false);
        let first_error: Mutex<Option<HttpError>> = Mutex::new(None);
        let work = || {
            while !failed.load(Ordering::SeqCst) {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                let Some((at, piece)) = next else { return };
                if let Err(e) = self.fetch_piece(at, piece) {
                    let mut first = first_error.lock().unwrap_or_else(|e| e.into_inner());
                    first.get_or_insert(e);
                    failed.store(true, Ordering::SeqCst);
                    return;
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(work);
            }
            work();
        });
        match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.pin.size)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.pin.size {
            return Ok(());
        }
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a web server does not say how much space a file uses",
        ))
    }

    fn transferred(&self) -> u64 {
        self.transferred.load(Ordering::Relaxed)
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn protocol(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ureq::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn urls_are_recognised_by_scheme() {
        assert!(is_http_url("http://h/x"));
        assert!(is_http_url("HTTPS://h/x"));
        assert!(!is_http_url("nbd://h/x"));
        assert!(!is_http_url("http:/x"));
        assert!(!is_http_url("htt"));
    }

    #[test]
    fn content_range_forms() {
        let cr = |v: &str| content_range(&headers(&[("content-range", v)]));
        assert_eq!(cr("bytes 0-0/16"), Some((Some((0, 0)), Some(16))));
        assert_eq!(cr("bytes 5-9/*"), Some((Some((5, 9)), None)));
        assert_eq!(cr("bytes */0"), Some((None, Some(0))));
        assert_eq!(cr("bytes 9-5/16"), None);
        assert_eq!(cr("items 0-1/2"), None);
        assert_eq!(cr("bytes 0-x/2"), None);
        assert_eq!(content_range(&HeaderMap::new()), None);
    }

    #[test]
    fn if_range_uses_strong_validators_only() {
        let pin = |etag: Option<&str>, date: Option<&str>| Pin {
            size: 1,
            etag: etag.map(String::from),
            last_modified: date.map(String::from),
        };
        assert_eq!(pin(Some("\"a\""), Some("d")).if_range(), Some("\"a\""));
        assert_eq!(pin(Some("W/\"a\""), Some("d")).if_range(), Some("d"));
        assert_eq!(pin(None, None).if_range(), None);
        let p = pin(Some("\"a\""), None);
        assert_eq!(p.mismatch(&headers(&[("etag", "\"a\"")])), None);
        assert!(p
            .mismatch(&headers(&[("etag", "\"b\"")]))
            .is_some_and(|m| m.contains("\"b\"")));
        // An answer without validators is judged by its Content-Range alone.
        assert_eq!(p.mismatch(&HeaderMap::new()), None);
    }

    #[test]
    fn only_faults_that_may_pass_are_retried() {
        assert!(Cause::Refused.transient());
        assert!(Cause::Status(503).transient());
        assert!(!Cause::Status(404).transient());
        assert!(!Cause::RangeIgnored.transient());
        assert!(!Cause::Changed(String::new()).transient());
        assert!(!tls_cause("invalid peer certificate: UnknownIssuer".into()).transient());
    }
}
