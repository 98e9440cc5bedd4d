//! The transmission phase: requests, checked, then answered.
//!
//! The connection's thread reads the requests and answers them itself, one after the other,
//! while they are quick (data in the page cache: a hand-off to another thread would cost
//! more than the request). A request whose backend call takes [`SLOW`] or more (it waited on
//! a device or on a remote layer) turns the connection to workers: the reader hands requests
//! to [`WORKERS`] threads that answer several at once, each reply written whole under the
//! writer's lock, and it turns back once [`FAST_STREAK`] requests in a row were quick.
//! Replies may then leave in any order, as the protocol allows (clients match them by
//! cookie); a FLUSH covers every write replied to before it arrived, since a reply is sent
//! only once the backend is done. Requests handed to workers hold at most
//! [`IN_FLIGHT_BYTES`] of payload; the reader waits for room.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::handshake::{Conn, Session};
use super::{BackendError, BackendResult, ConnectionError, MAX_PAYLOAD};
use crate::codec::{chunk, cmd, cmd_flags, errno, Chunk, Extent, ReplyHeader, Request};

type Result<T> = std::result::Result<T, ConnectionError>;

/// Holes shorter than this are sent as data: a chunk header costs 20 bytes, and the zero
/// scan works in these blocks (aligned to the export, so that holes line up with clusters).
const HOLE_BLOCK: u64 = 4096;

/// A READ or WRITE that waits at least this long (beyond moving its bytes) makes the
/// connection's requests slow.
pub(super) const SLOW: Duration = Duration::from_millis(1);
/// Quick requests in a row (under a quarter of [`SLOW`]) that make a connection's requests
/// quick again.
const FAST_STREAK: u32 = 256;
/// Workers of a connection whose requests are slow: as many requests in flight as qemu-nbd
/// runs per connection (16 coroutines), each mostly waiting.
const WORKERS: usize = 16;
/// Payload bytes (WRITE data, READ results) the requests handed to workers may hold.
const IN_FLIGHT_BYTES: u64 = 64 << 20;

/// A byte budget: the reader takes a request's share before handing it over, the worker
/// gives it back once the reply is sent.
struct Budget {
    left: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn take(&self, n: u64) {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        while *left < n {
            left = self.freed.wait(left).unwrap_or_else(|e| e.into_inner());
        }
        *left -= n;
    }

    fn give(&self, n: u64) {
        *self.left.lock().unwrap_or_else(|e| e.into_inner()) += n;
        self.freed.notify_all();
    }
}

/// A request handed to a worker: the request, a WRITE's data, its share of the budget.
struct Job {
    req: Request,
    data: Vec<u8>,
    share: u64,
}

/// What the reader and the workers of one connection share.
struct Shared<'w, W: Write> {
    writer: Mutex<&'w mut W>,
    budget: Budget,
    /// Requests go to workers.
    slow: AtomicBool,
    /// Quick requests the workers answered in a row.
    streak: AtomicU32,
    /// The first reply a worker could not send: the connection is over.
    failed: Mutex<Option<ConnectionError>>,
}

impl<W: Write> Shared<'_, W> {
    /// Notes how long a READ or WRITE took, less the time its bytes take to move (at
    /// 1 GiB/s, a byte a nanosecond): a wait turns the connection to workers, a streak of
    /// quick ones back to the reader. Other requests do not count: a FLUSH is slow by
    /// nature, and a block status or zeroing of a large range takes its time without waiting.
    fn timed(&self, req: &Request, took: Duration) {
        if req.kind != cmd::READ && req.kind != cmd::WRITE {
            return;
        }
        let waited = took.saturating_sub(Duration::from_nanos(u64::from(req.len)));
        if waited >= SLOW {
            self.streak.store(0, Ordering::Relaxed);
            self.slow.store(true, Ordering::Relaxed);
        } else if waited < SLOW / 4
            && self.slow.load(Ordering::Relaxed)
            && self.streak.fetch_add(1, Ordering::Relaxed) + 1 >= FAST_STREAK
        {
            self.slow.store(false, Ordering::Relaxed);
        }
    }

    fn fail(&self, e: ConnectionError) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
    }

    fn has_failed(&self) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

