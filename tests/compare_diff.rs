//! compare --diff: every differing range against ranges computed here, sector by sector, from
//! what qemu-img reads of both images (their raw copies); its first offset and exit status
//! against qemu-img compare's; `--max`; the human and JSON output.

mod common;

use common::Scratch;
use proptest::prelude::*;
use serde_json::{json, Value};

/// What qemu reads of `image`, through its chain.
fn guest(s: &Scratch, image: &str) -> Vec<u8> {
    let raw = format!("{image}.flat");
    s.qemu_img(&["convert", "-O", "raw", image, &raw]);
    s.read_file(&raw)
}

/// The differing ranges of two disks, sector by sector (past the end of the shorter disk it
/// reads as zeros, and that side is "past-end"), merged where they touch with the same sides.
fn expected(a: &[u8], b: &[u8]) -> Vec<Value> {
    let end = a.len().max(b.len());
    let mut out: Vec<(usize, usize, &str, &str)> = Vec::new();
    let mut at = 0;
    while at < end {
        let n = 512.min(end - at);
        let sector = |d: &[u8]| -> (Vec<u8>, &'static str) {
            if at >= d.len() {
                return (vec![0; n], "past-end");
            }
            let mut v = d[at..(at + n).min(d.len())].to_vec();
            v.resize(n, 0);
            let kind = if v.iter().all(|&x| x == 0) {
                "zero"
            } else {
                "data"
            };
            (v, kind)
        };
        let ((x, ka), (y, kb)) = (sector(a), sector(b));
        if x != y {
            match out.last_mut() {
                Some(l) if l.0 + l.1 == at && (l.2, l.3) == (ka, kb) => l.1 += n,
                _ => out.push((at, n, ka, kb)),
            }
        }
        at += n;
    }
    out.into_iter()
        .map(|(o, l, a, b)| json!({"offset": o, "length": l, "a": a, "b": b}))
        .collect()
}

/// `cowimg compare --diff --output json` (plus `extra` options), checked for its status.
fn diff_json(s: &Scratch, a: &str, b: &str, extra: &[&str]) -> Value {
    let r = s.cowimg(&[&["compare", "--diff", "--output", "json"], extra, &[a, b]].concat());
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}{}", r.stdout, r.stderr));
    let identical = v["identical"].as_bool().expect("identical");
    assert_eq!(r.status, if identical { 0 } else { 1 }, "{}", r.stderr);
    v
}

/// qemu-img compare's answer: `None` when identical, else the offset it reports.
fn qemu_first(s: &Scratch, a: &str, b: &str) -> Option<u64> {
    let r = s.run("qemu-img", &["compare", a, b]);
    match r.status {
        0 => None,
        1 => {
            let line = r
                .stdout
                .lines()
                .find_map(|l| l.strip_prefix("Content mismatch at offset "))
                .unwrap_or_else(|| panic!("qemu-img compare said: {}", r.stdout));
            Some(line.trim_end_matches('!').parse().expect("offset"))
        }
        _ => panic!("qemu-img compare {a} {b}: {}{}", r.stdout, r.stderr),
    }
}

/// Images of differing sizes over one base: every kind of range, in both outputs.
fn scenario(s: &Scratch) {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    s.qemu_io("base.qcow2", &["write -P 1 0 1M"]);
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
        "9M",
    ]);
    s.qemu_io(
        "top.qcow2",
        &[
            "write -P 1 0 64k",
            "write -P 2 64k 1k",
            "write -z 128k 64k",
            "write -P 3 4M 100",
            "write -P 4 8M 4k",
        ],
    );
    s.qemu_img(&["convert", "-O", "raw", "base.qcow2", "base.raw"]);
}

#[test]
fn every_kind_of_range_human_and_json() {
    let s = Scratch::new();
    scenario(&s);
    insta::assert_snapshot!(s
        .cowimg(&["compare", "--diff", "base.raw", "top.qcow2"])
        .show());
    insta::assert_snapshot!(s
        .cowimg(&[
            "compare",
            "--diff",
            "--output",
            "json",
            "top.qcow2",
            "base.raw"
        ])
        .show());
    // The first range is where qemu-img compare stops.
    let v = diff_json(&s, "base.raw", "top.qcow2", &[]);
    assert_eq!(
        v["ranges"][0]["offset"],
        qemu_first(&s, "base.raw", "top.qcow2").unwrap()
    );
    let want = expected(&guest(&s, "base.raw"), &guest(&s, "top.qcow2"));
    assert_eq!(v["ranges"], Value::Array(want));
    // Identical images: status 0, as qemu-img compare.
    insta::assert_snapshot!(s
        .cowimg(&["compare", "--diff", "base.qcow2", "base.raw"])
        .show());
    assert!(qemu_first(&s, "base.qcow2", "base.raw").is_none());
    // -q: only the status tells.
    insta::assert_snapshot!(s
        .cowimg(&["compare", "--diff", "-q", "base.raw", "top.qcow2"])
        .show());
}

