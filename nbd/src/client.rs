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

/// A socket of either kind.
#[derive(Debug)]
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn connect(address: &Address) -> Result<Socket> {
        let err = |source| Error::Connect {
            address: match address {
                Address::Tcp { host, port } => format!("{host} port {port}"),
                Address::Unix(p) => format!("the socket {}", p.display()),
            },
            source,
        };
        Ok(match address {
            Address::Tcp { host, port } => {
                let addrs = (host.as_str(), *port).to_socket_addrs().map_err(err)?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address found");
                let mut found = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, IO_TIMEOUT) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or_else(|| err(last))?;
                // Requests are small and latency matters: no Nagle delay.
                s.set_nodelay(true).map_err(err)?;
                Socket::Tcp(s)
            }
            Address::Unix(path) => Socket::Unix(UnixStream::connect(path).map_err(err)?),
        })
    }

    fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(IO_TIMEOUT))
            }
            Socket::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(IO_TIMEOUT))
            }
        }
    }

    fn shutdown(&self) {
        // Errors mean the socket is already closed, which is what is wanted.
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn io_err(context: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| {
        let source = if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no answer in time ({} s in the handshake, {} s with requests in flight)",
                    HANDSHAKE_TIMEOUT.as_secs(),
                    IO_TIMEOUT.as_secs()
                ),
            )
        } else if source.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )
        } else {
            source
        };
        Error::Io {
            context: context.to_string(),
            source,
        }
    }
}

// ---- handshake ----

fn send_option(sock: &mut Socket, code: u32, data: Vec<u8>) -> Result<()> {
    sock.write_all(&OptionRequest { code, data }.encode())
        .map_err(io_err("sending an option during the handshake"))
}

/// Reads one option reply to `option`: its type and data.
fn option_reply(sock: &mut Socket, option: u32) -> Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    sock.read_exact(&mut h)
        .map_err(io_err("reading an option reply during the handshake"))?;
    let h = OptionReplyHeader::decode(&h)?;
    if h.option != option {
        return Err(ProtocolError(format!(
            "a reply to option {} where option {option} was asked",
            h.option
        ))
        .into());
    }
    let mut data = vec![0u8; h.len as usize];
    sock.read_exact(&mut data)
        .map_err(io_err("reading an option reply during the handshake"))?;
    Ok((h.reply, data))
}

fn refused(option: &'static str, reply: u32, data: &[u8]) -> Error {
    Error::Refused {
        option,
        reason: codec::option_error_name(reply),
        message: codec::option_error_text(data),
    }
}

fn unexpected(option: &str, reply: u32) -> Error {
    Error::Protocol(ProtocolError(format!(
        "an option reply of type {reply} to {option}"
    )))
}

