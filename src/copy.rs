//! The copy engine shared by `convert`, `stream` and `rebase`: copies planned extents from a
//! source chain into a target image with rayon workers, detects zeros, honours the rate cap
//! and stops cleanly on request.
//!
//! Work is cut into chunks (aligned to the target's allocation unit) and grouped into batches;
//! workers copy a batch in parallel, then the target commits it (crash-safe, see the formats
//! crate). An interruption therefore loses at most the batch in flight, and what was committed
//! stays: re-running resumes.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use cowimg_formats::{is_zero, Image, ReadBelow};

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::ratelimit::RateLimiter;

/// Largest piece one worker copies at a time.
const CHUNK: u64 = 2 << 20;
/// Data copied between two commits when unthrottled.
const BATCH: u64 = 512 << 20;
/// Longest a batch should take under a rate cap, so that an interruption loses little.
const BATCH_TIME: Duration = Duration::from_secs(2);

/// Test hook for the crash tests: `COWIMG_TEST_ABORT_AFTER_CHUNKS=N` aborts the process (as a
/// kill would) once N chunks have been written, whether or not their batch was committed.
fn fault_hook() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("COWIMG_TEST_ABORT_AFTER_CHUNKS")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// Test hook: `COWIMG_TEST_BATCH_BYTES` sets the data per commit, so that crash tests see
/// several commits in a small image.
fn test_batch_bytes() -> Option<u64> {
    static BYTES: OnceLock<Option<u64>> = OnceLock::new();
    *BYTES.get_or_init(|| {
        std::env::var("COWIMG_TEST_BATCH_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

static CHUNKS_DONE: AtomicU64 = AtomicU64::new(0);

/// What to do with a guest range of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Copy what the source reads there.
    Copy,
    /// Make it read as zeros, hiding whatever lies below.
    Zero,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
    pub action: Action,
}

/// Counters shown by progress reporters, updated by the workers.
#[derive(Default)]
pub struct Counters {
    /// Guest bytes dealt with (copied, zeroed or found already done).
    pub done: AtomicU64,
    /// Bytes of data written into the target.
    pub copied: AtomicU64,
}

/// Zero data found in a copied range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroData {
    /// Leave it unallocated (nothing below the target shows through).
    Skip,
    /// Store it as zero clusters (something below would show through otherwise).
    Mark,
}

pub struct Copier<'a> {
    pub source: &'a Chain,
    /// Layer of `source` the data is read from (layers below it show through).
    pub source_layer: usize,
    pub target: &'a dyn Image,
    pub target_name: &'a str,
    /// What the target's unallocated ranges read (to complete partially written clusters).
    pub below: &'a dyn ReadBelow,
    pub zero_data: ZeroData,
    pub limiter: &'a RateLimiter,
    pub cancel: &'a AtomicBool,
    pub counters: &'a Counters,
    pub jobs: usize,
    /// When set, units that already read the same through this chain are left alone (a
    /// safe rebase onto an unrelated backing file copies only what would change).
    pub compare: Option<&'a Chain>,
    /// Store clusters compressed where they shrink (qcow2; whole clusters).
    pub compress: bool,
}

/// Splits sorted extents at multiples of `window`; the pieces of one window form one piece of
/// work, so no two workers ever touch the same window (and hence the same cluster).
fn windows(extents: &[Extent], window: u64) -> Vec<Vec<Extent>> {
    let mut out: Vec<Vec<Extent>> = Vec::new();
    let mut current: Option<u64> = None;
    for e in extents {
        let mut start = e.start;
        let end = e.start + e.len;
        while start < end {
            let w = start / window;
            let piece_end = end.min((w + 1) * window);
            let piece = Extent {
                start,
                len: piece_end - start,
                action: e.action,
            };
            if current == Some(w) {
                if let Some(last) = out.last_mut() {
                    last.push(piece);
                }
            } else {
                out.push(vec![piece]);
                current = Some(w);
            }
            start = piece_end;
        }
    }
    out
}

/// A batch's shared state: whose turn it is to store, in chunk order (compressing copies),
/// and the batch's first error. The error and the stop signal are one state under one lock, so
/// a worker can only see the batch stopped once the error that stopped it is recorded: what
/// the others fail with afterwards ("another copy worker failed") is never the one reported.
#[derive(Default)]
struct Turn {
    state: Mutex<TurnState>,
    cv: Condvar,
}

#[derive(Default)]
struct TurnState {
    /// The index of the chunk whose turn it is to store.
    next: usize,
    /// The first error of the batch; once set, every worker stops at its next step.
    failed: Option<Error>,
}

impl Turn {
    fn lock(&self) -> std::sync::MutexGuard<'_, TurnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn aborted(&self) -> bool {
        self.lock().failed.is_some()
    }

    /// Records `e` unless an earlier error stopped the batch, and stops it.
    fn fail(&self, e: Error) {
        self.lock().failed.get_or_insert(e);
        self.cv.notify_all();
    }

    /// The batch's outcome: its first error, if any.
    fn into_result(self) -> Result<()> {
        match self
            .state
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .failed
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A chunk's place in the order. Its turn passes on when the ticket is dropped, whatever
/// the chunk did (stored, found nothing to store, failed, was cancelled).
struct Ticket<'a> {
    turn: &'a Turn,
    index: usize,
}

impl Ticket<'_> {
    /// Waits until every earlier chunk of the batch has stored its data.
    fn wait(&self) -> Result<()> {
        let mut s = self.turn.lock();
        while s.next < self.index && s.failed.is_none() {
            s = self.turn.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.failed.is_some() {
            // Never reported: the batch already holds the error that stopped it.
            return Err(Error::Msg("another copy worker failed".into()));
        }
        Ok(())
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut s = self.turn.lock();
        // Wait for our turn only to pass it on: earlier chunks may still be storing.
        while s.next < self.index && s.failed.is_none() {
            s = self.turn.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.next = s.next.max(self.index + 1);
        self.turn.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_never_share_a_window() {
        let e = |start, len, action| Extent { start, len, action };
        let w = windows(
            &[
                e(0, 10, Action::Copy),
                e(20, 100, Action::Zero),
                e(130, 5, Action::Copy),
                e(300, 1, Action::Copy),
            ],
            64,
        );
        assert_eq!(
            w,
            vec![
                vec![e(0, 10, Action::Copy), e(20, 44, Action::Zero)],
                vec![e(64, 56, Action::Zero)],
                vec![e(130, 5, Action::Copy)],
                vec![e(300, 1, Action::Copy)],
            ]
        );
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    Same,
    Zero,
    Data,
}

impl Copier<'_> {
    /// Copies `extents` (sorted, disjoint, aligned to the target's allocation unit except at
    /// the image's end). Everything copied is committed, also when stopped or failing.
    pub fn run(&self, extents: &[Extent]) -> Result<()> {
        // Compression works on whole clusters, so then the cluster is the unit.
        let unit = if self.compress {
            self.target.cluster_size().unwrap_or(512)
        } else {
            self.target.allocation_unit().max(512)
        };
        // Work is handed out in windows aligned to whole clusters: two workers must never
        // touch one cluster (with extended L2 the unit is a subcluster, but a cluster is
        // allocated and its bitmap updated as one).
        let cluster = self.target.cluster_size().unwrap_or(unit).max(unit);
        let window = CHUNK.div_ceil(cluster).max(1) * cluster;
        let chunks = windows(extents, window);
        let chunk = window;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.jobs.max(1))
            .build()
            .map_err(|e| Error::Msg(format!("starting worker threads: {e}")))?;
        let batch_bytes = if let Some(b) = test_batch_bytes() {
            b
        } else if self.limiter.unlimited() {
            BATCH
        } else {
            // About BATCH_TIME worth of copying at the cap.
            (self.limiter.rate() * BATCH_TIME.as_secs()).clamp(chunk, BATCH)
        };
        let mut i = 0;
        while i < chunks.len() {
            let mut j = i;
            let mut bytes = 0;
            while j < chunks.len() && (bytes < batch_bytes || j == i) {
                bytes += chunks[j]
                    .iter()
                    .filter(|e| e.action == Action::Copy)
                    .map(|e| e.len)
                    .sum::<u64>();
                j += 1;
            }
            let result = self.run_batch(&pool, &chunks[i..j], unit);
            let pause = std::time::Instant::now();
            let committed = self
                .target
                .commit()
                .map_err(|e| Error::image(self.target_name, e));
            self.limiter.credit(pause.elapsed());
            result?;
            committed?;
            if self.cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted(0));
            }
            i = j;
        }
        Ok(())
    }

    /// Copies one batch with `jobs` workers taking chunks in order. When compressing, the
    /// workers compress in parallel but store in chunk order (each waits for its turn), so
    /// compressed clusters pack back to back as qemu packs them.
    fn run_batch(&self, pool: &rayon::ThreadPool, chunks: &[Vec<Extent>], unit: u64) -> Result<()> {
        let next = AtomicUsize::new(0);
        let turn = Turn::default();
        pool.scope(|scope| {
            for _ in 0..self.jobs.max(1) {
                scope.spawn(|_| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= chunks.len() || turn.aborted() {
                        return;
                    }
                    let ticket = self.compress.then(|| Ticket {
                        turn: &turn,
                        index: i,
                    });
                    let r = chunks[i]
                        .iter()
                        .try_for_each(|piece| self.copy_chunk(piece, unit, ticket.as_ref()));
                    if let Err(e) = r {
                        turn.fail(e);
                        return;
                    }
                });
            }
        });
        turn.into_result()
    }

    fn copy_chunk(&self, c: &Extent, unit: u64, ticket: Option<&Ticket>) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        let below = self.below;
        let err = |e| Error::image(self.target_name, e);
        if c.action == Action::Zero {
            self.target
                .write_zeroes(c.start, c.len, below)
                .map_err(err)?;
            self.counters.done.fetch_add(c.len, Ordering::Relaxed);
            return Ok(());
        }
        let mut buf = vec![0u8; c.len as usize];
        if self.source_layer == 0 {
            // Reading the named image: its copy-on-read flag applies.
            self.source.read(c.start, &mut buf)?;
        } else {
            self.source
                .read_from(self.source_layer, c.start, &mut buf)?;
        }
        let new = match self.compare {
            Some(other) => {
                let mut b = vec![0u8; c.len as usize];
                other.read(c.start, &mut b)?;
                Some(b)
            }
            None => None,
        };
        let unit_end = |p: usize| {
            (((c.start + p as u64) / unit + 1) * unit - c.start).min(buf.len() as u64) as usize
        };
        let kind = |p: usize| {
            let r = p..unit_end(p);
            if new.as_ref().is_some_and(|n| n[r.clone()] == buf[r.clone()]) {
                Unit::Same
            } else if is_zero(&buf[r]) {
                Unit::Zero
            } else {
                Unit::Data
            }
        };
        // Runs of units of one kind: data is written, zeros marked (or skipped), units that
        // already read the same under the new backing file are left alone.
        let mut pos = 0usize;
        while pos < buf.len() {
            let k = kind(pos);
            let mut end = unit_end(pos);
            while end < buf.len() && kind(end) == k {
                end = unit_end(end);
            }
            let at = c.start + pos as u64;
            match k {
                Unit::Data => {
                    self.limiter.wait((end - pos) as u64);
                    if let Some(ticket) = ticket {
                        // Cluster by cluster, compressed on this worker, stored in chunk order;
                        // what does not shrink is written plainly.
                        let mut compressed = Vec::new();
                        let mut p = pos;
                        while p < end {
                            let q = unit_end(p).min(end);
                            compressed.push((
                                p,
                                q,
                                self.target.compress_cluster(&buf[p..q]).map_err(err)?,
                            ));
                            p = q;
                        }
                        ticket.wait()?;
                        for (p, q, z) in compressed {
                            let at = c.start + p as u64;
                            let stored = match &z {
                                Some(z) => self.target.write_compressed(at, z).map_err(err)?,
                                None => false,
                            };
                            if !stored {
                                self.target.write(at, &buf[p..q], below).map_err(err)?;
                            }
                        }
                    } else {
                        self.target.write(at, &buf[pos..end], below).map_err(err)?;
                    }
                    self.counters
                        .copied
                        .fetch_add((end - pos) as u64, Ordering::Relaxed);
                }
                Unit::Zero if self.zero_data == ZeroData::Mark => {
                    self.target
                        .write_zeroes(at, (end - pos) as u64, below)
                        .map_err(err)?;
                }
                _ => {}
            }
            pos = end;
        }
        self.counters.done.fetch_add(c.len, Ordering::Relaxed);
        if let Some(limit) = fault_hook() {
            if CHUNKS_DONE.fetch_add(1, Ordering::SeqCst) + 1 >= limit {
                std::process::abort();
            }
        }
        Ok(())
    }
}
