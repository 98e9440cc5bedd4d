//! What `convert` and `create` do to what their destination is (issue 13 item 1): a device is
//! written in place (never replaced by a file), a symlink is written through, a replaced file
//! keeps its mode and owner, a hard-linked file is refused, and `convert -n` writes into an
//! existing image as `qemu-img convert -n` does (compared with qemu-img on copies).
//!
//! The block device is a real loop device (`losetup`, root: CI runs as root), detached by a
//! guard; without losetup the test fails. The character device is a node made with mknod
//! (/dev/null's numbers): no character device here holds data, so what is shown there is that
//! it is written in place and never replaced, and refused when too small, as qemu-img does.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::Scratch;

const MIB: usize = 1 << 20;

/// A loop device over a file, detached when dropped.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux) must be installed, and the tests run as root");
        assert!(
            out.status.success(),
            "losetup -f --show {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// `src.qcow2`: 16 MiB, 0xab in the first MiB, 0xcd in the last, zeros between.
fn source(s: &Scratch) {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "src.qcow2", "16M"]);
    s.qemu_io("src.qcow2", &["write -P 0xab 0 1M", "write -P 0xcd 15M 1M"]);
}

/// The bytes `src.qcow2` reads.
fn source_bytes() -> Vec<u8> {
    let mut v = vec![0u8; 16 * MIB];
    v[..MIB].fill(0xab);
    v[15 * MIB..].fill(0xcd);
    v
}

fn is_device(p: &Path, block: bool) -> bool {
    let t = fs::symlink_metadata(p).expect("stat").file_type();
    if block {
        t.is_block_device()
    } else {
        t.is_char_device()
    }
}

#[test]
fn block_device_is_written_in_place_as_qemu_img_writes_it() {
    let s = Scratch::new();
    source(&s);
    // Devices larger than the image, full of old bytes that must not show through.
    let junk = vec![0x11u8; 24 * MIB];
    s.write_file("ours.img", &junk);
    s.write_file("theirs.img", &junk);
    {
        let ours = Loop::attach(&s.path("ours.img"));
        let theirs = Loop::attach(&s.path("theirs.img"));
        s.cowimg_ok(&["convert", "-O", "raw", "src.qcow2", &ours.dev]);
        s.qemu_img(&["convert", "-O", "raw", "src.qcow2", &theirs.dev]);
        assert!(
            is_device(Path::new(&ours.dev), true),
            "{} is no longer a block device",
            ours.dev
        );
    }
    // Detached: the backing files hold what was written to the devices.
    let ours = s.read_file("ours.img");
    assert!(
        ours == s.read_file("theirs.img"),
        "cowimg and qemu-img wrote different bytes"
    );
    assert!(
        ours[..16 * MIB] == source_bytes()[..],
        "the image was not written whole"
    );
    assert!(
        ours[16 * MIB..].iter().all(|&b| b == 0x11),
        "bytes past the image were changed"
    );
}

#[test]
fn devices_too_small_or_for_qcow2_are_refused_and_untouched() {
    let s = Scratch::new();
    source(&s);
    s.write_file("small.img", &vec![0x11u8; 8 * MIB]);
    s.write_file("big.img", &vec![0x11u8; 24 * MIB]);
    {
        let small = Loop::attach(&s.path("small.img"));
        let big = Loop::attach(&s.path("big.img"));
        let r = s.cowimg(&["convert", "-O", "raw", "src.qcow2", &small.dev]);
        assert_eq!(r.status, 1, "{}", r.stderr);
        assert!(
            r.stderr.contains("Cannot grow device files")
                && r.stderr
                    .contains("holds 8388608 bytes, the image needs 16777216"),
            "{}",
            r.stderr
        );
        // qemu-img refuses it too.
        let q = s.run(
            "qemu-img",
            &["convert", "-O", "raw", "src.qcow2", &small.dev],
        );
        assert_eq!(q.status, 1, "{}", q.stderr);
        assert!(
            q.stderr.contains("Cannot grow device files"),
            "{}",
            q.stderr
        );
        let r = s.cowimg(&["convert", "-O", "qcow2", "src.qcow2", &big.dev]);
        assert_eq!(r.status, 1, "{}", r.stderr);
        assert!(
            r.stderr.contains("is a device") && r.stderr.contains("-O raw"),
            "{}",
            r.stderr
        );
        assert!(is_device(Path::new(&small.dev), true));
        assert!(is_device(Path::new(&big.dev), true));
    }
    assert!(s.read_file("small.img").iter().all(|&b| b == 0x11));
    assert!(s.read_file("big.img").iter().all(|&b| b == 0x11));
}

