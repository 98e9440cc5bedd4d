//! The fixture matrix: one image (or chain) per on-disk feature, made at test time by the real
//! qemu-img and qemu-io in a scratch directory, so that cowimg is measured against what
//! QEMU 10 actually writes. Nothing here is committed as a binary.
//!
//! Every fixture is small (a few MiB of virtual size, mostly sparse) and built by a function
//! of the same name; [`build`] makes one by name, [`NAMES`] lists them all.
//!
//! Include with `mod common; #[path = "common/fixtures.rs"] mod fixtures;`.

#![allow(dead_code)]

use crate::common::Scratch;

/// One generated image (with its backing files, all inside `scratch`).
pub struct Fixture {
    pub name: &'static str,
    pub scratch: Scratch,
    /// The image to hand to the tools, relative to the scratch directory (the tools run there).
    pub top: String,
}

/// Every fixture of the matrix.
pub const NAMES: &[&str] = &[
    "raw_sparse",
    "qcow2_v2",
    "qcow2_v2_over_raw",
    "qcow2_v3",
    "qcow2_v3_over_raw",
    "qcow2_cluster_512",
    "qcow2_cluster_2m",
    "qcow2_refcount_1",
    "qcow2_refcount_64",
    "qcow2_odd_size",
    "qcow2_zlib_convert",
    "qcow2_zstd_convert",
    "qcow2_zlib_convert_512",
    "qcow2_zstd_convert_2m",
    "qcow2_zlib_write_c",
    "qcow2_zstd_write_c",
    "qcow2_extended_l2",
    "qcow2_extended_l2_32k",
    "qcow2_zero_clusters",
    "qcow2_v2_zero_over_backing",
    "qcow2_snapshot",
    "qcow2_bitmap",
    "qcow2_dirty_lazy_refcounts",
    "qcow2_data_file",
    "qcow2_data_file_raw",
    "qed_4k_table16",
    "qed_over_raw",
    "qed_over_qcow2",
    "qed_backing_shorter",
    "chain_mixed_dirs",
    "backing_shorter",
    "backing_longer",
    "unrecorded_qcow2_over_qcow2",
    "unrecorded_qcow2_over_raw",
    "unrecorded_v2_over_qcow2",
    "raw_odd_size",
    "qcow2_over_odd_raw",
    "qcow2_prealloc_metadata",
    "qcow2_prealloc_falloc",
    "qcow2_prealloc_full",
    "qcow2_lazy_refcounts_clean",
    "qcow2_data_file_subdir",
    "qcow2_data_file_absolute",
    "qcow2_corrupt_bit",
    "qcow2_unknown_compat_and_extension",
    "qcow2_extended_l2_2m",
    "qcow2_large_sparse",
    "qcow2_2m_beyond_2g",
    "qcow2_extended_l2_16k",
    "qcow2_extended_l2_data_file",
    "qcow2_data_file_over_backing",
    "qcow2_resized",
    "qed_resized",
    "qed_need_check",
    "qcow2_bitmap_in_use",
    "qcow2_over_qcow2_as_raw",
    "qcow2_over_file_protocol",
    "qed_odd_size",
    "chain_mixed_dirs_absolute",
];

