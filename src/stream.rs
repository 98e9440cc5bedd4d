//! Streaming: copy into an image what the layers between it and a base provide, then make the
//! base its backing file. QEMU's block-stream, offline, in parallel and crash-safe.
//!
//! The policy reads like QEMU's stream.c: for every range, "allocated in the image itself?"
//! (then leave it) and otherwise "which layer above the base determines it?" (then copy it,
//! or mark it zero). What the image must record follows from what the *old* chain reads: data
//! as data; a zero cluster, or the end of a removed layer shorter than the image, as zeros.
//! With no base left, ranges that read as zero stay unallocated.

use std::sync::atomic::AtomicBool;

use cowimg_formats::{Alloc, BackingRef};

use crate::chain::{combine, Chain};
use crate::copy::{Action, Copier, Counters, Extent, ZeroData};
use crate::error::{Error, Result};
use crate::extent::{push_merged, widen, widen_range};
use crate::ratelimit::RateLimiter;

/// What determines a guest range of the old chain, seen from below the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Data in a layer being removed.
    Data,
    /// Zeros decided by a layer being removed (zero cluster, or past its end).
    Zeros,
    /// Nothing above the base: the base (or nothing at all) shows through, unchanged.
    Base,
}

/// The plan: extents to copy or zero, aligned to the image's allocation unit.
pub struct Plan {
    /// The extents, in guest order.
    pub extents: Vec<Extent>,
    /// Guest bytes the plan covers (the streamed range).
    pub range_len: u64,
}

impl Plan {
    /// Guest bytes of work: the extents' total length.
    pub fn work(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }
}

/// Plans streaming `[start, end)` of layer 0 of `chain`, keeping layer `base` (the chain's
/// length for none).
pub fn plan(chain: &Chain, base: usize, start: u64, end: u64) -> Result<Plan> {
    let top = chain.top();
    let mut exact: Vec<(u64, u64, Source)> = Vec::new();
    let runs = top
        .image
        .map(start, end - start)
        .map_err(|e| Error::image(&top.filename, e))?;
    for r in runs.iter().filter(|r| r.alloc == Alloc::Unallocated) {
        determine(chain, 1, base, r.start, r.end(), &mut exact)?;
    }
    let keep_base = base < chain.layers.len();
    let unit = top.image.allocation_unit().max(512);
    Ok(Plan {
        extents: align(exact, unit, keep_base, top.size()),
        range_len: end - start,
    })
}

/// Plans a commit of the chain's top into layer `base`: every range of the top that the
/// layers above `base` determine (data, zero clusters, the end of a layer shorter than the
/// top), in units of `base`, which must then read what the top reads there. Zeros are
/// recorded as zeros: `base` holds data of its own below them.
pub fn plan_commit(chain: &Chain, base: usize) -> Result<Plan> {
    let size = chain.top().size();
    let mut exact = Vec::new();
    determine(chain, 0, base, 0, size, &mut exact)?;
    let unit = chain.layers[base].image.allocation_unit().max(512);
    Ok(Plan {
        extents: align(exact, unit, true, size),
        range_len: size,
    })
}

