//! checksum: blkhash's published test vectors; one digest for every layout of the same disk
//! (raw, qcow2 with 512 B, 64 KiB and 2 MiB clusters, QED, compressed, a backing chain), as
//! qemu builds them; random disks against the Python reference (tests/tools/blkhash.py, which
//! hashes every byte read); zeros never read; the output formats.

mod common;
#[path = "common/fixtures.rs"]
mod fixtures;

use std::fs::File;
use std::os::unix::fs::FileExt;

use common::Scratch;
use fixtures::mixed_data;
use proptest::prelude::*;

const K: u64 = 1024;
const M: u64 = 1024 * K;

/// Writes a raw disk from blkhash's extent notation: `(byte, len)` writes `len` copies of
/// `byte` (zeros included, as data), `('-', len)` leaves a hole.
fn raw_from_extents(s: &Scratch, name: &str, extents: &[(u8, u64)]) {
    let f = File::create(s.path(name)).expect("create raw");
    let mut at = 0;
    for &(byte, len) in extents {
        if byte != b'-' {
            f.write_all_at(&vec![byte; len as usize], at)
                .expect("write");
        }
        at += len;
    }
    f.set_len(at).expect("set length");
}

/// The digest cowimg prints for `image` (its `DIGEST  FILE` line, checked).
fn cowimg_digest(s: &Scratch, args: &[&str]) -> String {
    let out = s.cowimg_ok(&[&["checksum"], args].concat());
    let image = args.last().expect("an image");
    let (digest, file) = out
        .trim_end()
        .split_once("  ")
        .unwrap_or_else(|| panic!("no 'DIGEST  FILE' line: {out}"));
    assert_eq!(file, *image);
    digest.to_string()
}

/// The Python reference's digest of the raw file `name`: every block read and hashed.
fn reference(s: &Scratch, algorithm: &str, name: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/blkhash.py");
    let r = s.run("python3", &[script, "-a", algorithm, name]);
    assert_eq!(r.status, 0, "python3 reference failed: {}", r.stderr);
    r.stdout
        .split_once("  ")
        .expect("reference output")
        .0
        .to_string()
}

