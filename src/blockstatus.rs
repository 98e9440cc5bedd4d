//! Block status: where each guest range of a chain comes from, as qemu reports it (the
//! library half of `cowimg map`, and what strict `compare`, `convert`, `stream`, `measure`,
//! `checksum`, `diff` and the NBD server ask).
//!
//! The answers are qemu's block status, reproduced step by step, because `map` and strict
//! `compare` print what it says: the format driver's answer for one layer (one run, never past
//! an L2 table), what qemu's generic block layer adds to it (`ALLOCATED`, zeros without or
//! past the end of a backing file, `EOF`), and the walk down the chain. Query lengths matter
//! as much as the flags: strict `compare` reports a mismatch where two answers differ, and an
//! answer that reaches the end of the image carries `EOF`.

use std::cell::RefCell;

use cowimg_formats::{Alloc, Format, Status};

use crate::chain::Chain;
use crate::error::{Error, Result};

/// qemu's block status flags (include/block/block-common.h), for exact comparisons.
pub mod flags {
    /// `BDRV_BLOCK_DATA`: reads come from stored data.
    pub const DATA: u32 = 0x01;
    /// `BDRV_BLOCK_ZERO`: reads as zeros.
    pub const ZERO: u32 = 0x02;
    /// `BDRV_BLOCK_OFFSET_VALID`: a host offset is known.
    pub const OFFSET_VALID: u32 = 0x04;
    /// `BDRV_BLOCK_ALLOCATED`: the layer itself decides the contents.
    pub const ALLOCATED: u32 = 0x10;
    /// `BDRV_BLOCK_EOF`: the answer reaches the end of the image.
    pub const EOF: u32 = 0x20;
    /// `BDRV_BLOCK_COMPRESSED`: stored compressed.
    pub const COMPRESSED: u32 = 0x80;
}

/// qcow2 answers at most this many bytes per query (its byte count is an `int`).
const QCOW2_MAX_ANSWER: u64 = i32::MAX as u64;

/// One range with one status (qemu-img's MapEntry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// How many layers down the contents come from (0: the top image).
    pub depth: usize,
    /// Some layer of the chain provides the contents (false: past every layer, zeros).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Reads from stored data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset of the data, when it has one.
    pub offset: Option<u64>,
    /// Layer index the entry's status comes from.
    pub layer: usize,
    /// The file `offset` points into (the layer's file, or its external data file).
    pub file: Option<String>,
}

impl Entry {
    /// qemu-img merges entries that continue each other with the same status
    /// (its entry_mergeable).
    fn continues(&self, next: &Entry) -> bool {
        self.start + self.length == next.start
            && self.present == next.present
            && self.depth == next.depth
            && self.data == next.data
            && self.zero == next.zero
            && self.compressed == next.compressed
            && self.file == next.file
            && self.offset.is_some() == next.offset.is_some()
            && self
                .offset
                .is_none_or(|o| Some(o + self.length) == next.offset)
    }
}

/// One answer of qemu's block status: `flags` hold for `[offset, offset + len)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// The [`flags`] that hold.
    pub flags: u32,
    /// How many bytes the answer covers.
    pub len: u64,
    /// Host offset (with `OFFSET_VALID`).
    pub host: Option<u64>,
    /// The file `host` points into.
    pub file: Option<String>,
    /// Layer that answered.
    pub layer: usize,
}

impl BlockStatus {
    /// Whether flag `f` holds.
    pub fn has(&self, f: u32) -> bool {
        self.flags & f != 0
    }
}

/// Answers status queries about one chain, remembering the last window of driver answers
/// per layer: consecutive queries walk forward through the same L2 table (or the same range
/// of a raw file), which is then read once.
pub struct Walker<'a> {
    chain: &'a Chain,
    /// Answers end where qemu's would (strict `compare`, which prints where two answers
    /// differ); otherwise answers are merged across L2 tables and as long as the data allows
    /// (walks whose merged result is the same either way: map, convert, stream, measure).
    exact: bool,
    /// Per layer: guest bytes one L2 table covers (no answer crosses its end).
    spans: Vec<u64>,
    windows: RefCell<Vec<Option<Window>>>,
}

struct Window {
    start: u64,
    end: u64,
    /// `end` is a boundary no answer crosses (an L2 table's end, or the layer's end).
    hard_end: bool,
    runs: Vec<Status>,
}

impl Window {
    /// The run holding `offset`, when this window can tell all of it up to `limit` (or, with
    /// `fresh`, as much of it as the window holds: a window just fetched at `offset`).
    fn run_at(&self, offset: u64, limit: u64, fresh: bool) -> Option<Status> {
        if offset < self.start || offset >= self.end {
            return None;
        }
        let r = *self
            .runs
            .get(self.runs.partition_point(|r| r.end() <= offset))?;
        // A run cut by the window's soft end may go on past it.
        if r.end() == self.end && !self.hard_end && self.end < limit && !fresh {
            return None;
        }
        Some(r)
    }
}