/// Builds the fixture called `name` in a fresh scratch directory.
pub fn build(name: &'static str) -> Fixture {
    let s = Scratch::new();
    let top = match name {
        "raw_sparse" => raw_sparse(&s),
        "qcow2_v2" => qcow2(&s, "v2.qcow2", "compat=0.10", 64 << 10, None),
        "qcow2_v2_over_raw" => qcow2(&s, "v2.qcow2", "compat=0.10", 64 << 10, Some("raw")),
        "qcow2_v3" => qcow2(&s, "v3.qcow2", "compat=1.1", 64 << 10, None),
        "qcow2_v3_over_raw" => qcow2(&s, "v3.qcow2", "compat=1.1", 64 << 10, Some("raw")),
        "qcow2_cluster_512" => qcow2(&s, "c512.qcow2", "cluster_size=512", 512, Some("qcow2")),
        "qcow2_cluster_2m" => qcow2(&s, "c2m.qcow2", "cluster_size=2M", 2 << 20, Some("qcow2")),
        "qcow2_refcount_1" => qcow2(&s, "r1.qcow2", "refcount_bits=1", 64 << 10, Some("raw")),
        "qcow2_refcount_64" => qcow2(&s, "r64.qcow2", "refcount_bits=64", 64 << 10, Some("raw")),
        "qcow2_odd_size" => odd_size(&s),
        "qcow2_zlib_convert" => convert_compressed(&s, "zlib", 64 << 10),
        "qcow2_zstd_convert" => convert_compressed(&s, "zstd", 64 << 10),
        "qcow2_zlib_convert_512" => convert_compressed(&s, "zlib", 512),
        "qcow2_zstd_convert_2m" => convert_compressed(&s, "zstd", 2 << 20),
        "qcow2_zlib_write_c" => write_compressed(&s, "zlib"),
        "qcow2_zstd_write_c" => write_compressed(&s, "zstd"),
        "qcow2_extended_l2" => extended_l2(&s, 64 << 10, true),
        "qcow2_extended_l2_32k" => extended_l2(&s, 32 << 10, false),
        "qcow2_zero_clusters" => zero_clusters(&s),
        "qcow2_v2_zero_over_backing" => v2_zero_over_backing(&s),
        "qcow2_snapshot" => snapshot(&s),
        "qcow2_bitmap" => bitmap(&s),
        "qcow2_dirty_lazy_refcounts" => dirty(&s),
        "qcow2_data_file" => data_file(&s, false),
        "qcow2_data_file_raw" => data_file(&s, true),
        "qed_4k_table16" => qed_small(&s),
        "qed_over_raw" => qed_over(&s, "raw"),
        "qed_over_qcow2" => qed_over(&s, "qcow2"),
        "qed_backing_shorter" => qed_backing_shorter(&s),
        "chain_mixed_dirs" => chain_mixed(&s),
        "backing_shorter" => backing_shorter(&s),
        "backing_longer" => backing_longer(&s),
        "unrecorded_qcow2_over_qcow2" => unrecorded(&s, "compat=1.1", "qcow2"),
        "unrecorded_qcow2_over_raw" => unrecorded(&s, "compat=1.1", "raw"),
        "unrecorded_v2_over_qcow2" => unrecorded(&s, "compat=0.10", "qcow2"),
        "raw_odd_size" => raw_odd_size(&s),
        "qcow2_over_odd_raw" => qcow2_over_odd_raw(&s),
        "qcow2_prealloc_metadata" => preallocated(&s, "metadata"),
        "qcow2_prealloc_falloc" => preallocated(&s, "falloc"),
        "qcow2_prealloc_full" => preallocated(&s, "full"),
        "qcow2_lazy_refcounts_clean" => {
            qcow2(&s, "lazy.qcow2", "lazy_refcounts=on", 64 << 10, Some("raw"))
        }
        "qcow2_data_file_subdir" => data_file_elsewhere(&s, false),
        "qcow2_data_file_absolute" => data_file_elsewhere(&s, true),
        "qcow2_corrupt_bit" => corrupt_bit(&s),
        "qcow2_unknown_compat_and_extension" => unknown_compat_and_extension(&s),
        "qcow2_extended_l2_2m" => extended_l2(&s, 2 << 20, true),
        "qcow2_large_sparse" => large_sparse(&s),
        "qcow2_2m_beyond_2g" => beyond_2g(&s),
        "qcow2_extended_l2_16k" => extended_l2(&s, 16 << 10, true),
        "qcow2_extended_l2_data_file" => extended_l2_data_file(&s),
        "qcow2_data_file_over_backing" => data_file_over_backing(&s),
        "qcow2_resized" => resized(&s, "qcow2"),
        "qed_resized" => resized(&s, "qed"),
        "qed_need_check" => qed_need_check(&s),
        "qcow2_bitmap_in_use" => bitmap_in_use(&s),
        "qcow2_over_qcow2_as_raw" => over_qcow2_as_raw(&s),
        "qcow2_over_file_protocol" => over_file_protocol(&s),
        "qed_odd_size" => qed_odd_size(&s),
        // The same chain, named by the absolute path of its top.
        "chain_mixed_dirs_absolute" => {
            chain_mixed(&s);
            s.path("top/top.qcow2").to_string_lossy().into_owned()
        }
        other => panic!("no fixture called {other}"),
    };
    Fixture {
        name,
        scratch: s,
        top,
    }
}

const MIB: u64 = 1 << 20;

/// qemu-io commands touching every kind of range for cluster size `cs` in an image of `size`
/// bytes: a full cluster, unaligned partial writes (inside one cluster and straddling two),
/// zero writes of whole clusters and of a partial one, a discard of one of two written
/// clusters, unmapping zero writes, data in the middle and in the last cluster.
pub fn pattern(cs: u64, size: u64) -> Vec<String> {
    vec![
        format!("write -q -P 0x11 0 {cs}"),
        format!("write -q -P 0x22 {} 1000", cs + 100),
        format!("write -q -P 0x33 {} 1400", 3 * cs - 700),
        format!("write -q -z {} {}", 5 * cs, 2 * cs),
        format!("write -q -z {} 512", 7 * cs + 512.min(cs / 2)),
        format!("write -q -P 0x44 {} {}", 8 * cs, 2 * cs),
        format!("discard -q {} {cs}", 8 * cs),
        format!("write -q -P 0x45 {} {}", 11 * cs, cs),
        format!("write -q -z -u {} {cs}", 11 * cs),
        format!("write -q -P 0x55 {} 8192", size / 2 + 4096),
        format!("write -q -P 0x66 {} {cs}", size - cs),
    ]
}

