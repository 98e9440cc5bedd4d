//! What `stream` and `rebase` share: a copy job run with progress and a rate cap, and the
//! result object they print with `--output json`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cowimg_formats::BackingRef;
use serde_json::json;

use cowimg::copy::Counters;
use cowimg::error::Result;
use cowimg::job::{ControlOptions, JobSpec, Session};
use cowimg::progress::{Mode, Reporter};
use cowimg::stream::{Plan, Settings};

/// How a copy runs as a job (stream, rebase, commit).
pub struct JobOptions {
    /// The operation (QMP's job `type`): stream, rebase, commit.
    pub kind: &'static str,
    /// The image the job works on; the default job id is its file name.
    pub device: String,
    /// `--job-id`, `--control`, `--events`.
    pub control: ControlOptions,
    /// Cap in bytes per second (0 = unlimited).
    pub speed: u64,
    /// Workers (0: chosen for the source).
    pub jobs: usize,
    /// How progress is shown.
    pub progress: Mode,
    /// `-c`: store copied clusters compressed (qcow2).
    pub compress: bool,
}

/// A finished job: its value, the bytes copied and the time it took.
pub struct Done<T> {
    /// What the job returns.
    pub value: T,
    /// Bytes of data written.
    pub copied: u64,
    /// Seconds it took.
    pub elapsed: f64,
}

/// Runs `body` (the copy and whatever follows it) as a job over `plan`: with progress
/// reporting, a control socket and events.
pub fn run<T>(
    plan: &Plan,
    o: &JobOptions,
    cancel: &AtomicBool,
    body: impl FnOnce(&Settings) -> Result<T>,
) -> Result<Done<T>> {
    let counters = Arc::new(Counters::default());
    // Ranges needing nothing count as done from the start, as QEMU's progress counts them.
    counters
        .done
        .store(plan.range_len - plan.work(), Ordering::Relaxed);
    let session = Session::start(
        JobSpec {
            id: cowimg::job::default_id(&o.device),
            kind: o.kind,
            device: o.device.clone(),
            end: plan.range_len,
            speed: o.speed,
        },
        counters.clone(),
        &o.control,
    )?;
    let job = &session.handle;
    let reporter = Reporter::start(o.progress, plan.range_len, job.cap(), counters.clone());
    let started = Instant::now();
    let settings = Settings {
        jobs: o.jobs,
        limiter: job.limiter(),
        cancel,
        counters: &counters,
        compress: o.compress,
        job: Some(job),
    };
    job.start();
    let result = body(&settings);
    let elapsed = started.elapsed().as_secs_f64();
    reporter.finish(result.as_ref().err().map(|e| e.to_string()).as_deref());
    session.finish(result.as_ref().map(|_| ()));
    Ok(Done {
        value: result?,
        copied: counters.copied.load(Ordering::Relaxed),
        elapsed,
    })
}

/// The `--output json` result object. `nothing_to_do`: nothing needed copying and the backing
/// file stays as it was (then `copied` is 0 and the image unchanged).
pub fn result_json(
    file: &str,
    len: u64,
    copied: u64,
    elapsed: f64,
    backing: Option<&BackingRef>,
    nothing_to_do: bool,
) -> String {
    super::pretty_json(&json!({
        "filename": file,
        "len": len,
        "copied": copied,
        "elapsed": elapsed,
        "backing-filename": backing.map(|b| b.name.clone()),
        "backing-filename-format": backing.and_then(|b| b.format.clone()),
        "nothing-to-do": nothing_to_do,
    }))
}

/// The human closing line.
pub fn summary(file: &str, copied: u64, elapsed: f64, backing: Option<&BackingRef>) -> String {
    let tail = match backing {
        Some(b) => format!("its backing file is now '{}'", b.name),
        None => "it is now standalone".to_string(),
    };
    format!(
        "Copied {} into '{file}' in {elapsed:.2} s; {tail}.",
        cowimg::size::size_to_str(copied)
    )
}
