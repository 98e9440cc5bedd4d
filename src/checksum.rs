//! Digests of the guest-visible disk, independent of the format: a raw image and any
//! qcow2/QED image (any cluster size, compression, allocation or backing chain) holding the
//! same bytes have the same digest.
//!
//! The construction is blkhash's (the `blksum` tool, version 0.10 and later), so a digest
//! can be checked with `blksum`; docs/checksum.md states it as a spec. In short: the disk is
//! cut into [`BLOCK_SIZE`] blocks (the last may be shorter), each block is hashed on its own,
//! and the digest is `H(H(block 0) || H(block 1) || ... || le64(disk size))`. A block that
//! reads as zeros always hashes to `H(64 KiB of zeros)`, computed once: ranges the image
//! reports as zero (holes, zero clusters, unallocated clusters without a backing file) are
//! never read, and data blocks that turn out to be zeros are not hashed. Block hashes are
//! computed by `jobs` threads; the outer hash takes them in order.

use std::sync::atomic::{AtomicBool, Ordering};

use cowimg_formats::is_zero;
use rayon::prelude::*;
use sha2::Digest;

use crate::blockstatus;
use crate::chain::Chain;
use crate::copy::Counters;
use crate::error::{Error, Result};

/// blkhash's block size: the unit each block hash covers. Changing it changes every digest.
pub const BLOCK_SIZE: u64 = 64 << 10;

/// Bytes one worker reads and hashes at a time (whole blocks).
const CHUNK: u64 = 1 << 20;

/// Data bytes handed to the workers at once; the outer hash of the previous batch runs
/// meanwhile, so memory stays bounded by two batches of block digests.
const BATCH: u64 = 64 << 20;

/// Guest bytes whose allocation is looked up at once: the lookups for the next window run
/// while the workers hash the blocks of the current one.
const WINDOW: u64 = 16 << 30;

/// A digest algorithm, named as openssl (and so `blksum --digest`) names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// SHA-1 (kept for old tooling; not collision resistant).
    Sha1,
    /// SHA-224.
    Sha224,
    /// blkhash's default.
    #[default]
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
    /// SHA-512/224.
    Sha512_224,
    /// SHA-512/256.
    Sha512_256,
}

impl Algorithm {
    /// Every algorithm cowimg computes.
    pub const ALL: [Algorithm; 7] = [
        Algorithm::Sha1,
        Algorithm::Sha224,
        Algorithm::Sha256,
        Algorithm::Sha384,
        Algorithm::Sha512,
        Algorithm::Sha512_224,
        Algorithm::Sha512_256,
    ];

    /// openssl's name (`sha256`, `sha512-256`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha224 => "sha224",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha384 => "sha384",
            Algorithm::Sha512 => "sha512",
            Algorithm::Sha512_224 => "sha512-224",
            Algorithm::Sha512_256 => "sha512-256",
        }
    }

    /// The algorithm of an openssl name, in any case.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name))
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The digest of one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checksum {
    /// The digest algorithm of every hash of the construction.
    pub algorithm: Algorithm,
    /// The digest's bytes.
    pub digest: Vec<u8>,
    /// Guest bytes covered (the virtual size).
    pub size: u64,
    /// Guest bytes actually read: what the image does not report as zeros, in whole blocks.
    pub read: u64,
}

impl Checksum {
    /// The digest in lower-case hex, as `blksum` and `sha256sum` print it.
    pub fn hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// How to compute a checksum.
pub struct Options<'a> {
    /// The digest (of blocks and of the whole).
    pub algorithm: Algorithm,
    /// Threads hashing blocks (at least one).
    pub jobs: usize,
    /// When given, follow the work: `done` counts guest bytes dealt with, `copied` bytes read.
    pub counters: Option<&'a Counters>,
    /// When given and set (by a signal handler), the computation stops with
    /// [`Error::Interrupted`] at the next batch.
    pub cancel: Option<&'a AtomicBool>,
    /// The job the computation runs as: its cap limits the bytes read per second, and its
    /// pause and cancel are honoured between batches.
    pub job: Option<&'a crate::job::JobHandle>,
}

impl Default for Options<'_> {
    /// sha256 on one thread per core.
    fn default() -> Self {
        Options {
            algorithm: Algorithm::default(),
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            counters: None,
            cancel: None,
            job: None,
        }
    }
}

/// The digest of the guest disk `chain` shows (the top image read through its backing
/// chain). Only reads: copy-on-read happens only if `chain` was opened with it.
pub fn checksum(chain: &Chain, opts: &Options) -> Result<Checksum> {
    let algorithm = opts.algorithm;
    let run = match algorithm {
        Algorithm::Sha1 => blkhash::<sha1::Sha1>,
        Algorithm::Sha224 => blkhash::<sha2::Sha224>,
        Algorithm::Sha256 => blkhash::<sha2::Sha256>,
        Algorithm::Sha384 => blkhash::<sha2::Sha384>,
        Algorithm::Sha512 => blkhash::<sha2::Sha512>,
        Algorithm::Sha512_224 => blkhash::<sha2::Sha512_224>,
        Algorithm::Sha512_256 => blkhash::<sha2::Sha512_256>,
    };
    let (digest, read) = run(chain, opts)?;
    Ok(Checksum {
        algorithm,
        digest,
        size: chain.size(),
        read,
    })
}

