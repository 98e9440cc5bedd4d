//! Helpers for integration tests: run cowimg and the qemu tools (the oracle) in a scratch dir.
//!
//! Tests that need qemu-img fail when it is missing: CI installs qemu-utils, and a silently
//! skipped interop test would prove nothing.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Scratch {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Status, stdout and stderr as one text, for snapshots.
    pub fn show(&self) -> String {
        format!(
            "exit: {}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    fn from(o: Output) -> Run {
        Run {
            status: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("scratch dir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Run {
        let out = Command::new(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {program} (install qemu-utils for qemu-img/qemu-io): {e}")
            });
        Run::from(out)
    }

    /// Runs a qemu tool and insists that it succeeds.
    pub fn qemu(&self, program: &str, args: &[&str]) -> String {
        let r = self.run(program, args);
        assert_eq!(
            r.status, 0,
            "{program} {args:?} failed: {}{}",
            r.stdout, r.stderr
        );
        r.stdout
    }

    pub fn qemu_img(&self, args: &[&str]) -> String {
        self.qemu("qemu-img", args)
    }

    /// `qemu-img create -f qcow2 -b BASE -F qcow2 TOP`: a qcow2 overlay over a qcow2 image.
    pub fn qcow2_overlay(&self, base: &str, top: &str) {
        self.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top,
        ]);
    }

    /// qemu-io with a list of -c commands.
    pub fn qemu_io(&self, image: &str, cmds: &[&str]) {
        let mut args = vec![
            "-f".to_string(),
            detect_format(&self.path(image)).to_string(),
        ];
        for c in cmds {
            args.push("-c".into());
            args.push(c.to_string());
        }
        args.push(image.into());
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        self.qemu("qemu-io", &refs);
    }

    pub fn cowimg(&self, args: &[&str]) -> Run {
        self.run(env!("CARGO_BIN_EXE_cowimg"), args)
    }

    /// Runs cowimg and insists that it succeeds.
    pub fn cowimg_ok(&self, args: &[&str]) -> String {
        let r = self.cowimg(args);
        assert_eq!(
            r.status, 0,
            "cowimg {args:?} failed: {}{}",
            r.stdout, r.stderr
        );
        r.stdout
    }

    /// `qemu-img compare`: true when identical.
    pub fn same(&self, a: &str, b: &str) -> bool {
        let r = self.run("qemu-img", &["compare", a, b]);
        assert!(
            r.status == 0 || r.status == 1,
            "qemu-img compare {a} {b}: {}{}",
            r.stdout,
            r.stderr
        );
        r.status == 0
    }

    /// cowimg and qemu-img, run with the same `args`, fail alike: the same exit status and
    /// the same message (the program's name aside).
    pub fn refuses_as_qemu_img(&self, args: &[&str]) {
        let (c, q) = (self.cowimg(args), self.run("qemu-img", args));
        assert_eq!(c.status, q.status, "{args:?}: {} vs {}", c.stderr, q.stderr);
        assert_eq!(c.stderr, q.stderr.replace("qemu-img", "cowimg"), "{args:?}");
    }

    /// `qemu-img check` must find no error and no leak.
    pub fn assert_clean(&self, image: &str) {
        let r = self.run("qemu-img", &["check", image]);
        assert_eq!(
            r.status, 0,
            "qemu-img check {image}: {}{}",
            r.stdout, r.stderr
        );
    }

    /// Bytes of guest data `image` holds itself (depth 0 in `qemu-img map`; `-U`, as the
    /// image may be in use by a server).
    pub fn own_data(&self, image: &str) -> u64 {
        let map: serde_json::Value =
            serde_json::from_str(&self.qemu_img(&["map", "-U", "--output=json", image]))
                .expect("qemu-img map JSON");
        map.as_array()
            .expect("a list")
            .iter()
            .filter(|e| e["depth"] == 0 && e["data"] == true)
            .map(|e| e["length"].as_u64().expect("a length"))
            .sum()
    }

    pub fn qemu_info(&self, image: &str) -> serde_json::Value {
        serde_json::from_str(&self.qemu_img(&["info", "--output=json", image]))
            .expect("qemu-img info JSON")
    }

    pub fn write_file(&self, name: &str, data: &[u8]) {
        std::fs::write(self.path(name), data).expect("write file");
    }

    pub fn read_file(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("read file")
    }
}

