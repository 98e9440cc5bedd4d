//! `cowimg convert`: reads an image through its chain and writes a new standalone image,
//! in parallel, skipping zeros; the output appears under its name only once complete. A
//! device, an NBD export, and with `-n` an existing image, are written in place instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cowimg_formats::qcow2::SnapshotRef;
use cowimg_formats::{BackingRef, Format, ReadBelow, ZerosBelow};

use super::create::ImageOptions;
use cowimg::blockstatus::entries;
use cowimg::chain::{combine, Chain, Layer, OpenOptions};
use cowimg::copy::{Action, Copier, Counters, Extent, ZeroData};
use cowimg::error::{Error, Result};
use cowimg::extent::widen;
use cowimg::job::{JobSpec, Session};
use cowimg::output;
use cowimg::output::{Existing, Output};
use cowimg::progress::{Mode, Reporter};

/// The arguments of `cowimg convert` (`cowimg convert --help` says what each flag does).
pub struct Args {
    /// The images to read, written one after the other (qemu-img concatenates them).
    pub srcs: Vec<String>,
    /// The destination (a file, a device or an NBD export).
    pub dst: String,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// `-O`: the destination's format.
    pub out_format: Format,
    /// `-o` options, as given.
    pub options: Vec<String>,
    /// How progress is shown.
    pub progress: Mode,
    /// Workers (0: chosen for the source).
    pub jobs: usize,
    /// `-U`: read an image another process may be writing.
    pub force_share: bool,
    /// Copy what the source's backing chain provides into the source as it is read
    /// (`--copy-on-read`); otherwise the source is only read, flagged copy-on-read or not.
    pub copy_on_read: bool,
    /// Store clusters compressed where they shrink (qcow2 output only).
    pub compress: bool,
    /// Write into the existing DST in place (`-n`) instead of creating a new image.
    pub no_create: bool,
    /// The existing DST reads as zeros already (`--target-is-zero`, with `-n`): zero ranges
    /// of SRC are skipped instead of written.
    pub target_is_zero: bool,
    /// `-B NAME [-F FMT]`: DST is an overlay of NAME and receives only what the source's top
    /// layer holds.
    pub backing: Option<(String, Option<String>)>,
    /// `-S`: the shortest zero run left as a hole (0: write everything); `None`: qemu-img's
    /// default, where every zero allocation unit of the output is a hole.
    pub sparse: Option<u64>,
    /// Cap in bytes per second (0 = unlimited).
    pub speed: u64,
    /// `-l`: read the source as this internal snapshot holds it.
    pub snapshot: Option<String>,
    /// `--job-id`, `--control`, `--events` (the default id is DST's file name).
    pub control: cowimg::job::ControlOptions,
}

