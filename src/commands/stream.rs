//! `cowimg stream`: copy into FILE what the layers between it and BASE provide, then make
//! BASE its backing file (none without `--base`).

use std::sync::atomic::AtomicBool;

use cowimg_formats::Format;

use super::job::{self, JobOptions};
use cowimg::chain::{Chain, OpenOptions};
use cowimg::error::{Error, Result};
use cowimg::progress::Mode;
use cowimg::size::size_to_str;
use cowimg::stream::{self, Plan};

/// The arguments of `cowimg stream` (`cowimg stream --help` says what each flag does).
pub struct Args {
    /// The image.
    pub file: String,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// `--base`: the layer kept as the backing file (none: stream everything).
    pub base: Option<String>,
    /// The rate cap in bytes per second (0: none).
    pub speed: u64,
    /// Workers (0: chosen for the source).
    pub jobs: usize,
    /// How progress is shown.
    pub progress: Mode,
    /// JSON output (`--output json`).
    pub json: bool,
    /// `--offset`: the start of a partial stream.
    pub offset: Option<u64>,
    /// `--length`: its length.
    pub length: Option<u64>,
    /// `-c`: store copied clusters compressed (qcow2).
    pub compress: bool,
    /// `--job-id`, `--control`, `--events`.
    pub control: cowimg::job::ControlOptions,
}

/// Runs `cowimg stream`; returns the exit status.
pub fn run(a: &Args, cancel: &AtomicBool) -> Result<i32> {
    let chain = Chain::open(&a.file, OpenOptions::write(a.format))?;
    let top = chain.top();
    let size = top.size();
    let base = stream::find_base(&chain, &a.file, a.base.as_deref())?;
    // "Nothing to do" is a result like any other: the JSON object (and the progress
    // completion event) says so, so that scripts always get one.
    let nothing = if chain.layers.len() == 1 {
        Some(format!(
            "Nothing to stream: '{}' has no backing file.",
            a.file
        ))
    } else if base == 1 {
        let hint = match chain.layers.get(2) {
            Some(_) => format!(
                "; to drop the layers below it, stream that image itself: cowimg stream {}",
                chain.layers[1].filename
            ),
            None => String::new(),
        };
        Some(format!(
            "Nothing to stream: '{}' is already the backing file of '{}'{hint}.",
            chain.layers[1].filename, a.file
        ))
    } else {
        None
    };
    let partial = a.offset.is_some() || a.length.is_some();
    let (start, end) = window(&a.file, size, a.offset, a.length)?;
    let plan = match nothing {
        Some(_) => Plan {
            extents: Vec::new(),
            range_len: end - start,
        },
        None => stream::plan(&chain, base, start, end)?,
    };
    let keep_base = base < chain.layers.len();
    let opts = JobOptions {
        kind: "stream",
        device: a.file.clone(),
        control: a.control.clone(),
        speed: a.speed,
        jobs: a.jobs,
        progress: a.progress,
        compress: a.compress,
    };
    let before = top.image.backing();
    let done = job::run(&plan, &opts, cancel, |settings| {
        if nothing.is_some() {
            return Ok(before.clone());
        }
        if partial {
            // A window of the disk: the layers below still provide the rest.
            stream::copy(&chain, &plan, keep_base, None, settings)?;
            return Ok(chain.top().image.backing());
        }
        stream::copy_and_switch(&chain, base, &plan, settings)
    })?;
    let backing = done.value.as_ref();
    if a.json {
        if let Some(msg) = &nothing {
            eprintln!("{msg}");
        }
        let nothing_to_do = plan.work() == 0 && done.value == before;
        println!(
            "{}",
            job::result_json(
                &a.file,
                plan.range_len,
                done.copied,
                done.elapsed,
                backing,
                nothing_to_do
            )
        );
    } else if let Some(msg) = &nothing {
        println!("{msg}");
    } else if partial {
        println!(
            "Copied {} into '{}' in {:.2} s; the range {start}..{end} is streamed; the backing file is unchanged.",
            size_to_str(done.copied),
            a.file,
            done.elapsed
        );
    } else {
        println!(
            "{}",
            job::summary(&a.file, done.copied, done.elapsed, backing)
        );
    }
    Ok(0)
}

/// The guest range `--offset`/`--length` ask for (the whole image without them); a window
/// reaching past the end is refused, as it would stream nothing there and say it did.
fn window(file: &str, size: u64, offset: Option<u64>, length: Option<u64>) -> Result<(u64, u64)> {
    let start = offset.unwrap_or(0);
    let virtual_size = format!("its virtual size is {} ({size} bytes)", size_to_str(size));
    if offset.is_some() && start >= size {
        return Err(Error::Usage(format!(
            "--offset {start} is at or past the end of '{file}': {virtual_size}"
        )));
    }
    let end = match length {
        None => size,
        Some(l) => start.checked_add(l).filter(|&e| e <= size).ok_or_else(|| {
            Error::Usage(format!(
                "--offset {start} --length {l} ends past the end of '{file}': {virtual_size}, so at most {} bytes remain from {start}",
                size - start
            ))
        })?,
    };
    Ok((start, end))
}
