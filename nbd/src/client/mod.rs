//! An NBD client connection: the fixed newstyle handshake, then requests pipelined on one
//! socket.
//!
//! Any number of threads may issue requests at once. Each request gets a fresh cookie and a
//! slot in a table of requests in flight; one reader thread per connection reads the replies
//! (simple replies, or the chunks of structured replies, which may interleave), checks each
//! against the request it names, and hands the result to the waiting caller. The table is
//! bounded ([`MAX_IN_FLIGHT`] requests, [`MAX_IN_FLIGHT_BYTES`] of read or write buffers), and
//! every length the server sends is checked against the request before a byte is read into
//! memory, so a hostile or broken server costs at most an error.
//!
//! A connection that breaks (the server hangs up, breaks the protocol, or stops answering for
//! [`IO_TIMEOUT`]) fails every request in flight and every later one with the reason.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::codec::{
    self, chunk, cmd, cmd_flags, handshake, opt, rep, tflags, Chunk, Extent, GoRequest, Info,
    MetaContext, MetaContextRequest, OptionReplyHeader, OptionRequest, ProtocolError, ReplyHeader,
    Request,
};
use crate::url::{Address, Target};

mod across;
mod negotiation;
mod socket;
mod transmission;

pub use across::{read_across, write_across};
use negotiation::negotiate;
use socket::{io_err, Socket};
pub use transmission::Ticket;
use transmission::{lock, read_replies, Done, Pending, Shared, State};

/// The largest read or write payload sent: the specification's portable maximum (32 MiB),
/// lowered to the server's advertised maximum.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Requests in flight on one connection at most (qemu uses 16, nbdcopy 64).
pub const MAX_IN_FLIGHT: usize = 64;
/// Bytes of read and write buffers in flight on one connection at most.
pub const MAX_IN_FLIGHT_BYTES: u64 = 128 << 20;
/// How long the server may leave a started handshake, or requests in flight, without a byte
/// of progress before the connection is given up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the handshake may wait for the server: a server that accepts a connection and
/// stays silent (one shutting down) must not hold a reconnection for [`IO_TIMEOUT`].
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the reader thread wakes while waiting, to check for a stalled server.
const POLL: Duration = Duration::from_millis(500);
/// Disjoint pieces one read reply may come in (a hostile server could otherwise make the
/// coverage bookkeeping of one 32 MiB read grow to millions of entries).
const MAX_READ_FRAGMENTS: usize = 1 << 16;
/// Reads [`read_across`] keeps in flight per connection before waiting for the oldest.
const READ_DEPTH: usize = 16;
/// The largest zeroing or trimming request: the 32-bit length, aligned down to 64 KiB (the
/// largest minimum block size).
const MAX_ZERO_REQUEST: u64 = 0xffff_0000;

/// What went wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection could not be opened.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The server's address as given (`host:port` or a socket path).
        address: String,
        /// Why (refused, no such socket, ...).
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The server sent something the protocol does not allow.
    #[error("the server broke the NBD protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The server answered an option of the handshake with an error.
    #[error("the server refused {option}: {reason}{}", if .message.is_empty() { String::new() } else { format!(" ({})", .message) })]
    Refused {
        /// The option (`NBD_OPT_GO`, ...).
        option: &'static str,
        /// The error reply, in words ("export not found", ...).
        reason: &'static str,
        /// The server's own message, if it sent one.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("the server failed a {command} of {len} bytes at offset {offset}: {}{}", codec::errno::describe(*.code), if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Command {
        /// The command (`read`, `write`, ...).
        command: &'static str,
        /// Where the request started.
        offset: u64,
        /// Its length.
        len: u64,
        /// The NBD error code ([`codec::errno`]).
        code: u32,
        /// The server's message from a structured error chunk, if any.
        message: String,
    },
    /// The connection failed earlier (or timed out) and takes no more requests.
    #[error("the connection to the server is broken: {0}")]
    Broken(String),
    /// A request the export cannot take (out of range, read-only, not offered).
    #[error("{0}")]
    Invalid(String),
}

/// The client's results.
pub type Result<T> = std::result::Result<T, Error>;

/// What the handshake established about the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes (pinned: it cannot change during the connection).
    pub size: u64,
    /// Transmission flags ([`tflags`]).
    pub flags: u16,
    /// Requests must be aligned to this (1 when the server does not say).
    pub min_block: u32,
    /// The server's preferred request size.
    pub preferred_block: u32,
    /// The largest read or write payload this client sends.
    pub max_request: u32,
    /// Structured replies were agreed.
    pub structured: bool,
    /// The id of the `base:allocation` context, when the server offers it.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    /// The export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & tflags::READ_ONLY != 0
    }

    /// The transmission flag `flag` ([`tflags`]) is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A connection to one export.
