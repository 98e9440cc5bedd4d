//! The transmission phase's messages: request headers, simple and structured replies,
//! and the chunks of structured replies (data, holes, block status, errors).

use super::*;

/// A request header (28 bytes); a write's data follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cmd_flags::*`).
    pub flags: u16,
    /// The command (`cmd::*`).
    pub kind: u16,
    /// Chosen by the client; the reply carries it back.
    pub cookie: u64,
    /// Where in the export.
    pub offset: u64,
    /// How many bytes (a write's payload length).
    pub len: u32,
}

impl Request {
    /// The bytes sent on the wire.
    pub fn encode(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes what was received, checking every length against the bytes there.
    pub fn decode(b: &[u8; 28]) -> Result<Request> {
        let mut r = Reader::new(b, "a request");
        if r.u32()? != REQUEST_MAGIC {
            return bad("a request without its magic");
        }
        Ok(Request {
            flags: r.u16()?,
            kind: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        })
    }
}

/// The header of a reply: simple (16 bytes) or a structured chunk (20 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; a successful read's data follows (as long as the request).
    Simple {
        /// 0, or the NBD error code ([`errno`]).
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured reply chunk; `len` bytes of payload follow.
    Chunk {
        /// Reply flags ([`chunk::FLAG_DONE`]).
        flags: u16,
        /// The chunk type (`chunk::*`).
        kind: u16,
        /// The request's cookie.
        cookie: u64,
        /// The payload's length.
        len: u32,
    },
}

impl ReplyHeader {
    /// Bytes of header after the 4-byte magic `magic` opens it.
    pub fn rest_len(magic: [u8; 4]) -> Result<usize> {
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => Ok(12),
            STRUCTURED_REPLY_MAGIC => Ok(16),
            m => bad(format!("a reply with the unknown magic {m:#010x}")),
        }
    }

    /// Decodes a whole header (magic included) from the start of `b`: `None` when `b` does
    /// not yet hold all of it, else the header and the bytes it took.
    pub fn decode(b: &[u8]) -> Result<Option<(ReplyHeader, usize)>> {
        let Some(magic) = b.get(..4) else {
            return Ok(None);
        };
        let n = 4 + Self::rest_len([magic[0], magic[1], magic[2], magic[3]])?;
        let Some(all) = b.get(..n) else {
            return Ok(None);
        };
        let mut r = Reader::new(&all[4..], "a reply header");
        let h = if n == 16 {
            ReplyHeader::Simple {
                error: r.u32()?,
                cookie: r.u64()?,
            }
        } else {
            ReplyHeader::Chunk {
                flags: r.u16()?,
                kind: r.u16()?,
                cookie: r.u64()?,
                len: r.u32()?,
            }
        };
        Ok(Some((h, n)))
    }

    /// The bytes sent on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20);
        match *self {
            ReplyHeader::Simple { error, cookie } => {
                out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&error.to_be_bytes());
                out.extend_from_slice(&cookie.to_be_bytes());
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                cookie,
                len,
            } => {
                out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(&cookie.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        out
    }
}

/// One block status extent: `len` bytes with `flags` ([`state`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Its length in bytes.
    pub len: u32,
    /// Its state ([`state`]).
    pub flags: u32,
}

/// The payload of a structured reply chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// No payload: the end of a reply.
    None,
    /// Data at an absolute offset of the export.
    OffsetData {
        /// Where the data goes.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// A range that reads as zeros.
    OffsetHole {
        /// Where it starts.
        offset: u64,
        /// Its length.
        len: u32,
    },
    /// The extents of one metadata context, back to back from the request's offset.
    BlockStatus {
        /// The context's id ([`MetaContext::id`]).
        context: u32,
        /// The extents.
        extents: Vec<Extent>,
    },
    /// An error; `offset` (from `ERROR_OFFSET`) is where it happened. `kind` is the chunk
    /// type (unknown types with the error bit are errors too).
    Error {
        /// The chunk type.
        kind: u16,
        /// The NBD error code ([`errno`]).
        code: u32,
        /// The server's message.
        message: String,
        /// Where the error happened, when the server says.
        offset: Option<u64>,
    },
}

