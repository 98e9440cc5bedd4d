//! Reading: cowimg's map, compare and convert against qemu-img's on chains qemu builds.

mod common;
use common::Scratch;

/// The reference record's chain: A = 0x11 on [0,4M); B = 0x22 on [1M,2M) and zeroed
/// [3M,3.5M); C = 0x33 on [2M,2M+64k).
fn abc(s: &Scratch, fmt: &str) {
    s.qemu_img(&["create", "-q", "-f", fmt, &format!("A.{fmt}"), "64M"]);
    s.qemu_io(&format!("A.{fmt}"), &["write -q -P 0x11 0 4M"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        fmt,
        "-b",
        &format!("A.{fmt}"),
        "-F",
        fmt,
        &format!("B.{fmt}"),
    ]);
    s.qemu_io(
        &format!("B.{fmt}"),
        &["write -q -P 0x22 1M 1M", "write -q -z 3M 512k"],
    );
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        fmt,
        "-b",
        &format!("B.{fmt}"),
        "-F",
        fmt,
        &format!("C.{fmt}"),
    ]);
    s.qemu_io(&format!("C.{fmt}"), &["write -q -P 0x33 2M 64k"]);
}

#[test]
fn map_and_convert_agree_with_qemu_img() {
    for fmt in ["qcow2", "qed"] {
        let s = Scratch::new();
        abc(&s, fmt);
        let c = format!("C.{fmt}");
        assert_eq!(
            s.cowimg_ok(&["map", "--output", "json", &c]),
            s.qemu_img(&["map", "--output=json", &c]),
            "map of {fmt} chain"
        );
        assert_eq!(s.cowimg_ok(&["map", &c]), s.qemu_img(&["map", &c]));
        s.qemu_img(&["convert", "-O", "raw", &c, "ref.raw"]);
        s.cowimg_ok(&["convert", "-O", "raw", &c, "mine.raw"]);
        assert_eq!(
            s.read_file("ref.raw"),
            s.read_file("mine.raw"),
            "convert -O raw of {fmt} chain"
        );
    }
}

#[test]
fn compare_agrees_with_qemu_img() {
    let s = Scratch::new();
    abc(&s, "qcow2");
    s.qemu_img(&["convert", "-O", "raw", "C.qcow2", "ref.raw"]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "big.qcow2", "128M"]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "e1.qcow2", "64M"]);
    for args in [
        vec!["ref.raw", "C.qcow2"],
        vec!["-s", "ref.raw", "C.qcow2"],
        vec!["C.qcow2", "B.qcow2"],
        vec!["C.qcow2", "A.qcow2"],
        vec!["C.qcow2", "big.qcow2"],
        vec!["-s", "C.qcow2", "big.qcow2"],
        vec!["e1.qcow2", "big.qcow2"],
    ] {
        let mine = s.cowimg(&[&["compare"][..], &args].concat());
        let theirs = s.run("qemu-img", &[&["compare"][..], &args].concat());
        assert_eq!(
            (mine.status, &mine.stdout),
            (theirs.status, &theirs.stdout),
            "compare {args:?}"
        );
    }
    let missing = s.cowimg(&["compare", "C.qcow2", "missing.qcow2"]);
    assert_eq!(missing.status, 2);
    assert!(
        missing.stderr.contains("Could not open 'missing.qcow2'"),
        "{}",
        missing.stderr
    );
}