/// Turns the exact ranges removed layers determine into extents of whole `unit`s, clipped
/// to `size`. `keep_base`: something stays below, so zeros must be recorded. Copies widen
/// outwards, zeros shrink inwards to the units they cover whole (the fringes are copied): a
/// zero extent covers whole units that nothing else touches, so only copies can overlap (by
/// the widening of their ends), and they merge.
fn align(exact: Vec<(u64, u64, Source)>, unit: u64, keep_base: bool, size: u64) -> Vec<Extent> {
    let mut extents: Vec<Extent> = Vec::new();
    for (s, e, src) in exact {
        let action = match src {
            Source::Data => Action::Copy,
            Source::Zeros if keep_base => Action::Zero,
            _ => continue,
        };
        // Whole units only. A unit that is only partly decided by removed layers is copied
        // whole: reading through the old chain gives exactly what the unit reads today. (The
        // end is clipped to the image below, once the extents are merged.)
        let (a, b) = widen_range(s, e, unit, u64::MAX);
        if action == Action::Zero {
            let (za, zb) = (s.div_ceil(unit) * unit, e / unit * unit);
            if za < zb {
                if a < za {
                    push_merged(
                        &mut extents,
                        Extent {
                            start: a,
                            len: za - a,
                            action: Action::Copy,
                        },
                    );
                }
                push_merged(
                    &mut extents,
                    Extent {
                        start: za,
                        len: zb - za,
                        action: Action::Zero,
                    },
                );
                if zb < b {
                    push_merged(
                        &mut extents,
                        Extent {
                            start: zb,
                            len: b - zb,
                            action: Action::Copy,
                        },
                    );
                }
                continue;
            }
        }
        push_merged(
            &mut extents,
            Extent {
                start: a,
                len: b - a,
                action: Action::Copy,
            },
        );
    }
    // The last unit may pass the end of the image.
    for e in extents.iter_mut() {
        e.len = e.len.min(size.saturating_sub(e.start));
    }
    extents.retain(|e| e.len > 0);
    extents
}

/// Finds what determines `[start, end)` from layer `i` down, above `base`, in guest order.
fn determine(
    chain: &Chain,
    i: usize,
    base: usize,
    start: u64,
    end: u64,
    out: &mut Vec<(u64, u64, Source)>,
) -> Result<()> {
    /// A step of the walk: a range found, or a range to look up from a layer down.
    enum Step {
        Found(u64, u64, Source),
        Look(usize, u64, u64),
    }
    // A stack of steps, not recursion, so that a deep chain cannot exhaust the stack; steps
    // are pushed in reverse so that ranges come out in guest order.
    let mut todo = vec![Step::Look(i, start, end)];
    while let Some(step) = todo.pop() {
        let (i, start, end) = match step {
            Step::Found(a, b, src) => {
                out.push((a, b, src));
                continue;
            }
            Step::Look(i, a, b) => (i, a, b),
        };
        if i >= base || i >= chain.layers.len() {
            out.push((start, end, Source::Base));
            continue;
        }
        let layer = &chain.layers[i];
        let inside = end.min(layer.size()).max(start);
        let mut steps = Vec::new();
        if inside > start {
            let runs = layer
                .image
                .map(start, inside - start)
                .map_err(|e| Error::image(&layer.filename, e))?;
            for r in runs {
                steps.push(match r.alloc {
                    Alloc::Data { .. } | Alloc::Compressed { .. } => {
                        Step::Found(r.start, r.end(), Source::Data)
                    }
                    Alloc::Zero { .. } => Step::Found(r.start, r.end(), Source::Zeros),
                    Alloc::Unallocated => Step::Look(i + 1, r.start, r.end()),
                });
            }
        }
        if inside < end {
            // Past the end of a removed layer the old chain reads zeros.
            steps.push(Step::Found(inside, end, Source::Zeros));
        }
        todo.extend(steps.into_iter().rev());
    }
    Ok(())
}

/// The backing name to record for `base` in the image: relative to the image's directory
/// when the chain named it relatively, absolute when it was named absolutely.
pub fn backing_name(chain: &Chain, base: usize) -> String {
    let above = &chain.layers[base - 1];
    let recorded = above.image.backing().map(|b| b.name).unwrap_or_default();
    let target = &chain.layers[base].filename;
    if recorded.starts_with('/') {
        return recorded;
    }
    let top = &chain.top().filename;
    if let Some(rel) = relative_to_image(top, target) {
        // Make sure the name leads to the same file from the image.
        let via = combine(top, &rel);
        if same_file(&via, target) {
            return rel;
        }
    }
    std::fs::canonicalize(target)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| target.clone())
}