/// Answers requests until the client disconnects; requests handed to workers are answered
/// before this returns.
pub(super) fn serve<R: Read, W: Write + Send>(c: &mut Conn<R, W>, s: &Session) -> Result<()> {
    let shared = Shared {
        writer: Mutex::new(&mut c.writer),
        budget: Budget {
            left: Mutex::new(IN_FLIGHT_BYTES),
            freed: Condvar::new(),
        },
        slow: AtomicBool::new(false),
        streak: AtomicU32::new(0),
        failed: Mutex::new(None),
    };
    let (tx, rx) = mpsc::sync_channel::<Job>(WORKERS);
    let rx = Mutex::new(rx);
    let reader = &mut c.reader;
    let read_result = std::thread::scope(|scope| {
        // Owned here, so that however the loop ends the workers see the end of the channel
        // (and the scope can join them).
        let tx = tx;
        let mut workers = false;
        let r = loop {
            if shared.has_failed() {
                break Ok(());
            }
            let Some((req, data)) = next_request(reader)? else {
                break Ok(());
            };
            if shared.slow.load(Ordering::Relaxed) {
                if !workers {
                    for _ in 0..WORKERS {
                        scope.spawn(|| work(&rx, &shared, s));
                    }
                    workers = true;
                }
                let share = match req.kind {
                    cmd::READ | cmd::WRITE => u64::from(req.len.min(MAX_PAYLOAD)),
                    _ => 0,
                };
                shared.budget.take(share);
                if tx.send(Job { req, data, share }).is_err() {
                    break Ok(());
                }
                continue;
            }
            // Answered here, straight into the writer (held: a worker finishing a request
            // handed over earlier waits for this reply).
            let mut w = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
            let t = Instant::now();
            answer(&mut **w, s, &req, data)?;
            let took = t.elapsed();
            w.flush()?;
            drop(w);
            shared.timed(&req, took);
        };
        drop(tx);
        r
    });
    // A reply that could not be sent ends the connection as a read error would.
    match shared
        .failed
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
    {
        Some(e) => Err(e),
        None => read_result,
    }
}

/// The next request and a WRITE's data; `None` at DISC or the end of input.
fn next_request<R: Read>(reader: &mut R) -> Result<Option<(Request, Vec<u8>)>> {
    let mut h = [0u8; 28];
    match reader.read_exact(&mut h) {
        Ok(()) => {}
        // A client that hangs up without NBD_CMD_DISC: an end like any other (requests
        // handed to workers are still answered).
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let req = Request::decode(&h)?;
    if req.kind == cmd::DISC {
        return Ok(None);
    }
    let mut data = Vec::new();
    if req.kind == cmd::WRITE {
        if req.len > MAX_PAYLOAD {
            // Its data cannot be skipped without reading it all: hang up.
            return Err(crate::codec::ProtocolError(format!(
                "a write of {} bytes (at most {MAX_PAYLOAD} served)",
                req.len
            ))
            .into());
        }
        data = vec![0u8; req.len as usize];
        reader.read_exact(&mut data)?;
    }
    Ok(Some((req, data)))
}

/// A worker: requests handed over, each answered into a buffer that is then written whole.
fn work<W: Write>(rx: &Mutex<mpsc::Receiver<Job>>, shared: &Shared<'_, W>, s: &Session) {
    loop {
        let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return, // the reader is done
        };
        let mut reply = Vec::new();
        let t = Instant::now();
        let answered = answer(&mut reply, s, &job.req, job.data);
        shared.timed(&job.req, t.elapsed());
        let sent = answered.and_then(|()| {
            let mut w = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
            w.write_all(&reply)?;
            w.flush()?;
            Ok(())
        });
        shared.budget.give(job.share);
        if let Err(e) = sent {
            shared.fail(e);
        }
    }
}

