//! `cowimg convert`: reads an image through its chain and writes a new standalone image,
//! in parallel, skipping zeros; the output appears under its name only once complete. A
//! device, and with `-n` an existing image, is written in place instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cowimg_formats::{Format, ReadBelow, ZerosBelow};

use crate::chain::{Chain, Layer, OpenOptions};
use crate::commands::create::ImageOptions;
use crate::commands::map::entries;
use crate::copy::{Action, Copier, Counters, Extent, ZeroData};
use crate::error::{Error, Result};
use crate::output::{Existing, Output};
use crate::progress::{Mode, Reporter};
use crate::ratelimit::RateLimiter;

pub struct Args {
    pub src: String,
    pub dst: String,
    pub format: Option<Format>,
    pub out_format: Format,
    pub options: Vec<String>,
    pub progress: Mode,
    pub jobs: usize,
    pub force_share: bool,
    /// Copy what the source's backing chain provides into the source as it is read
    /// (`--copy-on-read`); otherwise the source is only read, flagged copy-on-read or not.
    pub copy_on_read: bool,
    /// Store clusters compressed where they shrink (qcow2 output only).
    pub compress: bool,
    /// Write into the existing DST in place (`-n`) instead of creating a new image.
    pub no_create: bool,
}

pub fn run(a: &Args, cancel: &AtomicBool) -> Result<i32> {
    let mut opts = OpenOptions::read(a.format, a.force_share);
    opts.copy_on_read = a.copy_on_read;
    let chain = Chain::open(&a.src, opts)?;
    let size = chain.size();
    let mut o = ImageOptions::default();
    for list in &a.options {
        o.apply(a.out_format, list)?;
    }
    if a.compress && a.out_format != Format::Qcow2 {
        return Err(Error::Msg(
            "Compression not supported for this file format".into(),
        ));
    }
    // The destination: a new image (a device is written in place), or with -n the existing
    // image, opened with its own backing chain, which must not show through.
    let dest = if a.no_create {
        if !a.options.is_empty() {
            return Err(Error::Usage(
                "-o has no effect when skipping image creation".into(),
            ));
        }
        if a.compress {
            return Err(Error::Usage(
                "-c cannot be used with -n: compressed clusters are written only into a new image"
                    .into(),
            ));
        }
        let t = Chain::open(&a.dst, OpenOptions::write(Some(a.out_format)))?;
        if t.size() < size {
            return Err(Error::Msg(format!(
                "output file is smaller than input file: '{}' holds {} bytes, '{}' needs {size}",
                a.dst,
                t.size(),
                a.src
            )));
        }
        Dest::Existing(t)
    } else {
        let spec = o.spec(a.out_format, size, None, false)?;
        spec.validate()?;
        // qemu-img convert replaces an existing destination; cowimg does too, atomically.
        let out = Output::begin(&a.dst, Existing::Replace)?;
        out.create(&spec)?;
        Dest::New(out)
    };
    match dest {
        Dest::Existing(t) => copy(a, &chain, t.top(), &t.below(0), true, cancel)?,
        Dest::New(out) => {
            // The image is closed before its file is renamed into place.
            let target = out.open(a.out_format)?;
            copy(a, &chain, &target, &ZerosBelow, out.in_place(), cancel)?;
            drop(target);
            out.persist()?;
        }
    }
    Ok(0)
}

/// Where convert writes.
enum Dest {
    /// A new image (see [`Output`]).
    New(Output),
    /// The existing image DST names (`-n`), with its backing chain.
    Existing(Chain),
}

/// Copies what `chain` reads into `target`. Ranges that read as zero stay unallocated in a new
/// image; written `in_place`, they are overwritten with zeros, hiding what the destination
/// (or its backing chain, `below`) held.
fn copy(
    a: &Args,
    chain: &Chain,
    target: &Layer,
    below: &dyn ReadBelow,
    in_place: bool,
    cancel: &AtomicBool,
) -> Result<()> {
    let size = chain.size();
    let extents: Vec<Extent> = entries(chain, 0, size)?
        .into_iter()
        .filter(|e| !e.zero)
        .map(|e| Extent {
            start: e.start,
            len: e.length,
            action: Action::Copy,
        })
        .collect();
    // Whole units of the output (whole clusters when compressing), so that no cluster is
    // written in pieces: the widened parts read as zeros, as they are.
    let unit = if a.compress {
        target.image.cluster_size().unwrap_or(512)
    } else {
        target.image.allocation_unit()
    };
    let mut extents = widen(extents, unit, size);
    if in_place {
        extents = with_zero_gaps(extents, size);
    }
    let counters = Arc::new(Counters::default());
    // Ranges that need nothing count as done from the start (as stream's progress counts
    // them), so that a finished convert reports offset == len.
    let to_copy: u64 = extents.iter().map(|e| e.len).sum();
    counters
        .done
        .store(size.saturating_sub(to_copy), Ordering::Relaxed);
    let limiter = RateLimiter::new(0);
    let reporter = Reporter::start(a.progress, size, 0, counters.clone());
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
        limiter: &limiter,
        cancel,
        counters: &counters,
        jobs: a.jobs,
        compare: None,
        compress: a.compress,
    };
    let result = copier.run(&extents).and_then(|()| chain.finish());
    reporter.finish(result.as_ref().err().map(|e| e.to_string()).as_deref());
    result
}

/// Adds `Zero` extents over what sorted, disjoint `extents` leave of `[0, size)`.
fn with_zero_gaps(extents: Vec<Extent>, size: u64) -> Vec<Extent> {
    let mut out = Vec::with_capacity(extents.len() * 2 + 1);
    let mut pos = 0;
    let zero = |start, end| Extent {
        start,
        len: end - start,
        action: Action::Zero,
    };
    for e in extents {
        if e.start > pos {
            out.push(zero(pos, e.start));
        }
        pos = e.start + e.len;
        out.push(e);
    }
    if pos < size {
        out.push(zero(pos, size));
    }
    out
}

/// Widens copy extents to whole `unit`s (clipped to `size`) and joins those that touch.
pub fn widen(extents: Vec<Extent>, unit: u64, size: u64) -> Vec<Extent> {
    let unit = unit.max(1);
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        let start = e.start / unit * unit;
        let end = (e.start + e.len)
            .div_ceil(unit)
            .saturating_mul(unit)
            .min(size);
        match out.last_mut() {
            Some(l) if l.action == e.action && l.start + l.len >= start => {
                l.len = end.max(l.start + l.len) - l.start
            }
            _ => out.push(Extent {
                start,
                len: end - start,
                action: e.action,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_widen_to_units_and_merge() {
        let e = |start, len| Extent {
            start,
            len,
            action: Action::Copy,
        };
        assert_eq!(
            widen(vec![e(100, 10), e(600, 10), e(5000, 100)], 512, 5050),
            vec![e(0, 1024), e(4608, 442)]
        );
    }
}
