//! Exit statuses scripts rely on, with qemu-img as the oracle: a usage error is 1 for every
//! command (never 2, which means "corrupt" for `check` and "different" for `compare`).

mod common;
use common::Scratch;

/// Each command line gives cowimg the status qemu-img gives it.
#[test]
fn usage_errors_exit_1_as_qemu_img() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "1M"]);
    let cases: &[&[&str]] = &[
        &["check", "--output=JSON", "a.qcow2"],
        &["check", "-x", "a.qcow2"],
        &["check", "-r", "some", "a.qcow2"],
        &["info", "-x", "a.qcow2"],
        &["info", "--output=JSON", "a.qcow2"],
        &["map", "--output=JSON", "a.qcow2"],
        &["create", "-x", "c.qcow2", "1M"],
        &["create", "-f", "qcow2", "c.qcow2"],
        &["convert", "-x", "a.qcow2", "c.raw"],
        &["convert", "a.qcow2"],
        &["rebase", "-x", "a.qcow2"],
        &["rebase", "a.qcow2"],
        &["measure", "-x", "a.qcow2"],
        &["compare", "-x", "a.qcow2", "b.qcow2"],
        &["compare", "a.qcow2"],
        &["compare", "--bogus", "a.qcow2", "b.qcow2"],
        // Not a usage error for qemu-img compare: the image cannot be opened (2).
        &["compare", "-f", "bogus", "a.qcow2", "b.qcow2"],
        &["compare", "a.qcow2", "missing.qcow2"],
        // No command at all.
        &[],
    ];
    let mut bad = Vec::new();
    for args in cases {
        let want = s.run("qemu-img", args).status;
        let got = s.cowimg(args);
        if got.status != want {
            bad.push(format!(
                "{args:?}: cowimg {} (qemu-img {want}): {}",
                got.status, got.stderr
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// `--help` and `--version` succeed (clap prints them through the error path).
#[test]
fn help_and_version_exit_0() {
    let s = Scratch::new();
    for args in [&["--help"][..], &["--version"], &["check", "--help"]] {
        let r = s.cowimg(args);
        assert_eq!(r.status, 0, "{args:?}: {}", r.stderr);
        assert!(!r.stdout.is_empty(), "{args:?}");
    }
}
