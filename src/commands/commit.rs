//! `cowimg commit`: write TOP's data into its backing file (or into BASE further down), then
//! empty TOP, as `qemu-img commit` does; `-d` keeps TOP's data, and `-b` implies `-d`.

use std::sync::atomic::AtomicBool;

use cowimg_formats::Format;
use serde_json::json;

use super::job::{self, JobOptions};
use cowimg::chain::{Chain, OpenOptions};
use cowimg::commit;
use cowimg::error::{Error, Result};
use cowimg::progress::Mode;
use cowimg::stream;

/// The arguments of `cowimg commit` (`cowimg commit --help` says what each flag does).
pub struct Args {
    /// The image.
    pub file: String,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// `-b`: the image to commit into (by resolved path); default: TOP's backing file.
    pub base: Option<String>,
    /// `-d`: keep TOP's data after the commit.
    pub keep_top: bool,
    /// The rate cap in bytes per second (0: none).
    pub speed: u64,
    /// Workers (0: chosen for the source).
    pub jobs: usize,
    /// How progress is shown.
    pub progress: Mode,
    /// JSON output (`--output json`).
    pub json: bool,
    /// `-q`: print nothing on success.
    pub quiet: bool,
    /// `--job-id`, `--control`, `--events`.
    pub control: cowimg::job::ControlOptions,
}

/// Runs `cowimg commit`; returns the exit status.
pub fn run(a: &Args, cancel: &AtomicBool) -> Result<i32> {
    let mut chain = Chain::open(&a.file, OpenOptions::write(a.format))?;
    if chain.layers.len() == 1 {
        return Err(Error::Msg("Image does not have a backing file".into()));
    }
    let base = match &a.base {
        None => 1,
        Some(b) => chain.find(b).filter(|&i| i > 0).ok_or_else(|| {
            Error::Msg(format!(
                "Did not find '{b}' in the backing chain of '{}'",
                a.file
            ))
        })?,
    };
    // As qemu: committing further down leaves the images in between reading the base's new
    // data where they do not mask it, so TOP, which still masks everything it held, is kept
    // whole and the chain above the base keeps reading the same.
    let keep_top = a.keep_top || a.base.is_some();
    commit::open_base_for_writing(&mut chain, base)?;
    let grown = commit::grow_base(&chain, base)?;
    let plan = stream::plan_commit(&chain, base)?;
    let opts = JobOptions {
        kind: "commit",
        device: a.file.clone(),
        control: a.control.clone(),
        speed: a.speed,
        jobs: a.jobs,
        progress: a.progress,
        compress: false,
    };
    let done = job::run(&plan, &opts, cancel, |settings| {
        commit::copy(&chain, base, &plan, settings)?;
        if keep_top {
            Ok(false)
        } else {
            commit::empty_top(&chain)
        }
    })?;
    let base_name = &chain.layers[base].filename;
    if a.json {
        println!(
            "{}",
            super::pretty_json(&json!({
                "filename": a.file,
                "base": base_name,
                "len": plan.range_len,
                "copied": done.copied,
                "elapsed": done.elapsed,
                "base-grown": grown,
                "emptied": done.value,
            }))
        );
    } else if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}