fn einval(what: impl Into<String>) -> BackendError {
    BackendError::new(errno::EINVAL, what)
}

/// Checks that the request stays inside the export.
fn in_range(s: &Session, req: &Request) -> BackendResult<()> {
    let size = s.export.backend.size();
    match req.offset.checked_add(req.len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(einval(format!(
            "{} of {} bytes at offset {} is past the end of the export ({size} bytes)",
            cmd::name(req.kind),
            req.len,
            req.offset
        ))),
    }
}

fn writable(s: &Session, req: &Request) -> BackendResult<()> {
    if s.export.backend.writable() {
        Ok(())
    } else {
        Err(BackendError::new(
            errno::EPERM,
            format!("{} on a read-only export", cmd::name(req.kind)),
        ))
    }
}

fn answer<W: Write>(w: &mut W, s: &Session, req: &Request, data: Vec<u8>) -> Result<()> {
    let backend = &*s.export.backend;
    let (offset, len) = (req.offset, req.len as u64);
    let fua = req.flags & cmd_flags::FUA != 0;
    let flush_if_fua = |r: BackendResult<()>| match r {
        Ok(()) if fua => backend.flush(),
        r => r,
    };
    let outcome = match req.kind {
        cmd::READ => return read(w, s, req),
        cmd::BLOCK_STATUS => return block_status(w, s, req),
        cmd::WRITE => writable(s, req)
            .and_then(|_| in_range(s, req))
            .and_then(|_| flush_if_fua(backend.write(offset, &data))),
        cmd::FLUSH => backend.flush(),
        cmd::TRIM => writable(s, req)
            .and_then(|_| in_range(s, req))
            .and_then(|_| flush_if_fua(backend.trim(offset, len))),
        cmd::WRITE_ZEROES => {
            let fast = req.flags & cmd_flags::FAST_ZERO != 0;
            writable(s, req)
                .and_then(|_| in_range(s, req))
                .and_then(|_| flush_if_fua(backend.write_zeroes(offset, len, fast)))
        }
        cmd::CACHE => in_range(s, req).and_then(|_| backend.cache(offset, len)),
        k => Err(einval(format!("unknown command {k}"))),
    };
    let error = match outcome {
        Ok(()) => 0,
        Err(e) => e.errno,
    };
    w.write_all(
        &ReplyHeader::Simple {
            error,
            cookie: req.cookie,
        }
        .encode(),
    )?;
    Ok(())
}

fn send_chunk<W: Write>(w: &mut W, cookie: u64, done: bool, c: &Chunk) -> Result<()> {
    let payload = c.encode();
    let h = ReplyHeader::Chunk {
        flags: if done { chunk::FLAG_DONE } else { 0 },
        kind: c.kind(),
        cookie,
        len: payload.len() as u32,
    };
    w.write_all(&h.encode())?;
    w.write_all(&payload)?;
    Ok(())
}

/// An error answer: a structured error chunk when structured replies are on (its message
/// reaches the client's user), else a simple reply.
fn send_error<W: Write>(w: &mut W, s: &Session, req: &Request, e: &BackendError) -> Result<()> {
    if s.structured {
        let message: String = e.message.chars().take(4096).collect();
        let c = Chunk::Error {
            kind: chunk::ERROR,
            code: e.errno,
            message,
            offset: None,
        };
        send_chunk(w, req.cookie, true, &c)
    } else {
        w.write_all(
            &ReplyHeader::Simple {
                error: e.errno,
                cookie: req.cookie,
            }
            .encode(),
        )?;
        Ok(())
    }
}