fn same_file(a: &str, b: &str) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// `target` (a path as opened) relative to the directory of `image`, lexically.
fn relative_to_image(image: &str, target: &str) -> Option<String> {
    use std::path::{Component, Path, PathBuf};
    let cwd = std::env::current_dir().ok()?;
    let absolute = |p: &Path| -> PathBuf {
        let mut out = PathBuf::new();
        for c in cwd.join(p).components() {
            match c {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                other => out.push(other),
            }
        }
        out
    };
    let dir = absolute(Path::new(image)).parent()?.to_path_buf();
    let to = absolute(Path::new(target));
    let (d, t): (Vec<_>, Vec<_>) = (dir.components().collect(), to.components().collect());
    let common = d.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..d.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c);
    }
    Some(rel.to_string_lossy().into_owned())
}

/// Settings of one copy run.
pub struct Settings<'a> {
    /// Copy workers (0: the copy chooses, see [`crate::copy::auto_jobs`]).
    pub jobs: usize,
    /// The rate cap.
    pub limiter: &'a RateLimiter,
    /// Set to stop at the next chunk, committing what was copied.
    pub cancel: &'a AtomicBool,
    /// Progress, for reporters.
    pub counters: &'a Counters,
    /// Write copied clusters compressed (qcow2).
    pub compress: bool,
    /// The job the copy runs as (pause, cancel), if any.
    pub job: Option<&'a crate::job::JobHandle>,
}

/// Copies what the plan asks into the chain's top image; everything copied is committed.
/// `keep_base`: something stays below the image, so zeros must be recorded as zeros.
/// `compare`: the new backing chain of a rebase; units reading the same there are skipped.
pub fn copy(
    chain: &Chain,
    plan: &Plan,
    keep_base: bool,
    compare: Option<&Chain>,
    s: &Settings,
) -> Result<()> {
    let top = chain.top();
    if s.compress && top.format != cowimg_formats::Format::Qcow2 {
        return Err(Error::Usage(format!(
            "Compression not supported for this file format ({})",
            top.format
        )));
    }
    run_copier(chain, plan, keep_base, compare, s, false)
}

/// [`copy`] into an image that clients write meanwhile (`serve --stream`): every unit is
/// filled only where the image still leaves it unallocated (see [`Copier::fill`]), so a copy
/// never replaces what a client wrote first, and a client write overlapping a copy in flight
/// waits for it and lands on top.
pub fn copy_live(chain: &Chain, plan: &Plan, keep_base: bool, s: &Settings) -> Result<()> {
    run_copier(chain, plan, keep_base, None, s, true)
}

fn run_copier(
    chain: &Chain,
    plan: &Plan,
    keep_base: bool,
    compare: Option<&Chain>,
    s: &Settings,
    fill: bool,
) -> Result<()> {
    let top = chain.top();
    let copier = Copier {
        source: chain,
        source_layer: 1,
        target: &*top.image,
        target_name: &top.filename,
        below: &chain.below(0),
        zero_data: if keep_base {
            ZeroData::Mark
        } else {
            ZeroData::Skip
        },
        limiter: s.limiter,
        cancel: s.cancel,
        counters: s.counters,
        jobs: s.jobs,
        compare,
        compress: s.compress && !fill,
        fill,
        shift: 0,
        sparse: Some(0),
        job: s.job,
    };
    copier.run(&plan.extents)
}