/// Deterministic bytes that differ at every offset a test reads, with no runs that look like
/// zeros or a pattern (`seed` tells versions apart).
pub fn noise(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// Format of an image by its magic.
pub fn detect_format(p: &Path) -> &'static str {
    let b = std::fs::read(p)
        .map(|v| v.into_iter().take(4).collect::<Vec<u8>>())
        .unwrap_or_default();
    match b.as_slice() {
        b"QFI\xfb" => "qcow2",
        b"QED\0" => "qed",
        _ => "raw",
    }
}

/// Rewrites snapshot entry 0 with 8 bytes of extra data instead of qemu's 24 (no disk size).
/// Returns the length of the table qemu's repair writes.
pub fn shrink_snapshot_entry(s: &Scratch, img: &str) -> usize {
    let b = s.read_file(img);
    let at = u64::from_be_bytes(b[64..72].try_into().expect("8 bytes"));
    let e = &b[at as usize..];
    let extra = u32::from_be_bytes(e[36..40].try_into().expect("4 bytes")) as usize;
    let id_name =
        u16::from_be_bytes([e[12], e[13]]) as usize + u16::from_be_bytes([e[14], e[15]]) as usize;
    assert!(extra >= 16, "qemu-img wrote {extra} bytes of extra data");
    let mut entry = e[..36].to_vec();
    entry.extend_from_slice(&8u32.to_be_bytes());
    entry.extend_from_slice(&e[40..48]);
    entry.extend_from_slice(&e[40 + extra..40 + extra + id_name]);
    entry.resize(40 + extra + id_name, 0);
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(s.path(img))
            .expect("open image"),
        &entry,
        at,
    )
    .expect("rewrite the entry");
    40 + 24 + id_name
}

/// Every key qemu-img prints must be there with qemu-img's value; "actual-size" is the host's
/// business, and under "children" only the child names are compared.
pub fn agree(path: &str, want: &serde_json::Value, got: &serde_json::Value, bad: &mut Vec<String>) {
    match (want, got) {
        (serde_json::Value::Object(w), serde_json::Value::Object(g)) => {
            for (k, wv) in w {
                let p = format!("{path}.{k}");
                match g.get(k) {
                    _ if k == "actual-size" => {}
                    None => bad.push(format!("{p}: missing (qemu-img: {wv})")),
                    Some(gv) if k == "children" => {
                        let names = |v: &serde_json::Value| -> Vec<serde_json::Value> {
                            v.as_array()
                                .map(|a| a.iter().map(|c| c["name"].clone()).collect())
                                .unwrap_or_default()
                        };
                        if names(wv) != names(gv) {
                            bad.push(format!(
                                "{p}: child names {:?}, qemu-img {:?}",
                                names(gv),
                                names(wv)
                            ));
                        }
                    }
                    Some(gv) => agree(&p, wv, gv, bad),
                }
            }
        }
        (serde_json::Value::Array(w), serde_json::Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                agree(&format!("{path}[{i}]"), wv, gv, bad);
            }
        }
        _ if want == got => {}
        _ => bad.push(format!("{path}: cowimg {got}, qemu-img {want}")),
    }
}

/// Snapshot settings for job results (`--output json`, `--progress json`): elapsed times vary.
pub fn timeless() -> insta::internals::SettingsBindDropGuard {
    let mut settings = insta::Settings::clone_current();
    settings.add_filter(r#""elapsed": ?[0-9.e-]+"#, r#""elapsed":[T]"#);
    settings.bind_to_scope()
}

/// The last JSON line of a `--progress json` stderr (human messages may follow the events).
pub fn last_event(stderr: &str) -> serde_json::Value {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .last()
        .unwrap_or_else(|| panic!("no JSON event in: {stderr}"))
}
pub mod peers;
pub mod served;
