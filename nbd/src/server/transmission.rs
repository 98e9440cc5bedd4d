//! The transmission phase: requests, checked, then answered in order.

use std::io::{self, Read, Write};

use super::handshake::{Conn, Session};
use super::{BackendError, BackendResult, ConnectionError, MAX_PAYLOAD};
use crate::codec::{chunk, cmd, cmd_flags, errno, Chunk, Extent, ReplyHeader, Request};

type Result<T> = std::result::Result<T, ConnectionError>;

/// Holes shorter than this are sent as data: a chunk header costs 20 bytes, and the zero
/// scan works in these blocks (aligned to the export, so that holes line up with clusters).
const HOLE_BLOCK: u64 = 4096;

/// Answers requests until the client disconnects.
pub(super) fn serve<R: Read, W: Write>(c: &mut Conn<R, W>, s: &Session) -> Result<()> {
    loop {
        let mut h = [0u8; 28];
        match c.reader.read_exact(&mut h) {
            Ok(()) => {}
            // A client that hangs up without NBD_CMD_DISC: nothing is pending, so it is an
            // end like any other.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let req = Request::decode(&h)?;
        if req.kind == cmd::DISC {
            return Ok(());
        }
        answer(c, s, &req)?;
        c.writer.flush()?;
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

fn answer<R: Read, W: Write>(c: &mut Conn<R, W>, s: &Session, req: &Request) -> Result<()> {
    let backend = &*s.export.backend;
    let (offset, len) = (req.offset, req.len as u64);
    let fua = req.flags & cmd_flags::FUA != 0;
    let flush_if_fua = |r: BackendResult<()>| match r {
        Ok(()) if fua => backend.flush(),
        r => r,
    };
    let outcome = match req.kind {
        cmd::READ => return read(c, s, req),
        cmd::BLOCK_STATUS => return block_status(c, s, req),
        cmd::WRITE => {
            if req.len > MAX_PAYLOAD {
                // Its data cannot be skipped without reading it all: hang up.
                return Err(crate::codec::ProtocolError(format!(
                    "a write of {} bytes (at most {MAX_PAYLOAD} served)",
                    req.len
                ))
                .into());
            }
            let mut data = vec![0u8; req.len as usize];
            c.reader.read_exact(&mut data)?;
            writable(s, req)
                .and_then(|_| in_range(s, req))
                .and_then(|_| flush_if_fua(backend.write(offset, &data)))
        }
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
    c.writer.write_all(
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

fn read<R: Read, W: Write>(c: &mut Conn<R, W>, s: &Session, req: &Request) -> Result<()> {
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
        Err(e) => return send_error(&mut c.writer, s, req, &e),
    };
    let w = &mut c.writer;
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

fn block_status<R: Read, W: Write>(c: &mut Conn<R, W>, s: &Session, req: &Request) -> Result<()> {
    let w = &mut c.writer;
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
