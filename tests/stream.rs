//! `cowimg stream` on chains built by qemu-img/qemu-io: every form leaves an image that reads
//! exactly as before, passes `qemu-img check`, and names the expected backing file.

mod common;
use common::Scratch;

/// One layer: file name, `qemu-img create` options, size (None: the backing's), qemu-io writes.
struct Layer<'a> {
    name: &'a str,
    create: &'a [&'a str],
    size: Option<&'a str>,
    writes: &'a [&'a str],
}

/// Builds the chain bottom first; each layer backs the next one.
fn build(s: &Scratch, layers: &[Layer]) {
    let mut below: Option<&str> = None;
    for l in layers {
        let mut args: Vec<String> = vec!["create".into(), "-q".into()];
        args.extend(l.create.iter().map(|a| a.to_string()));
        if let Some(b) = below {
            let bfmt = common::detect_format(&s.path(b.trim_start_matches("../")));
            let bfmt = if bfmt == "raw" && !b.ends_with(".raw") {
                "raw"
            } else {
                bfmt
            };
            args.extend(["-b".into(), b.into(), "-F".into(), bfmt.into()]);
        }
        args.push(l.name.into());
        if let Some(size) = l.size {
            args.push(size.into());
        }
        let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        s.qemu_img(&refs);
        if !l.writes.is_empty() {
            s.qemu_io(l.name, l.writes);
        }
        below = Some(l.name);
    }
}

fn snapshot(s: &Scratch, image: &str, raw: &str) {
    s.qemu_img(&["convert", "-O", "raw", image, raw]);
}

fn backing_of(s: &Scratch, image: &str) -> Option<String> {
    s.qemu_info(image)
        .get("backing-filename")
        .and_then(|v| v.as_str())
        .map(String::from)
}

