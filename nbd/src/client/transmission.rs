//! Requests in flight and the reader thread: each reply (simple, or the chunks of a
//! structured one) is checked against the request it names and handed to its waiter.

use super::*;

// ---- transmission ----

/// The successful outcome of one request.
pub(super) enum Done {
    Empty,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
}

/// A request in flight.
pub(super) struct Pending {
    pub(super) kind: u16,
    pub(super) offset: u64,
    pub(super) len: u32,
    /// Bytes this request holds against [`MAX_IN_FLIGHT_BYTES`].
    pub(super) cost: u64,
    /// The read's data, filled as chunks arrive.
    pub(super) data: Vec<u8>,
    /// Parts of a structured read received so far (start → end, relative, merged).
    pub(super) covered: BTreeMap<u64, u64>,
    pub(super) extents: Option<Vec<Extent>>,
    pub(super) error: Option<(u32, String)>,
    pub(super) reply: mpsc::Sender<Result<Done>>,
}

impl Pending {
    /// Records the chunk `[at, at + n)` of a read (relative to the request), which must lie
    /// inside it and overlap nothing received before.
    pub(super) fn cover(&mut self, offset: u64, n: u64) -> Result<std::ops::Range<usize>> {
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
    pub(super) fn abandon(self, e: Error) -> Error {
        let _ = self.reply.send(Err(Error::Broken(e.to_string())));
        e
    }

    /// The outcome once the last chunk (or the simple reply) is in.
    pub(super) fn finish(mut self, structured: bool) {
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
pub(super) fn check_extents(mut e: Vec<Extent>, len: u32) -> Result<Vec<Extent>> {
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

pub(super) struct State {
    pub(super) next_cookie: u64,
    pub(super) pending: HashMap<u64, Pending>,
    pub(super) in_flight_bytes: u64,
    /// Why the connection is unusable, once it is.
    pub(super) broken: Option<String>,
}

pub(super) struct Shared {
    pub(super) info: ExportInfo,
    pub(super) writer: Mutex<Socket>,
    pub(super) state: Mutex<State>,
    /// Signalled when requests complete (room in the table) or the connection breaks.
    pub(super) room: Condvar,
    pub(super) closing: AtomicBool,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these tables inconsistent (every update is one
    // statement), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Marks the connection broken: every request in flight fails with `reason`, later ones
    /// are refused, and the socket is shut so that the reader stops.
    pub(super) fn fail(&self, reason: String, sock: &Socket) {
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
    pub(super) fn take(&self, cookie: u64) -> Result<Pending> {
        lock(&self.state).pending.remove(&cookie).ok_or_else(|| {
            ProtocolError(format!(
                "a reply with the cookie {cookie}, which no request in flight has"
            ))
            .into()
        })
    }

    pub(super) fn put_back(&self, cookie: u64, p: Pending) {
        lock(&self.state).pending.insert(cookie, p);
    }

    /// Hands a finished request its outcome. Returns whether the server answered that it is
    /// shutting down (ESHUTDOWN): it then takes no more requests, and the connection is to
    /// be closed so that it can stop (a caller may reconnect once it is back).
    pub(super) fn complete(&self, p: Pending) -> bool {
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
pub(super) const SHUTTING_DOWN: &str = "the server is shutting down (ESHUTDOWN)";

/// Reads exactly `buf`, waiting at most [`IO_TIMEOUT`] without progress. With `idle`, the
/// wait for the first byte is unlimited while no request is in flight, and `Ok(false)` means
/// the connection closed there (the client is closing, or the server hung up between replies).
pub(super) fn read_full(
    shared: &Shared,
    sock: &mut Socket,
    buf: &mut [u8],
    idle: bool,
) -> Result<bool> {
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
pub(super) fn read_replies(shared: &Shared, sock: &mut Socket) -> Result<()> {
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
pub(super) fn read_simple(
    shared: &Shared,
    sock: &mut Socket,
    p: &mut Pending,
    error: u32,
) -> Result<()> {
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
pub(super) fn read_chunk(
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
    pub(super) rx: mpsc::Receiver<Result<Done>>,
}

impl Ticket {
    pub(super) fn wait(self) -> Result<Done> {
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
