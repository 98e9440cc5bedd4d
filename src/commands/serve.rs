//! `cowimg serve`: exports an image over NBD until SIGINT/SIGTERM (or, without
//! `--persistent`, until its last client leaves and the stream, if any, is done), then
//! commits and exits 0. `--stream` runs the stream job in a background thread meanwhile.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cowimg_formats::Format;
use cowimg_nbd::server::{Export, Server};

use cowimg::chain::{open_image, Chain, OpenOptions};
use cowimg::error::{Error, Result};
use cowimg::lock::Access;
use cowimg::serve::{ImageBackend, Streamed};
use cowimg::size::size_to_str;

/// Where to listen.
pub enum Listen {
    /// `-k PATH`: a Unix socket.
    Unix(String),
    /// `-b HOST -p PORT`: TCP.
    Tcp {
        /// The address to bind.
        host: String,
        /// The port.
        port: u16,
    },
}

/// The arguments of `cowimg serve` (`cowimg serve --help` says what each flag does).
pub struct Args {
    /// The image to export.
    pub image: String,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// Where to listen.
    pub listen: Listen,
    /// `-x`: the export's name.
    pub export: String,
    /// `-D`: the export's description.
    pub description: String,
    /// `-r`: refuse writes.
    pub read_only: bool,
    /// `--copy-on-read` / `--no-copy-on-read`; `None` follows the image's flag.
    pub copy_on_read: Option<bool>,
    /// Clients served at once; more wait to be accepted.
    pub shared: usize,
    /// `-t`: keep serving after the last client leaves.
    pub persistent: bool,
    /// `--pid-file`: write the server's PID there once it listens.
    pub pid_file: Option<String>,
    /// `--stream`: stream the backing chain into the image while serving.
    pub stream: Option<StreamArgs>,
    /// `--handshake-limit`: seconds a client has to finish the handshake (0: no limit).
    pub handshake_limit: u64,
}

/// What `--stream` streams and how fast.
pub struct StreamArgs {
    /// `--base`: the backing file to keep (none: stream everything).
    pub base: Option<String>,
    /// `--speed`, bytes per second (0: unlimited).
    pub speed: u64,
    /// `--job-id`, `--control`, `--events` of the stream job.
    pub control: cowimg::job::ControlOptions,
}

/// Copy workers of the background stream: few, so that clients keep the machine's cores.
const STREAM_JOBS: usize = 2;

/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// One accepted connection, of either kind.
enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }

    /// Bounds (or, with `None`, unbounds) each read; the option belongs to the socket, so
    /// it applies to every clone of it.
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_read_timeout(t),
            Sock::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn shutdown_read(&self) {
        // Wakes the connection's blocking read; it fails only when the peer is gone already.
        let _ = match self {
            Sock::Unix(s) => s.shutdown(Shutdown::Read),
            Sock::Tcp(s) => s.shutdown(Shutdown::Read),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(buf),
            Sock::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(buf),
            Sock::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.flush(),
            Sock::Tcp(s) => s.flush(),
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn bind(l: &Listen) -> Result<Listener> {
        if let Listen::Unix(path) = l {
            remove_stale_socket(path);
        }
        let failed =
            |what: String, e: io::Error| Error::Msg(format!("cannot listen on {what}: {e}"));
        let listener = match l {
            Listen::Unix(path) => Listener::Unix(UnixListener::bind(path).map_err(|e| {
                failed(
                    format!("'{path}'"),
                    if e.kind() == io::ErrorKind::AddrInUse {
                        io::Error::new(e.kind(), "the path exists and is not a stale socket")
                    } else {
                        e
                    },
                )
            })?),
            Listen::Tcp { host, port } => Listener::Tcp(
                TcpListener::bind((host.as_str(), *port))
                    .map_err(|e| failed(format!("{host}:{port}"), e))?,
            ),
        };
        // Non-blocking, so that the accept loop can notice a stop request.
        match &listener {
            Listener::Unix(u) => u.set_nonblocking(true),
            Listener::Tcp(t) => t.set_nonblocking(true),
        }
        .map_err(|e| Error::Msg(format!("cannot listen: {e}")))?;
        Ok(listener)
    }

    fn accept(&self) -> io::Result<Sock> {
        Ok(match self {
            Listener::Unix(u) => {
                let (s, _) = u.accept()?;
                s.set_nonblocking(false)?;
                Sock::Unix(s)
            }
            Listener::Tcp(t) => {
                let (s, _) = t.accept()?;
                s.set_nonblocking(false)?;
                // Replies are small and latency-bound: send them at once.
                s.set_nodelay(true)?;
                Sock::Tcp(s)
            }
        })
    }
}

/// Removes a socket left by a server that died (kill -9), as qemu-nbd does: only a socket,
/// and only when nothing answers on it. Anything else at the path makes the bind fail with
/// its own message.
fn remove_stale_socket(path: &str) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket
        && UnixStream::connect(path).is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
    {
        let _ = std::fs::remove_file(path);
    }
}

