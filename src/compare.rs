//! Whether two guest disks read the same, and the first offset where they do not, as `qemu-img
//! compare` tells it (with `-s`, also where their block status differs). [`crate::diff`] lists
//! every differing range instead; both count in qemu's 512-byte sectors ([`SECTOR`]) and read
//! at most [`IO`] bytes of each disk at once. Ranges that read as zero in both disks are not
//! read at all.

use cowimg_formats::is_zero;

use crate::blockstatus::Walker;
use crate::chain::Chain;
use crate::diff::{IO, SECTOR};
use crate::error::{Error, Result};

/// Outcome of a comparison.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The disks read the same (`size_mismatch`: their sizes differ, and the longer one reads
    /// zeros past the shorter one's end).
    Identical {
        /// The sizes differ.
        size_mismatch: bool,
    },
    /// The first differing sector is at `offset`.
    Mismatch {
        /// Guest offset of the first differing sector.
        offset: u64,
        /// The sizes differ too.
        size_mismatch: bool,
    },
    /// Strict mode: the sizes differ.
    StrictSize,
    /// Strict mode: the block status differs at this offset.
    StrictStatus(u64),
}

/// qemu-img compare's loop (img_compare), answer by answer: both chains are asked for their
/// block status at the same offset, and the shorter answer decides how far to go. In strict
/// mode the two answers' flags must be equal, exactly as qemu compares them (so an answer that
/// reaches the end of an image, and carries `EOF`, differs from one that does not). Ranges
/// that read as zero in both are not read; where only one side is allocated, its bytes must
/// be zero.
pub fn compare(c1: &Chain, c2: &Chain, strict: bool) -> Result<Outcome> {
    use crate::blockstatus::flags::{ALLOCATED, ZERO};
    let (s1, s2) = (c1.size(), c2.size());
    if strict && s1 != s2 {
        return Ok(Outcome::StrictSize);
    }
    // Only strict mode prints where two answers differ; otherwise the first differing sector
    // is the same however the answers are cut.
    let walker = |c| {
        if strict {
            Walker::new(c)
        } else {
            Walker::coalescing(c)
        }
    };
    let (w1, w2) = (walker(c1), walker(c2));
    let min = s1.min(s2);
    let mut buf1 = vec![0u8; IO as usize];
    let mut buf2 = vec![0u8; IO as usize];
    let mut offset = 0;
    while offset < min {
        let st1 = w1.status_above(offset, s1 - offset)?;
        let st2 = w2.status_above(offset, s2 - offset)?;
        let mut chunk = st1.len.min(st2.len);
        if chunk == 0 {
            return Err(Error::Msg(format!(
                "no allocation status at offset {offset}"
            )));
        }
        if strict && st1.flags != st2.flags {
            return Ok(Outcome::StrictStatus(offset));
        }
        let (a1, a2) = (st1.has(ALLOCATED), st2.has(ALLOCATED));
        if st1.has(ZERO) && st2.has(ZERO) {
            // Both read as zero: nothing to read.
        } else if a1 == a2 {
            if a1 {
                chunk = chunk.min(IO);
                let n = chunk as usize;
                c1.read(offset, &mut buf1[..n])?;
                c2.read(offset, &mut buf2[..n])?;
                if let Some(d) = first_diff_sector(&buf1[..n], &buf2[..n]) {
                    return Ok(Outcome::Mismatch {
                        offset: offset + d,
                        size_mismatch: false,
                    });
                }
            }
        } else {
            chunk = chunk.min(IO);
            let n = chunk as usize;
            let (c, buf) = if a1 { (c1, &mut buf1) } else { (c2, &mut buf2) };
            c.read(offset, &mut buf[..n])?;
            if let Some(d) = first_nonzero_sector(&buf[..n]) {
                return Ok(Outcome::Mismatch {
                    offset: offset + d,
                    size_mismatch: false,
                });
            }
        }
        offset += chunk;
    }
    if s1 != s2 {
        // The longer image must read zeros past the shorter one's end.
        let (longer, walker) = if s1 > s2 { (c1, &w1) } else { (c2, &w2) };
        let max = s1.max(s2);
        let mut offset = min;
        while offset < max {
            let st = walker.status_above(offset, max - offset)?;
            let mut chunk = st.len;
            if chunk == 0 {
                return Err(Error::Msg(format!(
                    "no allocation status at offset {offset}"
                )));
            }
            if st.has(ALLOCATED) && !st.has(ZERO) {
                chunk = chunk.min(IO);
                let n = chunk as usize;
                longer.read(offset, &mut buf1[..n])?;
                if let Some(d) = first_nonzero_sector(&buf1[..n]) {
                    return Ok(Outcome::Mismatch {
                        offset: offset + d,
                        size_mismatch: true,
                    });
                }
            }
            offset += chunk;
        }
        return Ok(Outcome::Identical {
            size_mismatch: true,
        });
    }
    Ok(Outcome::Identical {
        size_mismatch: false,
    })
}

/// Offset of the first 512-byte sector that differs (qemu reports sector offsets, counted
/// from the start of the chunk it read).
fn first_diff_sector(a: &[u8], b: &[u8]) -> Option<u64> {
    a.chunks(SECTOR as usize)
        .zip(b.chunks(SECTOR as usize))
        .position(|(x, y)| x != y)
        .map(|i| i as u64 * SECTOR)
}

/// Offset of the first 512-byte sector that is not all zeros.
fn first_nonzero_sector(a: &[u8]) -> Option<u64> {
    a.chunks(SECTOR as usize)
        .position(|x| !is_zero(x))
        .map(|i| i as u64 * SECTOR)
}