/// A stretch of the disk, in block order: blocks known to be zero, or a chunk to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    Zeros {
        blocks: u64,
    },
    Data {
        offset: u64,
        len: u64,
    },
    /// A last block shorter than [`BLOCK_SIZE`] known to be zero: hashed as the bytes it
    /// is (not as a whole zero block), without reading them.
    ZeroTail {
        len: u64,
    },
}

/// The window `[start, end)` of the disk (`start` a multiple of [`BLOCK_SIZE`], `end` too
/// unless it is the disk's end) as pieces: whole blocks that only zero `entries` cover are
/// zeros, every other block is read, in chunks of at most `CHUNK` bytes.
fn pieces(entries: &[blockstatus::Entry], start: u64, end: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    // Next block not yet placed.
    let mut next = start / BLOCK_SIZE;
    let push_data = |out: &mut Vec<Piece>, next: &mut u64, end_block: u64| {
        while *next < end_block {
            let offset = *next * BLOCK_SIZE;
            let len = (CHUNK.min((end_block - *next) * BLOCK_SIZE)).min(end - offset);
            out.push(Piece::Data { offset, len });
            *next += len.div_ceil(BLOCK_SIZE);
        }
    };
    for e in entries.iter().filter(|e| !e.zero) {
        let first = e.start / BLOCK_SIZE;
        let end_block = (e.start + e.length).div_ceil(BLOCK_SIZE);
        if end_block <= next {
            continue;
        }
        if first > next {
            out.push(Piece::Zeros {
                blocks: first - next,
            });
            next = first;
        }
        push_data(&mut out, &mut next, end_block);
    }
    let total = end.div_ceil(BLOCK_SIZE);
    if total > next {
        let whole = end / BLOCK_SIZE;
        if whole > next {
            out.push(Piece::Zeros {
                blocks: whole - next,
            });
        }
        if total > whole {
            out.push(Piece::ZeroTail {
                len: end - whole * BLOCK_SIZE,
            });
        }
    }
    out
}