/// Opens the chain as `serve` needs it: writable when clients may write, reads copy or the
/// stream runs.
fn open(a: &Args) -> Result<(Chain, bool)> {
    let cor = match a.copy_on_read {
        Some(on) => on,
        // A shared, read-only look at the flag, before the real open takes its locks.
        None => open_image(&a.image, a.format, Access::ReadShared)?
            .image
            .copy_on_read(),
    };
    let mut opts = if a.read_only && !cor && a.stream.is_none() {
        OpenOptions::read(a.format, false)
    } else {
        OpenOptions::write(a.format)
    };
    opts.copy_on_read = cor;
    let chain = Chain::open(&a.image, opts)?;
    Ok((chain, cor))
}

/// Runs `cowimg serve`; returns the exit status.
pub fn run(a: &Args, stop: &AtomicBool) -> Result<i32> {
    if a.shared == 0 {
        return Err(Error::Usage("--shared must be at least 1".into()));
    }
    let (chain, _cor) = open(a)?;
    let base = match &a.stream {
        Some(st) => Some(cowimg::stream::find_base(
            &chain,
            &a.image,
            st.base.as_deref(),
        )?),
        None => None,
    };
    let backend = Arc::new(ImageBackend::new(chain, !a.read_only));
    let server = Arc::new(Server::new(vec![Export {
        name: a.export.clone(),
        description: a.description.clone(),
        backend: backend.clone(),
    }]));
    let listener = Listener::bind(&a.listen)?;
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| Error::Msg(format!("cannot write the pid file '{p}': {e}")))?;
    }
    // A scope, so that the stream thread may borrow the stop flag (it stops with it).
    std::thread::scope(|scope| {
        // The stream starts once clients can connect: they never wait for it.
        let streaming = match (&a.stream, base) {
            (Some(st), Some(base)) => {
                let backend = backend.clone();
                Some(scope.spawn(move || stream_and_log(&a.image, st, base, &backend, stop)))
            }
            _ => None,
        };
        serve_clients(a, &server, listener, stop, || {
            streaming.as_ref().is_none_or(|t| t.is_finished())
        });
        // A stop request has stopped the stream too (it shares the flag); its copies are
        // committed when it returns.
        let streamed = streaming.map(|t| {
            t.join()
                .unwrap_or_else(|_| Err(Error::Msg("the stream thread panicked".into())))
        });
        let result = backend.finish();
        if let Some(p) = &a.pid_file {
            let _ = std::fs::remove_file(p);
        }
        result?;
        match streamed {
            // Reported when it happened; the image is as consistent as after any stop.
            Some(Err(e)) if !matches!(e, Error::Interrupted(_)) => Err(e),
            _ => Ok(0),
        }
    })
}