pub struct Client {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.shared.info)
            .finish()
    }
}

impl Client {
    /// Connects and negotiates: structured replies and `base:allocation` when offered, then
    /// `NBD_OPT_GO` with block sizes (`NBD_OPT_EXPORT_NAME` on old servers).
    pub fn connect(target: &Target) -> Result<Client> {
        let mut sock = Socket::connect(&target.address)?;
        let setup = |e| Error::Io {
            context: "setting up the socket".into(),
            source: e,
        };
        sock.set_timeouts(HANDSHAKE_TIMEOUT).map_err(setup)?;
        let info = negotiate(&mut sock, &target.export)?;
        sock.set_timeouts(IO_TIMEOUT).map_err(setup)?;
        let mut reader_sock = sock.try_clone().map_err(setup)?;
        reader_sock.set_timeouts(POLL).map_err(setup)?;
        let shared = Arc::new(Shared {
            info,
            writer: Mutex::new(sock),
            state: Mutex::new(State {
                next_cookie: 1,
                pending: HashMap::new(),
                in_flight_bytes: 0,
                broken: None,
            }),
            room: Condvar::new(),
            closing: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || {
                let reason = match read_replies(&s, &mut reader_sock) {
                    Ok(()) => "the connection was closed".to_string(),
                    Err(Error::Broken(reason)) => reason,
                    Err(e) => e.to_string(),
                };
                s.fail(reason, &reader_sock);
            })
            .map_err(|e| Error::Io {
                context: "starting the reply reader thread".into(),
                source: e,
            })?;
        Ok(Client {
            shared,
            reader: Some(reader),
        })
    }

    /// What the handshake established.
    pub fn info(&self) -> &ExportInfo {
        &self.shared.info
    }

    /// Whether the connection broke (closed, reset, silent too long, or a protocol error):
    /// every request on it fails from then on.
    pub fn is_broken(&self) -> bool {
        lock(&self.shared.state).broken.is_some()
    }

    /// Sends a request (waiting for room in the table of requests in flight).
    fn submit(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Ticket> {
        let cost = if kind == cmd::READ {
            u64::from(len)
        } else {
            payload.len() as u64
        };
        let data = if kind == cmd::READ {
            vec![0u8; len as usize]
        } else {
            Vec::new()
        };
        let (tx, rx) = mpsc::channel();
        let cookie = {
            let mut st = lock(&self.shared.state);
            loop {
                if let Some(r) = &st.broken {
                    return Err(Error::Broken(r.clone()));
                }
                let fits =
                    st.in_flight_bytes + cost <= MAX_IN_FLIGHT_BYTES || st.pending.is_empty();
                if st.pending.len() < MAX_IN_FLIGHT && fits {
                    break;
                }
                st = self.shared.room.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            let cookie = st.next_cookie;
            st.next_cookie += 1;
            st.in_flight_bytes += cost;
            st.pending.insert(
                cookie,
                Pending {
                    kind,
                    offset,
                    len,
                    cost,
                    data,
                    covered: BTreeMap::new(),
                    extents: None,
                    error: None,
                    reply: tx,
                },
            );
            cookie
        };
        let header = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        }
        .encode();
        let mut w = lock(&self.shared.writer);
        let sent = w.write_all(&header).and_then(|()| w.write_all(payload));
        if let Err(e) = sent {
            // The request's waiter (and everyone else's) gets the reason.
            let reason = io_err("sending a request")(e).to_string();
            self.shared.fail(reason, &w);
        }
        Ok(Ticket { rx })
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        let size = self.info().size;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::Invalid(format!(
                "a {what} of {len} bytes at offset {offset} is past the end of the export ({size} bytes)"
            )));
        }
        Ok(())
    }

    fn check_aligned(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        let m = u64::from(self.info().min_block);
        // The export's end need not be aligned; a request may end there.
        if offset % m != 0 || (len % m != 0 && offset + len != self.info().size) {
            return Err(Error::Invalid(format!(
                "a {what} of {len} bytes at offset {offset} is not aligned to the server's minimum block size ({m})"
            )));
        }
        Ok(())
    }

    /// Starts a read of `[offset, offset + len)`, which must be aligned to the minimum block
    /// size and at most [`ExportInfo::max_request`] long.
    pub fn start_read(&self, offset: u64, len: u32) -> Result<Ticket> {
        self.check_range("read", offset, u64::from(len))?;
        self.check_aligned("read", offset, u64::from(len))?;
        if len > self.info().max_request {
            return Err(Error::Invalid(format!(
                "a read of {len} bytes is larger than the server's maximum request"
            )));
        }
        self.submit(cmd::READ, 0, offset, len, &[])
    }

