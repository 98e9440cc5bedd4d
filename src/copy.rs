//! The copy engine shared by `convert`, `stream` and `rebase`: copies planned extents from a
//! source chain into a target image with rayon workers, detects zeros, honours the rate cap
//! and stops cleanly on request.
//!
//! Work is cut into chunks (aligned to the target's allocation unit) and grouped into batches;
//! workers copy a batch in parallel, then the target commits it (crash-safe, see the formats
//! crate). An interruption therefore loses at most the batch in flight, and what was committed
//! stays: re-running resumes.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use cowimg_formats::{is_zero, Image, ReadBelow};

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::job::JobHandle;
use crate::ratelimit::RateLimiter;

/// Largest piece one worker copies at a time.
const CHUNK: u64 = 2 << 20;
/// Data copied between two commits when unthrottled.
const BATCH: u64 = 512 << 20;
/// Longest a batch should take under a rate cap, so that an interruption loses little.
const BATCH_TIME: Duration = Duration::from_secs(2);

/// Largest range one zeroing request of [`Copier::zero`] covers (a raw target zeroes it
/// in one go: one WRITE_ZEROES on an NBD export).
const ZERO_PIECE: u64 = 1 << 30;

/// Test hook for the crash tests: `COWIMG_TEST_ABORT_AFTER_CHUNKS=N` aborts the process (as a
/// kill would) once N chunks have been written, whether or not their batch was committed.
/// Only in builds with the `fault-injection` feature (the tests'); else always `None`.
fn fault_hook() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    test_env(&LIMIT, "COWIMG_TEST_ABORT_AFTER_CHUNKS")
}

/// Test hook: `COWIMG_TEST_BATCH_BYTES` sets the data per commit, so that crash tests see
/// several commits in a small image (`fault-injection` builds only).
fn test_batch_bytes() -> Option<u64> {
    static BYTES: OnceLock<Option<u64>> = OnceLock::new();
    test_env(&BYTES, "COWIMG_TEST_BATCH_BYTES")
}

/// The number in the environment variable `name`, read once into `cell`.
#[cfg(feature = "fault-injection")]
fn test_env(cell: &OnceLock<Option<u64>>, name: &str) -> Option<u64> {
    *cell.get_or_init(|| std::env::var(name).ok().and_then(|v| v.parse().ok()))
}

#[cfg(not(feature = "fault-injection"))]
fn test_env(_: &OnceLock<Option<u64>>, _: &str) -> Option<u64> {
    None
}

static CHUNKS_DONE: AtomicU64 = AtomicU64::new(0);

// The extents a copy works through are planned with `crate::extent`; named here too, where
// the copy engine's users have always found them.
pub use crate::extent::{Action, Extent};

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

/// The copy engine: extents of `source` copied into `target` by parallel workers, in
/// batches committed one after the other, under a rate cap, until done or cancelled. Used by
/// stream, rebase, commit and convert.
pub struct Copier<'a> {
    /// What is read.
    pub source: &'a Chain,
    /// Layer of `source` the data is read from (layers below it show through).
    pub source_layer: usize,
    /// What is written.
    pub target: &'a dyn Image,
    /// Its name, for errors.
    pub target_name: &'a str,
    /// What the target's unallocated ranges read (to complete partially written clusters).
    pub below: &'a dyn ReadBelow,
    /// What zeros found in the data become.
    pub zero_data: ZeroData,
    /// The rate cap.
    pub limiter: &'a RateLimiter,
    /// Set (by a signal handler) to stop at the next chunk, committing what was copied.
    pub cancel: &'a AtomicBool,
    /// Progress, for reporters.
    pub counters: &'a Counters,
    /// Copy workers; 0: chosen for the source ([`auto_jobs`]).
    pub jobs: usize,
    /// When set, units that already read the same through this chain are left alone (a
    /// safe rebase onto an unrelated backing file copies only what would change).
    pub compare: Option<&'a Chain>,
    /// Store clusters compressed where they shrink (qcow2; whole clusters).
    pub compress: bool,
    /// Where the source's byte 0 lands in the target: extents are in target offsets and the
    /// source is read `shift` bytes lower (convert writes several sources one after another).
    pub shift: u64,
    /// Zero detection in copied data: `Some(n)`: zero units are zeros (see `zero_data`) where
    /// they run at least `n` bytes, shorter runs are written as data (convert's `-S`);
    /// `None`: every byte is written as data.
    pub sparse: Option<u64>,
    /// Copy only into units the target still leaves unallocated, with
    /// [`Image::fill_unallocated`], as copy-on-read fills do: the target is live (`serve
    /// --stream`) and a client write that allocated a unit first is newer data than the copy.
    /// Zeros to mark are then written as data, which the fill can decide under its lock.
    pub fill: bool,
    /// The job this copy runs as: its pause and cancel requests are honoured between
    /// chunks (a pause commits first), and its limiter should be `limiter`.
    pub job: Option<&'a JobHandle>,
}