fn abc(fmt: &'static str) -> Vec<Layer<'static>> {
    let (a, b, c) = match fmt {
        "qcow2" => ("A.qcow2", "B.qcow2", "C.qcow2"),
        _ => ("A.qed", "B.qed", "C.qed"),
    };
    vec![
        Layer {
            name: a,
            create: if fmt == "qcow2" {
                &["-f", "qcow2"]
            } else {
                &["-f", "qed"]
            },
            size: Some("64M"),
            writes: &["write -q -P 0x11 0 4M", "write -q -P 0x12 40M 3M"],
        },
        Layer {
            name: b,
            create: if fmt == "qcow2" {
                &["-f", "qcow2"]
            } else {
                &["-f", "qed"]
            },
            size: None,
            writes: &[
                "write -q -P 0x22 1M 1M",
                "write -q -z 3M 512k",
                "write -q -z 41M 64k",
            ],
        },
        Layer {
            name: c,
            create: if fmt == "qcow2" {
                &["-f", "qcow2"]
            } else {
                &["-f", "qed"]
            },
            size: None,
            writes: &["write -q -P 0x33 2M 64k"],
        },
    ]
}

/// The three forms of the design on a three-layer chain of `fmt`.
fn three_forms(fmt: &'static str) {
    let (a, b, c) = (format!("A.{fmt}"), format!("B.{fmt}"), format!("C.{fmt}"));
    // stream C: standalone.
    let s = Scratch::new();
    build(&s, &abc(fmt));
    snapshot(&s, &c, "c.raw");
    s.cowimg_ok(&["stream", &c]);
    assert!(s.same("c.raw", &c));
    s.assert_clean(&c);
    assert_eq!(backing_of(&s, &c), None);

    // stream --base A C: A <- C.
    let s = Scratch::new();
    build(&s, &abc(fmt));
    snapshot(&s, &c, "c.raw");
    s.cowimg_ok(&["stream", "--base", &a, &c]);
    assert!(s.same("c.raw", &c));
    s.assert_clean(&c);
    assert_eq!(backing_of(&s, &c).as_deref(), Some(a.as_str()));

    // stream B: B standalone, C above reads the same.
    let s = Scratch::new();
    build(&s, &abc(fmt));
    snapshot(&s, &c, "c.raw");
    snapshot(&s, &b, "b.raw");
    s.cowimg_ok(&["stream", &b]);
    assert!(s.same("b.raw", &b));
    assert!(s.same("c.raw", &c));
    s.assert_clean(&b);
    assert_eq!(backing_of(&s, &b), None);

    // stream --base B C: nothing to copy; the message points at `stream B`.
    let s = Scratch::new();
    build(&s, &abc(fmt));
    let out = s.cowimg_ok(&["stream", "--base", &b, &c]);
    assert!(
        out.contains("Nothing to stream") && out.contains(&format!("cowimg stream {b}")),
        "{out}"
    );
}

#[test]
fn three_forms_qcow2() {
    three_forms("qcow2");
}

#[test]
fn three_forms_qed() {
    three_forms("qed");
}

#[test]
fn zeros_of_removed_layers_become_zero_clusters_when_a_base_remains() {
    let s = Scratch::new();
    build(&s, &abc("qcow2"));
    s.cowimg_ok(&["stream", "--base", "A.qcow2", "C.qcow2"]);
    let map = s.qemu_img(&["map", "--output=json", "C.qcow2"]);
    // B's zeroed [3M, 3.5M) hides A's data: it must be a zero cluster in C now.
    assert!(
        map.contains(r#"{ "start": 3145728, "length": 524288, "depth": 0, "present": true, "zero": true, "data": false"#),
        "{map}"
    );
}

#[test]
fn mixed_formats_sizes_and_cluster_sizes() {
    let s = Scratch::new();
    s.write_file("base.raw", &vec![0x5a; 3 << 20]);
    build(
        &s,
        &[
            Layer {
                name: "base.raw",
                create: &["-f", "raw"],
                size: Some("3M"),
                writes: &["write -q -P 0x5a 0 3M"],
            },
            Layer {
                name: "mid.qcow2",
                create: &["-f", "qcow2", "-o", "cluster_size=512"],
                size: Some("2M"),
                writes: &["write -q -P 0x61 4k 3k", "write -q -z 1M 8k"],
            },
            Layer {
                name: "ext.qcow2",
                create: &["-f", "qcow2", "-o", "cluster_size=64k,extended_l2=on"],
                size: Some("6M"),
                writes: &["write -q -P 0x62 70k 2k", "write -q -z 200k 6k"],
            },
            Layer {
                name: "top.qed",
                create: &["-f", "qed", "-o", "cluster_size=4k,table_size=16"],
                size: Some("8M"),
                writes: &["write -q -P 0x63 5M 4k"],
            },
            Layer {
                name: "v2.qcow2",
                create: &["-f", "qcow2", "-o", "compat=0.10,cluster_size=2M"],
                size: Some("8M"),
                writes: &["write -q -P 0x64 7M 1k"],
            },
        ],
    );
    snapshot(&s, "v2.qcow2", "v2.raw");
    snapshot(&s, "top.qed", "top.raw");
    // Drop the two middle layers under v2, keeping the raw base.
    s.cowimg_ok(&["stream", "--base", "base.raw", "top.qed"]);
    assert!(s.same("top.raw", "top.qed"));
    assert!(s.same("v2.raw", "v2.qcow2"));
    s.assert_clean("top.qed");
    assert_eq!(backing_of(&s, "top.qed").as_deref(), Some("base.raw"));
    // And flatten the top completely.
    s.cowimg_ok(&["stream", "v2.qcow2"]);
    assert!(s.same("v2.raw", "v2.qcow2"));
    s.assert_clean("v2.qcow2");
}

#[test]
fn compressed_bases() {
    for ctype in ["zlib", "zstd"] {
        let s = Scratch::new();
        build(
            &s,
            &[Layer {
                name: "src.qcow2",
                create: &["-f", "qcow2"],
                size: Some("16M"),
                writes: &["write -q -P 0x41 0 5M", "write -q -P 0x42 9M 100k"],
            }],
        );
        s.qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ctype}"),
            "src.qcow2",
            "A.qcow2",
        ]);
        build(
            &s,
            &[Layer {
                name: "C.qcow2",
                create: &["-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2"],
                size: None,
                writes: &["write -q -P 0x43 1M 4k"],
            }],
        );
        snapshot(&s, "C.qcow2", "c.raw");
        s.cowimg_ok(&["stream", "C.qcow2"]);
        assert!(s.same("c.raw", "C.qcow2"), "{ctype}");
        s.assert_clean("C.qcow2");
    }
}

#[test]
fn relative_names_across_directories() {
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("base/deep")).unwrap();
    std::fs::create_dir_all(s.path("mid")).unwrap();
    std::fs::create_dir_all(s.path("top")).unwrap();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base/deep/A.qcow2", "16M"]);
    s.qemu_io("base/deep/A.qcow2", &["write -q -P 1 0 2M"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../base/deep/A.qcow2",
        "-F",
        "qcow2",
        "mid/B.qcow2",
    ]);
    s.qemu_io("mid/B.qcow2", &["write -q -P 2 1M 2M"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../mid/B.qcow2",
        "-F",
        "qcow2",
        "top/C.qcow2",
    ]);
    s.qemu_io("top/C.qcow2", &["write -q -P 3 2M 64k"]);
    snapshot(&s, "top/C.qcow2", "c.raw");
    // --base is matched by resolved path, whatever the spelling.
    s.cowimg_ok(&[
        "stream",
        "--base",
        "./base/../base/deep/A.qcow2",
        "top/C.qcow2",
    ]);
    assert!(s.same("c.raw", "top/C.qcow2"));
    // The recorded name is relative to C's directory.
    assert_eq!(
        backing_of(&s, "top/C.qcow2").as_deref(),
        Some("../base/deep/A.qcow2")
    );
    s.assert_clean("top/C.qcow2");
}