fn negotiate(sock: &mut Socket, export: &str) -> Result<ExportInfo> {
    let mut g = [0u8; 18];
    sock.read_exact(&mut g)
        .map_err(io_err("reading the server greeting"))?;
    let gflags = codec::decode_greeting(&g)?;
    let no_zeroes = gflags & handshake::NO_ZEROES != 0;
    let cflags = u32::from(handshake::FIXED_NEWSTYLE | (gflags & handshake::NO_ZEROES));
    sock.write_all(&cflags.to_be_bytes())
        .map_err(io_err("sending the client flags"))?;

    // Structured replies: needed for holes in reads and for block status; servers without
    // them (nbd-server, nbdkit --no-sr) are still read with simple replies.
    send_option(sock, opt::STRUCTURED_REPLY, vec![])?;
    let structured = match option_reply(sock, opt::STRUCTURED_REPLY)? {
        (rep::ACK, _) => true,
        (r, _) if r & rep::ERR_BIT != 0 => false,
        (r, _) => return Err(unexpected("NBD_OPT_STRUCTURED_REPLY", r)),
    };

    let mut base_allocation = None;
    if structured {
        let req = MetaContextRequest {
            export: export.to_string(),
            queries: vec![codec::BASE_ALLOCATION.to_string()],
        };
        send_option(sock, opt::SET_META_CONTEXT, req.encode())?;
        loop {
            match option_reply(sock, opt::SET_META_CONTEXT)? {
                (rep::META_CONTEXT, d) => {
                    let m = MetaContext::decode(&d)?;
                    if m.name != codec::BASE_ALLOCATION {
                        return Err(ProtocolError(format!(
                            "the server selected the metadata context '{}', which was not asked for",
                            m.name
                        ))
                        .into());
                    }
                    base_allocation = Some(m.id);
                }
                (rep::ACK, _) => break,
                // No block status: everything counts as data.
                (r, _) if r & rep::ERR_BIT != 0 => {
                    base_allocation = None;
                    break;
                }
                (r, _) => return Err(unexpected("NBD_OPT_SET_META_CONTEXT", r)),
            }
        }
    }

    let go = GoRequest {
        export: export.to_string(),
        infos: vec![codec::info::BLOCK_SIZE],
    };
    send_option(sock, opt::GO, go.encode())?;
    let mut export_info = None;
    let mut block = None;
    loop {
        match option_reply(sock, opt::GO)? {
            (rep::INFO, d) => match Info::decode(&d)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                } => block = Some((minimum, preferred, maximum)),
                _ => {}
            },
            (rep::ACK, _) => break,
            (rep::ERR_UNSUP, _) => {
                // An old server: the export by name, no information.
                send_option(sock, opt::EXPORT_NAME, export.as_bytes().to_vec())?;
                let mut b = [0u8; 10];
                sock.read_exact(&mut b)
                    .map_err(io_err("reading the NBD_OPT_EXPORT_NAME reply"))?;
                export_info = Some(codec::decode_export_name_reply(&b)?);
                if !no_zeroes {
                    let mut pad = [0u8; 124];
                    sock.read_exact(&mut pad)
                        .map_err(io_err("reading the NBD_OPT_EXPORT_NAME reply"))?;
                }
                break;
            }
            (r, d) if r & rep::ERR_BIT != 0 => {
                return Err(refused("the export (NBD_OPT_GO)", r, &d))
            }
            (r, _) => return Err(unexpected("NBD_OPT_GO", r)),
        }
    }
    let (size, flags) = export_info.ok_or_else(|| {
        ProtocolError("NBD_OPT_GO succeeded without the export's size (NBD_INFO_EXPORT)".into())
    })?;
    if size > i64::MAX as u64 {
        return Err(ProtocolError(format!("an export size of {size} bytes (above 2^63)")).into());
    }
    let (min_block, preferred_block, maximum) = block.unwrap_or((1, 4096, MAX_REQUEST));
    // The largest payload, a multiple of the minimum block.
    let max_request = maximum.min(MAX_REQUEST) / min_block * min_block;
    Ok(ExportInfo {
        size,
        flags,
        min_block,
        preferred_block,
        max_request,
        structured,
        base_allocation,
    })
}

// ---- transmission ----

/// The successful outcome of one request.
enum Done {
    Empty,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
}

/// A request in flight.
struct Pending {
    kind: u16,
    offset: u64,
    len: u32,
    /// Bytes this request holds against [`MAX_IN_FLIGHT_BYTES`].
    cost: u64,
    /// The read's data, filled as chunks arrive.
    data: Vec<u8>,
    /// Parts of a structured read received so far (start → end, relative, merged).
    covered: BTreeMap<u64, u64>,
    extents: Option<Vec<Extent>>,
    error: Option<(u32, String)>,
    reply: mpsc::Sender<Result<Done>>,
}

