//! Randomized differential testing against qemu-img. A seeded generator makes a random chain
//! (depth 1 to 8; qcow2 v2/v3 with cluster sizes from 512 B to 2 MiB, extended L2, zstd,
//! refcount widths 1 and 64, lazy refcounts, QED, raw at the bottom; sizes that differ between
//! layers; random writes, zero writes, discards and compressed writes through qemu-io; internal
//! snapshots taken between writes; lazy-refcount images left dirty by a killed qemu-io), then:
//!
//! * `check`, `map` and `info` (plain and `--backing-chain`) of the top must agree with
//!   qemu-img's (exit status; `map` output byte for byte; every key of qemu-img's JSON with
//!   qemu-img's value, `actual-size` aside);
//! * one random operation (stream, stream --base, stream of an intermediate image, stream -c,
//!   rebase safe in the chain, safe onto an unrelated image, unsafe, convert, convert -c, and
//!   copy-on-read through a flagged overlay) runs with cowimg, and
//!   its qemu-img equivalent on a copy of the directory. cowimg's result must read as the old
//!   chain read (`qemu-img compare` with the guest data saved before), pass `qemu-img check`,
//!   record the backing fields qemu-img records, and its `check`/`map`/`info` must again agree
//!   with qemu-img's on it, and `compare` of it with the old data and with an unrelated image
//!   must give qemu-img compare's status and message.
//!
//! Failures print the seed; `COWIMG_SEED=S COWIMG_DIFF_SEEDS=1` replays one. `COWIMG_DIFF_SEEDS`
//! sets the number of seeds (CI: 2 x 25). Seeds of fixed failures go in `REGRESSIONS`.

mod common;
#[path = "common/reliability.rs"]
mod reliability;

use std::fmt::Write as _;

use common::{agree, Scratch};
use reliability::{count, first_seed, Rng};
use serde_json::Value;

/// Seeds that once failed (each names what it found); run first, always.
const REGRESSIONS: &[u64] = &[];

#[derive(Clone, Debug)]
struct Layer {
    name: String,
    fmt: &'static str,
    opts: &'static str,
    size: u64,
    io: Vec<String>,
}

/// Format choices: (format, create options, cluster size).
const KINDS: &[(&str, &str, u64)] = &[
    ("qcow2", "", 65536),
    ("qcow2", "compat=0.10", 65536),
    ("qcow2", "cluster_size=4096", 4096),
    ("qcow2", "cluster_size=512", 512),
    ("qcow2", "cluster_size=2M", 2 << 20),
    ("qcow2", "extended_l2=on,cluster_size=32k", 32768),
    ("qcow2", "compression_type=zstd,cluster_size=16k", 16384),
    ("qcow2", "compat=0.10,cluster_size=8k", 8192),
    ("qcow2", "refcount_bits=1,cluster_size=4096", 4096),
    ("qcow2", "refcount_bits=64", 65536),
    ("qcow2", "lazy_refcounts=on", 65536),
    ("qed", "", 65536),
    ("qed", "cluster_size=4096,table_size=2", 4096),
];

fn ext(fmt: &str) -> &str {
    fmt
}