/// A raw base of `size` bytes with data over the first half, a block at three quarters and
/// holes elsewhere, so that what shows through an overlay is visible.
pub fn raw_base(s: &Scratch, name: &str, size: u64) {
    s.qemu_img(&["create", "-q", "-f", "raw", name, &size.to_string()]);
    s.qemu_io(
        name,
        &[
            &format!("write -q -P 0xaa 0 {}", size / 2),
            &format!("write -q -P 0xbb {} 65536", size / 4 * 3),
        ],
    );
}

/// A qcow2 base of `size` bytes with cluster size `cs`, written like [`raw_base`].
fn qcow2_base(s: &Scratch, name: &str, size: u64, cs: u64) {
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cs}"),
        name,
        &size.to_string(),
    ]);
    s.qemu_io(
        name,
        &[
            &format!("write -q -P 0xaa 0 {}", size / 2),
            &format!("write -q -P 0xbb {} 65536", size / 4 * 3),
        ],
    );
}

/// Image size for a cluster size: at least 8 MiB, and 16 clusters.
fn size_for(cs: u64) -> u64 {
    (16 * cs).max(8 * MIB)
}

fn raw_sparse(s: &Scratch) -> String {
    let size = 8 * MIB;
    s.qemu_img(&["create", "-q", "-f", "raw", "r.raw", &size.to_string()]);
    let p = pattern(64 << 10, size);
    s.qemu_io("r.raw", &p.iter().map(String::as_str).collect::<Vec<_>>());
    "r.raw".into()
}

/// A qcow2 image made with `opts`, over a backing file of format `backing` when given, written
/// with [`pattern`].
fn qcow2(s: &Scratch, name: &str, opts: &str, cs: u64, backing: Option<&str>) -> String {
    let size = size_for(cs);
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", opts];
    let base_name;
    if let Some(fmt) = backing {
        base_name = format!("base.{fmt}");
        match fmt {
            "raw" => raw_base(s, &base_name, size),
            _ => qcow2_base(s, &base_name, size, cs),
        }
        args.extend(["-b", &base_name, "-F", fmt]);
    }
    let size_s = size.to_string();
    args.extend([name, &size_s]);
    s.qemu_img(&args);
    let p = pattern(cs, size);
    s.qemu_io(name, &p.iter().map(String::as_str).collect::<Vec<_>>());
    name.into()
}

/// A virtual size that is not a multiple of the cluster size: the last cluster is partial,
/// and holds a compressed cluster (allowed for the partial last cluster).
fn odd_size(s: &Scratch) -> String {
    let size = 4 * MIB + 3 * 512;
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "odd.qcow2",
        &size.to_string(),
    ]);
    s.qemu_io(
        "odd.qcow2",
        &[
            "write -q -P 0x11 0 100000",
            &format!("write -q -c -P 0x22 {} 1536", 4 * MIB),
            "write -q -P 0x33 3000000 5000",
        ],
    );
    "odd.qcow2".into()
}

/// Guest data of mixed compressibility: runs of text, pseudo-random bytes (stored
/// uncompressed by qemu), zeros and constant bytes, with boundaries inside clusters.
pub fn mixed_data(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let text = b"The quick brown fox jumps over the lazy dog; qcow2 compressed clusters! ";
    for (i, b) in v.iter_mut().enumerate() {
        // 48 KiB bands cross 64 KiB clusters, so most clusters hold two kinds.
        *b = match (i / (48 << 10)) % 4 {
            0 => text[i % text.len()],
            1 => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
            2 => 0,
            _ => 0x5a,
        };
    }
    v
}

/// `qemu-img convert -c` of mixed data into qcow2 with compression `kind` and cluster `cs`.
fn convert_compressed(s: &Scratch, kind: &str, cs: u64) -> String {
    let len = if cs > MIB {
        16 * MIB
    } else {
        2 * MIB + 5 * 512
    };
    s.write_file("src.raw", &mixed_data(len as usize));
    let name = format!("{kind}.qcow2");
    s.qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        &format!("compression_type={kind},cluster_size={cs}"),
        "src.raw",
        &name,
    ]);
    name
}

