//! Command-line values: sizes read as qemu-img reads them (qemu-img itself is the reference)
//! and range-checked before use, and `--jobs` bounded everywhere it is accepted.

mod common;
use common::Scratch;

use cowimg::size::{parse_size, SizeError, MAX_SIZE};
use proptest::prelude::*;

/// How qemu-img reads `s` as an image size: `Ok(bytes)`, or the kind of refusal.
fn qemu_reads(s: &Scratch, size: &str) -> Result<u64, SizeError> {
    // `--` so that a leading '-' is a size, not an option. Raw creation may fail after
    // parsing (the file system's limit), but the "Formatting" line has the parsed size.
    let r = s.run("qemu-img", &["create", "-f", "raw", "x.raw", "--", size]);
    if let Some(rest) = r.stdout.split(" size=").nth(1) {
        return Ok(rest
            .trim()
            .parse()
            .expect("qemu-img prints the size in bytes"));
    }
    if r.stderr
        .contains("Must be between 0 and 9223372036854775807")
    {
        return Err(SizeError::OutOfRange);
    }
    assert!(
        r.stderr.contains("Invalid image size specified: '"),
        "qemu-img create {size:?}: {}{}",
        r.stdout,
        r.stderr
    );
    Err(SizeError::Invalid)
}

/// cowimg's reading, with qemu-img's range applied (a size beyond `INT64_MAX` is out of range).
fn cowimg_reads(size: &str) -> Result<u64, SizeError> {
    match parse_size(size) {
        Ok(v) if v > MAX_SIZE => Err(SizeError::OutOfRange),
        r => r,
    }
}

#[test]
fn sizes_read_as_qemu_img_reads_them() {
    let s = Scratch::new();
    for size in [
        "0x1000",
        "0X1b",
        "1.5k",
        "1.k",
        ".5k",
        "+.5k",
        " 7",
        "1.0",
        "0.0001k",
        "1.5e",
        "0.3333333333333333333E",
        "1.99999999999999999999k",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "8E",
        "7.99999999999999999999E",
        "-1",
        "-5k",
        "-.5",
        "64Q",
        "1.5",
        "1e3",
        "0x",
        "0x10k",
        "0x1.8",
        "1KiB",
        "7 ",
        "",
    ] {
        assert_eq!(cowimg_reads(size), qemu_reads(&s, size), "size {size:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, .. ProptestConfig::default() })]

    /// Strings shaped like sizes (and near misses: signs, junk, hex with fractions or
    /// suffixes, 20+ digits that overflow) are read exactly as qemu-img reads them.
    #[test]
    fn size_strings_agree_with_qemu_img(
        size in "[ ]?[+-]?(0[xX][0-9a-fA-F]{0,17}|[0-9]{0,21})(\\.[0-9]{0,22})?[bBkKmMgGtTpPeEiQ]?[0-9x ]?"
    ) {
        let s = Scratch::new();
        prop_assert_eq!(cowimg_reads(&size), qemu_reads(&s, &size), "size {:?}", size);
    }
}

/// Sizes near 2^64 used to wrap when rounded up to a sector: `create` exited 0 with a
/// 0-byte image. Every format now refuses them as qemu-img does, and each format's own
/// limit is named in qemu-img's words.
#[test]
fn create_refuses_sizes_beyond_qemu_img_limits() {
    let s = Scratch::new();
    let range = "Invalid image size specified. Must be between 0 and 9223372036854775807.";
    let cases: &[(&str, &str, &str)] = &[
        ("qcow2", "18446744073709551615", range),
        ("qcow2", "18446744073709551105", range),
        ("qed", "18446744073709551615", range),
        ("raw", "18446744073709551615", range),
        ("qcow2", "8E", range),
        (
            "qcow2",
            "1E",
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
        ),
        (
            "qcow2",
            "2251799813685249",
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
        ),
        (
            "qed",
            "1E",
            "QED image size must be a non-zero multiple of cluster size and less than 70368744177664 bytes",
        ),
        ("raw", "1E", "The image size is too large for file format 'raw'"),
    ];
    for (fmt, size, want) in cases {
        let name = format!("big.{fmt}");
        let r = s.cowimg(&["create", "-q", "-f", fmt, &name, size]);
        assert_eq!(r.status, 1, "create -f {fmt} {size}: {}", r.stderr);
        assert!(
            r.stderr.contains(want),
            "create -f {fmt} {size}: {}",
            r.stderr
        );
        // qemu-img refuses the same size.
        let q = s.run("qemu-img", &["create", "-f", fmt, "q.img", size]);
        assert_ne!(q.status, 0, "qemu-img create -f {fmt} {size}");
        assert!(
            !s.path(&name).exists(),
            "create -f {fmt} {size} left a file"
        );
    }
    // The limits themselves are accepted, hexadecimal too.
    s.cowimg_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "max.qcow2",
        "2251799813685248",
    ]);
    s.assert_clean("max.qcow2");
    s.cowimg_ok(&["create", "-q", "-f", "qcow2", "hex.qcow2", "0x100000"]);
    assert_eq!(s.qemu_info("hex.qcow2")["virtual-size"], 1 << 20);
}