/// The layer of `chain` that `--base` names (the chain's length without one), or a usage
/// error saying which backing files there are. `file` is the image as the user named it.
pub fn find_base(chain: &Chain, file: &str, base: Option<&str>) -> Result<usize> {
    let Some(b) = base else {
        return Ok(chain.layers.len());
    };
    match chain.find(b) {
        Some(0) => Err(Error::Usage(format!("--base '{b}' is the image itself"))),
        Some(i) => Ok(i),
        None => {
            let names: Vec<&str> = chain.layers[1..]
                .iter()
                .map(|l| l.filename.as_str())
                .collect();
            Err(Error::Usage(format!(
                "'{b}' is not in the backing chain of '{file}' (its backing files: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )))
        }
    }
}

/// Streams the whole disk into the chain's top image, the way QEMU's block/stream.c reads:
/// plan what the layers above `base` provide, copy it (see [`copy`]; progress in
/// `s.counters`, the cap in `s.limiter`, a stop through `s.cancel`), then point the top at
/// `base` (at nothing when `base` is past the last layer). Returns the new backing reference.
///
/// ```
/// use std::sync::atomic::AtomicBool;
/// use cowimg::chain::{Chain, OpenOptions};
/// use cowimg::copy::Counters;
/// use cowimg::ratelimit::RateLimiter;
/// use cowimg::stream::{self, Settings};
///
/// # fn main() -> cowimg::Result<()> {
/// # let dir = tempfile::tempdir().expect("temp dir");
/// # let path = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
/// # std::fs::write(path("base.raw"), vec![7u8; 1 << 20]).expect("base");
/// cowimg::output::create_overlay(&path("top.qcow2"), "base.raw", cowimg_formats::Format::Raw)?;
/// let chain = Chain::open(&path("top.qcow2"), OpenOptions::write(None))?;
/// let counters = Counters::default();
/// let settings = Settings {
///     jobs: 0,
///     limiter: &RateLimiter::new(0),
///     cancel: &AtomicBool::new(false),
///     counters: &counters,
///     compress: false,
///     job: None,
/// };
/// // Layer 1 is the raw base; streaming down to past the last layer drops the backing file.
/// let backing = stream::run(&chain, chain.layers.len(), &settings)?;
/// assert!(backing.is_none());
/// assert_eq!(counters.copied.load(std::sync::atomic::Ordering::Relaxed), 1 << 20);
/// # Ok(())
/// # }
/// ```
pub fn run(chain: &Chain, base: usize, s: &Settings) -> Result<Option<BackingRef>> {
    let plan = plan(chain, base, 0, chain.size())?;
    copy_and_switch(chain, base, &plan, s)
}

/// [`run`] with the plan already made (a job sizes itself by the plan first).
pub fn copy_and_switch(
    chain: &Chain,
    base: usize,
    plan: &Plan,
    s: &Settings,
) -> Result<Option<BackingRef>> {
    let keep_base = base < chain.layers.len();
    copy(chain, plan, keep_base, None, s)?;
    let backing = keep_base.then(|| BackingRef {
        name: backing_name(chain, base),
        format: Some(chain.layers[base].format.name().to_string()),
    });
    switch(chain, backing.as_ref())?;
    Ok(chain.top().image.backing())
}

/// Points the chain's top at its new backing file. Call only after a complete [`copy`]:
/// everything is then on disk, and the pointer is the last thing to change.
pub fn switch(chain: &Chain, backing: Option<&BackingRef>) -> Result<()> {
    let top = chain.top();
    top.image
        .set_backing(backing)
        .map_err(|e| Error::image(&top.filename, e))
}

/// Plans a safe rebase of the chain's top onto an unrelated chain `new`: the ranges the top
/// does not hold where the old or the new backing reads anything but zeros. The copy then
/// compares both and writes only what would change.
pub fn plan_against(chain: &Chain, new: &Chain) -> Result<Plan> {
    use crate::blockstatus::status;
    let top = chain.top();
    let size = top.size();
    let unit = top.image.allocation_unit().max(512);
    let runs = top
        .image
        .map(0, size)
        .map_err(|e| Error::image(&top.filename, e))?;
    let mut extents = Vec::new();
    for r in runs.iter().filter(|r| r.alloc == Alloc::Unallocated) {
        let mut old = Vec::new();
        if chain.layers.len() > 1 {
            let inside = r.end().min(chain.layers[1].size()).max(r.start);
            if inside > r.start {
                status(chain, 1, r.start, inside, &mut old)?;
            }
        }
        let mut newer = Vec::new();
        let inside = r.end().min(new.size()).max(r.start);
        if inside > r.start {
            status(new, 0, r.start, inside, &mut newer)?;
        }
        // Anything that is not zero on either side may differ.
        for e in old.iter().chain(newer.iter()).filter(|e| !e.zero) {
            extents.push(Extent {
                start: e.start,
                len: e.length,
                action: Action::Copy,
            });
        }
    }
    // Widening keeps the order of the starts, so sorting first is sorting the result.
    extents.sort_by_key(|e| e.start);
    Ok(Plan {
        extents: widen(extents, unit, size),
        range_len: size,
    })
}
