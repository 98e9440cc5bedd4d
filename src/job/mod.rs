//! Jobs: long operations (`stream`, `rebase`, `commit`, `convert`, `checksum`) that can be
//! watched and steered while they run, as libvirt's BlockPull API and QEMU's block jobs are.
//!
//! A [`JobHandle`] is the job's shared state: its id and state, its progress (`cur`/`end`
//! from the copy engine's [`Counters`]), its rate limiter (whose cap changes live), and the
//! pause and cancel requests the copy engine honours at chunk boundaries. The handle writes
//! [`events`] (JSON lines with timestamps) and is served on a Unix socket by [`control`];
//! [`client`] is the other end, for `cowimg job`. docs/jobs.md describes the protocol.
//!
//! The handle is an `Arc` owning everything it needs, so any long-lived process (serve's
//! background stream) can create one, start a [`control::ControlServer`] on it, hand
//! `handle.limiter()`, `handle.counters()` and `Some(&handle)` to the copy engine, and call
//! [`JobHandle::finish`] at the end.

pub mod client;
pub mod control;
pub mod events;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::copy::Counters;
use crate::ratelimit::RateLimiter;
use events::Events;

/// The protocol version the control socket speaks (in its greeting).
pub const PROTOCOL_VERSION: u64 = 1;

/// A job's state, named as `query-block-jobs` reports it in `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Set up, not copying yet.
    Created,
    /// Copying.
    Running,
    /// Stopped at a chunk boundary with everything copied committed: safe to kill.
    Paused,
    /// Done: everything copied and committed, the switch made.
    Completed,
    /// Stopped by `block-job-cancel` or a signal, with what was copied committed: rerunning
    /// the command resumes.
    Cancelled,
    /// Stopped by an error (in [`JobInfo::error`]), with what was copied committed.
    Failed,
}

impl State {
    /// Whether the job is over.
    pub fn ended(self) -> bool {
        matches!(self, State::Completed | State::Cancelled | State::Failed)
    }

    /// The exit status of a job that ended this way (`job wait` exits with it): 0, 130 as
    /// after Ctrl-C, 1.
    pub fn exit_status(self) -> i32 {
        match self {
            State::Cancelled => 130,
            State::Failed => 1,
            _ => 0,
        }
    }

    /// The name QMP uses (`status` of `query-block-jobs`).
    pub fn name(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Running => "running",
            State::Paused => "paused",
            State::Completed => "completed",
            State::Cancelled => "cancelled",
            State::Failed => "failed",
        }
    }
}

/// What a job is, fixed when it is created.
pub struct JobSpec {
    /// The id clients name it by (the control socket's name).
    pub id: String,
    /// The operation, as QMP's `type`: stream, rebase, commit, convert, checksum.
    pub kind: &'static str,
    /// The image it works on (QMP's `device`).
    pub device: String,
    /// `end`: guest bytes the job covers.
    pub end: u64,
    /// The initial cap, bytes per second (0 = unlimited).
    pub speed: u64,
}

/// One entry of `query-block-jobs`: QMP's names (`len`, `offset`, `speed`, `status`,
/// `paused`) and cowimg's additions.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// Its operation (QMP's `type`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The image it works on.
    pub device: String,
    /// Its state.
    pub status: State,
    /// Paused (or asked to pause).
    pub paused: bool,
    /// libvirt's `end`.
    pub len: u64,
    /// libvirt's `cur`: guest bytes dealt with (copied, zeroed or needing nothing).
    pub offset: u64,
    /// Bytes of data actually written.
    pub copied: u64,
    /// The cap in bytes per second (0 = unlimited).
    pub speed: u64,
    /// Bytes per second copied over the last few seconds.
    pub current_speed: u64,
    /// Seconds since the job started.
    pub elapsed: f64,
    /// Seconds left at the current speed (or the cap); null when unknown.
    pub eta: Option<f64>,
    /// Why it failed, once it has.
    pub error: Option<String>,
}

struct Inner {
    state: State,
    error: Option<String>,
    /// (when, bytes copied) samples of the last few seconds, for the current speed.
    samples: VecDeque<(Instant, u64)>,
}

/// How far back the current speed looks.
const SPEED_WINDOW: Duration = Duration::from_secs(3);

/// A running job's shared state; see the module documentation.
pub struct JobHandle {
    spec: JobSpec,
    counters: Arc<Counters>,
    limiter: RateLimiter,
    cancel: AtomicBool,
    pause: AtomicBool,
    end: AtomicU64,
    inner: Mutex<Inner>,
    changed: Condvar,
    events: Events,
    started: Instant,
}