/// A random chain, bottom first.
fn gen_chain(rng: &mut Rng) -> Vec<Layer> {
    let depth = rng.range(1, 8) as usize;
    let mut layers: Vec<Layer> = Vec::new();
    for i in 0..depth {
        let (fmt, opts, cluster) = if i == 0 && rng.chance(1, 4) {
            ("raw", "", 512)
        } else {
            *rng.pick(KINDS)
        };
        let size = match layers.last() {
            None => rng.range(2, 16) * (512 << 10),
            Some(b) => {
                let delta =
                    rng.range(0, 4) * (256 << 10) + rng.range(0, 1) * 512 * rng.range(1, 100);
                if rng.chance(1, 2) {
                    b.size + delta
                } else {
                    b.size.saturating_sub(delta).max(512 << 10)
                }
            }
        };
        let size = size / 512 * 512;
        let mut io = Vec::new();
        for _ in 0..rng.range(0, 4) {
            let off = rng.below(size / 512) * 512;
            let len = (rng.range(1, 1024) * 512).min(size - off);
            let pat = rng.range(1, 255);
            match rng.below(10) {
                0..=4 => io.push(format!("write -q -P {pat} {off} {len}")),
                5 | 6 if fmt != "raw" => io.push(format!("write -q -z {off} {len}")),
                7 if fmt == "qcow2" || fmt == "raw" => io.push(format!("discard -q {off} {len}")),
                8 | 9
                    if fmt == "qcow2"
                        && !opts.contains("refcount_bits=1,")
                        && !io.iter().any(|c: &String| c.contains(" -c ")) =>
                {
                    // Compressed: whole clusters from a cluster boundary.
                    let clusters = size / cluster;
                    if clusters > 0 {
                        let c = rng.below(clusters);
                        let n = rng.range(1, 3).min(clusters - c);
                        // First: qemu cannot compress into allocated clusters.
                        io.insert(
                            0,
                            format!("write -q -c -P {pat} {} {}", c * cluster, n * cluster),
                        );
                    }
                }
                _ => io.push(format!("write -q -P {pat} {off} {len}")),
            }
        }
        // An internal snapshot taken between the writes (later writes then copy shared
        // clusters), and for lazy refcounts, a qemu-io killed after its writes: the image is
        // left dirty, with refcounts behind.
        if fmt == "qcow2"
            && !opts.contains("refcount_bits=1,")
            && !io.is_empty()
            && rng.chance(1, 4)
        {
            let at = rng.range(0, io.len() as u64) as usize;
            io.insert(
                at.max(io.iter().take_while(|c| c.contains(" -c ")).count()),
                "#snapshot".into(),
            );
        }
        if opts.contains("lazy_refcounts") && !io.is_empty() && rng.chance(1, 2) {
            io.push("#crash".into());
        }
        layers.push(Layer {
            name: format!("L{i}.{}", ext(fmt)),
            fmt,
            opts,
            size,
            io,
        });
    }
    layers
}

fn build(s: &Scratch, layers: &[Layer]) {
    for (i, l) in layers.iter().enumerate() {
        let mut args = vec!["create".to_string(), "-q".into(), "-f".into(), l.fmt.into()];
        if !l.opts.is_empty() {
            args.extend(["-o".into(), l.opts.into()]);
        }
        if i > 0 {
            let b = &layers[i - 1];
            args.extend(["-b".into(), b.name.clone(), "-F".into(), b.fmt.into()]);
        }
        args.extend([l.name.clone(), l.size.to_string()]);
        let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        s.qemu_img(&refs);
        for (k, group) in l.io.split(|c| c == "#snapshot").enumerate() {
            if k > 0 {
                s.qemu_img(&["snapshot", "-c", &format!("snap{k}"), &l.name]);
            }
            let crash = group.last().is_some_and(|c| c == "#crash");
            let cmds: Vec<&String> = group.iter().filter(|c| *c != "#crash").collect();
            if cmds.is_empty() {
                continue;
            }
            let mut a = vec!["-f".to_string(), l.fmt.into()];
            for c in cmds {
                a.extend(["-c".into(), c.clone()]);
            }
            if crash {
                a.extend(["-c".into(), "sigraise 9".into()]);
            }
            a.push(l.name.clone());
            let refs: Vec<&str> = a.iter().map(|a| a.as_str()).collect();
            if crash {
                // Killed on purpose: the image keeps its dirty bit.
                let r = s.run("qemu-io", &refs);
                assert!(r.status != 0, "qemu-io {refs:?} was to be killed");
            } else {
                s.qemu("qemu-io", &refs);
            }
        }
    }
}

