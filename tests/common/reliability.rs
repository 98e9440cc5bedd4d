//! Helpers of the reliability harnesses (`tests/reliability_*.rs`): a seeded random number
//! generator, storage doubles that record or fail I/O under the formats crate, crash states
//! built from a recorded log, and in-process runs of stream, rebase and copy-on-read over any
//! storage.
//!
//! Include with `mod common; #[path = "common/reliability.rs"] mod reliability;`.

#![allow(dead_code)]

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cowimg::chain::{open_layer, Chain, Layer, OpenOptions};
use cowimg::copy::Counters;
use cowimg::ratelimit::RateLimiter;
use cowimg::stream::{self, Settings};
use cowimg_formats::{BackingRef, FileStorage, Format, MemStorage, Storage};

/// A count from the environment (long runs), or the short CI default.
pub fn count(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The first seed of a run: `COWIMG_SEED` to replay a failure, else a fixed one (CI is
/// reproducible; long runs pass their own).
pub fn first_seed(default: u64) -> u64 {
    count("COWIMG_SEED", default)
}

/// xorshift64*: small, seeded, good enough to pick cases.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that nearby seeds start far apart.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// Uniform in `a..=b`.
    pub fn range(&mut self, a: u64, b: u64) -> u64 {
        a + self.below(b - a + 1)
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// One change to a file, as a recording storage saw it.
#[derive(Clone, Debug)]
pub enum IoOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Sync,
}

/// Storage that records every write, resize and sync it passes on.
#[derive(Debug)]
pub struct Recording<S: Storage> {
    pub inner: S,
    pub log: Mutex<Vec<IoOp>>,
}

impl<S: Storage> Recording<S> {
    pub fn new(inner: S) -> Recording<S> {
        Recording {
            inner,
            log: Mutex::new(Vec::new()),
        }
    }

    pub fn take_log(&self) -> Vec<IoOp> {
        std::mem::take(&mut self.log.lock().unwrap())
    }
}

impl<S: Storage> Storage for Recording<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // Logged under the lock with the write itself: concurrent writers are logged in the
        // order they reached the file.
        let mut log = self.log.lock().unwrap();
        self.inner.write_at(buf, offset)?;
        log.push(IoOp::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut log = self.log.lock().unwrap();
        self.inner.sync()?;
        log.push(IoOp::Sync);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut log = self.log.lock().unwrap();
        self.inner.set_len(len)?;
        log.push(IoOp::SetLen(len));
        Ok(())
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn data_extents(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        self.inner.data_extents(start, end)
    }
}

/// What a failing storage does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The `n`th write (counting from 1) and every later one fail with `errno`.
    WritesFrom { n: u64, errno: i32 },
    /// Writes that would make the file longer than `len` fail with ENOSPC (a full disk).
    Full { len: u64 },
    /// The `n`th sync and every later one fail with EIO.
    SyncsFrom { n: u64 },
    /// Reads fail with EIO from the `n`th on.
    ReadsFrom { n: u64 },
}

/// Storage that fails as told (EIO, ENOSPC, EACCES...).
#[derive(Debug)]
pub struct Failing<S: Storage> {
    pub inner: S,
    pub fault: Fault,
    writes: AtomicU64,
    syncs: AtomicU64,
    reads: AtomicU64,
    /// Set once a fault was injected.
    pub fired: AtomicBool,
}

impl<S: Storage> Failing<S> {
    pub fn new(inner: S, fault: Fault) -> Failing<S> {
        Failing {
            inner,
            fault,
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            fired: AtomicBool::new(false),
        }
    }

    fn fail(&self, errno: i32) -> io::Result<()> {
        self.fired.store(true, Ordering::SeqCst);
        Err(io::Error::from_raw_os_error(errno))
    }
}

impl<S: Storage> Storage for Failing<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        if let Fault::ReadsFrom { n: from } = self.fault {
            if n >= from {
                return self.fail(libc::EIO);
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        match self.fault {
            Fault::WritesFrom { n: from, errno } if n >= from => return self.fail(errno),
            Fault::Full { len } if offset + buf.len() as u64 > len.max(self.inner.len()?) => {
                // A full disk still takes what fits in blocks already allocated.
                return self.fail(libc::ENOSPC);
            }
            _ => {}
        }
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        let n = self.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        if let Fault::SyncsFrom { n: from } = self.fault {
            if n >= from {
                return self.fail(libc::EIO);
            }
        }
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if let Fault::Full { len: max } = self.fault {
            if len > max.max(self.inner.len()?) {
                return self.fail(libc::ENOSPC);
            }
        }
        self.inner.set_len(len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn data_extents(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        self.inner.data_extents(start, end)
    }
}

/// Opens `path` read-write without locking, as plain file storage.
pub fn file_storage(path: &Path) -> FileStorage {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image");
    FileStorage::new(f, path)
}

/// The chain of `top` (a path in the scratch directory) with its top image over `storage`.
/// The backing files are opened as cowimg opens them (read-only, locked).
pub fn chain_over(top: &Path, storage: Arc<dyn Storage>, copy_on_read: bool) -> Chain {
    let name = top.to_string_lossy().into_owned();
    let ro = Chain::open(&name, OpenOptions::read(None, true)).expect("open the chain");
    let format = ro.top().format;
    let mut layers: Vec<Layer> = ro.layers.into_iter().collect();
    layers[0] = open_layer(storage, &name, Some(format), true, false)
        .expect("open the top over test storage");
    if copy_on_read {
        Chain::from_layers_copy_on_read(layers)
    } else {
        Chain::from_layers(layers)
    }
}

/// Settings for an in-process copy: `jobs` workers, no rate cap, never cancelled.
pub fn with_settings<T>(jobs: usize, f: impl FnOnce(&Settings) -> T) -> T {
    let limiter = RateLimiter::new(0);
    let cancel = AtomicBool::new(false);
    let counters = Counters::default();
    let s = Settings {
        jobs,
        limiter: &limiter,
        cancel: &cancel,
        counters: &counters,
        compress: false,
        job: None,
    };
    f(&s)
}

/// `cowimg stream [--base layer base] TOP` in process, as the command runs it.
pub fn stream_in(chain: &Chain, base: Option<usize>, jobs: usize) -> cowimg::Result<()> {
    let base = base.unwrap_or(chain.layers.len());
    let size = chain.size();
    let plan = stream::plan(chain, base, 0, size)?;
    let keep_base = base < chain.layers.len();
    with_settings(jobs, |s| stream::copy(chain, &plan, keep_base, None, s))?;
    let backing = keep_base.then(|| BackingRef {
        name: stream::backing_name(chain, base),
        format: Some(chain.layers[base].format.name().to_string()),
    });
    stream::switch(chain, backing.as_ref())
}

/// `cowimg rebase -b NEW -F FMT TOP` (safe) in process: `new` is the new backing file as it is
/// stored (relative to the top's directory), `None` to flatten.
pub fn rebase_in(chain: &Chain, new: Option<(&str, Format)>, jobs: usize) -> cowimg::Result<()> {
    let top = &chain.top().filename;
    let resolved = new.map(|(n, _)| cowimg::chain::combine(top, n));
    let in_chain = match &resolved {
        None => Some(chain.layers.len()),
        Some(p) => chain.find(p),
    };
    let new_chain = match (&resolved, in_chain) {
        (Some(p), None) => Some(Chain::open(p, OpenOptions::read(new.map(|n| n.1), true))?),
        _ => None,
    };
    let plan = match (in_chain, &new_chain) {
        (Some(base), _) => stream::plan(chain, base, 0, chain.size())?,
        (None, Some(nc)) => stream::plan_against(chain, nc)?,
        _ => unreachable!(),
    };
    let backing = new.map(|(n, f)| BackingRef {
        name: n.to_string(),
        format: Some(f.name().to_string()),
    });
    with_settings(jobs, |s| {
        stream::copy(chain, &plan, new.is_some(), new_chain.as_ref(), s)
    })?;
    stream::switch(chain, backing.as_ref())
}

/// Reads the whole guest disk through a chain (copy-on-read applies when the chain has it),
/// in pieces of `piece` bytes, then makes the fills durable.
pub fn read_all(chain: &Chain, piece: u64) -> cowimg::Result<Vec<u8>> {
    let size = chain.size();
    let mut out = vec![0u8; size as usize];
    let mut at = 0;
    while at < size {
        let n = piece.min(size - at);
        chain.read(at, &mut out[at as usize..(at + n) as usize])?;
        at += n;
    }
    chain.finish()?;
    Ok(out)
}

/// Applies one change to a file image in memory.
fn apply(file: &mut Vec<u8>, op: &IoOp) {
    match op {
        IoOp::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[*offset as usize..end].copy_from_slice(data);
        }
        IoOp::SetLen(n) => file.resize(*n as usize, 0),
        IoOp::Sync => {}
    }
}

/// Persistence unit for torn writes: a page of the page cache.
const PAGE: u64 = 4096;

/// Applies a write of which only some pages reached the disk.
fn apply_torn(file: &mut Vec<u8>, offset: u64, data: &[u8], rng: &mut Rng) {
    let end = offset + data.len() as u64;
    let mut at = offset;
    while at < end {
        let next = ((at / PAGE + 1) * PAGE).min(end);
        if rng.chance(1, 2) {
            let piece = &data[(at - offset) as usize..(next - offset) as usize];
            apply(
                file,
                &IoOp::Write {
                    offset: at,
                    data: piece.to_vec(),
                },
            );
        }
        at = next;
    }
}

/// Builds up to `max` crash states from `initial` (the file before the run) and the run's
/// log. Between two syncs writes may reach the disk in any order, and a write larger than a
/// page may be torn at page boundaries (a single-sector write never is). Every epoch (the
/// writes after a sync) contributes: nothing of it, each prefix, random subsets, random
/// subsets with torn writes; the final state is always included. When there are more than
/// `max`, a seeded sample is kept. Each state is handed to `f` with a description (states
/// are made one at a time: each is a whole copy of the file). Returns the number of states.
pub fn crash_states(
    initial: &[u8],
    log: &[IoOp],
    max: usize,
    rng: &mut Rng,
    mut f: impl FnMut(&str, &[u8]),
) -> usize {
    // Epochs: the ops between syncs.
    let mut epochs: Vec<Vec<IoOp>> = vec![Vec::new()];
    for op in log {
        match op {
            IoOp::Sync => {
                if !epochs.last().unwrap().is_empty() {
                    epochs.push(Vec::new());
                }
            }
            other => epochs.last_mut().unwrap().push(other.clone()),
        }
    }
    if epochs.last().is_some_and(|e| e.is_empty()) && epochs.len() > 1 {
        epochs.pop();
    }
    // Candidate descriptions: (epoch, kind) generated lazily from a seed so that sampling
    // first keeps memory low.
    #[derive(Clone, Copy)]
    enum Kind {
        Prefix(usize),
        Subset(u64),
        Torn(u64),
    }
    let mut cands: Vec<(usize, Kind)> = Vec::new();
    for (k, ops) in epochs.iter().enumerate() {
        let n = ops.len();
        // Prefixes: all of them when few, else an even sample plus the ends.
        let step = (n / 16).max(1);
        let mut p = 0;
        while p < n {
            cands.push((k, Kind::Prefix(p)));
            p += step;
        }
        if n > 1 {
            // Long runs (a large `max`) try more random subsets of each epoch.
            let subsets = (max / epochs.len() / 2)
                .clamp(8, 1 << 12)
                .min(1 << n.min(12));
            for _ in 0..subsets {
                cands.push((k, Kind::Subset(rng.next())));
                cands.push((k, Kind::Torn(rng.next())));
            }
        }
    }
    let last = epochs.len() - 1;
    let final_cand = (last, Kind::Prefix(epochs[last].len()));
    // Sample to `max`, keeping the final state.
    let mut chosen: Vec<(usize, Kind)> = if cands.len() < max {
        cands
    } else {
        let mut c = cands;
        for i in 0..max.saturating_sub(1) {
            let j = i + rng.below((c.len() - i) as u64) as usize;
            c.swap(i, j);
        }
        c.truncate(max.saturating_sub(1));
        c
    };
    chosen.push(final_cand);
    chosen.sort_by_key(|(k, _)| *k);
    // Walk the epochs once, keeping the durable state.
    let count = chosen.len();
    let mut durable = initial.to_vec();
    let mut done_epoch = 0;
    for (k, kind) in chosen {
        while done_epoch < k {
            for op in &epochs[done_epoch] {
                apply(&mut durable, op);
            }
            done_epoch += 1;
        }
        let ops = &epochs[k];
        let mut state = durable.clone();
        let what = match kind {
            Kind::Prefix(p) => {
                for op in &ops[..p] {
                    apply(&mut state, op);
                }
                format!(
                    "epoch {k}/{}: first {p} of {} changes",
                    epochs.len(),
                    ops.len()
                )
            }
            Kind::Subset(seed) | Kind::Torn(seed) => {
                let torn = matches!(kind, Kind::Torn(_));
                let mut r = Rng::new(seed);
                let mut kept = 0;
                for op in ops {
                    if r.chance(1, 2) {
                        continue;
                    }
                    kept += 1;
                    match op {
                        IoOp::Write { offset, data }
                            if torn && data.len() as u64 > PAGE && r.chance(1, 2) =>
                        {
                            apply_torn(&mut state, *offset, data, &mut r)
                        }
                        other => apply(&mut state, other),
                    }
                }
                format!(
                    "epoch {k}/{}: {} subset (seed {seed:#x}) keeping {kept} of {} changes",
                    epochs.len(),
                    if torn { "torn" } else { "random" },
                    ops.len()
                )
            }
        };
        f(&what, &state);
    }
    count
}

/// Per-cluster contents of a standalone image over `bytes` (None where a read fails).
pub fn clusters(bytes: &[u8], format: Format, cluster: u64) -> Vec<Option<Vec<u8>>> {
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new(bytes.to_vec(), "img"));
    let Ok(layer) = open_layer(st, "img", Some(format), false, false) else {
        return Vec::new();
    };
    let chain = Chain::from_layers(vec![layer]);
    let size = chain.size();
    (0..size.div_ceil(cluster))
        .map(|i| {
            let mut b = vec![0u8; cluster.min(size - i * cluster) as usize];
            chain.read_from(0, i * cluster, &mut b).ok().map(|()| b)
        })
        .collect()
}

/// qemu-img check's corruption count (JSON).
pub fn corruptions(s: &crate::common::Scratch, image: &str) -> u64 {
    let r = s.run("qemu-img", &["check", "--output=json", image]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|_| panic!("qemu-img check {image}: {}{}", r.stdout, r.stderr));
    v["corruptions"].as_u64().unwrap_or(0)
}

/// Damaged images for the repair scenario: leaks, a refcount too low, a mapping past the end.
pub fn damaged(s: &crate::common::Scratch, fmt: &str) -> String {
    let name = format!("D.{fmt}");
    s.qemu_img(&["create", "-q", "-f", fmt, &name, "4M"]);
    s.qemu_io(
        &name,
        &[
            "write -q -P 0x11 0 256k",
            "write -q -P 0x22 1M 128k",
            "write -q -P 0x33 3M 64k",
        ],
    );
    let mut b = s.read_file(&name);
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    if fmt == "qcow2" {
        let l1 = be64(&b, 40) as usize;
        let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
        // Cluster 1 (64 KiB): unmapped, so its data cluster leaks.
        b[l2 + 8..l2 + 16].fill(0);
        // Cluster 16 (1 MiB): pointed past the end of the file.
        let e = be64(&b, l2 + 16 * 8);
        b[l2 + 16 * 8..l2 + 17 * 8]
            .copy_from_slice(&((e & 0xff00_0000_0000_0000) | (1 << 40)).to_be_bytes());
        // The refcount of cluster 48's data (3 MiB) dropped to 0: a corruption.
        let data = (be64(&b, l2 + 48 * 8) & 0x00ff_ffff_ffff_fe00) >> 16;
        let rt = be64(&b, 48) as usize;
        let rb = be64(&b, rt) as usize;
        b[rb + 2 * data as usize..rb + 2 * data as usize + 2].fill(0);
    } else {
        let l1 = le64(&b, 40) as usize;
        let l2 = le64(&b, l1) as usize;
        // Cluster 1 unmapped: leaked. Cluster 16 past the end of the file.
        b[l2 + 8..l2 + 16].fill(0);
        b[l2 + 16 * 8..l2 + 17 * 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    }
    s.write_file(&name, &b);
    name
}

/// A qcow2 image with an internal snapshot whose table entry lacks the disk size: its
/// repair writes a new snapshot table and frees the old one.
pub fn damaged_snapshot_table(s: &crate::common::Scratch) -> String {
    let name = "S.qcow2".to_string();
    s.qemu_img(&["create", "-q", "-f", "qcow2", &name, "4M"]);
    s.qemu_io(&name, &["write -q -P 0x11 0 256k"]);
    s.qemu_img(&["snapshot", "-c", "first", &name]);
    s.qemu_io(&name, &["write -q -P 0x22 64k 64k"]);
    crate::common::shrink_snapshot_entry(s, &name);
    name
}

/// A <- B <- C (`fmt`, 8 MiB) with data, zeros and partial clusters in every layer, and an
/// unrelated N. C's guest data is saved as `pristine.raw`.
pub fn chain_fixture(s: &crate::common::Scratch, fmt: &str, opts: &str) {
    let create = |name: &str, backing: Option<&str>| {
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        if let Some(b) = backing {
            args.extend(["-b", b, "-F", fmt]);
        }
        args.extend([name, "8M"]);
        s.qemu_img(&args);
    };
    let n = |x: &str| format!("{x}.{fmt}");
    create(&n("A"), None);
    s.qemu_io(
        &n("A"),
        &[
            "write -q -P 0x11 0 2M",
            "write -q -P 0x12 5M 1M",
            "write -q -P 0x13 7M 300k",
        ],
    );
    create(&n("B"), Some(&n("A")));
    s.qemu_io(
        &n("B"),
        &[
            "write -q -P 0x21 1M 512k",
            "write -q -z 3M 512k",
            "write -q -P 0x23 4608k 9k",
            "write -q -z 5M 64k",
        ],
    );
    create(&n("C"), Some(&n("B")));
    s.qemu_io(
        &n("C"),
        &["write -q -P 0x31 2M 64k", "write -q -P 0x32 6M 4k"],
    );
    create(&n("N"), None);
    s.qemu_io(
        &n("N"),
        &["write -q -P 0x11 0 1M", "write -q -P 0x44 6M 1M"],
    );
    s.qemu_img(&["convert", "-O", "raw", &n("C"), "pristine.raw"]);
}

/// The backing file an image names (read in process: no spawn).
pub fn backing_of(path: &Path) -> Option<String> {
    let l = cowimg::chain::open_image(
        &path.to_string_lossy(),
        None,
        cowimg::lock::Access::ReadShared,
    )
    .expect("open state");
    l.image.backing().map(|b| b.name)
}