/// blkhash with digest `D`: the digest and the bytes read.
fn blkhash<D: Digest + Send>(chain: &Chain, opts: &Options) -> Result<(Vec<u8>, u64)> {
    let counters = opts.counters;
    let size = chain.size();
    let zero_md = D::digest(vec![0u8; BLOCK_SIZE as usize]).to_vec();
    // Runs of zero blocks are fed to the outer hash from this many copies of `zero_md` at a
    // time, so that the hash consumes them in bulk.
    let zeros_run = zero_md.repeat(1024);
    let window = |start: u64| -> Result<Vec<Piece>> {
        let end = start.saturating_add(WINDOW).min(size);
        Ok(pieces(
            &blockstatus::entries(chain, start, end)?,
            start,
            end,
        ))
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs.max(1))
        .build()
        .map_err(|e| Error::Msg(format!("starting worker threads: {e}")))?;

    let mut outer = D::new();
    let mut read = 0;
    // `digests` holds, for each piece of `batch`, the block digests of a data piece.
    let feed = |outer: &mut D, batch: &[Piece], digests: Vec<Option<Vec<u8>>>| {
        for (p, d) in batch.iter().zip(digests) {
            match (*p, d) {
                (_, Some(d)) => outer.update(d),
                (Piece::Zeros { blocks }, None) => {
                    let mut left = blocks as usize * zero_md.len();
                    while left > 0 {
                        let n = left.min(zeros_run.len());
                        outer.update(&zeros_run[..n]);
                        left -= n;
                    }
                    if let Some(c) = counters {
                        c.done.fetch_add(blocks * BLOCK_SIZE, Ordering::Relaxed);
                    }
                }
                (Piece::Data { .. } | Piece::ZeroTail { .. }, None) => {}
            }
        }
    };
    let hash_batch = |batch: &[Piece]| -> Result<Vec<Option<Vec<u8>>>> {
        batch
            .par_iter()
            .map_init(Vec::new, |buf, p| {
                let (offset, len) = match *p {
                    Piece::Data { offset, len } => (offset, len),
                    Piece::Zeros { .. } => return Ok(None),
                    Piece::ZeroTail { len } => {
                        if let Some(c) = counters {
                            c.done.fetch_add(len, Ordering::Relaxed);
                        }
                        return Ok(Some(D::digest(vec![0; len as usize]).to_vec()));
                    }
                };
                buf.resize(len as usize, 0);
                chain.read(offset, buf)?;
                let mut out = Vec::with_capacity(len.div_ceil(BLOCK_SIZE) as usize * zero_md.len());
                for block in buf.chunks(BLOCK_SIZE as usize) {
                    if block.len() == BLOCK_SIZE as usize && is_zero(block) {
                        out.extend_from_slice(&zero_md);
                    } else {
                        out.extend_from_slice(&D::digest(block));
                    }
                }
                if let Some(c) = counters {
                    c.done.fetch_add(len, Ordering::Relaxed);
                    c.copied.fetch_add(len, Ordering::Relaxed);
                }
                Ok(Some(out))
            })
            .collect()
    };

    // Two stages: the workers hash one batch while the outer hash takes the one before (and
    // the allocation of the next window is looked up).
    let mut queue = std::collections::VecDeque::from(window(0)?);
    let mut looked_up = WINDOW.min(size);
    // The batch hashed last: its pieces and their digests (`None`: a zero block).
    type Hashed = (Vec<Piece>, Vec<Option<Vec<u8>>>);
    let mut prev: Option<Hashed> = None;
    pool.install(|| -> Result<()> {
        loop {
            let mut bytes = 0;
            let mut batch = Vec::new();
            while let Some(p) = queue.front() {
                if bytes >= BATCH && !batch.is_empty() {
                    break;
                }
                if let Piece::Data { len, .. } = *p {
                    bytes += len;
                }
                batch.extend(queue.pop_front());
            }
            read += bytes;
            let more = queue.is_empty() && looked_up < size;
            let (next, hashed) = rayon::join(
                || {
                    if let Some((b, d)) = prev.take() {
                        feed(&mut outer, &b, d);
                    }
                    more.then(|| window(looked_up)).transpose()
                },
                || hash_batch(&batch),
            );
            if let Some(next) = next? {
                queue.extend(next);
                looked_up = looked_up.saturating_add(WINDOW).min(size);
            }
            let hashed = hashed?;
            let stopping = || {
                opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
                    || opts.job.is_some_and(|j| j.cancel_requested())
            };
            if stopping() {
                return Err(Error::Interrupted(0));
            }
            if let Some(job) = opts.job {
                // Nothing to commit: a checksum only reads.
                job.checkpoint(opts.cancel.unwrap_or(&AtomicBool::new(false)));
                if stopping() {
                    return Err(Error::Interrupted(0));
                }
                job.limiter().wait(bytes);
            }
            if !batch.is_empty() {
                prev = Some((batch, hashed));
            } else if queue.is_empty() && looked_up >= size {
                return Ok(());
            }
        }
    })?;
    outer.update(size.to_le_bytes());
    Ok((outer.finalize().to_vec(), read))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, length: u64, zero: bool) -> blockstatus::Entry {
        blockstatus::Entry {
            start,
            length,
            depth: 0,
            present: true,
            zero,
            data: !zero,
            compressed: false,
            offset: None,
            layer: 0,
            file: None,
        }
    }

    const B: u64 = BLOCK_SIZE;

    #[test]
    fn blocks_touched_by_data_are_read_and_the_rest_are_zeros() {
        // Data in the middle of block 2 and spanning blocks 20..=37 of a 40.5-block disk.
        let size = 40 * B + B / 2;
        let entries = [
            entry(0, 2 * B + 10, true),
            entry(2 * B + 10, 100, false),
            entry(2 * B + 110, 18 * B, true),
            entry(20 * B + 110, 18 * B, false),
            entry(38 * B + 110, size - 38 * B - 110, true),
        ];
        assert_eq!(
            pieces(&entries, 0, size),
            vec![
                Piece::Zeros { blocks: 2 },
                Piece::Data {
                    offset: 2 * B,
                    len: B
                },
                Piece::Zeros { blocks: 17 },
                Piece::Data {
                    offset: 20 * B,
                    len: CHUNK
                },
                Piece::Data {
                    offset: 20 * B + CHUNK,
                    len: 3 * B
                },
                Piece::Zeros { blocks: 1 },
                // The partial last block is hashed as its bytes.
                Piece::ZeroTail { len: B / 2 },
            ]
        );
    }

    #[test]
    fn a_data_tail_shorter_than_a_block_is_read_as_it_is() {
        let size = 3 * B + 7;
        let entries = [entry(0, B, true), entry(B, size - B, false)];
        assert_eq!(
            pieces(&entries, 0, size),
            vec![
                Piece::Zeros { blocks: 1 },
                Piece::Data {
                    offset: B,
                    len: 2 * B + 7
                },
            ]
        );
        assert_eq!(pieces(&[], 0, 0), vec![]);
        // A window further on: blocks are counted from its start.
        let entries = [
            entry(2 * B, B, true),
            entry(3 * B, 10, false),
            entry(3 * B + 10, B - 10, true),
        ];
        assert_eq!(
            pieces(&entries, 2 * B, 4 * B),
            vec![
                Piece::Zeros { blocks: 1 },
                Piece::Data {
                    offset: 3 * B,
                    len: B
                }
            ]
        );
    }

    #[test]
    fn algorithm_names_are_openssls() {
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::from_name(a.name()), Some(a));
        }
        assert_eq!(
            Algorithm::from_name("SHA512-256"),
            Some(Algorithm::Sha512_256)
        );
        assert_eq!(Algorithm::from_name("md5"), None);
        assert_eq!(Algorithm::default(), Algorithm::Sha256);
    }
}