/// check, map and info of `image`: cowimg against qemu-img.
fn read_only_agree(s: &Scratch, image: &str, bad: &mut Vec<String>) {
    // check: same status; the JSON report with qemu-img's keys and values.
    let want = s.run("qemu-img", &["check", "--output=json", image]);
    let got = s.cowimg(&["check", "--output", "json", image]);
    if want.status != got.status {
        bad.push(format!(
            "check {image}: status {} (qemu-img {}): {}{}",
            got.status, want.status, got.stdout, got.stderr
        ));
    } else if want.status != 63 {
        match (
            serde_json::from_str::<Value>(&want.stdout),
            serde_json::from_str::<Value>(&got.stdout),
        ) {
            (Ok(w), Ok(g)) => agree(&format!("check {image}"), &w, &g, bad),
            _ => bad.push(format!(
                "check {image}: JSON\n{}\nqemu-img:\n{}",
                got.stdout, want.stdout
            )),
        }
    }
    // map: byte for byte.
    let want = s.run("qemu-img", &["map", "--output=json", image]);
    let got = s.cowimg(&["map", "--output", "json", image]);
    if (want.status, &want.stdout) != (got.status, &got.stdout) {
        bad.push(format!(
            "map {image}: status {} (qemu-img {})\n--- cowimg\n{}{}--- qemu-img\n{}{}",
            got.status, want.status, got.stdout, got.stderr, want.stdout, want.stderr
        ));
    }
    // info and info --backing-chain: qemu-img's keys and values.
    for chain in [false, true] {
        let mut theirs = vec!["info", "--output=json"];
        let mut mine = vec!["info", "--output", "json"];
        if chain {
            theirs.push("--backing-chain");
            mine.push("--backing-chain");
        }
        theirs.push(image);
        mine.push(image);
        let want = s.run("qemu-img", &theirs);
        let got = s.cowimg(&mine);
        match (
            serde_json::from_str::<Value>(&want.stdout),
            serde_json::from_str::<Value>(&got.stdout),
        ) {
            (Ok(w), Ok(g)) => agree(
                &format!(
                    "info{} {image}",
                    if chain { " --backing-chain" } else { "" }
                ),
                &w,
                &g,
                bad,
            ),
            _ => bad.push(format!(
                "{mine:?}: status {} {}{} (qemu-img {} {})",
                got.status, got.stdout, got.stderr, want.status, want.stderr
            )),
        }
    }
}

/// Copies every file of `from` into a new scratch directory.
fn copy_dir(from: &Scratch) -> Scratch {
    let to = Scratch::new();
    for e in std::fs::read_dir(from.dir.path()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.path(&e.file_name().to_string_lossy())).unwrap();
    }
    to
}

fn backing_fields(s: &Scratch, image: &str) -> (Value, Value) {
    let v = s.qemu_info(image);
    (
        v.get("backing-filename").cloned().unwrap_or(Value::Null),
        v.get("backing-filename-format")
            .cloned()
            .unwrap_or(Value::Null),
    )
}

