//! Reads and writes spread over several connections to one export (multi-conn), in
//! pipelined pieces.

use super::*;

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
