//! Compressed output: `convert -c` and `stream -c` write qcow2 compressed clusters that qemu
//! reads identically, and cowimg reads qemu's compressed images.

mod common;
use common::Scratch;

/// A two-layer source with compressible patterns, incompressible data and zeros.
fn source(s: &Scratch) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..(2u32 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    s.write_file("noise.bin", &noise);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "A.qcow2", "12M"]);
    s.qemu_io(
        "A.qcow2",
        &[
            "write -q -P 0x41 0 3M",
            "write -q -s noise.bin 4M 2M",
            "write -q -P 0x42 7M 100k",
        ],
    );
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", "C.qcow2",
    ]);
    s.qemu_io(
        "C.qcow2",
        &["write -q -P 0x43 1M 64k", "write -q -z 2M 64k"],
    );
    s.qemu_img(&["convert", "-O", "raw", "C.qcow2", "ref.raw"]);
}

fn compressed_share(s: &Scratch, image: &str) -> (u64, u64) {
    let map: serde_json::Value =
        serde_json::from_str(&s.qemu_img(&["map", "--output=json", image])).unwrap();
    let sum = |f: &dyn Fn(&serde_json::Value) -> bool| -> u64 {
        map.as_array()
            .unwrap()
            .iter()
            .filter(|e| f(e))
            .map(|e| e["length"].as_u64().unwrap())
            .sum()
    };
    (
        sum(&|e| e["compressed"] == true),
        sum(&|e| e["data"] == true && e["compressed"] == false),
    )
}

#[test]
fn convert_c_zlib_and_zstd() {
    for ctype in ["zlib", "zstd"] {
        for cs in ["64k", "2M", "4k"] {
            let s = Scratch::new();
            source(&s);
            let opts = format!("compression_type={ctype},cluster_size={cs}");
            s.cowimg_ok(&[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &opts,
                "C.qcow2",
                "out.qcow2",
            ]);
            assert!(s.same("ref.raw", "out.qcow2"), "{ctype} {cs}");
            s.assert_clean("out.qcow2");
            // Patterns are stored compressed, the noise plainly.
            let (compressed, plain) = compressed_share(&s, "out.qcow2");
            assert!(
                compressed >= 3 << 20,
                "{ctype} {cs}: only {compressed} bytes compressed"
            );
            assert!(
                plain >= 2 << 20,
                "{ctype} {cs}: incompressible data should stay plain"
            );
            // No larger than qemu-img's output.
            s.qemu_img(&[
                "convert", "-c", "-O", "qcow2", "-o", &opts, "C.qcow2", "q.qcow2",
            ]);
            let (mine, theirs) = (s.read_file("out.qcow2").len(), s.read_file("q.qcow2").len());
            assert!(
                mine <= theirs,
                "{ctype} {cs}: {mine} bytes vs qemu-img's {theirs}"
            );
            // And the same whatever the number of workers: stored in order.
            s.cowimg_ok(&[
                "convert",
                "-c",
                "--jobs",
                "1",
                "-O",
                "qcow2",
                "-o",
                &opts,
                "C.qcow2",
                "one.qcow2",
            ]);
            assert_eq!(
                s.read_file("one.qcow2").len(),
                mine,
                "{ctype} {cs}: layout depends on the workers"
            );
            // cowimg reads qemu's compressed image identically.
            s.cowimg_ok(&["convert", "-O", "raw", "q.qcow2", "back.raw"]);
            assert_eq!(s.read_file("back.raw"), s.read_file("ref.raw"));
        }
    }
}

#[test]
fn stream_c_writes_an_archive_ready_image() {
    let s = Scratch::new();
    source(&s);
    s.cowimg_ok(&["stream", "-c", "C.qcow2"]);
    assert!(s.same("ref.raw", "C.qcow2"));
    s.assert_clean("C.qcow2");
    assert!(compressed_share(&s, "C.qcow2").0 >= 3 << 20);
    // qemu-io reads it too.
    s.qemu_io(
        "C.qcow2",
        &["read -q -P 0x41 0 1M", "read -q -P 0x43 1M 64k"],
    );
}

#[test]
fn qed_and_raw_refuse_compression() {
    let s = Scratch::new();
    source(&s);
    for fmt in ["qed", "raw"] {
        let r = s.cowimg(&["convert", "-c", "-O", fmt, "C.qcow2", "x.img"]);
        assert_eq!(r.status, 1);
        assert!(
            r.stderr
                .contains("Compression not supported for this file format"),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn rebase_c_flattens_into_compressed_clusters() {
    let s = Scratch::new();
    source(&s);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "N.qcow2", "12M"]);
    s.cowimg_ok(&["rebase", "-c", "-b", "N.qcow2", "-F", "qcow2", "C.qcow2"]);
    assert!(s.same("ref.raw", "C.qcow2"));
    s.assert_clean("C.qcow2");
    assert!(compressed_share(&s, "C.qcow2").0 >= 3 << 20);
}