impl Pending {
    /// Records the chunk `[at, at + n)` of a read (relative to the request), which must lie
    /// inside it and overlap nothing received before.
    fn cover(&mut self, offset: u64, n: u64) -> Result<std::ops::Range<usize>> {
        let bad = |m: String| Err(Error::Protocol(ProtocolError(m)));
        if self.kind != cmd::READ {
            return bad(format!(
                "read data in the reply to a {}",
                cmd::name(self.kind)
            ));
        }
        let inside = offset >= self.offset
            && offset
                .checked_add(n)
                .is_some_and(|e| e <= self.offset + u64::from(self.len));
        if !inside || n == 0 {
            return bad(format!(
                "a read chunk of {n} bytes at offset {offset} outside the {} bytes asked at {}",
                self.len, self.offset
            ));
        }
        let (a, mut b) = (offset - self.offset, offset - self.offset + n);
        let mut start = a;
        if let Some((&s, &e)) = self.covered.range(..=a).next_back() {
            if e > a {
                return bad(format!("overlapping read chunks at offset {offset}"));
            }
            if e == a {
                start = s;
                self.covered.remove(&s);
            }
        }
        if let Some((&s, &e)) = self.covered.range(a..).next() {
            if s < b {
                return bad(format!("overlapping read chunks at offset {offset}"));
            }
            if s == b {
                self.covered.remove(&s);
                b = e;
            }
        }
        self.covered.insert(start, b);
        if self.covered.len() > MAX_READ_FRAGMENTS {
            return bad(format!(
                "a read answered in more than {MAX_READ_FRAGMENTS} separate pieces"
            ));
        }
        Ok(a as usize..(a + n) as usize)
    }

    /// Fails this request (taken out of the table while its reply was read) with the error
    /// that breaks the connection, which is returned for the rest of the table.
    fn abandon(self, e: Error) -> Error {
        let _ = self.reply.send(Err(Error::Broken(e.to_string())));
        e
    }

    /// The outcome once the last chunk (or the simple reply) is in.
    fn finish(mut self, structured: bool) {
        let outcome = if let Some((code, message)) = self.error.take() {
            Err(Error::Command {
                command: cmd::name(self.kind),
                offset: self.offset,
                len: u64::from(self.len),
                code,
                message,
            })
        } else {
            match self.kind {
                cmd::READ => {
                    let whole = self.covered.get(&0) == Some(&u64::from(self.len))
                        || self.len == 0
                        || !structured;
                    if whole {
                        Ok(Done::Data(std::mem::take(&mut self.data)))
                    } else {
                        Err(ProtocolError(format!(
                            "the reply to a read of {} bytes at {} did not cover all of it",
                            self.len, self.offset
                        ))
                        .into())
                    }
                }
                cmd::BLOCK_STATUS => match self.extents.take() {
                    Some(e) => check_extents(e, self.len).map(Done::Extents),
                    None => Err(ProtocolError(
                        "a block status reply without a base:allocation chunk".into(),
                    )
                    .into()),
                },
                _ => Ok(Done::Empty),
            }
        };
        // The caller may have given up waiting (its thread failed elsewhere): nothing to do.
        let _ = self.reply.send(outcome);
    }
}

/// Extents must run back to back from the request's start; all but the last must end inside
/// the request (the last may run past: it is cut to the request).
fn check_extents(mut e: Vec<Extent>, len: u32) -> Result<Vec<Extent>> {
    let mut pos = 0u64;
    let n = e.len();
    for (i, x) in e.iter_mut().enumerate() {
        let end = pos + u64::from(x.len);
        if end > u64::from(len) {
            if i + 1 < n {
                return Err(ProtocolError(format!(
                    "block status extents run past the {len} bytes asked"
                ))
                .into());
            }
            x.len = (u64::from(len) - pos) as u32;
        }
        pos = end;
    }
    Ok(e)
}

struct State {
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    in_flight_bytes: u64,
    /// Why the connection is unusable, once it is.
    broken: Option<String>,
}

