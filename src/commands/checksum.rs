//! `cowimg checksum`: prints each image's digest as `blksum` (and `sha256sum`) print theirs,
//! `DIGEST  FILENAME`, or all of them as one JSON array.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use cowimg_formats::Format;
use serde_json::json;

use super::pretty_json;
use cowimg::chain::{Chain, OpenOptions};
use cowimg::checksum::{checksum, Algorithm, Options, BLOCK_SIZE};
use cowimg::copy::Counters;
use cowimg::error::{Error, Result};
use cowimg::job::{JobSpec, Session};
use cowimg::progress::{Mode, Reporter};

/// The arguments of `cowimg checksum` (`cowimg checksum --help` says what each flag does).
pub struct Args {
    /// The images.
    pub files: Vec<String>,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// `-a`: the digest.
    pub algorithm: Algorithm,
    /// Hashing threads.
    pub jobs: usize,
    /// How progress is shown.
    pub progress: Mode,
    /// JSON output (`--output json`).
    pub json: bool,
    /// `-U`: read an image another process may be writing.
    pub force_share: bool,
    /// `--job-id`, `--control`, `--events`: each image is one job (the default id is its
    /// file name).
    pub control: cowimg::job::ControlOptions,
}

/// Checksums every image; one that fails is reported on stderr and the others still get
/// theirs (as `sha256sum` does), and the status is then 1.
pub fn run(a: &Args, cancel: &AtomicBool) -> Result<i32> {
    let mut status = 0;
    let mut results = Vec::new();
    for file in &a.files {
        match one(a, file, cancel) {
            Ok(line) if a.json => results.push(line),
            Ok(line) => println!("{}  {file}", line["checksum"].as_str().unwrap_or_default()),
            Err(e @ Error::Interrupted(_)) => return Err(e),
            Err(e) => {
                eprintln!("cowimg: {e}");
                status = 1;
            }
        }
    }
    if a.json {
        println!("{}", pretty_json(&serde_json::Value::Array(results)));
    }
    Ok(status)
}

fn one(a: &Args, file: &str, cancel: &AtomicBool) -> Result<serde_json::Value> {
    let chain = Chain::open(file, OpenOptions::read(a.format, a.force_share))?;
    let counters = Arc::new(Counters::default());
    let session = Session::start(
        JobSpec {
            id: cowimg::job::default_id(file),
            kind: "checksum",
            device: file.to_string(),
            end: chain.size(),
            speed: 0,
        },
        counters.clone(),
        &a.control,
    )?;
    let job = &session.handle;
    let reporter = Reporter::start(a.progress, chain.size(), job.cap(), counters.clone());
    job.start();
    let result = checksum(
        &chain,
        &Options {
            algorithm: a.algorithm,
            jobs: a.jobs,
            counters: Some(&counters),
            cancel: Some(cancel),
            job: Some(job),
        },
    );
    reporter.finish(result.as_ref().err().map(|e| e.to_string()).as_deref());
    session.finish(result.as_ref().map(|_| ()));
    let c = result?;
    chain.finish()?;
    Ok(json!({
        "filename": file,
        "format": chain.top().format.name(),
        "algorithm": c.algorithm.name(),
        "block-size": BLOCK_SIZE,
        "virtual-size": c.size,
        "bytes-read": c.read,
        "checksum": c.hex(),
    }))
}