impl JobHandle {
    /// A job in state `created` (the `created` event is written) over `counters`.
    pub fn new(spec: JobSpec, counters: Arc<Counters>, events: Events) -> Arc<JobHandle> {
        let h = Arc::new(JobHandle {
            limiter: RateLimiter::new(spec.speed),
            end: AtomicU64::new(spec.end),
            spec,
            counters,
            cancel: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                state: State::Created,
                error: None,
                samples: VecDeque::new(),
            }),
            changed: Condvar::new(),
            events,
            started: Instant::now(),
        });
        h.emit(
            "created",
            json!({"len": h.spec.end, "speed": h.spec.speed, "device": h.spec.device}),
        );
        h
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Its operation (stream, rebase, ...).
    pub fn kind(&self) -> &'static str {
        self.spec.kind
    }

    /// The job's cap as progress reports read it: the current one, `job set-speed` included.
    pub fn cap(self: &Arc<Self>) -> crate::progress::Cap {
        let job = self.clone();
        Arc::new(move || job.limiter().rate())
    }

    /// The limiter the copy workers must use: its cap is the one `block-job-set-speed` changes.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Its progress counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Where its events go.
    pub fn events(&self) -> &Events {
        &self.events
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: &str, mut data: serde_json::Value) {
        if let Some(o) = data.as_object_mut() {
            o.insert("id".into(), self.spec.id.clone().into());
            o.insert("type".into(), self.spec.kind.into());
        }
        self.events.emit(event, data);
    }

    /// Its state now.
    pub fn state(&self) -> State {
        self.lock().state
    }

    /// The copy starts: `created` -> `running`.
    pub fn start(&self) {
        let mut s = self.lock();
        if s.state == State::Created {
            s.state = State::Running;
            drop(s);
            self.emit("running", json!({}));
            self.changed.notify_all();
        }
    }

    /// Changes the cap (0 = unlimited); it applies within one rate-limiter slice.
    pub fn set_speed(&self, bytes_per_sec: u64) -> Result<(), String> {
        let state = self.state();
        if state.ended() {
            return Err(format!("job '{}' has already {}", self.id(), state.name()));
        }
        let previous = self.limiter.rate();
        self.limiter.set_rate(bytes_per_sec);
        self.emit(
            "speed-changed",
            json!({"speed": self.limiter.rate(), "previous": previous}),
        );
        Ok(())
    }

    /// Asks the job to pause and waits (at most `timeout`) until it has: the workers stopped
    /// at a chunk boundary and everything copied is committed. Returns the state then (a job
    /// past its copy ends instead of pausing).
    pub fn pause(&self, timeout: Duration) -> Result<State, String> {
        let state = self.state();
        if state.ended() {
            return Err(format!("job '{}' has already {}", self.id(), state.name()));
        }
        self.pause.store(true, Ordering::SeqCst);
        let until = Instant::now() + timeout;
        let mut s = self.lock();
        while s.state != State::Paused && !s.state.ended() && self.pause.load(Ordering::SeqCst) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "job '{}' did not reach a chunk boundary within {} s; it will pause there",
                    self.id(),
                    timeout.as_secs()
                ));
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(s.state)
    }

    /// Resumes a paused job (or withdraws a pause not yet reached).
    pub fn resume(&self) -> Result<(), String> {
        let state = self.state();
        if state != State::Paused && !self.pause.load(Ordering::SeqCst) {
            return Err(format!(
                "job '{}' is not paused (it is {})",
                self.id(),
                state.name()
            ));
        }
        self.pause.store(false, Ordering::SeqCst);
        self.changed.notify_all();
        Ok(())
    }

    /// Asks the job to stop at the next chunk boundary, committing what it copied, as
    /// Ctrl-C does.
    pub fn cancel(&self) -> Result<(), String> {
        let state = self.state();
        if state.ended() {
            return Err(format!("job '{}' has already {}", self.id(), state.name()));
        }
        self.cancel.store(true, Ordering::SeqCst);
        self.changed.notify_all();
        Ok(())
    }

    /// Whether `block-job-cancel` asked the job to stop.
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Whether a pause is asked for: the copy engine then takes no new chunk, commits, and
    /// calls [`JobHandle::checkpoint`].
    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::Relaxed)
    }

    /// Called by the copy engine with everything copied committed: when a pause is asked
    /// for, the job is `paused` until resumed or cancelled (here or by `signal`).
    pub fn checkpoint(&self, signal: &AtomicBool) {
        if !self.pause_requested() {
            return;
        }
        let mut s = self.lock();
        s.state = State::Paused;
        drop(s);
        self.emit(
            "paused",
            json!({"offset": self.counters.done.load(Ordering::Relaxed)}),
        );
        self.changed.notify_all();
        let mut s = self.lock();
        while self.pause_requested() && !self.cancel_requested() && !signal.load(Ordering::Relaxed)
        {
            // Signals do not notify the condition: look again every 50 ms.
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        self.pause.store(false, Ordering::SeqCst);
        if self.cancel_requested() || signal.load(Ordering::Relaxed) {
            // Cancelled while paused: it stays paused until it ends, without resuming.
            return;
        }
        s.state = State::Running;
        drop(s);
        self.emit("resumed", json!({}));
        self.changed.notify_all();
    }

    /// The job ended: `Ok` completed, `Interrupted` cancelled, any other error failed. Writes
    /// the closing event (with the totals) and wakes every waiter.
    pub fn finish(&self, outcome: Result<(), &crate::Error>) {
        let (state, error) = match outcome {
            Ok(()) => (State::Completed, None),
            Err(crate::Error::Interrupted(_)) => (State::Cancelled, None),
            Err(e) => (State::Failed, Some(e.to_string())),
        };
        let c = &self.counters;
        let mut data = json!({
            "device": self.spec.device,
            "len": self.end.load(Ordering::Relaxed),
            "offset": c.done.load(Ordering::Relaxed),
            "copied": c.copied.load(Ordering::Relaxed),
            "speed": self.limiter.rate(),
            "elapsed": self.started.elapsed().as_secs_f64(),
        });
        let event = match (state, &error) {
            (State::Failed, Some(msg)) => {
                data["error"] = msg.clone().into();
                "error"
            }
            (State::Cancelled, _) => "cancelled",
            _ => "completed",
        };
        // The closing event first, then the state: a waiter that sees the job ended has
        // been sent the event already.
        self.emit(event, data);
        {
            let mut s = self.lock();
            s.state = state;
            s.error = error;
        }
        self.events.close();
        self.changed.notify_all();
    }

    /// Blocks until the job ends; its final state.
    pub fn wait_end(&self) -> State {
        let mut s = self.lock();
        while !s.state.ended() {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.state
    }

    /// Records a speed sample (the control server does every quarter second).
    pub fn sample(&self) {
        let mut s = self.lock();
        self.sample_locked(&mut s);
    }

    fn sample_locked(&self, s: &mut Inner) {
        let now = Instant::now();
        s.samples
            .push_back((now, self.counters.copied.load(Ordering::Relaxed)));
        while s.samples.len() > 2
            && s.samples
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > SPEED_WINDOW)
        {
            s.samples.pop_front();
        }
    }

    /// The job as `query-block-jobs` reports it.
    pub fn info(&self) -> JobInfo {
        let mut s = self.lock();
        self.sample_locked(&mut s);
        let current_speed = match (s.samples.front(), s.samples.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 && s.state == State::Running => {
                ((b1 - b0) as f64 / t1.duration_since(*t0).as_secs_f64()) as u64
            }
            _ => 0,
        };
        let end = self.end.load(Ordering::Relaxed);
        let offset = self.counters.done.load(Ordering::Relaxed);
        let speed = self.limiter.rate();
        let left = end.saturating_sub(offset);
        let pace = if current_speed > 0 {
            current_speed
        } else {
            speed
        };
        let eta = if left == 0 {
            Some(0.0)
        } else if pace > 0 {
            Some(left as f64 / pace as f64)
        } else {
            None
        };
        JobInfo {
            id: self.spec.id.clone(),
            kind: self.spec.kind.to_string(),
            device: self.spec.device.clone(),
            status: s.state,
            paused: s.state == State::Paused,
            len: end,
            offset,
            copied: self.counters.copied.load(Ordering::Relaxed),
            speed,
            current_speed,
            elapsed: self.started.elapsed().as_secs_f64(),
            eta,
            error: s.error.clone(),
        }
    }
}