/// `qemu-io write -c` into an overlay (compressed clusters hide the backing), then plain
/// writes over part of a compressed cluster (qemu decompresses and rewrites it).
fn write_compressed(s: &Scratch, kind: &str) -> String {
    let size = 8 * MIB;
    raw_base(s, "base.raw", size);
    let name = format!("{kind}-w.qcow2");
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("compression_type={kind}"),
        "-b",
        "base.raw",
        "-F",
        "raw",
        &name,
    ]);
    s.qemu_io(
        &name,
        &[
            "write -q -c -P 0x11 0 64k",
            "write -q -c -P 0x12 64k 64k",
            "write -q -c -P 0x13 1M 128k",
            "write -q -c -P 0 2M 64k",
            "write -q -P 0x21 70000 1000",
            "write -q -c -P 0x14 7M 64k",
        ],
    );
    name
}

/// Extended L2 entries: subclusters partly written, zeroed, discarded; a compressed
/// cluster (zero bitmap); over a raw backing when `backing`.
fn extended_l2(s: &Scratch, cs: u64, backing: bool) -> String {
    let size = size_for(cs);
    let name = "ext.qcow2";
    let opts = format!("extended_l2=on,cluster_size={cs}");
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
    if backing {
        raw_base(s, "base.raw", size);
        args.extend(["-b", "base.raw", "-F", "raw"]);
    }
    let size_s = size.to_string();
    args.extend([name, &size_s]);
    s.qemu_img(&args);
    let sc = cs / 32;
    let mut cmds = vec![
        format!("write -q -P 5 0 {}", sc),
        format!("write -q -z {} {}", 2 * sc, sc),
        format!("write -q -P 6 {} {}", cs + sc / 2, 3 * sc),
        format!("write -q -P 7 {} {}", 3 * cs - sc, 2 * sc),
        format!("write -q -P 8 {} {}", 5 * cs, cs),
        format!("discard -q {} {}", 5 * cs + 4 * sc, 4 * sc),
        format!("write -q -z {} {}", 6 * cs + sc, 30 * sc),
        format!("write -q -c -P 9 {} {cs}", 9 * cs),
        format!("write -q -P 10 {} 100", size / 2 + 3 * sc + 7),
    ];
    cmds.extend(pattern(cs, size).into_iter().skip(9));
    s.qemu_io(name, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    name.into()
}

/// Zero clusters from `write -z`, `discard` and `write -z -u` over a qcow2 backing (they
/// must hide its data).
fn zero_clusters(s: &Scratch) -> String {
    let size = 8 * MIB;
    qcow2_base(s, "base.qcow2", size, 64 << 10);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "z.qcow2",
    ]);
    s.qemu_io(
        "z.qcow2",
        &[
            "write -q -z 0 256k",
            "write -q -P 0x31 1M 256k",
            "discard -q 1M 128k",
            "write -q -z -u 1152k 64k",
            "discard -q 2M 64k",
            "write -q -z 3M 1000",
            "write -q -P 0x32 6M 64k",
            "write -q -z 6M 64k",
        ],
    );
    "z.qcow2".into()
}

/// qcow2 v2 has no zero flag: zero writes over a backing allocate zeroed clusters, discards
/// let the backing show through again.
fn v2_zero_over_backing(s: &Scratch) -> String {
    let size = 8 * MIB;
    raw_base(s, "base.raw", size);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "v2z.qcow2",
    ]);
    s.qemu_io(
        "v2z.qcow2",
        &[
            "write -q -z 0 256k",
            "write -q -P 0x31 1M 256k",
            "discard -q 1M 128k",
            "write -q -z 3M 1000",
        ],
    );
    "v2z.qcow2".into()
}

/// An internal snapshot, then writes that make the active layer differ from it (copy on
/// write of shared clusters, zeroing, discarding), and a second snapshot.
fn snapshot(s: &Scratch) -> String {
    let size = 8 * MIB;
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "snap.qcow2",
        &size.to_string(),
    ]);
    s.qemu_io(
        "snap.qcow2",
        &["write -q -P 0x11 0 1M", "write -q -P 0x12 4M 128k"],
    );
    s.qemu_img(&["snapshot", "-c", "first", "snap.qcow2"]);
    s.qemu_io(
        "snap.qcow2",
        &[
            "write -q -P 0x21 64k 1000",
            "write -q -z 256k 128k",
            "discard -q 4M 64k",
            "write -q -P 0x22 6M 64k",
        ],
    );
    s.qemu_img(&["snapshot", "-c", "second", "snap.qcow2"]);
    s.qemu_io(
        "snap.qcow2",
        &["write -q -P 0x31 0 512", "write -q -P 0x32 7M 4096"],
    );
    "snap.qcow2".into()
}