/// blkhash's own expected digests (test/blkhash-test.c of nirs/blkhash, sha256, 64 KiB
/// blocks): the vector's name, its extents, and the digest.
#[test]
fn blkhash_published_vectors() {
    const B: u64 = 64 * K;
    const H: u64 = B / 2;
    let vectors: &[(&str, &[(u8, u64)], &str)] = &[
        (
            "block_data",
            &[(b'A', B)],
            "2e3a5f57d5e726ee5de62db1a85ff816f4fa6ea4627807d9a51bdc4c883e165e",
        ),
        (
            "block_data_zero",
            &[(0, B)],
            "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af",
        ),
        (
            "block_zero",
            &[(b'-', B)],
            "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af",
        ),
        (
            "partial_block_data",
            &[(b'A', H)],
            "9467334d6d7668a2f06898185b5cddc78cdfbd962f50c6bf250101f03a0e54dc",
        ),
        (
            "partial_block_data_zero",
            &[(0, H)],
            "842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56",
        ),
        (
            "partial_block_zero",
            &[(b'-', H)],
            "842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56",
        ),
        (
            "sparse",
            &[(b'-', 8 * B)],
            "722ac11a3a81034edf196aa3ee68d1a2e345cd0838b0c78c2ce2fb015d4d817d",
        ),
        (
            "sparse_unaligned",
            &[(b'-', 8 * B), (b'-', H)],
            "e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c",
        ),
        (
            "sparse_large",
            &[(b'-', 1024 * M)],
            "c6d6562c3074a2caa0ceea3e1f460f3af678c792ed05e64157eb51e68ae5260d",
        ),
        (
            "zero",
            &[(0, 8 * B)],
            "722ac11a3a81034edf196aa3ee68d1a2e345cd0838b0c78c2ce2fb015d4d817d",
        ),
        (
            "zero_unaligned",
            &[(0, 8 * B), (0, H)],
            "e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c",
        ),
        (
            "full",
            &[
                (b'A', H),
                (b'B', H),
                (b'C', H),
                (b'D', H),
                (b'E', H),
                (b'F', H),
            ],
            "4ab1586084326f5beb911621282e9557cd26856105eff7f78cace5986af4738b",
        ),
        (
            "full_unaligned",
            &[(b'A', H), (b'B', H), (b'C', H), (b'D', H), (b'E', H)],
            "2cad558b3a2a8d87435e80fe7bae69fa664d92eaa1b9411f573b9fbb412a4d43",
        ),
        (
            "mix",
            &[
                (b'A', H),
                (b'-', H),
                (b'-', H),
                (0, H),
                (b'E', H),
                (b'-', H),
                (b'-', H),
                (0, H),
            ],
            "4b2b5acd96f8105f4fb26abaf35c7c5756338ef9ccce19ffe7714c9ad94b4398",
        ),
        (
            "mix_unaligned",
            &[
                (b'A', H),
                (b'-', H),
                (b'-', H),
                (0, H),
                (b'E', H),
                (b'-', H),
                (b'-', H),
            ],
            "2510ac29c7103f2e68c672d728cbd43db4ed3dc809a24cde96e62dc5862a0f57",
        ),
    ];
    let s = Scratch::new();
    let mut bad = Vec::new();
    for (name, extents, want) in vectors {
        let file = format!("{name}.raw");
        raw_from_extents(&s, &file, extents);
        for jobs in ["1", "2", "7"] {
            let got = cowimg_digest(&s, &["--jobs", jobs, &file]);
            if got != *want {
                bad.push(format!("{name} --jobs {jobs}: got {got}, want {want}"));
            }
        }
        // The reference agrees with blkhash too (it is the oracle of the tests below).
        if *name != "sparse_large" && reference(&s, "sha256", &file) != *want {
            bad.push(format!("{name}: the Python reference disagrees"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// One disk, laid out every way qemu can: all give the reference's digest of the raw file,
/// and only what is not a hole or zero cluster is read.
#[test]
fn one_digest_for_every_layout() {
    let s = Scratch::new();
    // 9 MiB + 3 sectors: mixed data (text, random, zeros, constant), a hole, more data
    // straddling a 2 MiB cluster, and a partial last block.
    let size = 9 * M + 1536;
    let f = File::create(s.path("disk.raw")).expect("create");
    f.write_all_at(&mixed_data(3 * M as usize), 0)
        .expect("write");
    f.write_all_at(&mixed_data(M as usize + 4096), 5 * M + 512)
        .expect("write");
    f.write_all_at(b"tail", size - 4).expect("write");
    f.set_len(size).expect("size");
    drop(f);
    let want = reference(&s, "sha256", "disk.raw");

    for (name, args) in [
        ("c512.qcow2", &["-O", "qcow2", "-o", "cluster_size=512"][..]),
        ("c64k.qcow2", &["-O", "qcow2"]),
        ("c2m.qcow2", &["-O", "qcow2", "-o", "cluster_size=2M"]),
        ("z.qcow2", &["-O", "qcow2", "-c"]),
        (
            "zstd.qcow2",
            &["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
        ),
        ("d.qed", &["-O", "qed"]),
    ] {
        s.qemu_img(&[&["convert", "-f", "raw"], args, &["disk.raw", name]].concat());
    }
    // A chain: the first half in a base, an overlay that changes some of it (data, zeros
    // over data) and holds the rest; its flat copy is the reference.
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "base.qcow2",
        &size.to_string(),
    ]);
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
    s.qemu_io(
        "base.qcow2",
        &[
            "write -P 0x11 0 2M",
            "write -P 0x22 3M 1M",
            "write -P 0x33 8M 1M",
        ],
    );
    s.qemu_io(
        "top.qcow2",
        &[
            "write -P 0x44 1M 64k",
            "write -z 3M 512k",
            "write -P 0x55 6M 100k",
        ],
    );
    s.qemu_img(&["convert", "-O", "raw", "top.qcow2", "flat.raw"]);
    let want_chain = reference(&s, "sha256", "flat.raw");

    for name in [
        "disk.raw",
        "c512.qcow2",
        "c64k.qcow2",
        "c2m.qcow2",
        "z.qcow2",
        "zstd.qcow2",
        "d.qed",
    ] {
        assert_eq!(cowimg_digest(&s, &[name]), want, "{name}");
    }
    assert_eq!(cowimg_digest(&s, &["top.qcow2"]), want_chain);
    assert_eq!(cowimg_digest(&s, &["-f", "qcow2", "top.qcow2"]), want_chain);
    assert_eq!(cowimg_digest(&s, &["flat.raw"]), want_chain);
    // Inspection never writes.
    s.assert_clean("top.qcow2");
}

/// A disk of 1 TiB holding 1.5 MiB: only the data is read, and qcow2, QED and a sparse raw
/// file agree.
#[test]
fn zeros_are_never_read() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "big.qcow2", "1T"]);
    s.qemu_img(&["create", "-q", "-f", "qed", "big.qed", "1T"]);
    s.qemu_img(&["create", "-q", "-f", "raw", "big.raw", "1T"]);
    for img in ["big.qcow2", "big.qed", "big.raw"] {
        // The second write straddles 16 GiB, where checksum's allocation windows meet.
        s.qemu_io(
            img,
            &[
                "write -P 0x61 100G 512k",
                "write -P 0x63 17179607040 512k",
                "write -P 0x62 999G 512k",
            ],
        );
    }
    let out = s.cowimg_ok(&[
        "checksum",
        "--output",
        "json",
        "big.qcow2",
        "big.qed",
        "big.raw",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let all = v.as_array().expect("an array");
    assert_eq!(all.len(), 3);
    // The digest by the construction, block by block (the writes are whole blocks).
    let want = {
        use sha2::{Digest, Sha256};
        const B: usize = 64 << 10;
        let zero = Sha256::digest(vec![0u8; B]);
        let data = [
            (100u64 << 30, 0x61u8),
            (17179607040, 0x63),
            (999 << 30, 0x62),
        ];
        let mut outer = Sha256::new();
        let mut at = 0u64;
        while at < 1 << 40 {
            match data.iter().find(|(o, _)| (*o..*o + 512 * K).contains(&at)) {
                Some((_, p)) => outer.update(Sha256::digest(vec![*p; B])),
                None => outer.update(zero),
            }
            at += B as u64;
        }
        outer.update((1u64 << 40).to_le_bytes());
        outer
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    for r in all {
        assert_eq!(r["checksum"], want.as_str(), "{r}");
        // A file system may allocate a little more than was written around a write (then
        // read and found zero): the raw file reads what its extents say.
        let read = r["bytes-read"].as_u64().expect("bytes-read");
        if r["format"] == "raw" {
            assert!((3 * M / 2..=3 * M).contains(&read), "{r}");
        } else {
            assert_eq!(read, 3 * M / 2, "{r}");
        }
        assert_eq!(r["virtual-size"], 1024 * 1024 * M, "{r}");
        assert_eq!(r["checksum"], all[0]["checksum"], "{r}");
    }
}

#[test]
fn every_algorithm_matches_the_reference() {
    let s = Scratch::new();
    s.write_file("d.raw", &mixed_data(300 * K as usize));
    s.qemu_img(&["convert", "-O", "qcow2", "d.raw", "d.qcow2"]);
    for a in [
        "sha1",
        "sha224",
        "sha256",
        "sha384",
        "sha512",
        "sha512-224",
        "sha512-256",
    ] {
        let want = reference(&s, a, "d.raw");
        assert_eq!(cowimg_digest(&s, &["-a", a, "d.qcow2"]), want, "{a}");
        assert_eq!(cowimg_digest(&s, &["--algorithm", a, "d.raw"]), want, "{a}");
    }
    insta::assert_snapshot!(s.cowimg(&["checksum", "-a", "md5", "d.raw"]).show(), @r"
    exit: 1
    --- stdout
    --- stderr
    cowimg: unknown digest algorithm 'md5': use one of sha1, sha224, sha256, sha384, sha512, sha512-224, sha512-256
    ");
}

/// A raw file whose size is not whole sectors is, as qemu shows it, padded with zeros to the
/// next sector: its digest is that of the padded file (docs/checksum.md).
#[test]
fn a_raw_file_counts_whole_sectors_as_in_qemu() {
    let s = Scratch::new();
    s.write_file("odd.raw", &mixed_data(1000));
    let mut padded = mixed_data(1000);
    padded.resize(1024, 0);
    s.write_file("padded.raw", &padded);
    assert_eq!(
        cowimg_digest(&s, &["odd.raw"]),
        reference(&s, "sha256", "padded.raw")
    );
}

#[test]
fn json_output_and_a_failing_image_among_others() {
    let s = Scratch::new();
    raw_from_extents(&s, "a.raw", &[(b'A', 64 * K), (b'-', 64 * K), (0, 512)]);
    s.qemu_img(&["convert", "-O", "qcow2", "a.raw", "a.qcow2"]);
    insta::assert_snapshot!(s
        .cowimg(&["checksum", "--output", "json", "a.raw", "a.qcow2"])
        .show());
    // The missing one is reported, the others still get their digests, the status is 1.
    insta::assert_snapshot!(s
        .cowimg(&["checksum", "a.raw", "missing.qcow2", "a.qcow2"])
        .show());
}

#[derive(Clone, Debug)]
enum Extent {
    Data(u8, u64),
    Zeros(u64),
    Hole(u64),
}

fn extent() -> impl Strategy<Value = Extent> {
    // Lengths in sectors, up to a little over two blocks, so that extents start and end
    // inside blocks as well as on their edges.
    prop_oneof![
        (1u8.., 1u64..300).prop_map(|(b, n)| Extent::Data(b, n * 512)),
        (1u64..300).prop_map(|n| Extent::Zeros(n * 512)),
        (1u64..300).prop_map(|n| Extent::Hole(n * 512)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random disks of data, written zeros and holes, raw and qcow2 (64 KiB and 512 B
    /// clusters), with random digests and thread counts, against the reference.
    #[test]
    fn random_disks_match_the_reference(
        extents in prop::collection::vec(extent(), 0..12),
        algorithm in prop::sample::select(vec!["sha1", "sha256", "sha512"]),
        jobs in 1usize..4,
    ) {
        let s = Scratch::new();
        let spec: Vec<(u8, u64)> = extents
            .iter()
            .map(|e| match *e {
                // '-' marks a hole in the notation.
                Extent::Data(b, n) => (if b == b'-' { b'+' } else { b }, n),
                Extent::Zeros(n) => (0, n),
                Extent::Hole(n) => (b'-', n),
            })
            .collect();
        raw_from_extents(&s, "r.raw", &spec);
        s.qemu_img(&["convert", "-O", "qcow2", "r.raw", "r.qcow2"]);
        s.qemu_img(&["convert", "-O", "qcow2", "-o", "cluster_size=512", "r.raw", "s.qcow2"]);
        let want = reference(&s, algorithm, "r.raw");
        let jobs = jobs.to_string();
        for img in ["r.raw", "r.qcow2", "s.qcow2"] {
            prop_assert_eq!(
                cowimg_digest(&s, &["-a", algorithm, "--jobs", &jobs, img]),
                want.clone(),
                "{}", img
            );
        }
    }
}