fn read<W: Write>(w: &mut W, s: &Session, req: &Request) -> Result<()> {
    let checked = in_range(s, req).and_then(|_| {
        if req.len > MAX_PAYLOAD {
            return Err(einval(format!(
                "a read of {} bytes (at most {MAX_PAYLOAD} served)",
                req.len
            )));
        }
        let mut buf = vec![0u8; req.len as usize];
        s.export.backend.read(req.offset, &mut buf)?;
        Ok(buf)
    });
    let buf = match checked {
        Ok(b) => b,
        Err(e) => return send_error(w, s, req, &e),
    };
    if !s.structured {
        w.write_all(
            &ReplyHeader::Simple {
                error: 0,
                cookie: req.cookie,
            }
            .encode(),
        )?;
        w.write_all(&buf)?;
        return Ok(());
    }
    if buf.is_empty() {
        return send_chunk(w, req.cookie, true, &Chunk::None);
    }
    // With DF the reply must be one chunk; else zero blocks become holes.
    let pieces = if req.flags & cmd_flags::DF != 0 {
        vec![(0, buf.len(), false)]
    } else {
        split_holes(req.offset, &buf)
    };
    let last = pieces.len() - 1;
    for (i, &(a, b, hole)) in pieces.iter().enumerate() {
        let offset = req.offset + a as u64;
        let c = if hole {
            Chunk::OffsetHole {
                offset,
                len: (b - a) as u32,
            }
        } else {
            Chunk::OffsetData {
                offset,
                data: &buf[a..b],
            }
        };
        send_chunk(w, req.cookie, i == last, &c)?;
    }
    Ok(())
}

/// `buf` (read at `offset`) cut into `(start, end, is_hole)` pieces: runs of whole zero
/// [`HOLE_BLOCK`]s are holes, the rest data.
pub(super) fn split_holes(offset: u64, buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        // Up to the next block boundary of the export.
        let next = ((offset + pos as u64) / HOLE_BLOCK + 1) * HOLE_BLOCK - offset;
        let end = (next as usize).min(buf.len());
        let whole = end - pos == HOLE_BLOCK as usize;
        let hole = whole && is_zero(&buf[pos..end]);
        match out.last_mut() {
            Some(last) if last.2 == hole => last.1 = end,
            _ => out.push((pos, end, hole)),
        }
        pos = end;
    }
    out
}

fn block_status<W: Write>(w: &mut W, s: &Session, req: &Request) -> Result<()> {
    if !s.structured || s.contexts.is_empty() {
        let e = einval("block status needs structured replies and a metadata context selected");
        return send_error(w, s, req, &e);
    }
    if req.len == 0 {
        return send_error(w, s, req, &einval("block status of 0 bytes"));
    }
    if let Err(e) = in_range(s, req) {
        return send_error(w, s, req, &e);
    }
    let one = req.flags & cmd_flags::REQ_ONE != 0;
    let mut answers = Vec::with_capacity(s.contexts.len());
    for &(id, name) in &s.contexts {
        match s.export.backend.block_status(name, req.offset, req.len) {
            Ok(e) => answers.push((id, clip(e, req.len, one))),
            Err(e) => return send_error(w, s, req, &e),
        }
    }
    let last = answers.len() - 1;
    for (i, (context, extents)) in answers.into_iter().enumerate() {
        let c = Chunk::BlockStatus { context, extents };
        send_chunk(w, req.cookie, i == last, &c)?;
    }
    Ok(())
}

/// Extents clipped to the request's `len` (one only with `REQ_ONE`), merged where they
/// repeat a status, never empty (a backend with no answer gets "data", always safe).
pub(super) fn clip(extents: Vec<Extent>, len: u32, one: bool) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut left = len;
    for e in extents {
        if left == 0 || (one && !out.is_empty()) {
            break;
        }
        let n = e.len.min(left);
        if n == 0 {
            continue;
        }
        left -= n;
        match out.last_mut() {
            Some(l) if l.flags == e.flags => l.len += n,
            _ => out.push(Extent {
                len: n,
                flags: e.flags,
            }),
        }
    }
    if out.is_empty() {
        out.push(Extent { len, flags: 0 });
    }
    if one {
        out.truncate(1);
    }
    out
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}