/// Persistent bitmaps: an enabled one ("auto") and a disabled one with its own granularity.
fn bitmap(s: &Scratch) -> String {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "bm.qcow2", "8M"]);
    s.qemu_io("bm.qcow2", &["write -q -P 0x11 0 1M"]);
    s.qemu_img(&["bitmap", "--add", "bm.qcow2", "bm0"]);
    s.qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "128k",
        "--disable",
        "bm.qcow2",
        "bm1",
    ]);
    s.qemu_io("bm.qcow2", &["write -q -P 0x22 2M 64k"]);
    "bm.qcow2".into()
}

/// Lazy refcounts and a crash: the dirty bit stays set (qemu-io `abort` exits 134).
fn dirty(s: &Scratch) -> String {
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "lazy.qcow2",
        "8M",
    ]);
    qemu_io_then_abort(
        s,
        "qcow2",
        "lazy.qcow2",
        &["write -q -P 0x11 0 128k", "write -q -P 0x12 3M 4096"],
    );
    "lazy.qcow2".into()
}

/// An external data file (`data_file_raw` keeps it a valid raw image, zeros written).
/// qemu resolves the recorded data file name against its working directory.
fn data_file(s: &Scratch, raw: bool) -> String {
    let opts = format!(
        "data_file=ext-data.raw,data_file_raw={}",
        if raw { "on" } else { "off" }
    );
    s.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, "df.qcow2", "8M"]);
    let size = 8 * MIB;
    let p = pattern(64 << 10, size);
    s.qemu_io(
        "df.qcow2",
        &p.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    "df.qcow2".into()
}

/// QED with the smallest clusters and the largest tables: 4 KiB x 16 clusters per table;
/// 160 MiB so that several L2 tables exist.
fn qed_small(s: &Scratch) -> String {
    let size = 160 * MIB;
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4k,table_size=16",
        "t16.qed",
        &size.to_string(),
    ]);
    let mut p = pattern(4096, size);
    p.extend([
        "write -q -P 0x77 40M 12k".to_string(),
        "write -q -P 0x78 100M 4k".to_string(),
    ]);
    s.qemu_io("t16.qed", &p.iter().map(String::as_str).collect::<Vec<_>>());
    "t16.qed".into()
}

/// QED over a raw (format recorded by the no-probe bit) or a qcow2 (format probed) backing.
fn qed_over(s: &Scratch, fmt: &str) -> String {
    let size = 8 * MIB;
    let base = format!("base.{fmt}");
    match fmt {
        "raw" => raw_base(s, &base, size),
        _ => qcow2_base(s, &base, size, 64 << 10),
    }
    s.qemu_img(&["create", "-q", "-f", "qed", "-b", &base, "-F", fmt, "q.qed"]);
    let p = pattern(64 << 10, size);
    s.qemu_io("q.qed", &p.iter().map(String::as_str).collect::<Vec<_>>());
    "q.qed".into()
}

/// QED over a backing file shorter than it, not a multiple of its cluster size: a partial
/// write in the cluster holding the backing's end copies the backing up to its end only.
fn qed_backing_shorter(s: &Scratch) -> String {
    let base_size = 3 * MIB + 1536;
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        "base.raw",
        &base_size.to_string(),
    ]);
    s.qemu_io("base.raw", &[&format!("write -q -P 0xaa 0 {base_size}")]);
    s.qemu_img(&[
        "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "q.qed", "8M",
    ]);
    s.qemu_io(
        "q.qed",
        &["write -q -P 0x11 3M 512", "write -q -P 0x12 5M 4096"],
    );
    "q.qed".into()
}

/// raw <- qcow2 <- QED <- qcow2, each in its own directory, with relative and absolute
/// backing names; sizes vary so that backings are both shorter and longer than overlays.
/// The QED layer cannot record that its backing is qcow2: qemu probes it.
fn chain_mixed(s: &Scratch) -> String {
    for d in ["base", "l1", "l2", "top"] {
        std::fs::create_dir(s.path(d)).expect("mkdir");
    }
    s.qemu_img(&["create", "-q", "-f", "raw", "base/base.raw", "4M"]);
    s.qemu_io("base/base.raw", &["write -q -P 0x10 0 3M"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../base/base.raw",
        "-F",
        "raw",
        "l1/l1.qcow2",
        "6M",
    ]);
    s.qemu_io(
        "l1/l1.qcow2",
        &[
            "write -q -P 0x21 1M 64k",
            "write -q -z 2M 128k",
            "write -q -P 0x22 5M 100",
        ],
    );
    let abs_l1 = s.path("l1/l1.qcow2").to_string_lossy().into_owned();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        &abs_l1,
        "-F",
        "qcow2",
        "l2/l2.qed",
        "8M",
    ]);
    s.qemu_io(
        "l2/l2.qed",
        &[
            "write -q -P 0x31 1M 4096",
            "write -q -z 3M 64k",
            "write -q -P 0x32 7M 1000",
        ],
    );
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../l2/l2.qed",
        "-F",
        "qed",
        "top/top.qcow2",
        "5M",
    ]);
    s.qemu_io(
        "top/top.qcow2",
        &["write -q -P 0x41 0 512", "write -q -P 0x42 4M 64k"],
    );
    "top/top.qcow2".into()
}

