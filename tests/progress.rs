//! Progress as people and programs see it: every command that reports progress reaches 100%
//! (and `offset == len`) on success, and the rate and ETA come from the bytes actually copied.

mod common;
use common::Scratch;

/// A 4 GiB qcow2 base with 24 MiB of data in three places, and a top over it: streaming jumps
/// over almost all of the guest range and copies the little data there is.
fn sparse_chain(s: &Scratch) {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4G"]);
    s.qemu_io(
        "base.qcow2",
        &[
            "write -q -P 1 0 8M",
            "write -q -P 2 1G 8M",
            "write -q -P 3 3G 8M",
        ],
    );
    s.qcow2_overlay("base.qcow2", "top.qcow2");
}

/// The last percentage line of `-p` output without a terminal.
fn last_percentage(stderr: &str) -> &str {
    stderr
        .lines()
        .filter(|l| l.trim_start().starts_with('('))
        .last()
        .unwrap_or_else(|| panic!("no percentage line in: {stderr}"))
}

#[test]
fn every_progress_ends_at_100_percent() {
    let s = Scratch::new();
    sparse_chain(&s);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "other.qcow2", "4G"]);
    // convert: the zero ranges it skips count as done.
    for out in ["qcow2", "raw"] {
        let r = s.cowimg(&["convert", "-p", "-O", out, "top.qcow2", &format!("o.{out}")]);
        assert_eq!(r.status, 0, "{}", r.stderr);
        let last = last_percentage(&r.stderr);
        assert!(last.contains("(100.00/100%)"), "convert -O {out}: {last}");
        let r = s.cowimg(&["convert", "--progress", "json", "-O", out, "top.qcow2", "j"]);
        let e = common::last_event(&r.stderr);
        assert_eq!(e["event"], "completed");
        assert_eq!(e["offset"], e["len"], "convert -O {out}: {e}");
        assert_eq!(e["len"], 4u64 << 30);
    }
    assert!(s.same("top.qcow2", "o.qcow2"));
    // rebase onto an unrelated image, then stream: both end at 100% too.
    let r = s.cowimg(&[
        "rebase",
        "-p",
        "-b",
        "other.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(
        last_percentage(&r.stderr).contains("(100.00/100%)"),
        "{}",
        r.stderr
    );
    let r = s.cowimg(&["stream", "-p", "top.qcow2"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(
        last_percentage(&r.stderr).contains("(100.00/100%)"),
        "{}",
        r.stderr
    );
}

/// Parses "at 7.98 MiB/s, ETA 2s" out of a progress line: (bytes per second, ETA seconds).
fn rate_eta(line: &str) -> Option<(f64, u64)> {
    let at = line.split(" at ").nth(1)?;
    let (rate, rest) = at.split_once("/s, ETA ")?;
    let (num, unit) = rate.split_once(' ')?;
    let mult = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1048576.0,
        "GiB" => 1073741824.0,
        _ => 1099511627776.0,
    };
    let eta = rest.split_whitespace().next()?.trim_end_matches('s');
    Some((num.parse::<f64>().ok()? * mult, eta.parse().ok()?))
}

/// `stream --speed 8M` over 24 MiB of data in 4 GiB takes about 3 s: on a terminal (a pty,
/// through `script`) and in percentage lines the rate stays near the cap, not in the GiB/s the
/// jumps over holes used to give, and the ETA is not 0 s at the start.
#[test]
fn rate_and_eta_follow_bytes_copied_under_the_cap() {
    let s = Scratch::new();
    sparse_chain(&s);
    let cap = 8.0 * 1048576.0;
    let cmd = format!(
        "{} stream --speed 8M top.qcow2",
        env!("CARGO_BIN_EXE_cowimg")
    );
    let tty = s.run("script", &["-qec", &cmd, "/dev/null"]);
    assert_eq!(tty.status, 0, "{}{}", tty.stdout, tty.stderr);
    sparse_chain(&s);
    let lines = s.cowimg(&["stream", "-p", "--speed", "8M", "top.qcow2"]);
    assert_eq!(lines.status, 0, "{}", lines.stderr);
    for (name, text) in [("terminal", tty.stdout), ("-p lines", lines.stderr)] {
        let figures: Vec<(f64, u64)> = text.split(['\r', '\n']).filter_map(rate_eta).collect();
        assert!(figures.len() >= 3, "{name}: {text}");
        for (rate, _) in &figures {
            assert!(
                *rate <= cap * 1.01,
                "{name}: {rate} B/s over the cap: {text}"
            );
        }
        let copying = figures.iter().filter(|(rate, _)| *rate > 0.0).count();
        assert!(copying >= 2, "{name}: {text}");
        assert!(figures[0].1 >= 1, "{name}: the first ETA is 0 s: {text}");
    }
}