    /// Reads `buf.len()` bytes at `offset` (any alignment), in pipelined requests.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_across(&[self], 0, offset, buf, self.info().max_request)
    }

    fn writable(&self, what: &str) -> Result<()> {
        if self.info().read_only() {
            return Err(Error::Invalid(format!(
                "the export is read-only: cannot {what}"
            )));
        }
        Ok(())
    }

    /// Starts a write of `data` at `offset`, which must be aligned to the minimum block size
    /// and at most [`ExportInfo::max_request`] long; with `fua`, it is durable before it is
    /// answered (when the server offers FUA). The payload is sent before this returns.
    pub fn start_write(&self, offset: u64, data: &[u8], fua: bool) -> Result<Ticket> {
        self.writable("write")?;
        self.check_range("write", offset, data.len() as u64)?;
        self.check_aligned("write", offset, data.len() as u64)?;
        if data.len() > self.info().max_request as usize {
            return Err(Error::Invalid(format!(
                "a write of {} bytes is larger than the server's maximum request",
                data.len()
            )));
        }
        let flags = if fua && self.info().has(tflags::SEND_FUA) {
            cmd_flags::FUA
        } else {
            0
        };
        self.submit(cmd::WRITE, flags, offset, data.len() as u32, data)
    }

    /// Writes `data` at `offset` (aligned to the minimum block size), in pipelined requests;
    /// with `fua`, each is durable before it is answered (when the server offers FUA).
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        write_across(&[self], 0, offset, data, self.info().max_request, fua)
    }

    /// Requests over `[offset, offset + len)` without payload, cut at 32-bit lengths.
    fn ranged(&self, kind: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        let what = cmd::name(kind);
        self.check_range(what, offset, len)?;
        self.check_aligned(what, offset, len)?;
        let mut queue = VecDeque::new();
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(MAX_ZERO_REQUEST);
            if queue.len() >= READ_DEPTH {
                wait_front(&mut queue)?;
            }
            queue.push_back(self.submit(kind, flags, pos, n as u32, &[])?);
            pos += n;
        }
        while !queue.is_empty() {
            wait_front(&mut queue)?;
        }
        Ok(())
    }

    /// Makes the range read as zeros. With `fast` (and the server offering FAST_ZERO), the
    /// server fails with ENOTSUP instead of zeroing slowly; `punch` lets it deallocate.
    pub fn write_zeroes(&self, offset: u64, len: u64, fast: bool, punch: bool) -> Result<()> {
        self.writable("write zeroes")?;
        if !self.info().has(tflags::SEND_WRITE_ZEROES) {
            return Err(Error::Invalid(
                "the export does not offer WRITE_ZEROES".into(),
            ));
        }
        let mut flags = if punch { 0 } else { cmd_flags::NO_HOLE };
        if fast && self.info().has(tflags::SEND_FAST_ZERO) {
            flags |= cmd_flags::FAST_ZERO;
        }
        self.ranged(cmd::WRITE_ZEROES, flags, offset, len)
    }

    /// Tells the server the range is no longer needed (its contents become undefined).
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.writable("trim")?;
        if !self.info().has(tflags::SEND_TRIM) {
            return Err(Error::Invalid("the export does not offer TRIM".into()));
        }
        self.ranged(cmd::TRIM, 0, offset, len)
    }

    /// Makes every write answered so far durable. A server that does not offer FLUSH has
    /// nothing to flush (its answers are durable), so this is then a no-op.
    pub fn flush(&self) -> Result<()> {
        if !self.info().has(tflags::SEND_FLUSH) {
            return Ok(());
        }
        self.submit(cmd::FLUSH, 0, 0, 0, &[])?.wait().map(|_| ())
    }

    /// The `base:allocation` extents from `offset`, covering at most `len` bytes (the server
    /// may answer less; the caller asks again from where it stopped). `None` when the server
    /// offers no block status.
    pub fn block_status(&self, offset: u64, len: u32) -> Result<Option<Vec<Extent>>> {
        if self.info().base_allocation.is_none() {
            return Ok(None);
        }
        self.check_range("block status", offset, u64::from(len))?;
        match self
            .submit(cmd::BLOCK_STATUS, 0, offset, len, &[])?
            .wait()?
        {
            Done::Extents(e) => Ok(Some(e)),
            _ => Err(ProtocolError("a block status reply without extents".into()).into()),
        }
    }
}

fn wait_front(queue: &mut VecDeque<Ticket>) -> Result<()> {
    if let Some(t) = queue.pop_front() {
        t.wait()?;
    }
    Ok(())
}

impl Drop for Client {
    /// Soft disconnect: NBD_CMD_DISC, then the socket is shut and the reader joined.
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        {
            let mut w = lock(&self.shared.writer);
            let disc = Request {
                flags: 0,
                kind: cmd::DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            };
            // A broken connection cannot be told; nothing else to do.
            let _ = w.write_all(&disc.encode());
            w.shutdown();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