/// Overlay longer than its backing; the backing's size is not a multiple of any cluster.
fn backing_shorter(s: &Scratch) -> String {
    let base_size = 2 * MIB + 512;
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "base.qcow2",
        &base_size.to_string(),
    ]);
    s.qemu_io("base.qcow2", &[&format!("write -q -P 0xaa 0 {base_size}")]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "ov.qcow2",
        "8M",
    ]);
    s.qemu_io(
        "ov.qcow2",
        &["write -q -P 0x11 2M 100", "write -q -P 0x12 5M 64k"],
    );
    "ov.qcow2".into()
}

/// Overlay shorter than its backing: the backing's tail is not part of the guest disk.
fn backing_longer(s: &Scratch) -> String {
    raw_base(s, "base.raw", 16 * MIB);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "ov.qcow2",
        &(5 * MIB + 512).to_string(),
    ]);
    s.qemu_io("ov.qcow2", &["write -q -P 0x11 1M 4096"]);
    "ov.qcow2".into()
}

/// A qcow2 image whose header does not record its backing file's format, as images from
/// before qemu 1.x (and made with -u tricks) are: the backing format extension is removed.
fn unrecorded(s: &Scratch, compat: &str, fmt: &str) -> String {
    let size = 8 * MIB;
    let base = format!("base.{fmt}");
    match fmt {
        "raw" => raw_base(s, &base, size),
        _ => qcow2_base(s, &base, size, 64 << 10),
    }
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        compat,
        "-b",
        &base,
        "-F",
        fmt,
        "old.qcow2",
    ]);
    s.qemu_io(
        "old.qcow2",
        &["write -q -P 0x11 64k 64k", "write -q -P 0x12 3M 1000"],
    );
    remove_backing_format(&s.path("old.qcow2"));
    "old.qcow2".into()
}

/// Removes the backing format header extension (0xe2792aca) from a qcow2 image in place,
/// shifting the following extensions forward. The backing name stays where it is.
pub fn remove_backing_format(path: &std::path::Path) {
    let mut b = std::fs::read(path).expect("read image");
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let version = be32(&b, 4);
    let start = if version >= 3 {
        be32(&b, 100) as usize
    } else {
        72
    };
    let mut off = start;
    let mut kept = Vec::new();
    loop {
        let kind = be32(&b, off);
        let len = be32(&b, off + 4) as usize;
        if kind == 0 {
            break;
        }
        let rec = 8 + len.div_ceil(8) * 8;
        if kind != 0xe279_2aca {
            kept.extend_from_slice(&b[off..off + rec]);
        }
        off += rec;
    }
    let end = off + 8;
    kept.resize(end - start, 0);
    b[start..end].copy_from_slice(&kept);
    std::fs::write(path, &b).expect("write image");
}

/// A raw image whose length is not a multiple of 512: qemu counts whole sectors, the tail
/// past the end of the file reads as zeros.
fn raw_odd_size(s: &Scratch) -> String {
    let mut data = mixed_data(3 * MIB as usize + 1000);
    data[..4096].fill(0x77);
    s.write_file("odd.raw", &data);
    "odd.raw".into()
}

/// An overlay over a raw backing of odd length (the overlay's size is rounded up to 512).
fn qcow2_over_odd_raw(s: &Scratch) -> String {
    let mut data = vec![0x5au8; 3 * MIB as usize + 100];
    data[MIB as usize..MIB as usize + 4096].fill(0);
    s.write_file("base.raw", &data);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2",
    ]);
    s.qemu_io(
        "ov.qcow2",
        &[
            "write -q -P 0x11 64k 4096",
            &format!("write -q -P 0x12 {} 512", 3 * MIB),
        ],
    );
    "ov.qcow2".into()
}

