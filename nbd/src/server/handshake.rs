//! The option haggling of the fixed newstyle handshake, up to the transmission phase.

use std::io::{self, BufReader, BufWriter, Read, Write};

use super::{ConnectionError, Export, Server, MAX_PAYLOAD};
use crate::codec::{
    encode_export_name_reply, encode_greeting, handshake, info, opt, rep, tflags, GoRequest, Info,
    MetaContext, MetaContextRequest, OptionReplyHeader, OptionRequest, ProtocolError,
};

type Result<T> = std::result::Result<T, ConnectionError>;

/// Client flags the server knows; a client setting others must be disconnected.
const KNOWN_CLIENT_FLAGS: u32 = (handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES) as u32;

/// The two directions of a connection.
pub(super) struct Conn<R: Read, W: Write> {
    pub reader: BufReader<R>,
    pub writer: BufWriter<W>,
}

/// What the handshake agreed on.
pub(super) struct Session<'a> {
    pub export: &'a Export,
    pub structured: bool,
    /// The metadata contexts selected, with the ids given to the client.
    pub contexts: Vec<(u32, &'static str)>,
}

/// The transmission flags of `export` for a client that did (or did not) ask for structured
/// replies.
fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = tflags::HAS_FLAGS
        | tflags::SEND_FLUSH
        | tflags::SEND_FUA
        | tflags::SEND_CACHE
        // One backend shared by every connection: a flush on one covers all.
        | tflags::CAN_MULTI_CONN;
    if export.backend.writable() {
        f |= tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES | tflags::SEND_FAST_ZERO;
    } else {
        f |= tflags::READ_ONLY;
    }
    if structured {
        f |= tflags::SEND_DF;
    }
    f
}

fn reply<R: Read, W: Write>(c: &mut Conn<R, W>, option: u32, kind: u32, data: &[u8]) -> Result<()> {
    let h = OptionReplyHeader {
        option,
        reply: kind,
        len: data.len() as u32,
    };
    c.writer.write_all(&h.encode())?;
    c.writer.write_all(data)?;
    Ok(())
}

/// An error reply with a message for the client's user; sent at once.
fn refuse<R: Read, W: Write>(c: &mut Conn<R, W>, option: u32, kind: u32, why: &str) -> Result<()> {
    reply(c, option, kind, why.as_bytes())?;
    c.writer.flush()?;
    Ok(())
}

