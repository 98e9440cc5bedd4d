//! The control socket of a job: a Unix socket speaking versioned JSON lines (docs/jobs.md).
//!
//! It lives in the runtime directory (`$XDG_RUNTIME_DIR/cowimg/`, else `/tmp/cowimg-$UID/`,
//! mode 0700) as `ID.sock` (mode 0600), or at `--control PATH`. A socket left by a job killed
//! with `kill -9` refuses connections: it is detected as stale and replaced; one that answers
//! belongs to a live job, and its id is refused.
//!
//! Each client gets its own thread: a client that stops reading or disappears cannot stall
//! the job, whose workers never wait on the socket.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{JobHandle, PROTOCOL_VERSION};
use crate::error::{Error, Result};

/// The longest request line accepted; longer input is refused and the connection closed.
const MAX_LINE: u64 = 64 << 10;
/// How long `block-job-pause` waits for the job to reach a chunk boundary.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often idle threads look whether the server is stopping.
const POLL: Duration = Duration::from_millis(50);

/// The directory holding the control sockets of a user's jobs, created (0700) if needed:
/// `$XDG_RUNTIME_DIR/cowimg` when that variable names a directory, else `/tmp/cowimg-$UID`.
/// Refused when it is not a directory of this user's that only this user can enter.
pub fn runtime_dir() -> Result<PathBuf> {
    // An XDG_RUNTIME_DIR that does not exist (set, but not created, as in some containers)
    // is passed over rather than making every job warn.
    let dir = match std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty() && Path::new(d).is_dir())
    {
        Some(d) => PathBuf::from(d).join("cowimg"),
        // SAFETY: getuid has no preconditions and cannot fail.
        None => PathBuf::from(format!("/tmp/cowimg-{}", unsafe { libc::getuid() })),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::io(
                format!(
                    "Could not create the job runtime directory '{}'",
                    dir.display()
                ),
                e,
            ))
        }
    }
    let m = std::fs::symlink_metadata(&dir)
        .map_err(|e| Error::io(format!("Could not inspect '{}'", dir.display()), e))?;
    // SAFETY: as above.
    let uid = unsafe { libc::getuid() };
    if !m.is_dir() || m.uid() != uid || m.mode() & 0o077 != 0 {
        return Err(Error::Msg(format!(
            "the job runtime directory '{}' is not a private directory of yours (it must be owned by uid {uid} with mode 0700): remove it, or set XDG_RUNTIME_DIR, or pass --control PATH",
            dir.display()
        )));
    }
    Ok(dir)
}

