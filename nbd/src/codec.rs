//! The NBD wire format: constants and pure encoders/decoders, no I/O.
//!
//! Every decoder takes bytes that came from the other side and either returns a value or a
//! [`ProtocolError`] saying what was wrong; none panics or allocates more than the bytes it is
//! given (lengths are checked against the data, never used to size a buffer). Both
//! directions are here (client and server messages), so that a server can share the codec
//! and the tests can round-trip every message.
//!
//! All integers are big-endian (network order).

use std::fmt;

/// First magic of the server's greeting ("NBDMAGIC").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second magic of the greeting and prefix of every option request ("IHAVEOPT").
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Strings (names, messages) are at most this long (the specification's limit).
pub const MAX_STRING: usize = 4096;
/// Option request data a server accepts (names and queries are bounded strings).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Option reply data a client accepts: the largest legitimate reply (a `REP_SERVER` with a
/// name and a description) is about 8 KiB.
pub const MAX_OPTION_REPLY: u32 = 16 * 1024;
/// Extents one block status chunk may carry (the specification's limit).
pub const MAX_EXTENTS: usize = 1 << 20;

/// Handshake flags (server greeting) and client flags share bit meanings.
pub mod handshake {
    /// The server speaks the fixed newstyle negotiation (option haggling with replies).
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The 124 bytes of zeros after the export info of `NBD_OPT_EXPORT_NAME` are left out.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Option codes.
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`: choose an export and end the handshake (no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`: end the negotiation without using an export.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`: list the exports.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`: upgrade to TLS (not offered by cowimg).
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`: ask about an export without choosing it.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`: choose an export and end the handshake, with errors reported.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`: replies come in chunks (needed for block status).
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`: ask which metadata contexts an export has.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`: choose the metadata contexts block status reports.
    pub const SET_META_CONTEXT: u32 = 10;
    /// `NBD_OPT_EXTENDED_HEADERS`: 64-bit lengths in requests and replies (not used).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types; errors have bit 31 set.
pub mod rep {
    /// `NBD_REP_ACK`: the option is done.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`: one export of a list.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`: one piece of information about an export.
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`: one metadata context and its id.
    pub const META_CONTEXT: u32 = 4;
    /// Set in every error reply type.
    pub const ERR_BIT: u32 = 1 << 31;
    /// `NBD_REP_ERR_UNSUP`: the option is not known to the server.
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    /// `NBD_REP_ERR_POLICY`: the server forbids it.
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    /// `NBD_REP_ERR_INVALID`: the option is malformed.
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    /// `NBD_REP_ERR_PLATFORM`: not supported on the server's platform.
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    /// `NBD_REP_ERR_TLS_REQD`: TLS must be negotiated first.
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    /// `NBD_REP_ERR_UNKNOWN`: no such export.
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the client must ask for block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    /// `NBD_REP_ERR_TOO_BIG`: the request or reply would be too large.
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
    /// `NBD_REP_ERR_EXT_HEADER_REQD`: extended headers must be negotiated first.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT | 10;
}

/// Information types of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub mod info {
    /// `NBD_INFO_EXPORT`: the export's size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`: the export's canonical name.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`: a human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags of an export.
pub mod tflags {
    /// `NBD_FLAG_HAS_FLAGS`: the other flags are meaningful (always set).
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`: writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`: the server accepts `NBD_CMD_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`: the server honours the FUA flag.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`: the storage is a spinning disk (a scheduling hint).
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`: the server accepts `NBD_CMD_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`: the server accepts `NBD_CMD_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`: the server honours the DF (do not fragment) flag of reads.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`: several connections see each other's writes and a flush on one covers all.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_CACHE`: the server accepts `NBD_CMD_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`: the server honours the FAST_ZERO flag of zero writes.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types.
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`: the client disconnects.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`: what was acknowledged is made durable.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`: the range may be discarded.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_CACHE`: a prefetch hint.
    pub const CACHE: u16 = 5;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`: extents of the negotiated metadata contexts.
    pub const BLOCK_STATUS: u16 = 7;

    /// The command's name, for messages.
    pub fn name(kind: u16) -> &'static str {
        match kind {
            READ => "read",
            WRITE => "write",
            DISC => "disconnect",
            FLUSH => "flush",
            TRIM => "trim",
            CACHE => "cache",
            WRITE_ZEROES => "write zeroes",
            BLOCK_STATUS => "block status",
            _ => "unknown command",
        }
    }
}

/// Command flags.
pub mod cmd_flags {
    /// `NBD_CMD_FLAG_FUA`: durable before it is answered.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`: a zero write must allocate (not punch a hole).
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`: the read's reply must not be fragmented.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`: one extent per context is enough.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail rather than zero slowly.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// `NBD_REPLY_TYPE_NONE`: no payload (ends a reply).
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: a range that reads as zeros.
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`: extents of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_ERROR`: the request failed.
    pub const ERROR: u16 = (1 << 15) | 1;
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`: the request failed at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
    /// Chunk types with this bit are errors, known or not.
    pub const ERROR_BIT: u16 = 1 << 15;
}

/// `base:allocation` extent flags.
pub mod state {
    /// `NBD_STATE_HOLE`: not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// `NBD_STATE_ZERO`: reads as zeros.
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context cowimg asks for.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Error values of replies.
pub mod errno {
    /// Operation not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large (a request past the end, or too long).
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (FAST_ZERO that cannot be fast).
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;

    /// The error's name and meaning, for messages; values the specification does not define
    /// are to be treated as EINVAL, and say so.
    pub fn describe(code: u32) -> String {
        let known = match code {
            EPERM => "EPERM (operation not permitted)",
            EIO => "EIO (input/output error)",
            ENOMEM => "ENOMEM (out of memory)",
            EINVAL => "EINVAL (invalid argument)",
            ENOSPC => "ENOSPC (no space left)",
            EOVERFLOW => "EOVERFLOW (request too large)",
            ENOTSUP => "ENOTSUP (not supported)",
            ESHUTDOWN => "ESHUTDOWN (the server is shutting down)",
            _ => return format!("error {code} (not an NBD error value; taken as EINVAL)"),
        };
        known.to_string()
    }
}

/// Bytes from the other side that break the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtocolError {}

/// Result of a decoder.
pub type Result<T> = std::result::Result<T, ProtocolError>;

fn bad<T>(msg: impl Into<String>) -> Result<T> {
    Err(ProtocolError(msg.into()))
}

/// A cursor over bytes received, every read checked.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return bad(format!("{} is truncated", self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A string of `len` bytes (UTF-8, at most [`MAX_STRING`]).
    fn string(&mut self, len: usize) -> Result<String> {
        if len > MAX_STRING {
            return bad(format!(
                "{}: a string of {len} bytes (at most {MAX_STRING} allowed)",
                self.what
            ));
        }
        let b = self.take(len)?;
        String::from_utf8(b.to_vec())
            .or_else(|_| bad(format!("{}: a string is not UTF-8", self.what)))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn end(&self) -> Result<()> {
        if !self.buf.is_empty() {
            return bad(format!(
                "{} has {} unexpected trailing bytes",
                self.what,
                self.buf.len()
            ));
        }
        Ok(())
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

// ---- handshake ----

/// The server's greeting: the two magics and the handshake flags (18 bytes).
pub fn encode_greeting(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Decodes the greeting; oldstyle servers and servers without fixed newstyle are refused.
pub fn decode_greeting(b: &[u8; 18]) -> Result<u16> {
    let mut r = Reader::new(b, "the server greeting");
    if r.u64()? != NBDMAGIC {
        return bad("the peer is not an NBD server (no NBDMAGIC greeting)");
    }
    if r.u64()? != IHAVEOPT {
        return bad(
            "the server speaks the obsolete oldstyle NBD handshake, which is not supported",
        );
    }
    let flags = r.u16()?;
    if flags & handshake::FIXED_NEWSTYLE == 0 {
        return bad("the server does not offer the fixed newstyle handshake");
    }
    Ok(flags)
}

/// An option request: code and data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionRequest {
    /// The option (`opt::*`).
    pub code: u32,
    /// Its data.
    pub data: Vec<u8>,
}

impl OptionRequest {
    /// The bytes sent on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.data.len());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.code.to_be_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    /// Decodes the 16-byte header: the option code and its data length (bounded by
    /// [`MAX_OPTION_DATA`]).
    pub fn decode_header(b: &[u8; 16]) -> Result<(u32, u32)> {
        let mut r = Reader::new(b, "an option request");
        if r.u64()? != IHAVEOPT {
            return bad("an option request without the IHAVEOPT magic");
        }
        let code = r.u32()?;
        let len = r.u32()?;
        if len > MAX_OPTION_DATA {
            return bad(format!(
                "option {code} carries {len} bytes of data (too large)"
            ));
        }
        Ok((code, len))
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoRequest {
    /// The export's name ("" for the default export).
    pub export: String,
    /// The information asked for (`info::*`).
    pub infos: Vec<u16>,
}

impl GoRequest {
    /// The bytes sent on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string(&mut out, &self.export);
        out.extend_from_slice(&(self.infos.len() as u16).to_be_bytes());
        for i in &self.infos {
            out.extend_from_slice(&i.to_be_bytes());
        }
        out
    }

    /// Decodes what was received, checking every length against the bytes there.
    pub fn decode(b: &[u8]) -> Result<GoRequest> {
        let mut r = Reader::new(b, "NBD_OPT_GO data");
        let len = r.u32()? as usize;
        let export = r.string(len)?;
        let n = r.u16()?;
        let infos = (0..n).map(|_| r.u16()).collect::<Result<Vec<_>>>()?;
        r.end()?;
        Ok(GoRequest { export, infos })
    }
}

/// The data of `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export's name.
    pub export: String,
    /// The contexts asked for (`base:allocation`, ...).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// The bytes sent on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string(&mut out, &self.export);
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string(&mut out, q);
        }
        out
    }

    /// Decodes what was received, checking every length against the bytes there.
    pub fn decode(b: &[u8]) -> Result<MetaContextRequest> {
        let mut r = Reader::new(b, "meta context request data");
        let len = r.u32()? as usize;
        let export = r.string(len)?;
        let n = r.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            // Each query takes at least 4 bytes: a count beyond the data fails here, before
            // anything is allocated for it.
            let len = r.u32()? as usize;
            queries.push(r.string(len)?);
        }
        r.end()?;
        Ok(MetaContextRequest { export, queries })
    }
}

