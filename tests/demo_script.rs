//! `scripts/demo.sh` must not sit silent while it builds: it says it is building and lets
//! cargo's progress through.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

/// A stand-in `cargo` that behaves like the real one on stderr (progress unless `-q`) and then
/// fails, so the script stops right after the build step without building anything.
const FAKE_CARGO: &str = r#"#!/bin/sh
case " $* " in *" -q "*) ;; *) echo "   Compiling cowimg (fake)" >&2 ;; esac
exit 3
"#;

#[test]
fn demo_shows_the_build() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cargo = dir.path().join("cargo");
    std::fs::write(&cargo, FAKE_CARGO).expect("write fake cargo");
    std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755))
        .expect("chmod fake cargo");
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("PATH", path)
        .output()
        .expect("run demo.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stops at the failed build: {stderr}"
    );
    assert!(
        stderr.starts_with("building cowimg (first build takes a minute)\n"),
        "announces the build first: {stderr}"
    );
    assert!(
        stderr.contains("Compiling cowimg (fake)"),
        "cargo's progress is shown: {stderr}"
    );
}