/// Preallocated qcow2 (`metadata`: L2 tables and cluster offsets, file sparse; `falloc` and
/// `full`: the file's space too), then written. With metadata preallocation qemu asks the
/// file about every data cluster and reports its holes as zero data.
fn preallocated(s: &Scratch, mode: &str) -> String {
    let opts = format!("preallocation={mode}");
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        "pre.qcow2",
        "8M",
    ]);
    s.qemu_io(
        "pre.qcow2",
        &[
            "write -q -P 0x11 64k 4096",
            "write -q -P 0x12 1M 128k",
            "write -q -z 2M 64k",
        ],
    );
    "pre.qcow2".into()
}

/// An external data file named with a directory (relative names are relative to qemu's
/// working directory, not to the image), or by an absolute name, with the image elsewhere.
fn data_file_elsewhere(s: &Scratch, absolute: bool) -> String {
    for d in ["img", "dd"] {
        std::fs::create_dir(s.path(d)).expect("mkdir");
    }
    let name = if absolute {
        s.path("dd/ext.raw").to_string_lossy().into_owned()
    } else {
        "dd/ext.raw".into()
    };
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={name}"),
        "img/df.qcow2",
        "8M",
    ]);
    let p = pattern(64 << 10, 8 * MIB);
    s.qemu_io(
        "img/df.qcow2",
        &p.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    "img/df.qcow2".into()
}

/// The corrupt bit set on a consistent image: qemu reads it (read-only) and says so in info.
fn corrupt_bit(s: &Scratch) -> String {
    let name = qcow2(s, "c.qcow2", "compat=1.1", 64 << 10, None);
    let mut b = s.read_file(&name);
    b[79] |= 0x02;
    s.write_file(&name, &b);
    name
}

/// A third-party tool's marks that qemu ignores: an unknown compatible bit, an unknown
/// autoclear bit (read-only opens leave it) and an unknown header extension.
fn unknown_compat_and_extension(s: &Scratch) -> String {
    let name = qcow2(s, "u.qcow2", "compat=1.1", 64 << 10, None);
    let mut b = s.read_file(&name);
    b[87] |= 0x20; // compatible bit 5
    b[95] |= 0x20; // autoclear bit 5
    add_extension(&mut b, 0x1234_5678, b"third-party data");
    s.write_file(&name, &b);
    name
}

/// 3 GiB, 64 KiB clusters: data on both sides of L2 table boundaries (every 512 MiB), so
/// status answers end there.
fn large_sparse(s: &Scratch) -> String {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "big.qcow2", "3G"]);
    s.qemu_io(
        "big.qcow2",
        &[
            "write -q -P 0x11 0 64k",
            "write -q -P 0x12 511M 2M",
            "write -q -P 0x13 1023M 64k",
            "write -q -z 1536M 4M",
            "write -q -P 0x14 3071M 1M",
        ],
    );
    "big.qcow2".into()
}

/// 5 GiB, 2 MiB clusters: one L2 table covers everything, so a status answer is only capped
/// by qemu's 2 GiB - 1 limit per answer (and the next query starts unaligned).
fn beyond_2g(s: &Scratch) -> String {
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        "b2.qcow2",
        "5G",
    ]);
    s.qemu_io(
        "b2.qcow2",
        &[
            "write -q -P 0x11 0 4k",
            "write -q -P 0x12 2100M 4M",
            "write -q -P 0x13 5118M 2M",
        ],
    );
    "b2.qcow2".into()
}

/// Inserts a header extension before the end marker of a qcow2 image without a backing
/// file (whose extension area ends at the end marker).
pub fn add_extension(b: &mut [u8], kind: u32, data: &[u8]) {
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    assert_eq!(&b[8..16], &[0; 8], "only for images without a backing file");
    let mut off = if be32(b, 4) >= 3 {
        be32(b, 100) as usize
    } else {
        72
    };
    while be32(b, off) != 0 {
        off += 8 + (be32(b, off + 4) as usize).div_ceil(8) * 8;
    }
    let mut rec = Vec::new();
    rec.extend_from_slice(&kind.to_be_bytes());
    rec.extend_from_slice(&(data.len() as u32).to_be_bytes());
    rec.extend_from_slice(data);
    rec.resize(8 + data.len().div_ceil(8) * 8, 0);
    rec.extend_from_slice(&[0; 8]);
    b[off..off + rec.len()].copy_from_slice(&rec);
}

/// Extended L2 with an external data file: guest cluster 0 lies at data file offset 0, an
/// entry qemu tells from "unallocated" by its COPIED flag.
fn extended_l2_data_file(s: &Scratch) -> String {
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,data_file=ext-data.raw",
        "edf.qcow2",
        "8M",
    ]);
    s.qemu_io(
        "edf.qcow2",
        &[
            "write -q -P 1 0 4k",
            "write -q -P 2 64k 64k",
            "write -q -z 8k 2k",
            "write -q -P 3 1M 3000",
        ],
    );
    "edf.qcow2".into()
}

