//! The writing engine, driven through the library with random writes, zero writes and partial
//! writes, beside a raw shadow of the expected guest contents: after every committed batch
//! `qemu-img check` is clean and `qemu-img compare` finds image and shadow identical.

mod common;
use common::Scratch;

use cowimg::chain::{Chain, OpenOptions};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64 },
}

/// Image set-ups: (qemu-img create arguments, with a backing file, with a snapshot, made by
/// `qemu-img convert -c` so that it starts full of compressed clusters).
const SETUPS: &[(&[&str], bool, bool, bool)] = &[
    (&["-f", "qcow2"], false, false, false),
    (&["-f", "qcow2"], true, true, false),
    (&["-f", "qcow2", "-o", "compat=0.10"], true, false, false),
    (
        &["-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k"],
        true,
        false,
        false,
    ),
    (
        &["-f", "qcow2", "-o", "cluster_size=512,refcount_bits=1"],
        false,
        false,
        false,
    ),
    (
        &["-f", "qcow2", "-o", "cluster_size=512"],
        true,
        true,
        false,
    ),
    (
        &["-f", "qcow2", "-o", "cluster_size=2M"],
        true,
        false,
        false,
    ),
    (
        &["-f", "qcow2", "-o", "refcount_bits=64,lazy_refcounts=on"],
        false,
        true,
        false,
    ),
    (&["-f", "qcow2"], false, false, true),
    (
        &[
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=32k,compression_type=zstd",
        ],
        false,
        true,
        true,
    ),
    (&["-f", "qed"], false, false, false),
    (
        &["-f", "qed", "-o", "cluster_size=4k,table_size=2"],
        true,
        false,
        false,
    ),
];

const SIZE: u64 = 6 << 20;

fn op() -> impl Strategy<Value = Op> {
    let span = (0u64..SIZE, 1u64..(640 << 10)).prop_map(|(off, len)| (off, len.min(SIZE - off)));
    prop_oneof![
        3 => (span.clone(), any::<u8>()).prop_map(|((off, len), byte)| Op::Write { off, len, byte: byte | 1 }),
        1 => span.prop_map(|(off, len)| Op::Zero { off, len }),
    ]
}

fn run_case(setup: usize, batches: &[Vec<Op>]) {
    let (create, backed, snapshot, compressed) = SETUPS[setup];
    let s = Scratch::new();
    if compressed {
        s.qemu_img(&["create", "-q", "-f", "raw", "src.raw", "6M"]);
        s.qemu_io(
            "src.raw",
            &["write -q -P 0x31 0 2M", "write -q -P 0x32 3M 2M"],
        );
        let mut args = vec!["convert", "-c", "-O", "qcow2"];
        args.extend_from_slice(&create[2..]);
        args.extend(["src.raw", "img"]);
        s.qemu_img(&args);
    } else {
        let mut args = vec!["create", "-q"];
        args.extend_from_slice(create);
        if backed {
            s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "6M"]);
            s.qemu_io("base.qcow2", &["write -q -P 0x5a 0 6M"]);
            args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
        }
        args.extend(["img", "6M"]);
        s.qemu_img(&args);
    }
    s.qemu_io("img", &["write -q -P 0x77 1M 100k"]);
    if snapshot {
        s.qemu_img(&["snapshot", "-c", "s", "img"]);
    }
    s.qemu_img(&["convert", "-O", "raw", "img", "shadow.raw"]);
    let mut shadow = s.read_file("shadow.raw");
    let path = s.path("img").to_string_lossy().into_owned();
    for batch in batches {
        {
            let chain = Chain::open(&path, OpenOptions::write(None)).expect("open for writing");
            let img = &chain.top().image;
            let below = chain.below(0);
            for op in batch {
                match *op {
                    Op::Write { off, len, byte } => {
                        img.write(off, &vec![byte; len as usize], &below)
                            .expect("write");
                        shadow[off as usize..(off + len) as usize].fill(byte);
                    }
                    Op::Zero { off, len } => {
                        img.write_zeroes(off, len, &below).expect("write_zeroes");
                        shadow[off as usize..(off + len) as usize].fill(0);
                    }
                }
            }
            img.commit().expect("commit");
        }
        s.write_file("shadow.raw", &shadow);
        s.assert_clean("img");
        assert!(
            s.same("shadow.raw", "img"),
            "setup {setup}: content differs after {batch:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20, failure_persistence: None, .. ProptestConfig::default() })]
    #[test]
    fn random_writes_keep_images_consistent(
        setup in 0usize..SETUPS.len(),
        batches in prop::collection::vec(prop::collection::vec(op(), 1..8), 1..4),
    ) {
        run_case(setup, &batches);
    }
}

#[test]
fn every_setup_once() {
    let batch = vec![
        Op::Write {
            off: 1000,
            len: 70_000,
            byte: 3,
        },
        Op::Zero {
            off: 2 << 20,
            len: 1 << 20,
        },
        Op::Write {
            off: (1 << 20) + 512,
            len: 512,
            byte: 9,
        },
        Op::Zero { off: 100, len: 300 },
        // Whole subclusters inside a (compressed) cluster: the rest of it must survive.
        Op::Zero {
            off: (3 << 20) + 4096,
            len: 8192,
        },
    ];
    for setup in 0..SETUPS.len() {
        run_case(setup, &[batch.clone(), batch.clone()]);
    }
}
