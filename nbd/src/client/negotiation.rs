//! The fixed newstyle handshake: options, structured replies, `base:allocation`, then
//! `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME` with old servers).

use super::*;

// ---- handshake ----

pub(super) fn send_option(sock: &mut Socket, code: u32, data: Vec<u8>) -> Result<()> {
    sock.write_all(&OptionRequest { code, data }.encode())
        .map_err(io_err("sending an option during the handshake"))
}

/// Reads one option reply to `option`: its type and data.
pub(super) fn option_reply(sock: &mut Socket, option: u32) -> Result<(u32, Vec<u8>)> {
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

pub(super) fn refused(option: &'static str, reply: u32, data: &[u8]) -> Error {
    Error::Refused {
        option,
        reason: codec::option_error_name(reply),
        message: codec::option_error_text(data),
    }
}

pub(super) fn unexpected(option: &str, reply: u32) -> Error {
    Error::Protocol(ProtocolError(format!(
        "an option reply of type {reply} to {option}"
    )))
}

pub(super) fn negotiate(sock: &mut Socket, export: &str) -> Result<ExportInfo> {
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