#[test]
fn deep_chains() {
    for depth in [1usize, 5, 20] {
        let s = Scratch::new();
        s.qemu_img(&["create", "-q", "-f", "qcow2", "l0.qcow2", "8M"]);
        s.qemu_io("l0.qcow2", &["write -q -P 1 0 1M"]);
        for i in 1..=depth {
            let (below, me) = (format!("l{}.qcow2", i - 1), format!("l{i}.qcow2"));
            s.qemu_img(&[
                "create", "-q", "-f", "qcow2", "-b", &below, "-F", "qcow2", &me,
            ]);
            s.qemu_io(&me, &[&format!("write -q -P {} {}k 64k", i + 1, i * 192)]);
        }
        let top = format!("l{depth}.qcow2");
        snapshot(&s, &top, "top.raw");
        s.cowimg_ok(&["stream", "--base", "l0.qcow2", &top]);
        assert!(s.same("top.raw", &top), "depth {depth}");
        s.assert_clean(&top);
        assert_eq!(backing_of(&s, &top).as_deref(), Some("l0.qcow2"));
    }
}

#[test]
fn base_not_in_chain_is_an_error() {
    let s = Scratch::new();
    build(&s, &abc("qcow2"));
    s.qemu_img(&["create", "-q", "-f", "qcow2", "other.qcow2", "64M"]);
    let r = s.cowimg(&["stream", "--base", "other.qcow2", "C.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(
        r.stderr.contains("not in the backing chain"),
        "{}",
        r.stderr
    );
}

#[test]
fn target_with_an_internal_snapshot() {
    let s = Scratch::new();
    build(&s, &abc("qcow2"));
    s.qemu_img(&["snapshot", "-c", "snap", "C.qcow2"]);
    s.qemu_io("C.qcow2", &["write -q -P 0x44 2M 4k"]);
    snapshot(&s, "C.qcow2", "c.raw");
    s.cowimg_ok(&["stream", "C.qcow2"]);
    assert!(s.same("c.raw", "C.qcow2"));
    s.assert_clean("C.qcow2");
}

#[test]
fn range_form_never_changes_the_backing_file() {
    let s = Scratch::new();
    build(&s, &abc("qcow2"));
    snapshot(&s, "C.qcow2", "c.raw");
    s.cowimg_ok(&["stream", "--offset", "1M", "--length", "1M", "C.qcow2"]);
    assert!(s.same("c.raw", "C.qcow2"));
    assert_eq!(backing_of(&s, "C.qcow2").as_deref(), Some("B.qcow2"));
    let map = s.qemu_img(&["map", "--output=json", "C.qcow2"]);
    assert!(
        map.contains(r#"{ "start": 1048576, "length": 1048576, "depth": 0"#),
        "{map}"
    );
}

#[test]
fn progress_json_lines_and_result_object() {
    let s = Scratch::new();
    build(&s, &abc("qcow2"));
    let r = s.cowimg(&[
        "stream",
        "--progress",
        "json",
        "--output",
        "json",
        "C.qcow2",
    ]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let lines: Vec<serde_json::Value> = r
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let last = lines.last().expect("a completion event");
    assert_eq!(last["event"], "completed");
    assert_eq!(last["len"], 64 << 20);
    assert_eq!(last["offset"], 64 << 20);
    assert!(last["error"].is_null());
    let copied = last["copied"].as_u64().unwrap();
    // A's 4M+3M minus B's zeroed 512k+64k minus C's own 64k (zero ranges are not copied).
    assert_eq!(copied, (7 << 20) - (512 << 10) - (64 << 10) - (64 << 10));
    let result: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(result["copied"], copied);
    assert!(result["backing-filename"].is_null());
}

#[test]
fn speed_cap_holds_loosely() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "A.qcow2", "16M"]);
    s.qemu_io("A.qcow2", &["write -q -P 7 0 12M"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", "C.qcow2",
    ]);
    let t = std::time::Instant::now();
    s.cowimg_ok(&["stream", "--speed", "4M", "C.qcow2"]);
    // 12 MiB at 4 MiB/s: the first slice is free, so at least about 2 s.
    assert!(t.elapsed().as_secs_f64() >= 2.0, "took {:?}", t.elapsed());
}