/// Accepts and serves clients until a stop request, or (without `--persistent`) until
/// the last client has left and `done()` says the background work is over too; then
/// stops accepting and lets each open connection finish the request it is serving.
fn serve_clients(
    a: &Args,
    server: &Arc<Server>,
    listener: Listener,
    stop: &AtomicBool,
    done: impl Fn() -> bool,
) {
    // Open connections, by number: their sockets, to wake them at shutdown.
    let open_conns: Arc<Mutex<HashMap<u64, Sock>>> = Arc::default();
    let mut threads = Vec::new();
    let mut next = 0u64;
    let mut served = false;
    while !stop.load(Ordering::SeqCst) {
        let active = open_conns.lock().unwrap_or_else(|e| e.into_inner()).len();
        if !a.persistent && served && active == 0 && done() {
            break;
        }
        if active >= a.shared {
            std::thread::sleep(POLL);
            continue;
        }
        let sock = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("cowimg serve: accepting a connection failed: {e}");
                std::thread::sleep(POLL);
                continue;
            }
        };
        // A client that connects and sends nothing must not hold one of the -e slots for
        // ever: its handshake is bounded (as qemu-nbd's --handshake-limit), the requests
        // after it are not.
        let limit = (a.handshake_limit > 0).then(|| Duration::from_secs(a.handshake_limit));
        let (id, reader, waker, timer) = match (
            sock.try_clone(),
            sock.try_clone(),
            sock.try_clone(),
            sock.set_read_timeout(limit),
        ) {
            (Ok(r), Ok(w), Ok(t), Ok(())) => (next, r, w, t),
            (Err(e), _, _, _) | (_, Err(e), _, _) | (_, _, Err(e), _) | (_, _, _, Err(e)) => {
                eprintln!("cowimg serve: a connection could not be set up: {e}");
                continue;
            }
        };
        next += 1;
        served = true;
        open_conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, waker);
        let (server, conns, limit_secs) = (server.clone(), open_conns.clone(), a.handshake_limit);
        threads.push(std::thread::spawn(move || {
            let lift = || {
                if let Err(e) = timer.set_read_timeout(None) {
                    eprintln!("cowimg serve: connection {id}: {e}");
                }
            };
            match server.handle_then(reader, sock, lift) {
                Err(cowimg_nbd::server::ConnectionError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    eprintln!(
                        "cowimg serve: connection {id}: no handshake within {limit_secs} s (--handshake-limit): dropped"
                    )
                }
                Err(e) => eprintln!("cowimg serve: connection {id}: {e}"),
                Ok(()) => {}
            }
            conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        }));
        threads.retain(|t| !t.is_finished());
    }
    // Stop: no new connections; each open one finishes the request it is serving.
    drop(listener);
    for s in open_conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
    {
        s.shutdown_read();
    }
    for t in threads {
        let _ = t.join();
    }
    if let Listen::Unix(path) = &a.listen {
        let _ = std::fs::remove_file(path);
    }
}

/// Runs the stream (see [`ImageBackend::stream`]) and says on stderr how it ended:
/// completed (and what the backing file is now), interrupted (resumable), or failed (the
/// image is served on as it is).
fn stream_and_log(
    image: &str,
    st: &StreamArgs,
    base: usize,
    backend: &ImageBackend,
    stop: &AtomicBool,
) -> Result<Streamed> {
    let r = backend.stream(base, st.speed, STREAM_JOBS, stop, &st.control);
    match &r {
            Ok(s) if s.nothing_to_do => eprintln!(
                "cowimg serve: nothing to stream: {}",
                match &s.backing {
                    Some(b) => format!("the backing file of '{image}' is '{}' already", b.name),
                    None => format!("'{image}' has no backing file"),
                }
            ),
            Ok(s) => eprintln!(
                "cowimg serve: stream completed: copied {} ({} bytes) into '{image}' in {:.2} s; {}",
                size_to_str(s.copied),
                s.copied,
                s.elapsed,
                match &s.backing {
                    Some(b) => format!("its backing file is now '{}'", b.name),
                    None => "it is now standalone".to_string(),
                }
            ),
            Err(Error::Interrupted(_)) => eprintln!(
                "cowimg serve: stream interrupted; what it copied is committed: run serve --stream again to copy the rest"
            ),
            Err(e) => eprintln!(
                "cowimg serve: the stream failed: {e}; the image is served as it is, and serve --stream again resumes"
            ),
        }
    r
}