/// What the user asked of a job's control: `--job-id`, `--control`, `--events`.
#[derive(Clone, Debug, Default)]
pub struct ControlOptions {
    /// `--job-id ID`.
    pub job_id: Option<String>,
    /// The control socket's path instead of `RUNTIME_DIR/ID.sock`.
    pub control: Option<String>,
    /// `--events FILE|-`.
    pub events: Option<String>,
}

/// A job set up as a command runs it: the handle, and its control server while it runs.
pub struct Session {
    /// The job.
    pub handle: Arc<JobHandle>,
    server: Option<control::ControlServer>,
}

impl Session {
    /// Creates the job `spec` describes (its id from `opts`, else `spec.id`) and starts its
    /// control server. With neither `--job-id` nor `--control`, a default id already in use
    /// by a live job becomes `ID-2`, `ID-3`, ..., and a control socket that cannot be set up
    /// is a warning (the job runs without one); asked for explicitly, both are errors.
    pub fn start(
        mut spec: JobSpec,
        counters: Arc<Counters>,
        opts: &ControlOptions,
    ) -> crate::Result<Session> {
        let events = Events::to_path(opts.events.as_deref())?;
        let explicit = opts.job_id.is_some() || opts.control.is_some();
        if let Some(id) = &opts.job_id {
            if !valid_id(id) {
                return Err(crate::Error::Usage(format!(
                    "--job-id '{id}' is not a job id: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
                )));
            }
            spec.id = id.clone();
        }
        let bound = match &opts.control {
            Some(path) => control::bind(std::path::Path::new(path)).and_then(|l| match l {
                Some(l) => Ok((l, std::path::PathBuf::from(path))),
                None => Err(crate::Error::Msg(format!(
                    "a live job already listens on the control socket '{path}': choose another --control path"
                ))),
            }),
            None => Self::bind_id(&mut spec.id, opts.job_id.is_some()),
        };
        let (listener, path) = match bound {
            Ok(b) => (Some(b.0), Some(b.1)),
            Err(e) if !explicit => {
                eprintln!("cowimg: warning: {e}; the job runs without a control socket");
                (None, None)
            }
            Err(e) => return Err(e),
        };
        let handle = JobHandle::new(spec, counters, events);
        let server = match (listener, path) {
            (Some(l), Some(p)) => Some(control::ControlServer::start(handle.clone(), l, p)?),
            _ => None,
        };
        Ok(Session { handle, server })
    }