/// Runs `cowimg convert`; returns the exit status.
pub fn run(a: &Args, cancel: &AtomicBool) -> Result<i32> {
    let mut opts = OpenOptions::read(a.format, a.force_share);
    opts.copy_on_read = a.copy_on_read;
    if a.backing.is_some() && a.srcs.len() > 1 {
        return Err(Error::Msg(
            "Having a backing file for the target makes no sense when concatenating multiple input images".into(),
        ));
    }
    if a.snapshot.is_some() && a.srcs.len() > 1 {
        return Err(Error::Msg(
            "No support for concatenating multiple snapshot".into(),
        ));
    }
    if a.snapshot.is_some() && a.copy_on_read {
        return Err(Error::Usage(
            "--copy-on-read cannot be used with -l: a snapshot is read, never filled".into(),
        ));
    }
    let mut sources = a
        .srcs
        .iter()
        .map(|s| Chain::open(s, opts))
        .collect::<Result<Vec<_>>>()?;
    if let (Some(param), Some(chain)) = (&a.snapshot, sources.first_mut()) {
        load_snapshot(chain, param)?;
    }
    let size = sources
        .iter()
        .try_fold(0u64, |sum, c| sum.checked_add(c.size()))
        .ok_or_else(|| {
            Error::Msg(
                "the sources' sizes add up to more than 2^64 bytes: convert them one at a time"
                    .into(),
            )
        })?;
    let mut o = ImageOptions::default();
    for list in &a.options {
        o.apply(a.out_format, list)?;
    }
    if a.compress && a.out_format != Format::Qcow2 {
        return Err(Error::Msg(
            "Compression not supported for this file format".into(),
        ));
    }
    if a.target_is_zero && !a.no_create {
        // qemu-img's words: only an existing destination can be known to be zero.
        return Err(Error::Usage(
            "--target-is-zero requires use of -n flag".into(),
        ));
    }
    let how = How {
        top_only: a.backing.is_some(),
        sparse: a.sparse,
    };
    // An NBD export exists already: it is written in place, with or without -n, as
    // qemu-img writes it.
    let nbd = output::is_nbd(&a.dst);
    if nbd {
        output::check_nbd_format(&a.dst, a.out_format)?;
    }
    // The destination: a new image (a device is written in place), or with -n (or an NBD
    // export) the existing image, opened with its own backing chain, which must not show
    // through.
    if a.no_create || nbd {
        if !a.options.is_empty() {
            return Err(Error::Usage(if a.no_create {
                "-o has no effect when skipping image creation".into()
            } else {
                format!(
                    "-o has no effect on '{}': an NBD export exists already, nothing is created",
                    a.dst
                )
            }));
        }
        if a.compress {
            return Err(Error::Usage(
                "-c cannot be used with -n: compressed clusters are written only into a new image"
                    .into(),
            ));
        }
        let t = Chain::open(&a.dst, OpenOptions::write(Some(a.out_format)))?;
        if t.size() < size {
            // qemu-img's words (with -n, and without it for an export), then the sizes.
            let what = if a.no_create {
                "output file is smaller than input file".to_string()
            } else {
                format!(
                    "{}: error while converting raw: Cannot grow NBD nodes",
                    a.dst
                )
            };
            return Err(Error::Msg(format!(
                "{what}: '{}' holds {} bytes, '{}' needs {size}",
                a.dst,
                t.size(),
                a.srcs.join("' + '")
            )));
        }
        // Known to be zero, the destination needs SRC's zeros no more than a new image does.
        let in_place = !a.target_is_zero;
        return copy(a, &sources, how, t.top(), &t.below(0), in_place, cancel).map(|()| 0);
    }
    let backing = match &a.backing {
        None => None,
        Some((name, format)) => Some(open_backing(a, name, format.as_deref())?),
    };
    let spec = o.spec(
        a.out_format,
        size,
        backing.as_ref().map(|b| b.0.clone()),
        false,
    )?;
    spec.validate()?;
    // qemu-img convert replaces an existing destination; cowimg does too, atomically.
    let out = Output::begin(&a.dst, Existing::Replace)?;
    out.create(&spec)?;
    // The image is closed before its file is renamed into place.
    let target = out.open(a.out_format)?;
    match &backing {
        // Over a backing file, zeros must hide it and partial clusters complete from it.
        Some((_, chain)) => copy(a, &sources, how, &target, &chain.whole(), true, cancel)?,
        None => copy(
            a,
            &sources,
            how,
            &target,
            &ZerosBelow,
            out.in_place(),
            cancel,
        )?,
    }
    drop(target);
    out.persist()?;
    Ok(0)
}