/// Workers an HTTP source gets by default: each of its reads waits a round trip, and many in
/// flight hide it (a 1 GiB file 2 ms away: 4.2 s with 2 workers, 1.5 s with 16; 10 ms away:
/// 6.7 s and 1.6 s; docs/benchmarks.md).
const HTTP_JOBS: usize = 16;

/// Workers an NBD source gets by default. Each worker keeps its reads pipelined on the
/// connections, so fewer are needed than for HTTP, and more only contend for the CPU and the
/// target's inode lock at low latency (256 MiB 2 ms away on 2 cores: 0.24 s with 2 workers,
/// 0.16 s with 8, 0.19 s with 16; 10 ms away: 0.75, 0.23 and 0.20 s).
const NBD_JOBS: usize = 8;

/// The default number of copy workers for `source`: one per core, and at least
/// 16 (`HTTP_JOBS`) or 8 (`NBD_JOBS`) when a layer is remote (the larger when both are).
pub fn auto_jobs(source: &Chain) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    source
        .layers
        .iter()
        .map(|l| match l.image.storage().protocol() {
            "http" | "https" => HTTP_JOBS,
            "nbd" => NBD_JOBS,
            _ => 1,
        })
        .fold(cores, usize::max)
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

impl Copier<'_> {
    /// Makes the `(start, end)` ranges of a raw target read as zeros, in large pieces spread
    /// over the workers, then commits. A raw target has no clusters for workers to share, so
    /// the pieces need not follow [`Copier::run`]'s windows; each is one request to the
    /// storage (WRITE_ZEROES on an NBD export) instead of one per copy window.
    pub fn zero(&self, ranges: &[(u64, u64)]) -> Result<()> {
        let mut pieces = Vec::new();
        for &(start, end) in ranges {
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(ZERO_PIECE);
                pieces.push((pos, n));
                pos += n;
            }
        }
        let pool = self.pool()?;
        let (zeroed, _) = self.spread(&pool, pieces.len(), false, |i, _| {
            if self.stopping() {
                return Ok(());
            }
            let (at, n) = pieces[i];
            self.target
                .write_zeroes(at, n, self.below)
                .map_err(|e| Error::image(self.target_name, e))?;
            self.counters.done.fetch_add(n, Ordering::Relaxed);
            Ok(())
        });
        let committed = self
            .target
            .commit()
            .map_err(|e| Error::image(self.target_name, e));
        zeroed?;
        committed?;
        if self.stopping() {
            return Err(Error::Interrupted(0));
        }
        Ok(())
    }

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
        // A window holds at least the shortest zero run left as a hole, which is found
        // within one window.
        let window = CHUNK.max(self.sparse.unwrap_or(0)).div_ceil(cluster).max(1) * cluster;
        let chunks = windows(extents, window);
        let chunk = window;
        let pool = self.pool()?;
        let mut i = 0;
        while i < chunks.len() {
            // Looked at for every batch: `job set-speed` may have changed the cap.
            let batch_bytes = if let Some(b) = test_batch_bytes() {
                b
            } else if self.limiter.unlimited() {
                BATCH
            } else {
                // About BATCH_TIME worth of copying at the cap.
                (self.limiter.rate() * BATCH_TIME.as_secs()).clamp(chunk, BATCH)
            };
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
            let (result, taken) = self.run_batch(&pool, &chunks[i..j], unit);
            let pause = std::time::Instant::now();
            let committed = self
                .target
                .commit()
                .map_err(|e| Error::image(self.target_name, e));
            self.limiter.credit(pause.elapsed());
            result?;
            committed?;
            if self.stopping() {
                return Err(Error::Interrupted(0));
            }
            // A pause asked for cut the batch short at `taken`; everything copied is now
            // committed, so the job may wait (and be killed) safely.
            if let Some(job) = self.job {
                job.checkpoint(self.cancel);
                if self.stopping() {
                    return Err(Error::Interrupted(0));
                }
            }
            i += taken;
        }
        Ok(())
    }

    /// Whether the copy should stop: a signal, or the job's cancel.
    fn stopping(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.job.is_some_and(|j| j.cancel_requested())
    }

    /// Whether workers should take no new chunk (the job is to pause).
    fn pausing(&self) -> bool {
        self.job.is_some_and(|j| j.pause_requested())
    }

    /// Copies one batch with `jobs` workers taking windows in order. Each worker reads and
    /// sorts its window in parallel with the others, then, in window order (each waits for
    /// its turn), sets aside the space its data will take, marks zeros and stores compressed
    /// clusters, and then writes its data in parallel again. The file's layout thus follows
    /// guest order, not the order in which workers finish: the same input gives the same
    /// file whatever `--jobs` is, and compressed clusters pack back to back as qemu packs them.
    ///
    /// Returns the outcome and how many windows were taken: all of them, unless a pause was
    /// asked for, when workers stop taking new ones (those taken are a prefix, each finished).
    fn run_batch(
        &self,
        pool: &rayon::ThreadPool,
        chunks: &[Vec<Extent>],
        unit: u64,
    ) -> (Result<()>, usize) {
        self.spread(pool, chunks.len(), true, |i, turn| {
            let ticket = Ticket { turn, index: i };
            self.copy_window(&chunks[i], unit, ticket)
        })
    }

    /// The number of workers: `jobs`, or the source's default.
    fn workers(&self) -> usize {
        match self.jobs {
            0 => auto_jobs(self.source),
            n => n,
        }
    }

    /// The workers' threads.
    fn pool(&self) -> Result<rayon::ThreadPool> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(self.workers())
            .build()
            .map_err(|e| Error::Msg(format!("starting worker threads: {e}")))
    }

    /// Runs `work(i, turn)` for every `i` in `0..n` on the workers, which take the indexes in
    /// order; the first failure stops the rest and is the outcome. When `pausable`, workers
    /// take no new index once the job is to pause. Returns the outcome and how many indexes
    /// were taken (a prefix of `0..n`, each finished).
    fn spread(
        &self,
        pool: &rayon::ThreadPool,
        n: usize,
        pausable: bool,
        work: impl Fn(usize, &Turn) -> Result<()> + Sync,
    ) -> (Result<()>, usize) {
        let next = AtomicUsize::new(0);
        let turn = Turn::default();
        pool.scope(|scope| {
            for _ in 0..self.workers() {
                scope.spawn(|_| loop {
                    // Checked before taking a window, so the windows taken stay contiguous.
                    if pausable && self.pausing() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n || turn.aborted() {
                        return;
                    }
                    if let Err(e) = work(i, &turn) {
                        turn.fail(e);
                        return;
                    }
                });
            }
        });
        let taken = next.into_inner().min(n);
        (turn.into_result(), taken)
    }

    /// Copies the pieces of one window: read and sort, then in turn reserve, then write.
    fn copy_window(&self, pieces: &[Extent], unit: u64, ticket: Ticket) -> Result<()> {
        let mut prepared = Vec::with_capacity(pieces.len());
        for piece in pieces {
            if self.stopping() {
                return Ok(());
            }
            prepared.push(self.prepare(piece, unit)?);
        }
        if self.fill {
            // Fills decide their allocation under the image's cluster locks: no ordering.
            drop(ticket);
            return self.fill_prepared(&prepared);
        }
        ticket.wait()?;
        let mut plain = Vec::with_capacity(prepared.len());
        for p in &prepared {
            plain.push(self.store_in_order(p)?);
        }
        // The next window may reserve now: what is left is writing into space set aside.
        drop(ticket);
        let err = |e| Error::image(self.target_name, e);
        for (p, plain) in prepared.iter().zip(plain) {
            for r in plain {
                self.target
                    .write(p.start + r.start as u64, &p.buf[r], self.below)
                    .map_err(err)?;
            }
            self.counters
                .copied
                .fetch_add(p.data_bytes(), Ordering::Relaxed);
            self.counters.done.fetch_add(p.len, Ordering::Relaxed);
            self.fault_hook();
        }
        Ok(())
    }

    /// Stores prepared pieces with conditional fills (see [`Copier::fill`]).
    fn fill_prepared(&self, prepared: &[Prepared]) -> Result<()> {
        let err = |e| Error::image(self.target_name, e);
        for p in prepared {
            let mut filled = 0;
            for step in &p.steps {
                let (r, zeros) = match step {
                    Step::Data(r) | Step::Compressed(r, _) => (r, false),
                    Step::Zeros(r) => (r, true),
                };
                let at = p.start + r.start as u64;
                filled += if zeros {
                    let zeros = vec![0u8; r.len()];
                    self.target.fill_unallocated(at, &zeros, self.below)
                } else {
                    self.target
                        .fill_unallocated(at, &p.buf[r.clone()], self.below)
                }
                .map_err(err)?;
            }
            self.counters.copied.fetch_add(filled, Ordering::Relaxed);
            self.counters.done.fetch_add(p.len, Ordering::Relaxed);
            self.fault_hook();
        }
        Ok(())
    }

    /// The crash tests' hook (see [`fault_hook`]), after each chunk written.
    fn fault_hook(&self) {
        if let Some(limit) = fault_hook() {
            if CHUNKS_DONE.fetch_add(1, Ordering::SeqCst) + 1 >= limit {
                std::process::abort();
            }
        }
    }

    /// Reads a piece and sorts it into steps: runs of data to write (compressed, when
    /// compressing), zeros to mark; units that read as they should already are left alone.
    fn prepare(&self, c: &Extent, unit: u64) -> Result<Prepared> {
        let mut p = Prepared {
            start: c.start,
            len: c.len,
            buf: Vec::new(),
            steps: Vec::new(),
        };
        if c.action == Action::Zero {
            p.steps.push(Step::Zeros(0..c.len as usize));
            return Ok(p);
        }
        let mut buf = vec![0u8; c.len as usize];
        let from = c.start - self.shift;
        if self.source_layer == 0 {
            // Reading the named image: its copy-on-read flag applies.
            self.source.read(from, &mut buf)?;
        } else {
            self.source.read_from(self.source_layer, from, &mut buf)?;
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
            } else if self.sparse.is_some() && is_zero(&buf[r]) {
                Unit::Zero
            } else {
                Unit::Data
            }
        };
        let min_zeros = self.sparse.unwrap_or(0) as usize;
        let mut pos = 0usize;
        while pos < buf.len() {
            let mut k = kind(pos);
            let mut end = unit_end(pos);
            while end < buf.len() && kind(end) == k {
                end = unit_end(end);
            }
            // A zero run too short to be a hole (`-S`) is data, as qemu-img writes it: inside
            // a piece, not at either end of it.
            if k == Unit::Zero && end - pos < min_zeros && pos > 0 && end < buf.len() {
                k = Unit::Data;
            }
            match k {
                Unit::Data if self.compress => {
                    // Compressed here, on this worker, cluster by cluster.
                    let mut q = pos;
                    while q < end {
                        let r = q..unit_end(q).min(end);
                        let z = self
                            .target
                            .compress_cluster(&buf[r.clone()])
                            .map_err(|e| Error::image(self.target_name, e))?;
                        q = r.end;
                        p.steps.push(Step::Compressed(r, z));
                    }
                }
                Unit::Data => p.steps.push(Step::Data(pos..end)),
                Unit::Zero if self.zero_data == ZeroData::Mark => {
                    p.steps.push(Step::Zeros(pos..end))
                }
                _ => {}
            }
            pos = end;
        }
        // The cap bounds what is stored and what crosses the network, whichever is more: a
        // remote source's zeros and metadata are transferred too.
        let network = self.source.network_since() + self.compare.map_or(0, Chain::network_since);
        self.limiter.wait(p.data_bytes().max(network));
        p.buf = buf;
        Ok(p)
    }

    /// The ordered part of storing a piece: reserves the space of its data, marks its zeros,
    /// stores its compressed clusters. Returns the ranges still to write (plain data).
    fn store_in_order(&self, p: &Prepared) -> Result<Vec<Range<usize>>> {
        let err = |e| Error::image(self.target_name, e);
        let at = |r: &Range<usize>| p.start + r.start as u64;
        let mut plain = Vec::new();
        for step in &p.steps {
            let r = match step {
                Step::Zeros(r) => {
                    self.target
                        .write_zeroes(at(r), r.len() as u64, self.below)
                        .map_err(err)?;
                    continue;
                }
                Step::Compressed(r, Some(z))
                    if self.target.write_compressed(at(r), z).map_err(err)? =>
                {
                    continue;
                }
                Step::Data(r) | Step::Compressed(r, _) => r,
            };
            self.target.reserve(at(r), r.len() as u64).map_err(err)?;
            plain.push(r.clone());
        }
        Ok(plain)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    Same,
    Zero,
    Data,
}

/// What storing a piece takes, in ranges of the piece's buffer.
enum Step {
    /// Data to write plainly.
    Data(Range<usize>),
    /// One cluster of data and its compressed form (`None`: it does not shrink).
    Compressed(Range<usize>, Option<Vec<u8>>),
    /// Zeros to mark (hiding what lies below).
    Zeros(Range<usize>),
}

/// A piece read and sorted, ready to store.
struct Prepared {
    start: u64,
    len: u64,
    buf: Vec<u8>,
    steps: Vec<Step>,
}

impl Prepared {
    /// The bytes of data the piece stores.
    fn data_bytes(&self) -> u64 {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Data(r) | Step::Compressed(r, _) => r.len() as u64,
                Step::Zeros(_) => 0,
            })
            .sum()
    }
}
