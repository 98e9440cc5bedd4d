//! NBD servers (nbdkit, qemu-nbd) and web servers (nginx, python) started by the tests, on
//! Unix sockets or loopback, each with a bounded lifetime: run under `timeout`, and stopped by
//! its PID when the guard drops. A missing server fails the test (CI installs nbdkit,
//! qemu-utils, nginx-light and openssl).

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
        let socket = self.socket.clone();
        wait_up(&mut self.child, program, || match (&socket, port) {
            (Some(p), _) => std::os::unix::net::UnixStream::connect(p).is_ok(),
            (None, Some(port)) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            _ => unreachable!("a server listens somewhere"),
        });
    }

    /// `nbdkit PLUGIN ARGS...` on a Unix socket in `dir`, serving export "" (any name).
    /// `filters` come before the plugin (`--filter=delay`, ...).
    pub fn nbdkit(dir: &Path, options: &[&str], plugin_and_args: &[&str]) -> Server {
        let sock = dir.join(format!("nbdkit-{}.sock", unique()));
        Server::nbdkit_at(&sock, options, plugin_and_args)
    }

    /// As [`Server::nbdkit`], on the socket `sock` (a server restarted where it was).
    pub fn nbdkit_at(sock: &Path, options: &[&str], plugin_and_args: &[&str]) -> Server {
        let sock = sock.to_path_buf();
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

/// Waits until `up` says the server `child` listens; fails the test when it exits first or
/// takes longer than 20 s.
fn wait_up(child: &mut Child, program: &str, up: impl Fn() -> bool) {
    let start = Instant::now();
    while !up() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{program} exited before serving: {st}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{program} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
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

/// A web server started by a test on a loopback port: nginx (Range, keep-alive, optionally
/// TLS) or python's `http.server` (which ignores Range). Bounded like [`Server`]: run under
/// `timeout`, stopped by its PID when dropped.
pub struct Web {
    child: Child,
    pub port: u16,
    /// `http://127.0.0.1:PORT` or `https://...`, without a trailing slash.
    pub base: String,
    /// nginx's access log: `METHOD URI PROTO "RANGE" STATUS BYTES CONNECTION` per line.
    pub access_log: Option<PathBuf>,
}

/// TLS material for [`Web::nginx_tls`]: the server's certificate chain and key.
pub struct Tls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

impl Web {
    /// nginx serving the directory `root` over HTTP, its config, logs and temp files in a
    /// directory of its own under `dir`.
    pub fn nginx(dir: &Path, root: &Path) -> Web {
        Web::nginx_with(dir, root, None)
    }

    /// nginx serving `root` over HTTPS with the given certificate and key.
    pub fn nginx_tls(dir: &Path, root: &Path, tls: Tls<'_>) -> Web {
        Web::nginx_with(dir, root, Some(tls))
    }

    fn nginx_with(dir: &Path, root: &Path, tls: Option<Tls<'_>>) -> Web {
        let prefix = dir.join(format!("nginx-{}", unique()));
        std::fs::create_dir_all(prefix.join("tmp")).expect("nginx prefix");
        let port = free_port();
        let p = |name: &str| prefix.join(name).display().to_string();
        let (listen, scheme) = match &tls {
            Some(t) => (
                format!(
                    "listen 127.0.0.1:{port} ssl; ssl_certificate {}; ssl_certificate_key {};",
                    t.cert.display(),
                    t.key.display()
                ),
                "https",
            ),
            None => (format!("listen 127.0.0.1:{port};"), "http"),
        };
        // One process (no master, no user switch), everything under the prefix.
        let conf = format!(
            "master_process off;\nworker_processes 1;\npid {pid};\nerror_log {err};\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  log_format ranges '$request \"$http_range\" $status $body_bytes_sent $connection';\n  \
             access_log {log} ranges;\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  \
             fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n  \
             server {{ {listen} root {root}; }}\n}}\n",
            pid = p("nginx.pid"),
            err = p("error.log"),
            log = p("access.log"),
            tmp = p("tmp"),
            root = root.display(),
        );
        std::fs::write(prefix.join("nginx.conf"), conf).expect("nginx config");
        let args = [
            "-p".to_string(),
            prefix.display().to_string(),
            "-e".to_string(),
            p("error.log"),
            "-c".to_string(),
            p("nginx.conf"),
            "-g".to_string(),
            "daemon off;".to_string(),
        ];
        let mut w = Web::spawn("nginx", &args, root, port, scheme, "install nginx-light");
        w.access_log = Some(prefix.join("access.log"));
        w
    }

    /// `python3 -m http.server` serving `root`: answers `Range` requests with 200 and the
    /// whole file. The system's python3 (PATH may hold another).
    pub fn python(root: &Path) -> Web {
        let port = free_port();
        let args = [
            "-m".to_string(),
            "http.server".to_string(),
            port.to_string(),
            "--bind".to_string(),
            "127.0.0.1".to_string(),
            "--directory".to_string(),
            root.display().to_string(),
        ];
        Web::spawn(
            "/usr/bin/python3",
            &args,
            root,
            port,
            "http",
            "install python3",
        )
    }

    fn spawn(
        program: &str,
        args: &[String],
        root: &Path,
        port: u16,
        scheme: &str,
        hint: &str,
    ) -> Web {
        let child = Command::new("timeout")
            .arg(LIFETIME)
            .arg(program)
            .args(args)
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program} ({hint}): {e}"));
        let mut w = Web {
            child,
            port,
            base: format!("{scheme}://127.0.0.1:{port}"),
            access_log: None,
        };
        wait_up(&mut w.child, program, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        w
    }

    /// The URL of `name` under the served directory.
    pub fn url(&self, name: &str) -> String {
        format!("{}/{name}", self.base)
    }

    /// Stops the server and returns its access log's lines (nginx only; a request is logged
    /// after its answer went out, so the log is read once the server has exited).
    pub fn stop_and_log(self) -> Vec<String> {
        let log = self.access_log.clone().expect("nginx keeps an access log");
        drop(self);
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        // SIGTERM to `timeout`, which passes it on; nginx and python exit on it.
        // SAFETY: signalling a child process we started, by its PID.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// A test CA and a server certificate it signed for 127.0.0.1 and localhost, made with
/// `openssl` in `dir` (a CA and a leaf: rustls refuses a CA certificate as the server's).
/// Returns (CA certificate, server certificate, server key).
pub fn make_test_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run openssl (install openssl): {e}"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=cowimg test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extensions file");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}