/// The control socket of job `id` in the runtime directory.
pub fn socket_for(id: &str) -> Result<PathBuf> {
    if !super::valid_id(id) {
        return Err(Error::Usage(format!(
            "'{id}' is not a job id: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        )));
    }
    Ok(runtime_dir()?.join(format!("{id}.sock")))
}

/// Whether a socket file answers (a live job) or not (stale, or not there).
pub fn is_live(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// A socket bound at `path`, replacing a stale one; `Ok(None)` when a live job holds it.
pub fn bind(path: &Path) -> Result<Option<UnixListener>> {
    let ctx = || {
        format!(
            "Could not listen on the control socket '{}'",
            path.display()
        )
    };
    if path.as_os_str().len() >= 108 {
        return Err(Error::Msg(format!(
            "{}: the path is longer than a Unix socket address allows (107 bytes): pass a shorter --control PATH",
            ctx()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if is_live(path) {
                return Ok(None);
            }
            // Left by a job that was killed: nobody listens, so nothing is lost.
            std::fs::remove_file(path).map_err(|e| Error::io(ctx(), e))?;
        }
        Ok(_) => {
            return Err(Error::Msg(format!(
                "{}: a file that is not a socket is there; remove it or choose another path",
                ctx()
            )))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::io(ctx(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(ctx(), e))?;
    Ok(Some(listener))
}

/// The job's end, as the accept loop sees it: its polling sleeps end as soon as it is set, so
/// that a job's end (and the command's) never waits for a poll interval.
#[derive(Default)]
struct Closing {
    set: Mutex<bool>,
    changed: Condvar,
}

impl Closing {
    fn lock(&self) -> std::sync::MutexGuard<'_, bool> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self) {
        *self.lock() = true;
        self.changed.notify_all();
    }

    fn is_set(&self) -> bool {
        *self.lock()
    }

    /// Waits `d`, or less when the job ends meanwhile.
    fn sleep(&self, d: Duration) {
        let set = self.lock();
        if !*set {
            let _ = self.changed.wait_timeout(set, d);
        }
    }
}

/// A running control server; dropping it stops it, lets clients that connected read their
/// replies (at most two seconds), and removes the socket.
pub struct ControlServer {
    path: PathBuf,
    /// Set when the job has ended: the accept loop takes the connections still queued, then
    /// ends.
    closing: Arc<Closing>,
    /// Set last: client threads stop.
    stop: Arc<AtomicBool>,
    /// Connections being served, and `job-wait`s in progress.
    clients: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Serves `job` on `listener` (bound at `path` by [`bind`]).
    pub fn start(job: Arc<JobHandle>, listener: UnixListener, path: PathBuf) -> Result<Self> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("control socket", e))?;
        let closing = Arc::new(Closing::default());
        let stop = Arc::new(AtomicBool::new(false));
        let clients = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (closing, stop, clients) = (closing.clone(), stop.clone(), clients.clone());
            std::thread::Builder::new()
                .name("job-control".into())
                .spawn(move || accept_loop(job, listener, &closing, stop, clients))
                .map_err(|e| Error::io("starting the control thread", e))?
        };
        Ok(ControlServer {
            path,
            closing,
            stop,
            clients,
            thread: Some(thread),
        })
    }

    /// The control socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // No client can connect from here on. One that connected just before (a `job wait`
        // racing the job's end) is accepted by the loop's last round and still gets its
        // reply, which now says how the job ended.
        let _ = std::fs::remove_file(&self.path);
        self.closing.set();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let until = Instant::now() + Duration::from_secs(2);
        while self.clients.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(
    job: Arc<JobHandle>,
    listener: UnixListener,
    closing: &Closing,
    stop: Arc<AtomicBool>,
    clients: Arc<AtomicUsize>,
) {
    let mut last_sample = Instant::now();
    loop {
        // Read before accepting: once it is set, this round empties the queue and ends.
        let last_round = closing.is_set();
        if last_sample.elapsed() >= Duration::from_millis(250) {
            job.sample();
            last_sample = Instant::now();
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let (job, stop, clients) = (job.clone(), stop.clone(), clients.clone());
                // Counted while served, so that the server's end waits for the reply.
                clients.fetch_add(1, Ordering::SeqCst);
                let counted = clients.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("job-client".into())
                        .spawn(move || {
                            let _served = Served(clients.clone());
                            serve_client(&job, stream, &stop, &clients);
                        });
                if spawned.is_err() {
                    // Out of threads: that client is dropped; the job goes on.
                    counted.fetch_sub(1, Ordering::SeqCst);
                    closing.sleep(POLL);
                }
            }
            Err(_) if last_round => return,
            Err(_) => closing.sleep(POLL),
        }
    }
}

/// The greeting sent on connecting, like QMP's.
pub fn greeting(job: &JobHandle) -> Value {
    json!({"cowimg-job": {
        "version": PROTOCOL_VERSION,
        "id": job.id(),
        "type": job.kind(),
        "commands": COMMANDS,
    }})
}

/// The commands the protocol knows.
pub const COMMANDS: [&str; 6] = [
    "query-block-jobs",
    "block-job-set-speed",
    "block-job-pause",
    "block-job-resume",
    "block-job-cancel",
    "job-wait",
];

fn serve_client(job: &JobHandle, stream: UnixStream, stop: &AtomicBool, waiters: &AtomicUsize) {
    // A client that does not read does not hold this thread forever either.
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_read_timeout(Some(POLL));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut send = |v: &Value| writeln!(out, "{v}").and_then(|()| out.flush()).is_ok();
    if !send(&greeting(job)) {
        return;
    }
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let room = MAX_LINE + 1 - line.len() as u64;
        match (&mut reader).take(room).read_until(b'\n', &mut line) {
            Ok(0) if line.is_empty() => return, // the client went away
            Ok(_) if !line.ends_with(b"\n") && (line.len() as u64) <= MAX_LINE => {
                // The end of input without a newline: answer that last request, then close.
                let request = std::mem::take(&mut line);
                let _ = handle_line(job, &request, &mut send, waiters);
                return;
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        if line.len() as u64 > MAX_LINE {
            send(&error_reply(
                None,
                "GenericError",
                &format!("request longer than {MAX_LINE} bytes; closing the connection"),
            ));
            return;
        }
        let request = std::mem::take(&mut line);
        if !handle_line(job, &request, &mut send, waiters) {
            return;
        }
    }
}

/// An error reply, QMP's shape.
fn error_reply(id: Option<&Value>, class: &str, desc: &str) -> Value {
    let mut v = json!({"error": {"class": class, "desc": desc}});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// Answers one request line; false when the connection should close.
fn handle_line(
    job: &JobHandle,
    line: &[u8],
    send: &mut dyn FnMut(&Value) -> bool,
    waiters: &AtomicUsize,
) -> bool {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return true;
    }
    let request: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return send(&error_reply(
                None,
                "GenericError",
                &format!("JSON parse error: {e}; send one JSON object per line, such as {{\"execute\":\"query-block-jobs\"}}"),
            ))
        }
    };
    let id = request.get("id").cloned();
    let reply = match respond(job, &request, send, waiters) {
        Ok(v) => {
            let mut r = json!({"return": v});
            if let Some(id) = &id {
                r["id"] = id.clone();
            }
            r
        }
        Err((class, desc)) => error_reply(id.as_ref(), class, &desc),
    };
    send(&reply)
}

type Reply = std::result::Result<Value, (&'static str, String)>;

fn respond(
    job: &JobHandle,
    request: &Value,
    send: &mut dyn FnMut(&Value) -> bool,
    waiters: &AtomicUsize,
) -> Reply {
    let generic = |m: String| ("GenericError", m);
    let Some(obj) = request.as_object() else {
        return Err(generic("expected a JSON object with \"execute\"".into()));
    };
    if let Some(v) = obj.get("version") {
        if v.as_u64() != Some(PROTOCOL_VERSION) {
            return Err(generic(format!(
                "protocol version {v} is not spoken here: this job speaks version {PROTOCOL_VERSION}"
            )));
        }
    }
    let Some(cmd) = obj.get("execute").and_then(Value::as_str) else {
        return Err(generic(
            "missing \"execute\": name the command to run".into(),
        ));
    };
    let empty = serde_json::Map::new();
    let args = match obj.get("arguments") {
        None => &empty,
        Some(Value::Object(a)) => a,
        Some(_) => return Err(generic("\"arguments\" must be an object".into())),
    };
    // QMP names jobs by `device` (or `id`): a name that is not this job's is refused.
    if let Some(d) = args.get("device") {
        if d.as_str() != Some(job.id()) {
            return Err((
                "DeviceNotActive",
                format!(
                    "No active block job on device '{}'",
                    d.as_str().unwrap_or("?")
                ),
            ));
        }
    }
    match cmd {
        "query-block-jobs" => Ok(json!([job.info()])),
        "block-job-set-speed" => {
            let speed = args
                .get("speed")
                .and_then(Value::as_u64)
                .ok_or_else(|| generic("block-job-set-speed needs \"speed\": bytes per second, an integer >= 0 (0 = unlimited)".into()))?;
            job.set_speed(speed).map_err(generic)?;
            Ok(json!({}))
        }
        "block-job-pause" => {
            let state = job.pause(PAUSE_TIMEOUT).map_err(generic)?;
            Ok(json!({"status": state}))
        }
        "block-job-resume" => job.resume().map(|()| json!({})).map_err(generic),
        "block-job-cancel" => job.cancel().map(|()| json!({})).map_err(generic),
        "job-wait" => {
            // Subscribe first, so that the end cannot slip between the look and the wait.
            let events = job.events().subscribe();
            let _waiting = Waiting::new(waiters);
            loop {
                if job.state().ended() {
                    // What is still queued (the closing event) goes out before the reply.
                    while let Ok(line) = events.try_recv() {
                        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                        if !send(&v) {
                            return Err(generic("client went away".into()));
                        }
                    }
                    let state = job.state();
                    return Ok(
                        json!({"status": state, "exit-status": state.exit_status(), "job": job.info()}),
                    );
                }
                match events.recv_timeout(POLL) {
                    Ok(line) => {
                        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                        if !send(&v) {
                            return Err(generic("client went away".into()));
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        // Closed: the job has ended; the next look says so.
                        if !job.state().ended() {
                            std::thread::sleep(POLL);
                        }
                    }
                }
            }
        }
        other => Err((
            "CommandNotFound",
            format!(
                "The command {other} has not been found; this job knows: {}",
                COMMANDS.join(", ")
            ),
        )),
    }
}

/// Counts a connection being served until its thread ends.
struct Served(Arc<AtomicUsize>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a `job-wait` in progress, so that the server lets it finish before stopping.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
