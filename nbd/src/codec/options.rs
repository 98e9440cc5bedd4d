//! The handshake's messages: the greeting, option requests and replies, export info and
//! metadata contexts.

use super::*;

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