    /// Binds `RUNTIME_DIR/ID.sock`; a default id taken by a live job gets a suffix.
    fn bind_id(
        id: &mut String,
        explicit: bool,
    ) -> crate::Result<(std::os::unix::net::UnixListener, std::path::PathBuf)> {
        let base = id.clone();
        for n in 1..=99 {
            let candidate = if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            let path = control::socket_for(&candidate)?;
            if let Some(l) = control::bind(&path)? {
                *id = candidate;
                return Ok((l, path));
            }
            if explicit {
                return Err(crate::Error::Msg(format!(
                    "a job with id '{candidate}' is already running (control socket '{}'): choose another --job-id, or watch it with 'cowimg job query {candidate}'",
                    path.display()
                )));
            }
        }
        Err(crate::Error::Msg(format!(
            "99 jobs named '{base}' are running: pass --job-id"
        )))
    }

    /// The control socket's path, if the job has one.
    pub fn socket(&self) -> Option<&std::path::Path> {
        self.server.as_ref().map(|s| s.path())
    }

    /// Ends the job (closing event, waiters woken) and stops the control server.
    pub fn finish(self, outcome: Result<(), &crate::Error>) {
        self.handle.finish(outcome);
        drop(self.server);
    }
}

/// Whether `id` can name a job: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with a dot
/// (it names a file in the runtime directory).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The default id of a job on `image`: its file name, with what an id cannot hold replaced
/// by `_`.
pub fn default_id(image: &str) -> String {
    let name = std::path::Path::new(image)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "job".into());
    let mut id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(56)
        .collect();
    if id.starts_with('.') {
        id.replace_range(0..1, "_");
    }
    if id.is_empty() {
        id = "job".into();
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_file_names() {
        assert_eq!(default_id("/var/lib/images/C.qcow2"), "C.qcow2");
        assert_eq!(default_id("my disk (1).qcow2"), "my_disk__1_.qcow2");
        assert_eq!(default_id(".hidden"), "_hidden");
        assert!(valid_id("C.qcow2"));
        assert!(!valid_id("../x"));
        assert!(!valid_id(""));
        assert!(!valid_id(".x"));
    }

    #[test]
    fn pause_waits_for_the_checkpoint_and_resume_continues() {
        let h = JobHandle::new(
            JobSpec {
                id: "t".into(),
                kind: "stream",
                device: "t.qcow2".into(),
                end: 10,
                speed: 0,
            },
            Arc::new(Counters::default()),
            Events::new(None),
        );
        h.start();
        let signal = Arc::new(AtomicBool::new(false));
        let worker = {
            let (h, signal) = (h.clone(), signal.clone());
            std::thread::spawn(move || {
                while !h.pause_requested() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                h.checkpoint(&signal);
            })
        };
        assert_eq!(h.pause(Duration::from_secs(10)), Ok(State::Paused));
        assert!(h.info().paused);
        h.resume().expect("resume");
        worker.join().expect("worker");
        assert_eq!(h.state(), State::Running);
        assert!(h.resume().is_err());
        h.finish(Ok(()));
        assert_eq!(h.wait_end(), State::Completed);
        assert!(h.cancel().is_err());
    }
}