/// One seed: returns a description of the case and the disagreements found.
fn run_seed(seed: u64) -> (String, Vec<String>) {
    let mut rng = Rng::new(seed);
    let layers = gen_chain(&mut rng);
    let mut desc = String::new();
    for l in &layers {
        let _ = writeln!(
            desc,
            "  {} ({} {} {} bytes): {:?}",
            l.name, l.fmt, l.opts, l.size, l.io
        );
    }
    let s = Scratch::new();
    build(&s, &layers);
    let d = layers.len();
    let top = layers[d - 1].clone();
    s.qemu_img(&["convert", "-O", "raw", &top.name, "pristine.raw"]);
    let mut bad = Vec::new();
    read_only_agree(&s, &top.name, &mut bad);

    // An unrelated image to rebase onto.
    let u = Layer {
        name: "U.qcow2".into(),
        fmt: "qcow2",
        opts: "",
        size: rng.range(1, 12) * (512 << 10),
        io: vec![],
    };
    s.qemu_img(&["create", "-q", "-f", "qcow2", &u.name, &u.size.to_string()]);
    s.qemu_io(
        &u.name,
        &[
            &format!("write -q -P 9 0 {}", u.size.min(1 << 20)),
            &format!("write -q -P 3 {} 4096", u.size / 2),
        ],
    );

    let streamable = top.fmt != "raw" && d >= 2;
    let op = if !streamable {
        *rng.pick(&[6, 8])
    } else {
        rng.below(10)
    };
    // (cowimg args, qemu-img args, images whose data must read as before with its raw copy).
    // The image cowimg writes, when it is not the one whose data is checked first.
    let mut written: Option<String> = None;
    let mut checks: Vec<(String, String)> = vec![(top.name.clone(), "pristine.raw".into())];
    let (mine, theirs): (Vec<String>, Vec<String>) = match op {
        1 if d >= 3 => {
            let k = rng.below(d as u64 - 2) as usize;
            let b = &layers[k];
            (
                vec![
                    "stream".into(),
                    "--base".into(),
                    b.name.clone(),
                    top.name.clone(),
                ],
                vec![
                    "rebase".into(),
                    "-b".into(),
                    b.name.clone(),
                    "-F".into(),
                    b.fmt.into(),
                    top.name.clone(),
                ],
            )
        }
        2 if d >= 3 => {
            let k = rng.range(1, d as u64 - 2) as usize;
            let m = &layers[k];
            s.qemu_img(&["convert", "-O", "raw", &m.name, "mid.raw"]);
            checks.push((m.name.clone(), "mid.raw".into()));
            written = Some(m.name.clone());
            (
                vec!["stream".into(), m.name.clone()],
                vec!["rebase".into(), "-b".into(), "".into(), m.name.clone()],
            )
        }
        3 => {
            // Safe rebase in the chain (or flatten).
            let k = rng.below(d as u64);
            let (b, f) = if k == d as u64 - 1 {
                (String::new(), None)
            } else {
                (
                    layers[k as usize].name.clone(),
                    Some(layers[k as usize].fmt),
                )
            };
            let mut a = vec!["rebase".to_string(), "-b".into(), b];
            if let Some(f) = f {
                a.extend(["-F".into(), f.into()]);
            }
            a.push(top.name.clone());
            (a.clone(), a)
        }
        4 | 5 => {
            let mut a = vec!["rebase".to_string()];
            if op == 5 {
                a.push("-u".into());
                checks.clear();
            }
            a.extend([
                "-b".into(),
                u.name.clone(),
                "-F".into(),
                "qcow2".into(),
                top.name.clone(),
            ]);
            (a.clone(), a)
        }
        6 => {
            let (f, o) = *rng.pick(&[
                ("qcow2", ""),
                ("qcow2", "cluster_size=4096"),
                ("qed", ""),
                ("raw", ""),
                ("qcow2", "compat=0.10"),
            ]);
            let mut a = vec!["convert".to_string(), "-O".into(), f.into()];
            if !o.is_empty() {
                a.extend(["-o".into(), o.into()]);
            }
            a.extend([top.name.clone(), format!("out.{f}")]);
            checks = vec![(format!("out.{f}"), "pristine.raw".into())];
            (a.clone(), a)
        }
        7 if top.fmt == "qcow2" => {
            // Stream storing compressed clusters; qemu-img rebase -c is the equivalent.
            (
                vec!["stream".into(), "-c".into(), top.name.clone()],
                vec![
                    "rebase".into(),
                    "-c".into(),
                    "-b".into(),
                    "".into(),
                    top.name.clone(),
                ],
            )
        }
        8 => {
            let o = *rng.pick(&[
                "",
                "cluster_size=4096",
                "compression_type=zstd",
                "extended_l2=on",
            ]);
            let mut a = vec![
                "convert".to_string(),
                "-c".into(),
                "-O".into(),
                "qcow2".into(),
            ];
            if !o.is_empty() {
                a.extend(["-o".into(), o.into()]);
            }
            a.extend([top.name.clone(), "out.qcow2".into()]);
            checks = vec![("out.qcow2".into(), "pristine.raw".into())];
            (a.clone(), a)
        }
        9 => {
            // Copy-on-read: a flagged overlay over the top, read whole by convert; it fills
            // with what the chain provides and must read as before (qemu ignores the flag).
            let fmt = if rng.chance(1, 2) { "qcow2" } else { "qed" };
            let f = format!("F.{fmt}");
            s.cowimg_ok(&[
                "create",
                "-q",
                "-f",
                fmt,
                "-b",
                &top.name,
                "-F",
                top.fmt,
                "--copy-on-read",
                &f,
            ]);
            checks = vec![
                (f.clone(), "pristine.raw".into()),
                ("out.raw".into(), "pristine.raw".into()),
            ];
            // qemu-img has no --copy-on-read: it only converts.
            let theirs = vec![
                "convert".to_string(),
                "-O".into(),
                "raw".into(),
                f,
                "out.raw".into(),
            ];
            let mut mine = theirs.clone();
            mine.insert(1, "--copy-on-read".into());
            (mine, theirs)
        }
        _ => (
            vec!["stream".into(), top.name.clone()],
            vec!["rebase".into(), "-b".into(), "".into(), top.name.clone()],
        ),
    };
    let _ = writeln!(desc, "  operation: cowimg {mine:?}, qemu-img {theirs:?}");
    let q = copy_dir(&s);
    let refs: Vec<&str> = mine.iter().map(|a| a.as_str()).collect();
    let r = s.cowimg(&refs);
    let qrefs: Vec<&str> = theirs.iter().map(|a| a.as_str()).collect();
    let qr = q.run("qemu-img", &qrefs);
    if r.status != 0 {
        if qr.status == 0 {
            bad.push(format!(
                "cowimg {mine:?} failed ({}): {}",
                r.status, r.stderr
            ));
        }
        return (desc, bad);
    }
    for (image, raw) in &checks {
        if !s.same(raw, image) {
            bad.push(format!("after {mine:?}: {image} no longer reads as before"));
        }
    }
    let result = checks
        .first()
        .map(|c| c.0.clone())
        .unwrap_or(top.name.clone());
    if op == 9 {
        // The flagged overlay took data in: its own clusters, never its backing files'.
        let below = s
            .run("qemu-img", &["map", "--output=json", &top.name])
            .stdout;
        if s.own_data(&result) == 0 && below.contains("\"data\": true") {
            bad.push(format!("copy-on-read: nothing was copied into {result}"));
        }
    }
    let written = written.unwrap_or(result.clone());
    let c = s.run("qemu-img", &["check", &written]);
    if c.status != 0 && c.status != 63 {
        bad.push(format!(
            "after {mine:?}: qemu-img check {written}: {}{}",
            c.stdout, c.stderr
        ));
    }
    if qr.status == 0 {
        // What qemu-img's run gives: the same backing fields, the same data.
        if mine[0] != "convert" && backing_fields(&s, &result) != backing_fields(&q, &result) {
            bad.push(format!(
                "after {mine:?}: backing fields {:?}, qemu-img's {:?}",
                backing_fields(&s, &result),
                backing_fields(&q, &result)
            ));
        }
        let theirs_path = q.path(&result).to_string_lossy().into_owned();
        if !s.same(&result, &theirs_path) {
            bad.push(format!(
                "after {mine:?}: {result} reads differently from qemu-img's result"
            ));
        }
    } else {
        let _ = writeln!(desc, "  (qemu-img failed: {})", qr.stderr.trim());
    }
    read_only_agree(&s, &result, &mut bad);
    if written != result {
        read_only_agree(&s, &written, &mut bad);
    }
    // compare: the result against the old guest data (identical) and against the unrelated
    // image (qemu-img compare's status and message).
    for other in ["pristine.raw", u.name.as_str()] {
        let want = s.run("qemu-img", &["compare", &result, other]);
        let got = s.cowimg(&["compare", &result, other]);
        if (want.status, &want.stdout) != (got.status, &got.stdout) {
            bad.push(format!(
                "compare {result} {other}: status {} {:?} {:?}, qemu-img {} {:?}",
                got.status, got.stdout, got.stderr, want.status, want.stdout
            ));
        }
    }
    (desc, bad)
}