#[test]
fn max_keeps_the_first_ranges_whole() {
    let s = Scratch::new();
    scenario(&s);
    let all = diff_json(&s, "base.raw", "top.qcow2", &[]);
    let all = all["ranges"].as_array().expect("ranges").clone();
    assert_eq!(all.len(), 4);
    for n in 1..=5 {
        let v = diff_json(&s, "base.raw", "top.qcow2", &["--max", &n.to_string()]);
        let want = &all[..n.min(all.len())];
        assert_eq!(
            v["ranges"].as_array().unwrap().as_slice(),
            want,
            "--max {n}"
        );
        assert_eq!(v["truncated"], n < all.len(), "--max {n}");
    }
    insta::assert_snapshot!(s
        .cowimg(&["compare", "--diff", "--max", "2", "base.raw", "top.qcow2"])
        .show());
}

#[test]
fn usage_and_open_errors_keep_compares_statuses() {
    let s = Scratch::new();
    scenario(&s);
    // Usage errors exit 1 (as qemu-img); an image that cannot be opened exits 2.
    let r = s.cowimg(&["compare", "--max", "2", "base.raw", "top.qcow2"]);
    assert_eq!(r.status, 1, "{}", r.stderr);
    let r = s.cowimg(&["compare", "-s", "--diff", "base.raw", "top.qcow2"]);
    assert_eq!(r.status, 1, "{}", r.stderr);
    let r = s.cowimg(&["compare", "--diff", "base.raw", "missing.qcow2"]);
    assert_eq!(r.status, 2, "{}", r.stderr);
    assert!(r.stderr.contains("missing.qcow2"), "{}", r.stderr);
}

#[derive(Clone, Debug)]
enum Write {
    Pattern(u8, u64, u64),
    Zero(u64, u64),
}

fn write() -> impl Strategy<Value = Write> {
    // Offsets and lengths in sectors, over 4 MiB, so that writes land inside and across
    // 64 KiB clusters.
    prop_oneof![
        (1u8.., 0u64..8192, 1u64..400).prop_map(|(p, o, n)| Write::Pattern(p, o * 512, n * 512)),
        (0u64..8192, 1u64..400).prop_map(|(o, n)| Write::Zero(o * 512, n * 512)),
    ]
}

fn apply(s: &Scratch, image: &str, size: u64, writes: &[Write]) {
    let cmds: Vec<String> = writes
        .iter()
        .filter_map(|w| match *w {
            Write::Pattern(p, o, n) if o < size => {
                Some(format!("write -P {p} {o} {}", n.min(size - o)))
            }
            Write::Zero(o, n) if o < size => Some(format!("write -z {o} {}", n.min(size - o))),
            _ => None,
        })
        .collect();
    let refs: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
    if !refs.is_empty() {
        s.qemu_io(image, &refs);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Two overlays of one base with random writes (and sizes): the ranges are the ones read
    /// from qemu's copies, the first offset and status are qemu-img compare's.
    #[test]
    fn random_overlays_against_qemu(
        base in prop::collection::vec(write(), 0..4),
        a in prop::collection::vec(write(), 0..6),
        b in prop::collection::vec(write(), 0..6),
        size_b in prop::sample::select(vec![4u64 << 20, 3 << 20, 5 << 20]),
    ) {
        let s = Scratch::new();
        s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
        apply(&s, "base.qcow2", 4 << 20, &base);
        for (name, size) in [("a.qcow2", 4u64 << 20), ("b.qcow2", size_b)] {
            s.qemu_img(&[
                "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", name,
                &size.to_string(),
            ]);
        }
        apply(&s, "a.qcow2", 4 << 20, &a);
        apply(&s, "b.qcow2", size_b, &b);
        let v = diff_json(&s, "a.qcow2", "b.qcow2", &[]);
        let want = expected(&guest(&s, "a.qcow2"), &guest(&s, "b.qcow2"));
        prop_assert_eq!(&v["ranges"], &Value::Array(want));
        let first = v["ranges"][0]["offset"].as_u64();
        prop_assert_eq!(first, qemu_first(&s, "a.qcow2", "b.qcow2"));
    }
}