impl<'a> Chunk<'a> {
    /// The chunk type this payload is sent as.
    pub fn kind(&self) -> u16 {
        match self {
            Chunk::None => chunk::NONE,
            Chunk::OffsetData { .. } => chunk::OFFSET_DATA,
            Chunk::OffsetHole { .. } => chunk::OFFSET_HOLE,
            Chunk::BlockStatus { .. } => chunk::BLOCK_STATUS,
            Chunk::Error { kind, .. } => *kind,
        }
    }

    /// Decodes the payload of a chunk of type `kind`. Unknown types without the error bit
    /// are a protocol error (the client must then hang up).
    pub fn decode(kind: u16, b: &'a [u8]) -> Result<Chunk<'a>> {
        let mut r = Reader::new(b, "a structured reply chunk");
        let c = match kind {
            chunk::NONE => Chunk::None,
            chunk::OFFSET_DATA => {
                let offset = r.u64()?;
                let data = r.rest();
                if data.is_empty() {
                    return bad("an OFFSET_DATA chunk without data");
                }
                Chunk::OffsetData { offset, data }
            }
            chunk::OFFSET_HOLE => {
                let offset = r.u64()?;
                let len = r.u32()?;
                if len == 0 {
                    return bad("an OFFSET_HOLE chunk of length 0");
                }
                Chunk::OffsetHole { offset, len }
            }
            chunk::BLOCK_STATUS => {
                let context = r.u32()?;
                let body = r.rest();
                if body.is_empty() || body.len() % 8 != 0 || body.len() / 8 > MAX_EXTENTS {
                    return bad(format!(
                        "a BLOCK_STATUS chunk with {} bytes of extents (1 to {MAX_EXTENTS} extents of 8 bytes expected)",
                        body.len()
                    ));
                }
                let mut extents = Vec::with_capacity(body.len() / 8);
                let mut e = Reader::new(body, "a BLOCK_STATUS chunk");
                while !e.buf.is_empty() {
                    let (len, flags) = (e.u32()?, e.u32()?);
                    if len == 0 {
                        return bad("a BLOCK_STATUS extent of length 0");
                    }
                    extents.push(Extent { len, flags });
                }
                Chunk::BlockStatus { context, extents }
            }
            k if k & chunk::ERROR_BIT != 0 => {
                let code = r.u32()?;
                if code == 0 {
                    return bad("an error chunk with error value 0");
                }
                let len = r.u16()? as usize;
                let message = String::from_utf8_lossy(r.take(len)?).into_owned();
                let offset = if k == chunk::ERROR_OFFSET {
                    Some(r.u64()?)
                } else {
                    // Unknown error types may carry more; only the message is used.
                    r.rest();
                    None
                };
                Chunk::Error {
                    kind: k,
                    code,
                    message,
                    offset,
                }
            }
            k => return bad(format!("a structured reply chunk of unknown type {k}")),
        };
        r.end()?;
        Ok(c)
    }

    /// The bytes sent on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Chunk::None => {}
            Chunk::OffsetData { offset, data } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(data);
            }
            Chunk::OffsetHole { offset, len } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
            }
            Chunk::BlockStatus { context, extents } => {
                out.extend_from_slice(&context.to_be_bytes());
                for e in extents {
                    out.extend_from_slice(&e.len.to_be_bytes());
                    out.extend_from_slice(&e.flags.to_be_bytes());
                }
            }
            Chunk::Error {
                code,
                message,
                offset,
                ..
            } => {
                out.extend_from_slice(&code.to_be_bytes());
                out.extend_from_slice(&(message.len() as u16).to_be_bytes());
                out.extend_from_slice(message.as_bytes());
                if let Some(o) = offset {
                    out.extend_from_slice(&o.to_be_bytes());
                }
            }
        }
        out
    }
}