struct Shared {
    info: ExportInfo,
    writer: Mutex<Socket>,
    state: Mutex<State>,
    /// Signalled when requests complete (room in the table) or the connection breaks.
    room: Condvar,
    closing: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these tables inconsistent (every update is one
    // statement), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Marks the connection broken: every request in flight fails with `reason`, later ones
    /// are refused, and the socket is shut so that the reader stops.
    fn fail(&self, reason: String, sock: &Socket) {
        let pending: Vec<Pending> = {
            let mut st = lock(&self.state);
            st.broken.get_or_insert(reason.clone());
            st.in_flight_bytes = 0;
            st.pending.drain().map(|(_, p)| p).collect()
        };
        sock.shutdown();
        for p in pending {
            let _ = p.reply.send(Err(Error::Broken(reason.clone())));
        }
        self.room.notify_all();
    }

    /// Takes the request `cookie` out of the table while its reply is read.
    fn take(&self, cookie: u64) -> Result<Pending> {
        lock(&self.state).pending.remove(&cookie).ok_or_else(|| {
            ProtocolError(format!(
                "a reply with the cookie {cookie}, which no request in flight has"
            ))
            .into()
        })
    }

    fn put_back(&self, cookie: u64, p: Pending) {
        lock(&self.state).pending.insert(cookie, p);
    }

    /// Hands a finished request its outcome. Returns whether the server answered that it is
    /// shutting down (ESHUTDOWN): it then takes no more requests, and the connection is to
    /// be closed so that it can stop (a caller may reconnect once it is back).
    fn complete(&self, p: Pending) -> bool {
        {
            let mut st = lock(&self.state);
            st.in_flight_bytes = st.in_flight_bytes.saturating_sub(p.cost);
        }
        self.room.notify_all();
        let shutting_down = p
            .error
            .as_ref()
            .is_some_and(|(code, _)| *code == codec::errno::ESHUTDOWN);
        p.finish(self.info.structured);
        shutting_down
    }
}

/// The reason a connection is closed after the server said ESHUTDOWN.
const SHUTTING_DOWN: &str = "the server is shutting down (ESHUTDOWN)";

/// Reads exactly `buf`, waiting at most [`IO_TIMEOUT`] without progress. With `idle`, the
/// wait for the first byte is unlimited while no request is in flight, and `Ok(false)` means
/// the connection closed there (the client is closing, or the server hung up between replies).
fn read_full(shared: &Shared, sock: &mut Socket, buf: &mut [u8], idle: bool) -> Result<bool> {
    let mut done = 0;
    let mut last = Instant::now();
    while done < buf.len() {
        match sock.read(&mut buf[done..]) {
            Ok(0) => {
                if done == 0 && idle && shared.closing.load(Ordering::SeqCst) {
                    return Ok(false);
                }
                return Err(io_err("reading a reply")(
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            Ok(n) => {
                done += n;
                last = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if shared.closing.load(Ordering::SeqCst) && done == 0 && idle {
                    return Ok(false);
                }
                let waiting = done > 0 || !lock(&shared.state).pending.is_empty();
                if !waiting {
                    last = Instant::now();
                } else if last.elapsed() >= IO_TIMEOUT {
                    return Err(io_err("reading a reply")(e));
                }
            }
            Err(e) => {
                if shared.closing.load(Ordering::SeqCst) && done == 0 && idle {
                    return Ok(false);
                }
                return Err(io_err("reading a reply")(e));
            }
        }
    }
    Ok(true)
}

/// The reader thread: replies until the connection ends.
fn read_replies(shared: &Shared, sock: &mut Socket) -> Result<()> {
    let structured = shared.info.structured;
    loop {
        let mut head = [0u8; 20];
        if !read_full(shared, sock, &mut head[..4], true)? {
            return Ok(());
        }
        let rest = ReplyHeader::rest_len([head[0], head[1], head[2], head[3]])?;
        read_full(shared, sock, &mut head[4..4 + rest], false)?;
        let (h, _) = ReplyHeader::decode(&head[..4 + rest])?
            .ok_or_else(|| ProtocolError("a short reply header".into()))?;
        match h {
            ReplyHeader::Simple { error, cookie } => {
                let mut p = shared.take(cookie)?;
                if let Err(e) = read_simple(shared, sock, &mut p, error) {
                    return Err(p.abandon(e));
                }
                if shared.complete(p) {
                    return Err(Error::Broken(SHUTTING_DOWN.into()));
                }
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                cookie,
                len,
            } => {
                if !structured {
                    return Err(ProtocolError(
                        "a structured reply although structured replies were not agreed".into(),
                    )
                    .into());
                }
                let mut p = shared.take(cookie)?;
                if let Err(e) = read_chunk(shared, sock, &mut p, kind, flags, len) {
                    return Err(p.abandon(e));
                }
                if flags & chunk::FLAG_DONE != 0 {
                    if shared.complete(p) {
                        return Err(Error::Broken(SHUTTING_DOWN.into()));
                    }
                } else {
                    shared.put_back(cookie, p);
                }
            }
        }
    }
}

/// Reads the rest of a simple reply to request `p`.
fn read_simple(shared: &Shared, sock: &mut Socket, p: &mut Pending, error: u32) -> Result<()> {
    if shared.info.structured && p.kind == cmd::READ {
        return Err(ProtocolError(
            "a simple reply to a read after structured replies were agreed".into(),
        )
        .into());
    }
    if error != 0 {
        p.error = Some((error, String::new()));
    } else if p.kind == cmd::READ {
        read_full(shared, sock, &mut p.data, false)?;
    } else if p.kind == cmd::BLOCK_STATUS {
        return Err(ProtocolError("a simple reply to a block status request".into()).into());
    }
    Ok(())
}

/// Reads one chunk's payload into request `p`, every length checked first.
fn read_chunk(
    shared: &Shared,
    sock: &mut Socket,
    p: &mut Pending,
    kind: u16,
    flags: u16,
    len: u32,
) -> Result<()> {
    let bad = |m: String| -> Result<()> { Err(ProtocolError(m).into()) };
    if kind == chunk::OFFSET_DATA {
        if len <= 8 || len - 8 > p.len {
            return bad(format!(
                "an OFFSET_DATA chunk of {len} bytes for a read of {} bytes",
                p.len
            ));
        }
        let mut off = [0u8; 8];
        read_full(shared, sock, &mut off, false)?;
        let range = p.cover(u64::from_be_bytes(off), u64::from(len - 8))?;
        read_full(shared, sock, &mut p.data[range], false)?;
        return Ok(());
    }
    let max = match kind {
        chunk::NONE => 0,
        chunk::OFFSET_HOLE => 12,
        chunk::BLOCK_STATUS => 4 + 8 * codec::MAX_EXTENTS as u32,
        // Error chunks: code, length, a bounded message, an offset.
        _ => 6 + codec::MAX_STRING as u32 + 8,
    };
    if len > max {
        return bad(format!(
            "a chunk of type {kind} with {len} bytes of payload (at most {max} expected)"
        ));
    }
    let mut payload = vec![0u8; len as usize];
    read_full(shared, sock, &mut payload, false)?;
    match Chunk::decode(kind, &payload)? {
        Chunk::None if flags & chunk::FLAG_DONE == 0 => {
            return bad("a NONE chunk that is not the last".into());
        }
        Chunk::None => {}
        Chunk::OffsetHole { offset, len } => {
            let range = p.cover(offset, u64::from(len))?;
            p.data[range].fill(0);
        }
        Chunk::BlockStatus { context, extents } => {
            if p.kind != cmd::BLOCK_STATUS
                || Some(context) != shared.info.base_allocation
                || p.extents.is_some()
            {
                return bad(format!(
                    "an unexpected block status chunk (context {context}) in the reply to a {}",
                    cmd::name(p.kind)
                ));
            }
            p.extents = Some(extents);
        }
        Chunk::Error {
            code,
            message,
            offset,
            ..
        } => {
            if let Some(o) = offset {
                if o < p.offset || o - p.offset >= u64::from(p.len).max(1) {
                    return bad(format!("an error at offset {o}, outside the request"));
                }
            }
            p.error.get_or_insert((code, message));
        }
        Chunk::OffsetData { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// A request sent; [`Ticket::done`] or [`Ticket::data`] gives its outcome.
pub struct Ticket {
    rx: mpsc::Receiver<Result<Done>>,
}

impl Ticket {
    fn wait(self) -> Result<Done> {
        self.rx
            .recv()
            .unwrap_or_else(|_| Err(Error::Broken("the reply was lost".into())))
    }

    /// Waits for the request's outcome (a write's, a zeroing's...).
    pub fn done(self) -> Result<()> {
        self.wait().map(|_| ())
    }

    /// Waits for a read's data.
    pub fn data(self) -> Result<Vec<u8>> {
        match self.wait()? {
            Done::Data(d) => Ok(d),
            _ => Ok(Vec::new()),
        }
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

/// Reads `buf.len()` bytes at `offset` through `clients` (connections to one export; several
/// when the server allows multi-conn), in pieces of at most `piece` bytes handed out
/// round-robin from connection `first`, up to `READ_DEPTH` (16) per connection in flight.
/// Unaligned reads are widened to the minimum block size.
pub fn read_across(
    clients: &[&Client],
    first: usize,
    offset: u64,
    buf: &mut [u8],
    piece: u32,
) -> Result<()> {
    let Some(c0) = clients.first() else {
        return Err(Error::Invalid("no connection to read through".into()));
    };
    let info = c0.info();
    let end = offset + buf.len() as u64;
    c0.check_range("read", offset, buf.len() as u64)?;
    let m = u64::from(info.min_block);
    let (a, b) = (
        offset / m * m,
        end.div_ceil(m).saturating_mul(m).min(info.size),
    );
    let piece = u64::from(piece.min(info.max_request).max(info.min_block)) / m * m;
    let mut queue: VecDeque<(u64, Ticket)> = VecDeque::new();
    let finish = |queue: &mut VecDeque<(u64, Ticket)>, buf: &mut [u8]| -> Result<()> {
        let Some((at, t)) = queue.pop_front() else {
            return Ok(());
        };
        let data = t.data()?;
        // The part of [at, at + data.len()) inside [offset, end).
        let (s, e) = (at.max(offset), (at + data.len() as u64).min(end));
        if s < e {
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&data[(s - at) as usize..(e - at) as usize]);
        }
        Ok(())
    };
    let mut pos = a;
    let mut i = first;
    while pos < b {
        let n = (b - pos).min(piece);
        if queue.len() >= READ_DEPTH * clients.len() {
            finish(&mut queue, buf)?;
        }
        let c = clients[i % clients.len()];
        queue.push_back((pos, c.start_read(pos, n as u32)?));
        i += 1;
        pos += n;
    }
    while !queue.is_empty() {
        finish(&mut queue, buf)?;
    }
    Ok(())
}

/// Writes `data` at `offset` through `clients` (connections to one export; several when the
/// server allows multi-conn), in pieces of at most `piece` bytes (aligned to the minimum block
/// size) handed out round-robin from connection `first`, up to `READ_DEPTH` (16) per connection
/// in flight. Returns once every piece is answered: a FLUSH sent afterwards covers them all.
pub fn write_across(
    clients: &[&Client],
    first: usize,
    offset: u64,
    data: &[u8],
    piece: u32,
    fua: bool,
) -> Result<()> {
    let Some(c0) = clients.first() else {
        return Err(Error::Invalid("no connection to write through".into()));
    };
    let info = c0.info();
    let m = info.min_block.max(1);
    let piece = (piece.min(info.max_request).max(m) / m * m) as usize;
    let mut queue = VecDeque::new();
    for (i, part) in data.chunks(piece).enumerate() {
        if queue.len() >= READ_DEPTH * clients.len() {
            wait_front(&mut queue)?;
        }
        let c = clients[(first + i) % clients.len()];
        queue.push_back(c.start_write(offset + (i * piece) as u64, part, fua)?);
    }
    while !queue.is_empty() {
        wait_front(&mut queue)?;
    }
    Ok(())
}