/// Runs the handshake: `Some` when the client entered the transmission phase, `None` when
/// it ended the handshake (`NBD_OPT_ABORT` or a hang-up between options).
pub(super) fn negotiate<'a, R: Read, W: Write>(
    server: &'a Server,
    c: &mut Conn<R, W>,
) -> Result<Option<Session<'a>>> {
    c.writer.write_all(&encode_greeting(
        handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES,
    ))?;
    c.writer.flush()?;
    let mut b = [0u8; 4];
    c.reader.read_exact(&mut b)?;
    let client_flags = u32::from_be_bytes(b);
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(ProtocolError(format!("unknown client flags {client_flags:#x}")).into());
    }
    let no_zeroes = client_flags & handshake::NO_ZEROES as u32 != 0;
    let mut structured = false;
    // The contexts selected, and the export they were selected for.
    let mut selected: (String, Vec<(u32, &'static str)>) = (String::new(), Vec::new());
    loop {
        let mut h = [0u8; 16];
        match c.reader.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let (code, len) = OptionRequest::decode_header(&h)?;
        // Bounded by MAX_OPTION_DATA in decode_header.
        let mut data = vec![0u8; len as usize];
        c.reader.read_exact(&mut data)?;
        match code {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                // This option has no error reply: an unknown name can only be a hang-up.
                let Some(export) = server.find(&name) else {
                    return Err(ProtocolError(format!(
                        "NBD_OPT_EXPORT_NAME of unknown export '{name}'"
                    ))
                    .into());
                };
                let flags = transmission_flags(export, structured);
                c.writer
                    .write_all(&encode_export_name_reply(export.backend.size(), flags))?;
                if !no_zeroes {
                    c.writer.write_all(&[0u8; 124])?;
                }
                c.writer.flush()?;
                let contexts = contexts_for(&selected, &export.name, &name);
                return Ok(Some(Session {
                    export,
                    structured,
                    contexts,
                }));
            }
            opt::ABORT => {
                // The client may have gone already; the acknowledgement is a courtesy.
                let _ = reply(c, code, rep::ACK, &[]).and_then(|_| Ok(c.writer.flush()?));
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    refuse(c, code, rep::ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in &server.exports {
                    let mut p = (e.name.len() as u32).to_be_bytes().to_vec();
                    p.extend_from_slice(e.name.as_bytes());
                    p.extend_from_slice(e.description.as_bytes());
                    reply(c, code, rep::SERVER, &p)?;
                }
                reply(c, code, rep::ACK, &[])?;
            }
            opt::INFO | opt::GO => {
                let Some((req, export)) =
                    decode_for(server, c, code, GoRequest::decode(&data), |r| &r.export)?
                else {
                    continue;
                };
                let flags = transmission_flags(export, structured);
                let size = export.backend.size();
                reply(c, code, rep::INFO, &Info::Export { size, flags }.encode())?;
                for &i in &req.infos {
                    let payload = match i {
                        info::NAME => Info::Name(export.name.clone()),
                        info::DESCRIPTION => Info::Description(export.description.clone()),
                        _ => continue,
                    };
                    reply(c, code, rep::INFO, &payload.encode())?;
                }
                // Always sent: a client that did not ask may still use it.
                let bs = Info::BlockSize {
                    minimum: 1,
                    preferred: export.backend.preferred_block_size(),
                    maximum: MAX_PAYLOAD,
                };
                reply(c, code, rep::INFO, &bs.encode())?;
                reply(c, code, rep::ACK, &[])?;
                c.writer.flush()?;
                if code == opt::GO {
                    let contexts = contexts_for(&selected, &export.name, &req.export);
                    return Ok(Some(Session {
                        export,
                        structured,
                        contexts,
                    }));
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    refuse(
                        c,
                        code,
                        rep::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                    continue;
                }
                structured = true;
                reply(c, code, rep::ACK, &[])?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                if !structured {
                    refuse(
                        c,
                        code,
                        rep::ERR_INVALID,
                        "metadata contexts need structured replies (NBD_OPT_STRUCTURED_REPLY) first",
                    )?;
                    continue;
                }
                let Some((req, export)) =
                    decode_for(server, c, code, MetaContextRequest::decode(&data), |r| {
                        &r.export
                    })?
                else {
                    continue;
                };
                let chosen = choose(
                    export.backend.contexts(),
                    &req.queries,
                    code == opt::LIST_META_CONTEXT,
                );
                for &(id, name) in &chosen {
                    let m = MetaContext {
                        id,
                        name: name.to_string(),
                    };
                    reply(c, code, rep::META_CONTEXT, &m.encode())?;
                }
                reply(c, code, rep::ACK, &[])?;
                if code == opt::SET_META_CONTEXT {
                    selected = (req.export, chosen);
                }
            }
            _ => {
                refuse(
                    c,
                    code,
                    rep::ERR_UNSUP,
                    &format!("option {code} is not supported by this server"),
                )?;
                continue;
            }
        }
        c.writer.flush()?;
    }
}

/// An option's decoded data and the export it names; `None` once the option has been refused
/// (its data is malformed, or no export has that name).
fn decode_for<'a, T, R: Read, W: Write>(
    server: &'a Server,
    c: &mut Conn<R, W>,
    code: u32,
    decoded: std::result::Result<T, ProtocolError>,
    name: impl Fn(&T) -> &String,
) -> Result<Option<(T, &'a Export)>> {
    let req = match decoded {
        Ok(r) => r,
        Err(e) => {
            refuse(c, code, rep::ERR_INVALID, &e.0)?;
            return Ok(None);
        }
    };
    match server.find(name(&req)) {
        Some(export) => Ok(Some((req, export))),
        None => {
            let why = format!("no export named '{}'", name(&req));
            refuse(c, code, rep::ERR_UNKNOWN, &why)?;
            Ok(None)
        }
    }
}

/// The contexts of `available` a request's queries name (ids are positions + 1). A LIST with
/// no query lists everything, and namespace queries (`base:`, `qemu:`) list the namespace; a
/// SET selects exact names only.
fn choose(available: &[&'static str], queries: &[String], list: bool) -> Vec<(u32, &'static str)> {
    let with_ids = available
        .iter()
        .enumerate()
        .map(|(i, &n)| (i as u32 + 1, n));
    if list && queries.is_empty() {
        return with_ids.collect();
    }
    with_ids
        .filter(|&(_, name)| {
            queries
                .iter()
                .any(|q| q == name || (list && q.ends_with(':') && name.starts_with(q.as_str())))
        })
        .collect()
}

/// The contexts selected by `SET_META_CONTEXT` if they were selected for the export the
/// client enters (`asked` is the name it used, `name` the export's own).
fn contexts_for(
    selected: &(String, Vec<(u32, &'static str)>),
    name: &str,
    asked: &str,
) -> Vec<(u32, &'static str)> {
    if selected.0 == asked || selected.0 == name {
        selected.1.clone()
    } else {
        Vec::new()
    }
}
