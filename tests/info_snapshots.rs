//! Golden `info` output (human and JSON, plain and `--backing-chain`) for a few tiny images
//! made by qemu-img/qemu-io at test time. What depends on the host or the moment is masked:
//! the scratch directory, disk usage ("disk size", "actual-size") and snapshot dates.
//! The read matrix proves agreement with qemu-img; these snapshots pin the whole output,
//! cowimg's own additions included, so that any change to it is seen in review.

mod common;

use common::Scratch;

/// Builds one golden image (or chain) and returns the name to pass to `info`.
fn build(s: &Scratch, name: &str) -> &'static str {
    match name {
        "qcow2_over_raw" => {
            s.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "1M"]);
            s.qemu_img(&[
                "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2",
            ]);
            s.qemu_io("ov.qcow2", &["write -q -P 0x11 0 4k"]);
            "ov.qcow2"
        }
        "qcow2_v2" => {
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,cluster_size=4k",
                "v2.qcow2",
                "1M",
            ]);
            "v2.qcow2"
        }
        "qed_over_qcow2_probed" => {
            s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qed",
                "-o",
                "cluster_size=4k,table_size=1",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "ov.qed",
            ]);
            "ov.qed"
        }
        "snapshot_and_bitmaps" => {
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "snap.qcow2",
                "1M",
            ]);
            s.qemu_io("snap.qcow2", &["write -q -P 0x11 0 4k"]);
            s.qemu_img(&["snapshot", "-c", "before", "snap.qcow2"]);
            s.qemu_img(&["bitmap", "--add", "snap.qcow2", "bm0"]);
            s.qemu_img(&[
                "bitmap",
                "--add",
                "-g",
                "8k",
                "--disable",
                "snap.qcow2",
                "bm1",
            ]);
            "snap.qcow2"
        }
        "lazy_data_file_raw" => {
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k,lazy_refcounts=on,data_file=d.raw,data_file_raw=on",
                "df.qcow2",
                "1M",
            ]);
            let r = s.run(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    "write -q -P 0x11 0 4k",
                    "-c",
                    "abort",
                    "df.qcow2",
                ],
            );
            assert!(
                r.status == -1 || r.status == 134,
                "qemu-io abort: {}",
                r.stderr
            );
            "df.qcow2"
        }
        "raw" => {
            s.write_file("disk.raw", &[0x5a; 1000]);
            "disk.raw"
        }
        "chain_dirs" => {
            std::fs::create_dir(s.path("a")).expect("mkdir");
            std::fs::create_dir(s.path("b")).expect("mkdir");
            s.qemu_img(&["create", "-q", "-f", "raw", "a/base.raw", "1M"]);
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "-b",
                "../a/base.raw",
                "-F",
                "raw",
                "b/mid.qcow2",
            ]);
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qed",
                "-o",
                "cluster_size=4k,table_size=1",
                "-b",
                "../b/mid.qcow2",
                "-F",
                "qcow2",
                "a/top.qed",
            ]);
            "a/top.qed"
        }
        other => panic!("no golden image {other}"),
    }
}

fn golden(name: &str) {
    let s = Scratch::new();
    let image = build(&s, name);
    let dir = s.dir.path().to_string_lossy().into_owned();
    let mut settings = insta::Settings::clone_current();
    settings.add_filter(&regex_escape(&dir), "[TMP]");
    settings.add_filter(r"disk size: .*", "disk size: [SIZE]");
    settings.add_filter(r#""actual-size": \d+"#, r#""actual-size": [SIZE]"#);
    settings.add_filter(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", "[DATE]");
    settings.add_filter(r#""date-(sec|nsec)": \d+"#, r#""date-$1": [DATE]"#);
    settings.set_prepend_module_to_snapshot(true);
    settings.bind(|| {
        for (suffix, args) in [
            ("human", vec!["info", image]),
            ("json", vec!["info", "--output", "json", image]),
            ("chain_human", vec!["info", "--backing-chain", image]),
            (
                "chain_json",
                vec!["info", "--backing-chain", "--output", "json", image],
            ),
        ] {
            let r = s.cowimg(&args);
            assert_eq!(r.status, 0, "cowimg {args:?}: {}", r.stderr);
            insta::assert_snapshot!(format!("{name}_{suffix}"), r.stdout);
        }
    });
}

/// Escapes a path for use as a regular expression.
fn regex_escape(s: &str) -> String {
    s.chars().fold(String::new(), |mut out, c| {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
        out
    })
}

#[test]
fn qcow2_over_raw() {
    golden("qcow2_over_raw");
}

#[test]
fn qcow2_v2() {
    golden("qcow2_v2");
}

#[test]
fn qed_over_qcow2_probed() {
    golden("qed_over_qcow2_probed");
}

#[test]
fn snapshot_and_bitmaps() {
    golden("snapshot_and_bitmaps");
}

#[test]
fn lazy_data_file_raw() {
    golden("lazy_data_file_raw");
}

#[test]
fn raw() {
    golden("raw");
}

#[test]
fn chain_dirs() {
    golden("chain_dirs");
}

/// `snapshot -l` prints what `qemu-img snapshot -l` prints, byte for byte, with the same exit
/// status: qcow2 v3 and v2 with and without snapshots (names with spaces, a long one that
/// overflows its column), a qcow2 whose backing file is missing, QED and raw (nothing listed).
#[test]
fn snapshot_list_matches_qemu_img() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "none.qcow2", "16M"]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "v3.qcow2", "16M"]);
    s.qemu_io("v3.qcow2", &["write -q -P 0x33 0 64k"]);
    for name in ["first", "with spaces", "a-name-longer-than-sixteen-columns"] {
        s.qemu_img(&["snapshot", "-c", name, "v3.qcow2"]);
    }
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "16M",
    ]);
    s.qemu_img(&["snapshot", "-c", "old", "v2.qcow2"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "v3.qcow2", "-F", "qcow2", "ov.qcow2",
    ]);
    s.qemu_img(&["snapshot", "-c", "over", "ov.qcow2"]);
    s.qemu_img(&["create", "-q", "-f", "qed", "d.qed", "16M"]);
    s.qemu_img(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let mut listed = 0;
    for img in [
        "none.qcow2",
        "v3.qcow2",
        "v2.qcow2",
        "ov.qcow2",
        "d.qed",
        "r.raw",
    ] {
        let want = s.run("qemu-img", &["snapshot", "-l", img]);
        let got = s.cowimg(&["snapshot", "-l", img]);
        assert_eq!(got.status, want.status, "{img}: {}", got.show());
        assert_eq!(got.stdout, want.stdout, "{img}");
        listed += want.stdout.lines().count();
    }
    // Three tables: 3 + 1 + 1 snapshots, each with two heading lines.
    assert_eq!(
        listed,
        5 + 3 * 2,
        "qemu-img listed other snapshots than made"
    );
    // The backing file of ov.qcow2 is not needed to list its own snapshots.
    std::fs::remove_file(s.path("v3.qcow2")).unwrap();
    let got = s.cowimg(&["snapshot", "-l", "ov.qcow2"]);
    assert_eq!(got.status, 0, "{}", got.show());
    assert!(got.stdout.contains(" over "), "{}", got.show());
    // A missing image is an error naming it, exit 1 as in qemu-img.
    let got = s.cowimg(&["snapshot", "-l", "nosuch.qcow2"]);
    assert_eq!(got.status, 1, "{}", got.show());
    assert!(got.stderr.contains("nosuch.qcow2"), "{}", got.show());
}
