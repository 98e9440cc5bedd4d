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

mod options;
#[cfg(test)]
mod tests;
mod transmission;

pub use options::*;
pub use transmission::*;

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
