//! `cowimg serve` started by the tests: `timeout -s KILL 300 cowimg serve -t -k SOCKET
//! --pid-file F`, in the scratch directory, killed by its PID when the guard drops.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cowimg_nbd::{Address, Target};

use super::Scratch;

/// A running `cowimg serve -t -k SOCKET`, killed (by PID) when dropped.
pub struct Served {
    child: Option<Child>,
    pid_file: std::path::PathBuf,
    pub socket: std::path::PathBuf,
}

impl Served {
    pub fn start(s: &Scratch, image: &str, extra: &[&str]) -> Served {
        Served::start_env(s, image, extra, &[])
    }

    /// [`Served::start`] with environment variables (the copy engine's test hooks).
    pub fn start_env(s: &Scratch, image: &str, extra: &[&str], env: &[(&str, &str)]) -> Served {
        let socket = s.path(&format!("{image}.sock"));
        let pid_file = s.path(&format!("{image}.pid"));
        let _ = std::fs::remove_file(&pid_file);
        let child = Command::new("timeout")
            .args([
                "-s",
                "KILL",
                "300",
                env!("CARGO_BIN_EXE_cowimg"),
                "serve",
                "-t",
                "-k",
            ])
            .arg(&socket)
            .arg("--pid-file")
            .arg(&pid_file)
            .args(extra)
            .arg(image)
            .envs(env.iter().copied())
            .current_dir(s.dir.path())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cowimg serve (and timeout from coreutils)");
        let mut srv = Served {
            child: Some(child),
            pid_file,
            socket,
        };
        let t = Instant::now();
        while !srv.pid_file.exists() {
            let c = srv.child.as_mut().expect("running");
            if c.try_wait().expect("wait").is_some() {
                let out = srv
                    .child
                    .take()
                    .expect("running")
                    .wait_with_output()
                    .expect("wait");
                panic!(
                    "the server exited: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        srv
    }

    pub fn url(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn target(&self) -> Target {
        Target {
            address: Address::Unix(self.socket.clone()),
            export: String::new(),
        }
    }

    /// The server's own PID (not timeout's).
    pub fn pid(&self) -> i32 {
        std::fs::read_to_string(&self.pid_file)
            .expect("pid file")
            .trim()
            .parse()
            .expect("a pid")
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
    }

    /// SIGTERM, then the server's exit status and stderr.
    pub fn stop(mut self) -> (i32, String) {
        self.signal("-TERM");
        let out = self
            .child
            .take()
            .expect("running")
            .wait_with_output()
            .expect("wait");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// kill -9 of the server, then waits for it.
    pub fn kill9(mut self) {
        let pid = self.pid().to_string();
        self.signal("-KILL");
        wait_gone(&pid);
        let _ = self.child.take().expect("running").wait();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(p) = std::fs::read_to_string(&self.pid_file) {
                let _ = Command::new("kill").args(["-KILL", p.trim()]).status();
                wait_gone(p.trim());
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (up to 10 s) until process `pid` is gone: the server is timeout's child, not ours.
pub fn wait_gone(pid: &str) {
    let t = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && t.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// xorshift, seeded: the tests' random patterns, offsets and moments, reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The backing file `qemu-img info -U` shows for `image` (`None`: standalone).
pub fn backing(s: &Scratch, image: &str) -> Option<String> {
    let info: serde_json::Value =
        serde_json::from_str(&s.qemu_img(&["info", "-U", "--output=json", image])).unwrap();
    info["backing-filename"].as_str().map(str::to_string)
}

/// Waits (up to `secs`) until a served `image`'s backing file is `want`: the stream of
/// `serve --stream` has completed and switched it.
pub fn wait_backing(s: &Scratch, image: &str, want: Option<&str>, secs: u64) {
    let t = Instant::now();
    loop {
        let now = backing(s, image);
        if now.as_deref() == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "the stream did not complete in {secs} s: the backing file is still {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
