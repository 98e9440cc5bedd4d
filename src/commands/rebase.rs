//! `cowimg rebase`: point an image at a new backing file. Safe by default: whatever would
//! read differently is first copied into the image, with the streaming engine (parallel,
//! throttled, resumable); `-u` only rewrites the pointer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cowimg_formats::{BackingRef, Format};
use serde_json::json;

use crate::chain::{combine, open_image, Chain, OpenOptions};
use crate::copy::Counters;
use crate::error::{Error, Result};
use crate::lock::Access;
use crate::progress::{Mode, Reporter};
use crate::ratelimit::RateLimiter;
use crate::size::size_to_str;
use crate::stream::{self, Settings};

pub struct Args {
    pub file: String,
    pub format: Option<Format>,
    /// `-b`: the new backing file as it is to be stored ("" for none).
    pub backing: Option<String>,
    pub backing_format: Option<String>,
    pub unsafe_mode: bool,
    pub speed: u64,
    pub jobs: usize,
    pub progress: Mode,
    pub json: bool,
    pub force_share: bool,
    pub compress: bool,
}

pub fn run(a: &Args, cancel: &AtomicBool) -> Result<i32> {
    let Some(new_name) = a.backing.clone() else {
        if !a.unsafe_mode {
            return Err(Error::Usage(
                "Must specify backing file (-b) or use unsafe mode (-u)\nTry 'cowimg rebase --help' for more info".into(),
            ));
        }
        return Err(Error::Usage("-u needs -b NEW (or -b \"\" to drop the backing file)".into()));
    };
    let new = if new_name.is_empty() {
        None
    } else {
        let Some(fmt) = a.backing_format.clone() else {
            return Err(Error::Msg(format!(
                "Could not change the backing file to '{new_name}': backing format must be specified (-F)"
            )));
        };
        Format::from_name(&fmt)
            .ok_or_else(|| Error::Usage(format!("Unknown backing format '{fmt}' (cowimg handles qcow2, qed and raw)")))?;
        Some(BackingRef { name: new_name.clone(), format: Some(fmt) })
    };

    if a.unsafe_mode {
        let top = open_image(&a.file, a.format, Access::Write)?;
        if top.format == Format::Raw {
            return Err(Error::Msg(format!("Could not change the backing file to '{new_name}': Operation not supported")));
        }
        top.image.set_backing(new.as_ref()).map_err(|e| Error::image(&a.file, e))?;
        report(a, new.as_ref(), 0, 0.0);
        return Ok(0);
    }

    let chain = Chain::open(&a.file, OpenOptions::write(a.format))?;
    if chain.top().format == Format::Raw {
        return Err(Error::Msg(format!("Could not change the backing file to '{new_name}': Operation not supported")));
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
    let new_chain = match (&resolved, in_chain) {
        (Some(path), None) => {
            let fmt = new.as_ref().and_then(|b| b.format.as_deref()).map(crate::chain::parse_format).transpose()?;
            Some(
                Chain::open(path, OpenOptions::read(fmt, a.force_share))
                    .map_err(|e| Error::Msg(format!("Could not open new backing file '{new_name}': {e}")))?,
            )
        }
        _ => None,
    };
    let plan = match (in_chain, &new_chain) {
        (Some(base), _) => stream::plan(&chain, base, 0, size)?,
        (None, Some(nc)) => stream::plan_against(&chain, nc)?,
        (None, None) => unreachable!("a new backing file is either in the chain or opened"),
    };
    let counters = Arc::new(Counters::default());
    counters.done.store(plan.range_len - plan.work(), Ordering::Relaxed);
    let limiter = RateLimiter::new(a.speed);
    let reporter = Reporter::start(a.progress, plan.range_len, a.speed, counters.clone());
    let started = Instant::now();
    let settings = Settings { jobs: a.jobs, limiter: &limiter, cancel, counters: &counters, compress: a.compress };
    let result = stream::copy(&chain, &plan, new.is_some(), new_chain.as_ref(), &settings)
        .and_then(|()| stream::switch(&chain, new.as_ref()));
    reporter.finish(result.as_ref().err().map(|e| e.to_string()).as_deref());
    result?;
    report(a, new.as_ref(), counters.copied.load(Ordering::Relaxed), started.elapsed().as_secs_f64());
    Ok(0)
}

fn report(a: &Args, backing: Option<&BackingRef>, copied: u64, elapsed: f64) {
    if a.json {
        println!(
            "{}",
            crate::commands::pretty_json(&json!({
                "filename": a.file,
                "copied": copied,
                "elapsed": elapsed,
                "backing-filename": backing.map(|b| b.name.clone()),
                "backing-filename-format": backing.and_then(|b| b.format.clone()),
            }))
        );
    } else if !a.unsafe_mode && a.progress != Mode::Off {
        eprintln!(
            "Copied {} into '{}' in {elapsed:.2} s; {}.",
            size_to_str(copied),
            a.file,
            match backing {
                Some(b) => format!("its backing file is now '{}'", b.name),
                None => "it is now standalone".into(),
            }
        );
    }
}