/// Makes `chain` read its top image as the internal snapshot `param` names (`-l`): an id
/// or a name (the id tried first), or `snapshot.id=ID,snapshot.name=NAME`, as qemu-img
/// takes it, with its messages.
fn load_snapshot(chain: &mut Chain, param: &str) -> Result<()> {
    let mut which = SnapshotRef::default();
    let mut tries = Vec::new();
    if param.starts_with("snapshot.") {
        for kv in param.split(',') {
            match kv.split_once('=') {
                Some(("snapshot.id", v)) => which.id = Some(v),
                Some(("snapshot.name", v)) => which.name = Some(v),
                _ => {
                    let key = kv.split('=').next().unwrap_or(kv);
                    return Err(Error::Usage(format!("Invalid parameter '{key}'")));
                }
            }
        }
        tries.push(which);
    } else {
        tries.push(SnapshotRef {
            id: Some(param),
            name: None,
        });
        tries.push(SnapshotRef {
            id: None,
            name: Some(param),
        });
    }
    let top = &mut chain.layers[0];
    for which in tries {
        let view = top.image.snapshot_view(which).map_err(|e| match e {
            cowimg_formats::Error::Unsupported(_) => Error::Msg(format!(
                "Failed to load snapshot: Block format '{}' used by device '' does not support temporarily loading internal snapshots",
                top.format
            )),
            e => Error::image(&top.filename, e),
        })?;
        if let Some(view) = view {
            top.image = view;
            return Ok(());
        }
    }
    Err(Error::Msg(
        "Failed to load snapshot: Can't find snapshot".into(),
    ))
}

/// What of the sources convert writes.
#[derive(Clone, Copy)]
struct How {
    /// Only what each source's top layer holds (`-B`): the rest is left to DST's backing file.
    top_only: bool,
    /// See [`Args::sparse`].
    sparse: Option<u64>,
}

/// Checks `-B NAME -F FMT` as qemu-img does and opens NAME (resolved against DST, as the new
/// image will resolve it) to complete partial clusters.
fn open_backing(a: &Args, name: &str, format: Option<&str>) -> Result<(BackingRef, Chain)> {
    if a.out_format == Format::Raw {
        return Err(Error::Msg(format!(
            "Backing file not supported for file format '{}'",
            a.out_format
        )));
    }
    let Some(format) = format else {
        return Err(Error::Msg(
            "Use of backing file requires explicit backing format".into(),
        ));
    };
    let fmt = cowimg::chain::parse_format(format)?;
    let chain =
        Chain::open(&combine(&a.dst, name), OpenOptions::read(Some(fmt), true)).map_err(|e| {
            Error::Msg(format!(
                "Could not open '{}': Could not open backing file: {e}",
                a.dst
            ))
        })?;
    let r = BackingRef {
        name: name.to_string(),
        format: Some(format.to_string()),
    };
    Ok((r, chain))
}