#[test]
fn character_device_is_written_in_place_never_replaced() {
    let s = Scratch::new();
    source(&s);
    s.write_file("empty.raw", b"");
    let node = s.path("null");
    let made = Command::new("mknod")
        .arg(&node)
        .args(["c", "1", "3"])
        .status()
        .expect("mknod");
    assert!(made.success(), "mknod needs root");
    // A character device sizes as 0 bytes: an image of 16 MiB does not fit, as in qemu-img.
    for tool in [env!("CARGO_BIN_EXE_cowimg"), "qemu-img"] {
        let r = s.run(tool, &["convert", "-O", "raw", "src.qcow2", "null"]);
        assert_eq!(r.status, 1, "{tool}: {}", r.stderr);
        assert!(
            r.stderr.contains("Cannot grow device files"),
            "{tool}: {}",
            r.stderr
        );
        // An empty image does, and is written (and flushed) in place.
        let r = s.run(
            tool,
            &["convert", "-f", "raw", "-O", "raw", "empty.raw", "null"],
        );
        assert_eq!(r.status, 0, "{tool}: {}", r.stderr);
        assert!(is_device(&node, false), "{tool} replaced the device node");
    }
}

#[test]
fn symlink_destination_is_written_through() {
    let s = Scratch::new();
    source(&s);
    fs::create_dir(s.path("sub")).unwrap();
    s.write_file("sub/real.qcow2", b"old contents");
    fs::set_permissions(s.path("sub/real.qcow2"), fs::Permissions::from_mode(0o640)).unwrap();
    // A chain of two relative links.
    std::os::unix::fs::symlink("sub/real.qcow2", s.path("link1")).unwrap();
    std::os::unix::fs::symlink("link1", s.path("link2")).unwrap();
    // A dangling link names the file to create, in the link target's directory.
    std::os::unix::fs::symlink("sub/new.qcow2", s.path("dangling")).unwrap();
    // A link inside sub pointing back up.
    std::os::unix::fs::symlink("../up.qcow2", s.path("sub/up")).unwrap();
    for dst in ["link2", "dangling", "sub/up"] {
        s.cowimg_ok(&["convert", "-O", "qcow2", "src.qcow2", dst]);
    }
    for (link, to) in [
        ("link2", "link1"),
        ("link1", "sub/real.qcow2"),
        ("dangling", "sub/new.qcow2"),
        ("sub/up", "../up.qcow2"),
    ] {
        assert_eq!(
            fs::read_link(s.path(link)).expect("still a symlink"),
            Path::new(to)
        );
    }
    for target in ["sub/real.qcow2", "sub/new.qcow2", "up.qcow2"] {
        assert!(
            s.same(target, "src.qcow2"),
            "{target} differs from the source"
        );
        s.assert_clean(target);
    }
    let mode = fs::metadata(s.path("sub/real.qcow2")).unwrap().mode();
    assert_eq!(
        mode & 0o7777,
        0o640,
        "the mode of the link target was not kept"
    );
    for dir in [s.dir.path().to_path_buf(), s.path("sub")] {
        for e in fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains("cowimg-partial"), "{name} was left behind");
        }
    }
}

#[test]
fn replaced_file_keeps_mode_and_owner() {
    let s = Scratch::new();
    source(&s);
    for (name, args) in [
        (
            "conv.qcow2",
            vec!["convert", "-O", "qcow2", "src.qcow2", "conv.qcow2"],
        ),
        (
            "made.qcow2",
            vec!["create", "--force", "-q", "-f", "qcow2", "made.qcow2", "1M"],
        ),
    ] {
        s.write_file(name, b"a private disk");
        let p = s.path(name);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&p, Some(1234), Some(4321)).expect("chown needs root");
        let before = fs::metadata(&p).unwrap();
        s.cowimg_ok(&args);
        let after = fs::metadata(&p).unwrap();
        assert_ne!(
            before.ino(),
            after.ino(),
            "{name}: replaced, not written in place"
        );
        assert_eq!(after.mode() & 0o7777, 0o600, "{name}: mode");
        assert_eq!((after.uid(), after.gid()), (1234, 4321), "{name}: owner");
        s.assert_clean(name);
    }
    assert!(s.same("conv.qcow2", "src.qcow2"));
}