/// The header of an option reply (20 bytes); its data follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// The reply type (`rep::*`).
    pub reply: u32,
    /// The length of the data that follows.
    pub len: u32,
}

impl OptionReplyHeader {
    /// The bytes sent on the wire.
    pub fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply.to_be_bytes());
        b[16..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes a header; its length must be at most [`MAX_OPTION_REPLY`].
    pub fn decode(b: &[u8; 20]) -> Result<OptionReplyHeader> {
        let mut r = Reader::new(b, "an option reply");
        if r.u64()? != OPTION_REPLY_MAGIC {
            return bad("an option reply without its magic");
        }
        let h = OptionReplyHeader {
            option: r.u32()?,
            reply: r.u32()?,
            len: r.u32()?,
        };
        if h.len > MAX_OPTION_REPLY {
            return bad(format!(
                "an option reply of {} bytes (at most {MAX_OPTION_REPLY} expected)",
                h.len
            ));
        }
        Ok(h)
    }
}

/// The text an option error reply carries (lossy: it is only shown).
pub fn option_error_text(data: &[u8]) -> String {
    String::from_utf8_lossy(&data[..data.len().min(MAX_STRING)]).into_owned()
}

/// What an option error reply means, for messages.
pub fn option_error_name(reply: u32) -> &'static str {
    match reply {
        rep::ERR_UNSUP => "not supported",
        rep::ERR_POLICY => "refused by policy",
        rep::ERR_INVALID => "invalid request",
        rep::ERR_PLATFORM => "not supported on the server's platform",
        rep::ERR_TLS_REQD => "the server requires TLS, which cowimg does not speak",
        rep::ERR_UNKNOWN => "export not found",
        rep::ERR_SHUTDOWN => "the server is shutting down",
        rep::ERR_BLOCK_SIZE_REQD => "the server requires block size negotiation",
        rep::ERR_TOO_BIG => "request too big",
        rep::ERR_EXT_HEADER_REQD => "the server requires extended headers",
        _ => "unknown error",
    }
}

