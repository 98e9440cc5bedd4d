//! Every range where two guest disks differ (`compare --diff`), where `qemu-img compare`
//! tells only the first. The unit is qemu's: 512-byte sectors, so the first range starts at
//! the offset `qemu-img compare` reports. Past the end of the shorter disk, the longer one
//! must read zeros, as qemu-img compare has it ([`crate::compare`] is its first-offset answer). Ranges both disks report as zero are not read.

use cowimg_formats::is_zero;

use crate::blockstatus::{flags, BlockStatus, Walker};
use crate::chain::Chain;
use crate::error::{Error, Result};

/// The unit of comparison, as `qemu-img compare` counts.
pub const SECTOR: u64 = 512;

/// The most bytes read from each disk at once (here and in [`crate::compare`]).
pub const IO: u64 = 2 << 20;

/// What one disk holds in a differing range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Bytes that are not all zeros.
    Data,
    /// Zeros.
    Zero,
    /// Nothing: the range is past this disk's end (compared as zeros).
    PastEnd,
}

impl Side {
    /// The name printed and in JSON: `data`, `zero`, `past-end`.
    pub fn name(self) -> &'static str {
        match self {
            Side::Data => "data",
            Side::Zero => "zero",
            Side::PastEnd => "past-end",
        }
    }
}

/// A range of whole sectors (the last one may be cut by the end of the longer disk) where
/// the two disks differ, with what each side holds there throughout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// Guest offset, a multiple of [`SECTOR`].
    pub offset: u64,
    /// Bytes: whole sectors, except a last one cut by the longer disk's end.
    pub length: u64,
    /// What the first disk holds there.
    pub a: Side,
    /// What the second disk holds there.
    pub b: Side,
}

/// Where two disks differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff {
    /// In order, merged: two ranges never touch unless what a side holds changes.
    pub ranges: Vec<Range>,
    /// More ranges follow: the walk stopped at the limit.
    pub truncated: bool,
    /// Virtual size of the first disk.
    pub size_a: u64,
    /// Virtual size of the second disk.
    pub size_b: u64,
}

impl Diff {
    /// Whether the disks read the same (sizes aside, as `qemu-img compare` without `-s`).
    pub fn identical(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// The ranges where the guest disks of `a` and `b` differ; with `max`, the first `max`
/// ranges, each complete.
pub fn diff(a: &Chain, b: &Chain, max: Option<usize>) -> Result<Diff> {
    let (size_a, size_b) = (a.size(), b.size());
    let end = size_a.max(size_b);
    let (wa, wb) = (Walker::coalescing(a), Walker::coalescing(b));
    let mut out = Diff {
        ranges: Vec::new(),
        truncated: false,
        size_a,
        size_b,
    };
    let mut buf_a = vec![0u8; IO as usize];
    let mut buf_b = vec![0u8; IO as usize];
    let mut offset = 0;
    while offset < end {
        let st_a = status(&wa, offset, size_a)?;
        let st_b = status(&wb, offset, size_b)?;
        // A side past its end reads zeros for as long as the other side's answer goes.
        let len = match (&st_a, &st_b) {
            (Some(x), Some(y)) => x.len.min(y.len),
            (Some(x), None) | (None, Some(x)) => x.len,
            (None, None) => end - offset,
        };
        let zero = |st: &Option<BlockStatus>| st.as_ref().is_none_or(|s| s.has(flags::ZERO));
        if zero(&st_a) && zero(&st_b) {
            offset += len;
            continue;
        }
        let n = len.min(IO) as usize;
        let (da, db) = (&mut buf_a[..n], &mut buf_b[..n]);
        for (chain, st, buf) in [(a, &st_a, &mut *da), (b, &st_b, &mut *db)] {
            if zero(st) {
                buf.fill(0);
            } else {
                chain.read(offset, buf)?;
            }
        }
        if da != db {
            for (i, (x, y)) in da
                .chunks(SECTOR as usize)
                .zip(db.chunks(SECTOR as usize))
                .enumerate()
            {
                if x == y {
                    continue;
                }
                let at = offset + i as u64 * SECTOR;
                let side = |bytes: &[u8], size: u64| {
                    if at >= size {
                        Side::PastEnd
                    } else if is_zero(bytes) {
                        Side::Zero
                    } else {
                        Side::Data
                    }
                };
                let r = Range {
                    offset: at,
                    length: x.len() as u64,
                    a: side(x, size_a),
                    b: side(y, size_b),
                };
                if !push(&mut out.ranges, r, max) {
                    out.truncated = true;
                    return Ok(out);
                }
            }
        }
        offset += n as u64;
    }
    Ok(out)
}

/// The status of `[offset, size)` of one disk, or `None` past its end.
fn status(w: &Walker, offset: u64, size: u64) -> Result<Option<BlockStatus>> {
    if offset >= size {
        return Ok(None);
    }
    let st = w.status_above(offset, size - offset)?;
    if st.len == 0 {
        return Err(Error::Msg(format!(
            "no allocation status at offset {offset}"
        )));
    }
    Ok(Some(st))
}

/// Appends `r`, merged into the last range when it continues it with the same sides; false
/// when it would be a new range beyond `max`.
fn push(ranges: &mut Vec<Range>, r: Range, max: Option<usize>) -> bool {
    if let Some(last) = ranges.last_mut() {
        if last.offset + last.length == r.offset && (last.a, last.b) == (r.a, r.b) {
            last.length += r.length;
            return true;
        }
    }
    if max.is_some_and(|m| ranges.len() >= m) {
        return false;
    }
    ranges.push(r);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, length: u64, a: Side, b: Side) -> Range {
        Range {
            offset,
            length,
            a,
            b,
        }
    }

    #[test]
    fn ranges_merge_only_when_they_touch_with_the_same_sides() {
        use Side::*;
        let mut v = Vec::new();
        assert!(push(&mut v, r(0, 512, Data, Zero), None));
        assert!(push(&mut v, r(512, 512, Data, Zero), None));
        assert!(push(&mut v, r(1024, 512, Data, Data), None));
        assert!(push(&mut v, r(2048, 512, Data, Data), None));
        assert_eq!(
            v,
            [
                r(0, 1024, Data, Zero),
                r(1024, 512, Data, Data),
                r(2048, 512, Data, Data)
            ]
        );
        // At the limit a continuation still merges, a new range does not fit.
        assert!(push(&mut v, r(2560, 512, Data, Data), Some(3)));
        assert!(!push(&mut v, r(4096, 512, Zero, Data), Some(3)));
        assert_eq!(v.len(), 3);
        assert_eq!(v[2].length, 1024);
    }
}