/// An external data file and a backing file: unallocated clusters read from the backing.
fn data_file_over_backing(s: &Scratch) -> String {
    raw_base(s, "base.raw", 8 * MIB);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=ext-data.raw",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "dfb.qcow2",
    ]);
    s.qemu_io(
        "dfb.qcow2",
        &[
            "write -q -P 1 0 4k",
            "write -q -P 2 1M 64k",
            "write -q -z 2M 64k",
        ],
    );
    "dfb.qcow2".into()
}

/// Written, grown past its first L1 table (qcow2 moves the L1 table), written again, and
/// (qcow2) shrunk a little.
fn resized(s: &Scratch, fmt: &str) -> String {
    let name = format!("rs.{fmt}");
    s.qemu_img(&["create", "-q", "-f", fmt, &name, "8M"]);
    s.qemu_io(&name, &["write -q -P 1 0 64k", "write -q -P 2 7M 1M"]);
    s.qemu_img(&["resize", "-q", "-f", fmt, &name, "1100M"]);
    s.qemu_io(
        &name,
        &["write -q -P 3 1000M 64k", "write -q -P 4 1099M 1M"],
    );
    if fmt == "qcow2" {
        s.qemu_img(&["resize", "-q", "-f", fmt, "--shrink", &name, "1099M"]);
    }
    name
}

/// QED left with the need-check bit by a crash during an allocating write.
fn qed_need_check(s: &Scratch) -> String {
    s.qemu_img(&["create", "-q", "-f", "qed", "nc.qed", "8M"]);
    qemu_io_then_abort(
        s,
        "qed",
        "nc.qed",
        &["write -q -P 0x11 0 128k", "aio_write -P 0x12 1M 64k"],
    );
    "nc.qed".into()
}

/// A persistent bitmap left "in-use" by a crash while qemu had it loaded.
fn bitmap_in_use(s: &Scratch) -> String {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "bu.qcow2", "8M"]);
    s.qemu_img(&["bitmap", "--add", "bu.qcow2", "bm0"]);
    qemu_io_then_abort(s, "qcow2", "bu.qcow2", &["write -q -P 1 0 64k"]);
    "bu.qcow2".into()
}

/// A recorded backing format that differs from the file's magic: a qcow2 file used as a raw
/// backing (its bytes are the guest disk). The recorded format is obeyed, never probed.
fn over_qcow2_as_raw(s: &Scratch) -> String {
    qcow2_base(s, "base.qcow2", 8 * MIB, 64 << 10);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "raw",
        "ov.qcow2",
        "8M",
    ]);
    s.qemu_io("ov.qcow2", &["write -q -P 0x11 1M 64k"]);
    "ov.qcow2".into()
}

/// A backing format that names qemu's protocol driver (`-F file`): the file's bytes are the
/// disk, as with raw, and info shows the backing as a protocol node.
fn over_file_protocol(s: &Scratch) -> String {
    let mut data = mixed_data(3 * MIB as usize + 1000);
    data[..4096].fill(0x77);
    s.write_file("base.bin", &data);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.bin", "-F", "file", "ov.qcow2",
    ]);
    s.qemu_io(
        "ov.qcow2",
        &["write -q -P 0x11 1M 64k", "write -q -z 2M 64k"],
    );
    "ov.qcow2".into()
}

/// QED whose size is not a multiple of its cluster size (the last cluster is partial), over
/// a raw backing of yet another size.
fn qed_odd_size(s: &Scratch) -> String {
    let base = vec![0x3cu8; 2 * MIB as usize + 4000];
    s.write_file("base.raw", &base);
    s.qemu_img(&[
        "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "odd.qed", "3000000",
    ]);
    s.qemu_io(
        "odd.qed",
        &[
            "write -q -P 0x11 2M 1000",
            "write -q -P 0x12 2998000 2000",
            "write -q -z 1M 64k",
        ],
    );
    "odd.qed".into()
}

/// Runs qemu-io `cmds` on `image`, then `abort`: the process dies as in a crash, leaving what
/// a killed writer leaves (dirty bits, need-check, in-use bitmaps). qemu-io is killed by
/// SIGABRT, so it has no exit code (134 is what a shell would show).
fn qemu_io_then_abort(s: &Scratch, fmt: &str, image: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.extend(["-c", "abort", image]);
    let r = s.run("qemu-io", &args);
    assert!(
        r.status == -1 || r.status == 134,
        "qemu-io abort: {} {}{}",
        r.status,
        r.stdout,
        r.stderr
    );
}
