//! NBD servers started by the tests (nbdkit, qemu-nbd), on Unix sockets or loopback, each
//! with a bounded lifetime: run under `timeout`, and stopped by its PID when the guard drops.
//! A missing server fails the test (CI installs nbdkit and qemu-utils).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a test server lives, whatever happens to the test.
const LIFETIME: &str = "120";

pub struct Server {
    child: Child,
    /// The export's URL (`nbd+unix:///EXPORT?socket=...` or `nbd://127.0.0.1:PORT/EXPORT`).
    pub url: String,
    pub socket: Option<PathBuf>,
}

impl Server {
    fn start(
        program: &str,
        args: &[String],
        url: String,
        socket: Option<PathBuf>,
        port: Option<u16>,
    ) -> Server {
        let child = Command::new("timeout")
            .arg(LIFETIME)
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program} (install nbdkit, qemu-utils): {e}"));
        let mut s = Server { child, url, socket };
        s.wait_ready(program, port);
        s
    }

    fn wait_ready(&mut self, program: &str, port: Option<u16>) {
        let start = Instant::now();
        loop {
            let up = match (&self.socket, port) {
                (Some(p), _) => std::os::unix::net::UnixStream::connect(p).is_ok(),
                (None, Some(port)) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
                _ => unreachable!("a server listens somewhere"),
            };
            if up {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{program} exited before serving: {st}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{program} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nbdkit PLUGIN ARGS...` on a Unix socket in `dir`, serving export "" (any name).
    /// `filters` come before the plugin (`--filter=delay`, ...).
    pub fn nbdkit(dir: &Path, options: &[&str], plugin_and_args: &[&str]) -> Server {
        let sock = dir.join(format!("nbdkit-{}.sock", unique()));
        let mut args: Vec<String> = ["-f", "--exit-with-parent", "-U"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(sock.display().to_string());
        args.extend(options.iter().map(|s| s.to_string()));
        args.extend(plugin_and_args.iter().map(|s| s.to_string()));
        let url = format!("nbd+unix:///?socket={}", sock.display());
        Server::start("nbdkit", &args, url, Some(sock), None)
    }

    /// `qemu-nbd` serving `image` as export `name` on a Unix socket in `dir`.
    pub fn qemu_nbd_unix(dir: &Path, name: &str, options: &[&str], image: &Path) -> Server {
        let sock = dir.join(format!("qemu-nbd-{}.sock", unique()));
        let mut args = vec![
            format!("--socket={}", sock.display()),
            format!("--export-name={name}"),
        ];
        args.extend(options.iter().map(|s| s.to_string()));
        args.push(image.display().to_string());
        let url = format!("nbd+unix:///{name}?socket={}", sock.display());
        Server::start("qemu-nbd", &args, url, Some(sock), None)
    }

    /// `qemu-nbd` serving `image` as export `name` on a loopback TCP port.
    pub fn qemu_nbd_tcp(name: &str, options: &[&str], image: &Path) -> (Server, u16) {
        let port = free_port();
        let mut args = vec![
            "--bind=127.0.0.1".to_string(),
            format!("--port={port}"),
            format!("--export-name={name}"),
        ];
        args.extend(options.iter().map(|s| s.to_string()));
        args.push(image.display().to_string());
        let url = format!("nbd://127.0.0.1:{port}/{name}");
        (
            Server::start("qemu-nbd", &args, url, None, Some(port)),
            port,
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM to `timeout`, which passes it on to the server; then reap it.
        // SAFETY: signalling a child process we started, by its PID.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// A loopback port nobody listens on (the kernel's choice; released before the server binds).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}