/// Every size-valued option is range-checked and its refusal names the option.
#[test]
fn size_options_name_themselves_when_refused() {
    let s = Scratch::new();
    s.cowimg_ok(&["create", "-q", "-f", "qcow2", "t.qcow2", "1M"]);
    let between = "specified. Must be between 0 and 9223372036854775807.";
    let cases: &[(&[&str], String)] = &[
        (
            &["map", "--start-offset", "8E", "t.qcow2"],
            format!("Invalid start offset {between}"),
        ),
        (
            &["map", "--max-length", "18446744073709551615", "t.qcow2"],
            format!("Invalid max length {between}"),
        ),
        (
            &["measure", "--size", "16E", "-O", "qcow2"],
            format!("Invalid image size {between}"),
        ),
        (
            &["stream", "--speed", "8E", "t.qcow2"],
            format!("Invalid speed (--speed) {between}"),
        ),
        (
            &["stream", "--offset", "64Q", "t.qcow2"],
            "Invalid offset (--offset) specified: '64Q'.".to_string(),
        ),
        (
            &["create", "-f", "qcow2", "-o", "size=16E", "o.qcow2"],
            "Value '16E' is out of range for parameter 'size'".to_string(),
        ),
    ];
    for (args, want) in cases {
        let r = s.cowimg(args);
        assert_eq!(r.status, 1, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(want.as_str()), "{args:?}: {}", r.stderr);
    }
}

/// A value that is not a size: the first line is qemu-img's where qemu-img has the option
/// (compared with it), and a hint follows naming the option as typed and the forms it takes.
#[test]
fn invalid_sizes_name_the_option_and_the_accepted_forms() {
    let s = Scratch::new();
    s.cowimg_ok(&["create", "-q", "-f", "qcow2", "t.qcow2", "1M"]);
    let mut out = String::new();
    for args in [
        &["create", "-f", "qcow2", "x.qcow2", "10X"][..],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=10X",
            "x.qcow2",
            "1G",
        ],
        &["create", "-f", "qcow2", "-o", "size=1.5", "x.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "--cluster-size",
            "64KiB",
            "x.qcow2",
            "1G",
        ],
        &["measure", "-O", "qcow2", "--size", "10X"],
        &["map", "--start-offset", "10X", "t.qcow2"],
        &["map", "--max-length", "1e3", "t.qcow2"],
        &["stream", "--speed", "10X", "t.qcow2"],
        &["stream", "--offset", "0x", "--length", "1M", "t.qcow2"],
        &["stream", "--offset", "0", "--length", "1M.", "t.qcow2"],
        &["rebase", "--speed", "fast", "-b", "", "t.qcow2"],
        // Out of range: the message says the range; no hint.
        &["stream", "--speed", "8E", "t.qcow2"],
        // Not a size in bytes: no size hint.
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=x",
            "x.qcow2",
            "1G",
        ],
    ] {
        let r = s.cowimg(args);
        assert_eq!(r.status, 1, "{args:?}: {}", r.stderr);
        out += &format!("$ cowimg {}\n{}\n", args.join(" "), r.show());
    }
    insta::assert_snapshot!("invalid_sizes", out);
    assert!(!s.path("x.qcow2").exists());
    // Where qemu-img has the option, its line comes first, word for word.
    for args in [
        &["create", "-f", "qcow2", "x.qcow2", "10X"][..],
        &["measure", "-O", "qcow2", "--size", "10X"],
        &["map", "--start-offset", "10X", "t.qcow2"],
        &["map", "--max-length", "1e3", "t.qcow2"],
    ] {
        let q = s.run("qemu-img", args);
        let c = s.cowimg(args);
        assert_eq!(
            c.stderr.lines().next(),
            Some(q.stderr.replace("qemu-img", "cowimg").trim_end()),
            "{args:?}"
        );
    }
}

/// `--jobs` is bounded (1..=256) by every command that takes it, refused as a usage error
/// before anything is opened, instead of spawning a thread per job.
#[test]
fn jobs_outside_the_limit_are_refused_everywhere() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    for jobs in ["0", "257", "100000"] {
        for args in [
            vec!["stream", "--jobs", jobs, "top.qcow2"],
            vec!["rebase", "--jobs", jobs, "-b", "", "top.qcow2"],
            vec!["convert", "--jobs", jobs, "top.qcow2", "out.raw"],
        ] {
            let r = s.cowimg(&args);
            assert_eq!(r.status, 1, "{args:?}: {}", r.stderr);
            assert!(
                r.stderr
                    .contains(&format!("--jobs must be between 1 and 256, not {jobs}")),
                "{args:?}: {}",
                r.stderr
            );
        }
    }
    assert!(!s.path("out.raw").exists());
    // The limit itself works.
    s.cowimg_ok(&["convert", "--jobs", "256", "top.qcow2", "out.raw"]);
    s.cowimg_ok(&["stream", "--jobs", "256", "top.qcow2"]);
}