/// One `NBD_REP_INFO` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// The export's size in bytes.
        size: u64,
        /// Its transmission flags ([`tflags`]).
        flags: u16,
    },
    /// `NBD_INFO_NAME`: the canonical name.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Requests must be aligned to this.
        minimum: u32,
        /// Requests of this size (and alignment) are served best.
        preferred: u32,
        /// The largest payload the server takes.
        maximum: u32,
    },
    /// A type this codec does not know (clients ignore it).
    Unknown(u16),
}

impl Info {
    /// The bytes sent on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Info::Export { size, flags } => {
                out.extend_from_slice(&info::EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(s) | Info::Description(s) => {
                let t = if matches!(self, Info::Name(_)) {
                    info::NAME
                } else {
                    info::DESCRIPTION
                };
                out.extend_from_slice(&t.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                for v in [minimum, preferred, maximum] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Info::Unknown(t) => out.extend_from_slice(&t.to_be_bytes()),
        }
        out
    }

    /// Decodes an `NBD_REP_INFO` payload; block sizes are checked against the
    /// specification's rules (powers of two, minimum at most 64 KiB, ordered).
    pub fn decode(b: &[u8]) -> Result<Info> {
        let mut r = Reader::new(b, "an NBD_REP_INFO reply");
        let info = match r.u16()? {
            info::EXPORT => Info::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            t @ (info::NAME | info::DESCRIPTION) => {
                let len = r.buf.len();
                let s = r.string(len)?;
                if t == info::NAME {
                    Info::Name(s)
                } else {
                    Info::Description(s)
                }
            }
            info::BLOCK_SIZE => {
                let (minimum, preferred, maximum) = (r.u32()?, r.u32()?, r.u32()?);
                if !minimum.is_power_of_two() || minimum > 64 * 1024 {
                    return bad(format!(
                        "the server's minimum block size {minimum} is not a power of two up to 64 KiB"
                    ));
                }
                if !preferred.is_power_of_two() || preferred < minimum.max(512) {
                    return bad(format!(
                        "the server's preferred block size {preferred} is not a power of two of at least 512 and the minimum"
                    ));
                }
                if maximum < preferred {
                    return bad(format!(
                        "the server's maximum block size {maximum} is below its preferred size {preferred}"
                    ));
                }
                Info::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                }
            }
            t => {
                r.rest();
                Info::Unknown(t)
            }
        };
        r.end()?;
        Ok(info)
    }
}