impl<'a> Walker<'a> {
    /// A walker whose answers are qemu's, query by query (strict `compare`).
    pub fn new(chain: &'a Chain) -> Walker<'a> {
        Walker::with(chain, true)
    }

    /// A walker whose answers are merged as far as the data allows: a walk's merged result
    /// is qemu's, at a cost that grows with the data, not with the virtual size.
    pub fn coalescing(chain: &'a Chain) -> Walker<'a> {
        Walker::with(chain, false)
    }

    fn with(chain: &'a Chain, exact: bool) -> Walker<'a> {
        Walker {
            chain,
            exact,
            spans: chain.layers.iter().map(|l| l2_span(&*l.image)).collect(),
            windows: RefCell::new((0..chain.layers.len()).map(|_| None).collect()),
        }
    }

    /// The driver's answer for layer `i` at `offset`, at most `bytes` long (qemu's
    /// `drv->bdrv_co_block_status`).
    fn driver_status(&self, i: usize, offset: u64, bytes: u64) -> Result<Status> {
        let layer = &self.chain.layers[i];
        let img = &*layer.image;
        let limit = offset.saturating_add(bytes);
        let cached = self.windows.borrow()[i]
            .as_ref()
            .and_then(|w| w.run_at(offset, limit, false));
        let run = match cached {
            Some(r) => r,
            None => {
                let size = layer.size();
                let err = |e| Error::image(&layer.filename, e);
                let (runs, end, hard_end) = if self.exact {
                    // qcow2 and QED answers end at an L2 table's end: a window of that table
                    // is exact. A raw file's answer is its data or hole extent, up to what is
                    // asked.
                    let (end, hard_end) = match layer.format {
                        Format::Raw => (limit.min(size), limit >= size),
                        _ => {
                            let span = self.spans[i];
                            ((offset / span + 1).saturating_mul(span).min(size), true)
                        }
                    };
                    (
                        img.status(offset, end - offset).map_err(err)?,
                        end,
                        hard_end,
                    )
                } else {
                    let runs = img.status_ahead(offset, size - offset).map_err(err)?;
                    let end = runs.last().map_or(offset, |r| r.end());
                    (runs, end, end >= size)
                };
                let w = Window {
                    start: offset,
                    end,
                    hard_end,
                    runs,
                };
                let found = w.run_at(offset, limit, true);
                self.windows.borrow_mut()[i] = Some(w);
                found.ok_or_else(|| {
                    Error::image(
                        &layer.filename,
                        cowimg_formats::Error::invalid(format!(
                            "no allocation status for offset {offset}"
                        )),
                    )
                })?
            }
        };
        let len = run.end().min(limit) - offset;
        let intra = offset - run.start;
        let at = |h: u64| h + intra;
        Ok(Status {
            start: offset,
            len,
            alloc: match run.alloc {
                Alloc::Data { host } => Alloc::Data { host: at(host) },
                Alloc::Zero { host } => Alloc::Zero { host: host.map(at) },
                other => other,
            },
            reserved: run.reserved.map(at),
            recurse: run.recurse,
        })
    }

    /// qemu's `bdrv_co_block_status` for layer `i` alone: the driver's answer, and what the
    /// generic block layer adds.
    pub fn layer_status(&self, i: usize, offset: u64, bytes: u64) -> Result<BlockStatus> {
        use flags::*;
        let layer = &self.chain.layers[i];
        let size = layer.size();
        if offset >= size {
            return Ok(BlockStatus {
                flags: EOF,
                len: 0,
                host: None,
                file: None,
                layer: i,
            });
        }
        let bytes = bytes.min(size - offset);
        let st = self.driver_status(i, offset, bytes)?;
        let mut len = st.len;
        if layer.format == Format::Qcow2 && self.exact {
            len = len.min(QCOW2_MAX_ANSWER);
        }
        let data_file = || {
            Some(
                layer
                    .image
                    .data_storage()
                    .path()
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        let (mut f, host, file) = match st.alloc {
            Alloc::Data { host } => {
                // Asking the file (qemu's BDRV_BLOCK_RECURSE, cleared once done since qemu
                // 9.0) adds only what it says of a hole.
                let hole = if st.recurse == Some(true) { ZERO } else { 0 };
                (DATA | OFFSET_VALID | hole, Some(host), data_file())
            }
            Alloc::Compressed { .. } => (DATA | COMPRESSED, None, None),
            Alloc::Zero { host: Some(h) } => (ZERO | OFFSET_VALID, Some(h), data_file()),
            Alloc::Zero { host: None } => (ZERO, None, None),
            Alloc::Unallocated => match st.reserved {
                Some(h) => (OFFSET_VALID, Some(h), data_file()),
                None => (0, None, None),
            },
        };
        if f & (DATA | ZERO) != 0 {
            f |= ALLOCATED;
        } else {
            // Unallocated: zeros without a backing file, and past the end of a shorter one.
            match self.chain.layers.get(i + 1) {
                None => f |= ZERO,
                Some(below) if offset >= below.size() => f |= ZERO,
                Some(_) => {}
            }
        }
        if offset + len == size {
            f |= EOF;
        }
        Ok(BlockStatus {
            flags: f,
            len,
            host,
            file,
            layer: i,
        })
    }

    /// qemu's `bdrv_block_status_above(top, NULL, ...)`: the status of the whole chain at
    /// `offset`, as `compare` asks it.
    pub fn status_above(&self, offset: u64, bytes: u64) -> Result<BlockStatus> {
        use flags::*;
        let first = self.layer_status(0, offset, bytes)?;
        if first.len == 0 || first.has(ALLOCATED) || self.chain.layers.len() == 1 {
            return Ok(first);
        }
        let eof = first.has(EOF).then(|| offset + first.len);
        let mut bytes = first.len;
        let mut st = first;
        for i in 1..self.chain.layers.len() {
            st = self.layer_status(i, offset, bytes)?;
            if st.len == 0 {
                // This layer is shorter: the zeros read past its end count as its own.
                st = BlockStatus {
                    flags: ZERO | ALLOCATED,
                    len: bytes,
                    host: None,
                    file: None,
                    layer: i,
                };
                break;
            }
            if st.has(ALLOCATED) {
                st.flags &= !EOF;
                break;
            }
            bytes = st.len;
        }
        if Some(offset + st.len) == eof {
            st.flags |= EOF;
        }
        Ok(st)
    }

    /// qemu-img map's `get_block_status`: the first layer from `i` down that holds
    /// `[offset, offset + bytes)` or reads it as zero.
    pub fn map_entry(&self, i: usize, offset: u64, bytes: u64) -> Result<Entry> {
        use flags::*;
        let mut depth = i;
        let mut bytes = bytes;
        let st = loop {
            let st = self.layer_status(depth, offset, bytes)?;
            bytes = st.len;
            if st.has(ZERO | DATA) || depth + 1 == self.chain.layers.len() {
                break st;
            }
            depth += 1;
        };
        let host = if st.has(OFFSET_VALID) { st.host } else { None };
        Ok(Entry {
            start: offset,
            length: st.len,
            depth,
            present: st.has(ALLOCATED),
            zero: st.has(ZERO),
            data: st.has(DATA),
            compressed: st.has(COMPRESSED),
            offset: host,
            layer: depth,
            file: if host.is_some() { st.file } else { None },
        })
    }
}

/// Guest bytes one L2 table covers (no status answer crosses its end).
fn l2_span(img: &dyn cowimg_formats::Image) -> u64 {
    use cowimg_formats::Details;
    let cs = img.cluster_size().unwrap_or(512);
    match img.details() {
        Details::Qcow2(d) => cs * (cs / if d.extended_l2 { 16 } else { 8 }),
        Details::Qed(d) => cs * (u64::from(d.table_size) * cs / 8),
        Details::Raw => u64::MAX,
    }
}

/// The status of `[start, end)` of layer `i` and what shows through from below it, appended
/// to `out` merged as qemu-img map merges entries. Where qemu's answers would end is not
/// visible in a merged result, so the walk takes answers as long as the data allows: its
/// cost grows with what is allocated, not with the size of the range.
pub fn status(chain: &Chain, i: usize, start: u64, end: u64, out: &mut Vec<Entry>) -> Result<()> {
    let walker = Walker::coalescing(chain);
    let mut pos = start;
    while pos < end {
        let e = walker.map_entry(i, pos, end - pos)?;
        if e.length == 0 {
            // Only past the end of layer `i`, which callers do not ask for.
            return Err(Error::image(
                &chain.layers[i].filename,
                cowimg_formats::Error::invalid(format!("no allocation status at offset {pos}")),
            ));
        }
        pos += e.length;
        match out.last_mut() {
            Some(last) if last.continues(&e) => last.length += e.length,
            _ => out.push(e),
        }
    }
    Ok(())
}

/// Merged entries for `[start, end)` of the chain's top.
pub fn entries(chain: &Chain, start: u64, end: u64) -> Result<Vec<Entry>> {
    let mut merged = Vec::new();
    if start < end {
        status(chain, 0, start, end, &mut merged)?;
    }
    Ok(merged)
}
