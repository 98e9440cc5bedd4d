//! `cowimg rebase`: point an image at a new backing file. Safe by default: whatever would
//! read differently is first copied into the image, with the streaming engine (parallel,
//! throttled, resumable); `-u` only rewrites the pointer.

use std::sync::atomic::AtomicBool;

use cowimg_formats::probe::{probe, Probed};
use cowimg_formats::{BackingRef, FileStorage, Format};

use super::job::{self, JobOptions};
use cowimg::chain::{combine, open_image, Chain, OpenOptions};
use cowimg::error::{Error, Result};
use cowimg::lock::Access;
use cowimg::progress::Mode;
use cowimg::stream;

/// The arguments of `cowimg rebase` (`cowimg rebase --help` says what each flag does).
pub struct Args {
    /// The image.
    pub file: String,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// `-b`: the new backing file as it is to be stored ("" for none).
    pub backing: Option<String>,
    /// `-F`: the new backing file's format.
    pub backing_format: Option<String>,
    /// `-u`: change only the pointer, copy nothing.
    pub unsafe_mode: bool,
    /// The rate cap in bytes per second (0: none).
    pub speed: u64,
    /// Workers (0: chosen for the source).
    pub jobs: usize,
    /// How progress is shown.
    pub progress: Mode,
    /// JSON output (`--output json`).
    pub json: bool,
    /// `-U`: read an image another process may be writing.
    pub force_share: bool,
    /// `-c`: store copied clusters compressed (qcow2).
    pub compress: bool,
    /// `--job-id`, `--control`, `--events`.
    pub control: cowimg::job::ControlOptions,
}

/// Runs `cowimg rebase`; returns the exit status.
pub fn run(a: &Args, cancel: &AtomicBool) -> Result<i32> {
    let Some(new_name) = a.backing.clone() else {
        if !a.unsafe_mode {
            return Err(Error::Usage(
                "Must specify backing file (-b) or use unsafe mode (-u)\nTry 'cowimg rebase --help' for more info".into(),
            ));
        }
        return Err(Error::Usage(
            "-u needs -b NEW (or -b \"\" to drop the backing file)".into(),
        ));
    };
    let new = if new_name.is_empty() {
        None
    } else {
        let Some(fmt) = a.backing_format.clone() else {
            return Err(Error::Msg(format!(
                "Could not change the backing file to '{new_name}': backing format must be specified (-F)"
            )));
        };
        Format::from_name(&fmt).ok_or_else(|| {
            Error::Usage(format!(
                "Unknown backing format '{fmt}' (cowimg handles qcow2, qed and raw)"
            ))
        })?;
        Some(BackingRef {
            name: new_name.clone(),
            format: Some(fmt),
        })
    };

    if a.unsafe_mode {
        let top = open_image(&a.file, a.format, Access::Write)?;
        if top.format == Format::Raw {
            return Err(Error::Msg(format!(
                "Could not change the backing file to '{new_name}': Operation not supported"
            )));
        }
        let before = top.image.backing();
        // No data to copy, but a job with progress still reports its (empty) completion.
        let plan = stream::Plan {
            extents: Vec::new(),
            range_len: 0,
        };
        let opts = JobOptions {
            kind: "rebase",
            device: a.file.clone(),
            control: a.control.clone(),
            speed: a.speed,
            jobs: a.jobs,
            progress: a.progress,
            compress: a.compress,
        };
        let done = job::run(&plan, &opts, cancel, |_| {
            top.image
                .set_backing(new.as_ref())
                .map_err(|e| Error::image(&a.file, e))
        })?;
        report(a, new.as_ref(), 0, 0, done.elapsed, before == new);
        return Ok(0);
    }

    let chain = Chain::open(&a.file, OpenOptions::write(a.format))?;
    if chain.top().format == Format::Raw {
        return Err(Error::Msg(format!(
            "Could not change the backing file to '{new_name}': Operation not supported"
        )));
    }
    let size = chain.size();
    // Where the new backing file is: resolved against the image's directory, as stored.
    let resolved = new.as_ref().map(|b| combine(&a.file, &b.name));
    let in_chain = match &resolved {
        None => Some(chain.layers.len()),
        Some(path) => chain.find(path),
    };
    if in_chain == Some(0) {
        return Err(Error::Usage(format!("'{new_name}' is the image itself")));
    }
    if let (Some(path), Some(given)) = (&resolved, new.as_ref().and_then(|b| b.format.as_deref())) {
        refuse_contradicting_format(path, &new_name, cowimg::chain::parse_format(given)?)?;
    }
    let new_chain = match (&resolved, in_chain) {
        (Some(path), None) => {
            let fmt = new
                .as_ref()
                .and_then(|b| b.format.as_deref())
                .map(cowimg::chain::parse_format)
                .transpose()?;
            Some(
                Chain::open(path, OpenOptions::read(fmt, a.force_share)).map_err(|e| {
                    Error::Msg(format!("Could not open new backing file '{new_name}': {e}"))
                })?,
            )
        }
        _ => None,
    };
    let plan = match (in_chain, &new_chain) {
        (Some(base), _) => stream::plan(&chain, base, 0, size)?,
        (None, Some(nc)) => stream::plan_against(&chain, nc)?,
        (None, None) => unreachable!("a new backing file is either in the chain or opened"),
    };
    let opts = JobOptions {
        kind: "rebase",
        device: a.file.clone(),
        control: a.control.clone(),
        speed: a.speed,
        jobs: a.jobs,
        progress: a.progress,
        compress: a.compress,
    };
    let before = chain.top().image.backing();
    let done = job::run(&plan, &opts, cancel, |settings| {
        stream::copy(&chain, &plan, new.is_some(), new_chain.as_ref(), settings)?;
        stream::switch(&chain, new.as_ref())
    })?;
    let nothing_to_do = plan.work() == 0 && before == new;
    report(
        a,
        new.as_ref(),
        plan.range_len,
        done.copied,
        done.elapsed,
        nothing_to_do,
    );
    Ok(0)
}

/// Safe mode reads the new backing file anyway, so it can tell a `-F` its magic contradicts
/// (qemu-img records it, and the image then reads differently). `-u` records `-F` as given,
/// for a backing file not in place yet. A file that cannot be read is left to the open that
/// follows, which says why.
fn refuse_contradicting_format(path: &str, new_name: &str, given: Format) -> Result<()> {
    let Ok(file) = std::fs::File::open(path) else {
        return Ok(());
    };
    let Ok(probed) = probe(&FileStorage::new(file, path)) else {
        return Ok(());
    };
    let how = match probed {
        Probed::Known(f) if f == given => return Ok(()),
        Probed::Known(f) => format!("it is a {f} image, not {given}: pass -F {f}"),
        Probed::Other(name) => {
            format!("it is a {name} image, not {given} (cowimg does not read {name})")
        }
    };
    Err(Error::Msg(format!(
        "Could not change the backing file to '{new_name}': {how}, or -u to record -F {given} as given"
    )))
}

fn report(
    a: &Args,
    backing: Option<&BackingRef>,
    len: u64,
    copied: u64,
    elapsed: f64,
    nothing_to_do: bool,
) {
    if a.json {
        println!(
            "{}",
            job::result_json(&a.file, len, copied, elapsed, backing, nothing_to_do)
        );
    } else if !a.unsafe_mode && a.progress != Mode::Off {
        eprintln!("{}", job::summary(&a.file, copied, elapsed, backing));
    }
}