/// One `NBD_REP_META_CONTEXT` payload: the id the server gave the context, and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContext {
    /// The id block status replies name the context by.
    pub id: u32,
    /// The context's name (`base:allocation`, ...).
    pub name: String,
}

impl MetaContext {
    /// The bytes sent on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.id.to_be_bytes().to_vec();
        out.extend_from_slice(self.name.as_bytes());
        out
    }

    /// Decodes what was received, checking every length against the bytes there.
    pub fn decode(b: &[u8]) -> Result<MetaContext> {
        let mut r = Reader::new(b, "an NBD_REP_META_CONTEXT reply");
        let id = r.u32()?;
        let len = r.buf.len();
        let name = r.string(len)?;
        Ok(MetaContext { id, name })
    }
}

/// The answer to `NBD_OPT_EXPORT_NAME` (the fallback when `NBD_OPT_GO` is not supported):
/// size and flags, then 124 zero bytes unless `NO_ZEROES` was agreed (the caller reads and
/// drops those).
pub fn decode_export_name_reply(b: &[u8; 10]) -> Result<(u64, u16)> {
    let mut r = Reader::new(b, "the NBD_OPT_EXPORT_NAME reply");
    Ok((r.u64()?, r.u16()?))
}

/// Encodes the answer to `NBD_OPT_EXPORT_NAME` (without the zero padding).
pub fn encode_export_name_reply(size: u64, flags: u16) -> [u8; 10] {
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&size.to_be_bytes());
    b[8..].copy_from_slice(&flags.to_be_bytes());
    b
}