/// Copies what the `sources` read, one after the other, into `target`. Ranges that read as
/// zero stay unallocated in a new image; written `in_place` (or over a backing file), they
/// are overwritten with zeros, hiding what the destination (or its backing chain, `below`)
/// held: a raw destination (a device, an NBD export) is zeroed first in large requests, an
/// image's clusters are marked zero as they are copied.
fn copy(
    a: &Args,
    sources: &[Chain],
    how: How,
    target: &Layer,
    below: &dyn ReadBelow,
    in_place: bool,
    cancel: &AtomicBool,
) -> Result<()> {
    // Whole units of the output (whole clusters when compressing), so that no cluster is
    // written in pieces: the widened parts read as zeros, as they are.
    let unit = if a.compress {
        target.image.cluster_size().unwrap_or(512)
    } else {
        target.image.allocation_unit()
    };
    // Over a backing file (-B) only the top's ranges are written: the rest shows through.
    let zero_gaps = in_place && !how.top_only;
    let raw = target.image.format() == Format::Raw;
    let mut plans = Vec::with_capacity(sources.len());
    let mut shift = 0;
    for chain in sources {
        let end = shift + chain.size();
        let mut extents = plan(chain, how, unit, shift, end)?;
        if zero_gaps && !raw {
            extents = with_zero_gaps(extents, shift, end);
        }
        plans.push((shift, extents));
        shift = end;
    }
    let size = shift;
    let zero_first = if zero_gaps && raw {
        let all: Vec<Extent> = plans.iter().flat_map(|p| p.1.iter().copied()).collect();
        gaps(&all, 0, size)
    } else {
        Vec::new()
    };
    let counters = Arc::new(Counters::default());
    // Ranges that need nothing count as done from the start (as stream's progress counts
    // them), so that a finished convert reports offset == len.
    let to_copy: u64 = plans.iter().flat_map(|p| &p.1).map(|e| e.len).sum::<u64>()
        + zero_first.iter().map(|(s, e)| e - s).sum::<u64>();
    counters
        .done
        .store(size.saturating_sub(to_copy), Ordering::Relaxed);
    let session = Session::start(
        JobSpec {
            id: cowimg::job::default_id(&a.dst),
            kind: "convert",
            device: a.dst.clone(),
            end: size,
            speed: a.speed,
        },
        counters.clone(),
        &a.control,
    )?;
    let job = &session.handle;
    let reporter = Reporter::start(a.progress, size, job.cap(), counters.clone());
    job.start();
    let result = (|| -> Result<()> {
        for (i, (chain, (shift, extents))) in sources.iter().zip(&plans).enumerate() {
            let copier = Copier {
                source: chain,
                source_layer: 0,
                target: &*target.image,
                target_name: &a.dst,
                below,
                zero_data: if in_place {
                    ZeroData::Mark
                } else {
                    ZeroData::Skip
                },
                limiter: job.limiter(),
                cancel,
                counters: &counters,
                jobs: a.jobs,
                compare: None,
                compress: a.compress,
                fill: false,
                job: Some(job),
                shift: *shift,
                sparse: match how.sparse {
                    None => Some(0),
                    Some(0) => None,
                    Some(n) => Some(n),
                },
            };
            if i == 0 && zero_gaps && raw {
                // Also when there is nothing to zero: the commit is the final FLUSH of an
                // export.
                copier.zero(&zero_first)?;
            }
            copier.run(extents)?;
            chain.finish()?;
        }
        Ok(())
    })();
    reporter.finish(result.as_ref().err().map(|e| e.to_string()).as_deref());
    session.finish(result.as_ref().map(|_| ()));
    result
}

/// The extents of one source placed at `[start, end)` of the target, in target offsets,
/// widened to whole `unit`s of the target (within the source's place).
fn plan(chain: &Chain, how: How, unit: u64, start: u64, end: u64) -> Result<Vec<Extent>> {
    let everything = how.sparse == Some(0);
    let extents: Vec<Extent> = entries(chain, 0, end - start)?
        .into_iter()
        .filter_map(|e| {
            // With -B, what the top holds is copied, zero clusters too (they hide the
            // backing file: read as zeros, they are marked zero in DST); the rest is left
            // to DST's backing file. Copied, not zeroed, so that the parts widening adds
            // are the backing file's data.
            let wanted = if how.top_only {
                e.depth == 0
            } else {
                !e.zero || everything
            };
            wanted.then(|| Extent {
                start: start + e.start,
                len: e.length,
                action: Action::Copy,
            })
        })
        .collect();
    let mut extents = widen(extents, unit, end);
    if let Some(first) = extents.first_mut() {
        // Widening must not reach into the previous source's place.
        if first.start < start {
            first.len -= start - first.start;
            first.start = start;
        }
    }
    Ok(extents)
}

/// The `(start, end)` ranges of `[start, end)` that sorted, disjoint `extents` leave.
fn gaps(extents: &[Extent], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(extents.len() + 1);
    let mut pos = start;
    for e in extents {
        if e.start > pos {
            out.push((pos, e.start));
        }
        pos = e.start + e.len;
    }
    if pos < end {
        out.push((pos, end));
    }
    out
}

/// Adds `Zero` extents over what sorted, disjoint `extents` leave of `[start, end)`.
fn with_zero_gaps(extents: Vec<Extent>, start: u64, end: u64) -> Vec<Extent> {
    let zeros = gaps(&extents, start, end)
        .into_iter()
        .map(|(start, end)| Extent {
            start,
            len: end - start,
            action: Action::Zero,
        });
    let mut out: Vec<Extent> = extents.into_iter().chain(zeros).collect();
    out.sort_by_key(|e| e.start);
    out
}