fn run_seeds(seeds: impl Iterator<Item = u64>) {
    let mut failures = Vec::new();
    let mut n = 0;
    for seed in seeds {
        n += 1;
        let outcome = std::panic::catch_unwind(|| run_seed(seed));
        match outcome {
            Ok((_, bad)) if bad.is_empty() => {}
            Ok((desc, bad)) => {
                failures.push(format!("seed {seed:#x}:\n{desc}  {}", bad.join("\n  ")))
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
                failures.push(format!(
                    "seed {seed:#x}: panicked: {}",
                    msg.unwrap_or_default()
                ))
            }
        }
    }
    eprintln!("{n} seeds, {} failures", failures.len());
    assert!(
        failures.is_empty(),
        "{} of {n} seeds failed (replay one with COWIMG_SEED=S COWIMG_DIFF_SEEDS=1):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn regressions() {
    run_seeds(REGRESSIONS.iter().copied());
}

/// Two halves, so that the test harness runs them on both cores.
#[test]
fn random_chains_first_half() {
    let n = count("COWIMG_DIFF_SEEDS", 50);
    let first = first_seed(0xd1ff_0000);
    run_seeds(first..first + n.div_ceil(2));
}

#[test]
fn random_chains_second_half() {
    let n = count("COWIMG_DIFF_SEEDS", 50);
    let first = first_seed(0xd1ff_0000);
    run_seeds(first + n.div_ceil(2)..first + n);
}