/// As an unprivileged user, the owner cannot be given away (the new file is the user's), but
/// the mode is kept.
#[test]
fn replaced_file_keeps_its_mode_for_an_unprivileged_user() {
    let s = Scratch::new();
    source(&s);
    fs::set_permissions(s.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(s.path("src.qcow2"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(s.path("home")).unwrap();
    std::os::unix::fs::chown(s.path("home"), Some(65534), Some(65534)).unwrap();
    s.write_file("home/disk.raw", b"old");
    let p = s.path("home/disk.raw");
    // Group root: nobody may not give the new file that group.
    std::os::unix::fs::chown(&p, Some(65534), Some(0)).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    // A copy nobody can run wherever the checkout lies.
    fs::copy(env!("CARGO_BIN_EXE_cowimg"), s.path("cowimg-bin")).unwrap();
    let bin = s.path("cowimg-bin").to_string_lossy().into_owned();
    let r = s.run(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &bin,
            "convert",
            "-O",
            "raw",
            "src.qcow2",
            "home/disk.raw",
        ],
    );
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    let m = fs::metadata(&p).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
    assert!(s.read_file("home/disk.raw") == source_bytes());
}

#[test]
fn hard_linked_destination_is_refused_and_written_in_place_with_n() {
    let s = Scratch::new();
    source(&s);
    s.write_file("a.raw", &vec![0x11u8; 16 * MIB]);
    fs::hard_link(s.path("a.raw"), s.path("b.raw")).unwrap();
    let r = s.cowimg(&["convert", "-O", "raw", "src.qcow2", "a.raw"]);
    assert_eq!(r.status, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("hard links") && r.stderr.contains("convert -n"),
        "{}",
        r.stderr
    );
    assert!(s.read_file("b.raw").iter().all(|&b| b == 0x11));
    s.cowimg_ok(&["convert", "-n", "-O", "raw", "src.qcow2", "a.raw"]);
    // One file under two names: both read the new bytes.
    assert_eq!(
        fs::metadata(s.path("a.raw")).unwrap().ino(),
        fs::metadata(s.path("b.raw")).unwrap().ino()
    );
    assert!(s.read_file("b.raw") == source_bytes());
    let r = s.run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", "b.raw", "src.qcow2"],
    );
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
}

/// A destination for `-n`, made twice: one for cowimg, one for qemu-img.
fn make(s: &Scratch, kind: &str, name: &str) {
    let mk = |args: &[&str]| {
        s.qemu_img(args);
    };
    match kind {
        // Larger than the source, full of old bytes.
        "raw-junk" => s.write_file(name, &vec![0x11u8; 20 * MIB]),
        "raw-small" => s.write_file(name, &vec![0x11u8; 8 * MIB]),
        "qcow2-full" => {
            mk(&["create", "-q", "-f", "qcow2", name, "16M"]);
            s.qemu_io(name, &["write -P 0x22 0 16M"]);
        }
        // Over a backing file whose data must not show through the source's zeros.
        "qcow2-backed" | "qed-backed" => {
            if !s.path("back.qcow2").exists() {
                mk(&["create", "-q", "-f", "qcow2", "back.qcow2", "16M"]);
                s.qemu_io("back.qcow2", &["write -P 0x77 0 16M"]);
            }
            let fmt = &kind[..kind.find('-').unwrap()];
            mk(&[
                "create",
                "-q",
                "-f",
                fmt,
                "-b",
                "back.qcow2",
                "-F",
                "qcow2",
                name,
            ]);
        }
        "qcow2-small" => mk(&["create", "-q", "-f", "qcow2", name, "8M"]),
        "qcow2-big" => mk(&["create", "-q", "-f", "qcow2", name, "32M"]),
        "missing" => {}
        _ => unreachable!("{kind}"),
    }
}

#[test]
fn convert_n_writes_in_place_as_qemu_img_does() {
    let s = Scratch::new();
    source(&s);
    // (destination, options, qemu-img's message when it refuses)
    let cases: &[(&str, &[&str], Option<&str>)] = &[
        ("raw-junk", &["-O", "raw"], None),
        ("qcow2-full", &["-O", "qcow2"], None),
        ("qcow2-backed", &["-O", "qcow2"], None),
        ("qed-backed", &["-O", "qed"], None),
        ("qcow2-big", &["-O", "qcow2"], None),
        ("missing", &["-O", "raw"], Some("No such file or directory")),
        (
            "raw-small",
            &["-O", "raw"],
            Some("output file is smaller than input file"),
        ),
        (
            "qcow2-small",
            &["-O", "qcow2"],
            Some("output file is smaller than input file"),
        ),
        // Without -O the destination is raw: a qcow2 file of 32 MiB virtual size but a few
        // hundred KiB is a small raw image.
        (
            "qcow2-big",
            &[],
            Some("output file is smaller than input file"),
        ),
        (
            "raw-junk",
            &["-O", "qcow2"],
            Some("Image is not in qcow2 format"),
        ),
        (
            "qcow2-full",
            &["-O", "qcow2", "-o", "cluster_size=4k"],
            Some("-o has no effect when skipping image creation"),
        ),
    ];
    for (i, (kind, opts, refused)) in cases.iter().enumerate() {
        let (ours, theirs) = (format!("ours{i}"), format!("theirs{i}"));
        make(&s, kind, &ours);
        make(&s, kind, &theirs);
        let before = s.path(&ours).exists().then(|| s.read_file(&ours));
        let run = |tool: &str, dst: &str| {
            let mut args = vec!["convert", "-n"];
            args.extend_from_slice(opts);
            args.extend(["src.qcow2", dst]);
            s.run(tool, &args)
        };
        let r = run(env!("CARGO_BIN_EXE_cowimg"), &ours);
        let q = run("qemu-img", &theirs);
        let case = format!("case {i} ({kind} {opts:?})");
        assert_eq!(
            r.status, q.status,
            "{case}: {}\nqemu-img: {}",
            r.stderr, q.stderr
        );
        match refused {
            Some(msg) => {
                assert_eq!(r.status, 1, "{case}");
                assert!(q.stderr.contains(msg), "{case}: qemu-img said {}", q.stderr);
                assert!(r.stderr.contains(msg), "{case}: {}", r.stderr);
                let after = s.path(&ours).exists().then(|| s.read_file(&ours));
                assert!(before == after, "{case}: the refused destination changed");
            }
            None => {
                assert_eq!(r.status, 0, "{case}: {}", r.stderr);
                if kind.starts_with("raw") {
                    assert!(
                        s.read_file(&ours) == s.read_file(&theirs),
                        "{case}: not the bytes qemu-img wrote"
                    );
                } else {
                    s.assert_clean(&ours);
                    assert!(
                        s.same(&ours, "src.qcow2"),
                        "{case}: differs from the source"
                    );
                    assert!(s.same(&ours, &theirs), "{case}: differs from qemu-img's");
                }
            }
        }
    }
    // qemu-img fails on -c with -n ("Input/output error"); cowimg says why, before writing.
    make(&s, "qcow2-full", "c.qcow2");
    let before = s.read_file("c.qcow2");
    let r = s.cowimg(&["convert", "-n", "-c", "-O", "qcow2", "src.qcow2", "c.qcow2"]);
    assert_eq!(r.status, 1);
    assert!(
        r.stderr.contains("-c cannot be used with -n"),
        "{}",
        r.stderr
    );
    assert!(s.read_file("c.qcow2") == before);
}

#[test]
fn create_refusal_prints_the_command_with_force() {
    let s = Scratch::new();
    s.cowimg_ok(&["create", "-q", "-f", "qcow2", "my disk.qcow2", "1M"]);
    let r = s.cowimg(&["create", "-f", "qcow2", "my disk.qcow2", "2M"]);
    assert_eq!(r.status, 1, "{}", r.stderr);
    assert!(r.stdout.is_empty(), "nothing is formatted: {}", r.stdout);
    let line = r
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("  "))
        .unwrap_or_else(|| panic!("no command in: {}", r.stderr));
    let words = shlex::split(line).expect("a shell command");
    assert_eq!(
        words,
        [
            env!("CARGO_BIN_EXE_cowimg"),
            "create",
            "--force",
            "-f",
            "qcow2",
            "my disk.qcow2",
            "2M"
        ]
    );
    // Running it replaces the image.
    let done = Command::new(&words[0])
        .args(&words[1..])
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(s.qemu_info("my disk.qcow2")["virtual-size"], 2 * MIB as u64);
}