// ---- transmission ----

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_round_trips_and_refuses_oldstyle() {
        let g = encode_greeting(3);
        assert_eq!(decode_greeting(&g), Ok(3));
        let mut old = g;
        old[8..16].copy_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
        assert!(decode_greeting(&old).unwrap_err().0.contains("oldstyle"));
        assert!(decode_greeting(&encode_greeting(2)).is_err());
    }

    #[test]
    fn block_sizes_follow_the_rules() {
        let bs = |minimum, preferred, maximum| {
            Info::decode(
                &Info::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                }
                .encode(),
            )
        };
        assert!(bs(1, 4096, 32 << 20).is_ok());
        assert!(bs(3, 4096, 32 << 20).is_err());
        assert!(bs(1 << 17, 1 << 17, 1 << 20).is_err());
        assert!(bs(1, 256, 4096).is_err());
        assert!(bs(1, 4096, 1024).is_err());
    }

    #[test]
    fn chunks_with_bad_lengths_are_refused() {
        assert!(Chunk::decode(chunk::OFFSET_HOLE, &[0; 11]).is_err());
        assert!(Chunk::decode(chunk::OFFSET_HOLE, &[0; 13]).is_err());
        assert!(Chunk::decode(chunk::OFFSET_DATA, &[0; 8]).is_err());
        assert!(Chunk::decode(chunk::BLOCK_STATUS, &[0; 4]).is_err());
        assert!(
            Chunk::decode(chunk::BLOCK_STATUS, &[0; 12]).is_err(),
            "zero-length extent"
        );
        assert!(Chunk::decode(chunk::NONE, &[0]).is_err());
        assert!(Chunk::decode(7, &[]).is_err(), "unknown non-error type");
        // An error chunk whose message length runs past the payload.
        assert!(Chunk::decode(chunk::ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err());
        // Unknown error types are errors.
        let c = Chunk::decode(0x8007, &[0, 0, 0, 5, 0, 1, b'x', 1, 2]).unwrap();
        assert!(matches!(c, Chunk::Error { code: 5, .. }));
    }

    #[test]
    fn reply_headers_need_all_their_bytes() {
        let h = ReplyHeader::Chunk {
            flags: 1,
            kind: 5,
            cookie: 7,
            len: 12,
        }
        .encode();
        for n in 0..h.len() {
            assert_eq!(ReplyHeader::decode(&h[..n]), Ok(None));
        }
        assert!(ReplyHeader::decode(&[1, 2, 3, 4]).is_err());
    }

    fn arb_chunk() -> impl Strategy<Value = (u16, Vec<u8>)> {
        let data = prop::collection::vec(any::<u8>(), 1..64);
        let extents = prop::collection::vec((1u32.., any::<u32>()), 1..16);
        prop_oneof![
            Just((chunk::NONE, vec![])),
            (any::<u64>(), data).prop_map(|(offset, d)| (
                chunk::OFFSET_DATA,
                Chunk::OffsetData { offset, data: &d }.encode()
            )),
            (any::<u64>(), 1u32..).prop_map(|(offset, len)| (
                chunk::OFFSET_HOLE,
                Chunk::OffsetHole { offset, len }.encode()
            )),
            (any::<u32>(), extents).prop_map(|(context, e)| (
                chunk::BLOCK_STATUS,
                Chunk::BlockStatus {
                    context,
                    extents: e
                        .into_iter()
                        .map(|(len, flags)| Extent { len, flags })
                        .collect()
                }
                .encode()
            )),
            (1u32.., "[a-z ]{0,40}", prop::option::of(any::<u64>())).prop_map(
                |(code, m, offset)| {
                    let kind = if offset.is_some() {
                        chunk::ERROR_OFFSET
                    } else {
                        chunk::ERROR
                    };
                    (
                        kind,
                        Chunk::Error {
                            kind,
                            code,
                            message: m,
                            offset,
                        }
                        .encode(),
                    )
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn decoders_never_panic_on_random_bytes(b in prop::collection::vec(any::<u8>(), 0..200), kind in any::<u16>()) {
            let _ = Chunk::decode(kind, &b);
            let _ = ReplyHeader::decode(&b);
            let _ = Info::decode(&b);
            let _ = MetaContext::decode(&b);
            let _ = GoRequest::decode(&b);
            let _ = MetaContextRequest::decode(&b);
            let _ = option_error_text(&b);
            if let Ok(a) = <[u8; 20]>::try_from(&b[..b.len().min(20)]) {
                let _ = OptionReplyHeader::decode(&a);
            }
            if let Ok(a) = <[u8; 28]>::try_from(&b[..b.len().min(28)]) {
                let _ = Request::decode(&a);
            }
            if let Ok(a) = <[u8; 18]>::try_from(&b[..b.len().min(18)]) {
                let _ = decode_greeting(&a);
            }
        }

        #[test]
        fn chunks_round_trip((kind, payload) in arb_chunk()) {
            let c = Chunk::decode(kind, &payload).unwrap();
            prop_assert_eq!(c.kind(), kind);
            prop_assert_eq!(c.encode(), payload);
        }

        #[test]
        fn requests_and_replies_round_trip(flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), len in any::<u32>(), error in any::<u32>()) {
            let r = Request { flags, kind, cookie, offset, len };
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
            for h in [ReplyHeader::Simple { error, cookie }, ReplyHeader::Chunk { flags, kind, cookie, len }] {
                let b = h.encode();
                prop_assert_eq!(ReplyHeader::decode(&b), Ok(Some((h, b.len()))));
            }
        }

        #[test]
        fn options_round_trip(export in "[a-z/]{0,20}", infos in prop::collection::vec(any::<u16>(), 0..8), queries in prop::collection::vec("[a-z:]{0,20}", 0..4), id in any::<u32>(), size in any::<u64>(), tf in any::<u16>()) {
            let g = GoRequest { export: export.clone(), infos };
            prop_assert_eq!(GoRequest::decode(&g.encode()), Ok(g));
            let m = MetaContextRequest { export: export.clone(), queries };
            prop_assert_eq!(MetaContextRequest::decode(&m.encode()), Ok(m));
            let c = MetaContext { id, name: export.clone() };
            prop_assert_eq!(MetaContext::decode(&c.encode()), Ok(c));
            for i in [Info::Export { size, flags: tf }, Info::Name(export.clone()), Info::Description(export)] {
                prop_assert_eq!(Info::decode(&i.encode()), Ok(i));
            }
            let h = OptionReplyHeader { option: id, reply: tf as u32, len: (size % 1000) as u32 };
            prop_assert_eq!(OptionReplyHeader::decode(&h.encode()), Ok(h));
            let o = OptionRequest { code: id, data: vec![1; (size % 100) as usize] };
            let b = o.encode();
            let hdr: [u8; 16] = b[..16].try_into().unwrap();
            prop_assert_eq!(OptionRequest::decode_header(&hdr), Ok((id, o.data.len() as u32)));
        }
    }
}