#[test]
fn a_batch_of_only_zero_marks_is_committed() {
    // Regression: a commit that had no new clusters to count skipped the staged L2 entries.
    let s = Scratch::new();
    build(
        &s,
        &[
            Layer {
                name: "A.qcow2",
                create: &["-f", "qcow2"],
                size: Some("8M"),
                writes: &["write -q -P 0x11 0 8M"],
            },
            Layer {
                name: "B.qcow2",
                create: &["-f", "qcow2"],
                size: None,
                writes: &["write -q -z 1M 2M"],
            },
            Layer {
                name: "C.qcow2",
                create: &["-f", "qcow2"],
                size: None,
                writes: &["write -q -P 0x33 0 64k"],
            },
        ],
    );
    snapshot(&s, "C.qcow2", "c.raw");
    s.cowimg_ok(&["stream", "--base", "A.qcow2", "C.qcow2"]);
    assert!(s.same("c.raw", "C.qcow2"));
    s.assert_clean("C.qcow2");
}

#[test]
fn extended_l2_top_with_partly_allocated_clusters() {
    let s = Scratch::new();
    build(
        &s,
        &[
            Layer {
                name: "A.qcow2",
                create: &["-f", "qcow2", "-o", "cluster_size=4k"],
                size: Some("4M"),
                writes: &["write -q -P 0x11 0 4M"],
            },
            Layer {
                name: "B.qcow2",
                create: &["-f", "qcow2"],
                size: None,
                writes: &["write -q -P 0x22 100k 50k", "write -q -z 300k 9k"],
            },
            // 64 KiB clusters of 2 KiB subclusters, written in pieces.
            Layer {
                name: "C.qcow2",
                create: &["-f", "qcow2", "-o", "extended_l2=on"],
                size: None,
                writes: &[
                    "write -q -P 0x33 0 2k",
                    "write -q -P 0x34 70k 6k",
                    "write -q -z 96k 2k",
                    "write -q -P 0x35 301k 1k",
                ],
            },
        ],
    );
    snapshot(&s, "C.qcow2", "c.raw");
    s.cowimg_ok(&["stream", "--base", "A.qcow2", "C.qcow2"]);
    assert!(s.same("c.raw", "C.qcow2"));
    s.assert_clean("C.qcow2");
    s.cowimg_ok(&["stream", "C.qcow2"]);
    assert!(s.same("c.raw", "C.qcow2"));
    s.assert_clean("C.qcow2");
}

/// With nothing to stream, `--output json` still prints its object (saying so) and
/// `--progress json` still ends with a completion event at 100%.
#[test]
fn nothing_to_stream_is_a_result() {
    let s = Scratch::new();
    let _t = common::timeless();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "A.qcow2", "1M"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", "B.qcow2",
    ]);
    for (name, args) in [
        ("standalone", &["A.qcow2"][..]),
        ("base_is_backing", &["--base", "A.qcow2", "B.qcow2"][..]),
    ] {
        let full = [
            &["stream", "--output", "json", "--progress", "json"][..],
            args,
        ]
        .concat();
        let r = s.cowimg(&full);
        insta::assert_snapshot!(format!("nothing_to_stream_{name}"), r.show());
        let result: serde_json::Value = serde_json::from_str(&r.stdout).expect("one JSON object");
        assert_eq!(result["nothing-to-do"], true);
        let last = common::last_event(&r.stderr);
        assert_eq!(last["event"], "completed");
        assert_eq!(last["offset"], last["len"]);
    }
    // Something to do: the field is false.
    let r = s.cowimg(&["stream", "--output", "json", "B.qcow2"]);
    let result: serde_json::Value = serde_json::from_str(&r.stdout).expect("one JSON object");
    assert_eq!(result["nothing-to-do"], false, "{}", r.stdout);
}

/// A window reaching past the end of the image is refused, naming the image's size.
#[test]
fn window_past_the_end_is_an_error() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "A.qcow2", "2G"]);
    s.qemu_io("A.qcow2", &["write -q -P 1 0 1M"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", "B.qcow2",
    ]);
    for (name, window) in [
        ("offset_past_end", ["--offset", "3G", "--length", "1M"]),
        ("offset_at_end", ["--offset", "2G", "--length", "0"]),
        ("length_past_end", ["--offset", "1G", "--length", "2G"]),
    ] {
        let r = s.cowimg(&[&["stream"][..], &window, &["B.qcow2"]].concat());
        insta::assert_snapshot!(format!("window_{name}"), r.show());
    }
    // Nothing was streamed: B still holds nothing of its own.
    let map = s.qemu_img(&["map", "--output=json", "B.qcow2"]);
    assert!(
        !map.contains(r#""depth": 0, "present": true, "zero": false, "data": true"#),
        "{map}"
    );
    // The last byte is inside.
    s.cowimg_ok(&["stream", "--offset", "1G", "--length", "1G", "B.qcow2"]);
}
