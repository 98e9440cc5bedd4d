//! Making a new qcow2 image, laid out as `qemu-img create` lays it out: header cluster,
//! refcount table, refcount block(s), L1 table; the file ends right after the L1 table.

use super::compress::CompressionType;
use super::header::{self, Extension, Header};
use super::layout::refcount_structures;
use super::refcount::RefGeometry;
use crate::io::{sync, write_all, Storage};
use crate::util::{align_up, put_be32};
use crate::{BackingRef, Error, Result};

/// Options of a new qcow2 image (qemu-img's `-o` names in comments).
#[derive(Clone, Debug)]
pub struct Options {
    /// Virtual size in bytes (rounded up to 512, as qemu does).
    pub size: u64,
    /// `cluster_size`.
    pub cluster_size: u64,
    /// `compat=0.10` (v2) instead of 1.1 (v3).
    pub v2: bool,
    /// `lazy_refcounts`.
    pub lazy_refcounts: bool,
    /// `refcount_bits`.
    pub refcount_bits: u32,
    /// `extended_l2`.
    pub extended_l2: bool,
    /// `compression_type`.
    pub compression: CompressionType,
    /// The backing file, if any.
    pub backing: Option<BackingRef>,
    /// cowimg's copy-on-read flag.
    pub copy_on_read: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            size: 0,
            cluster_size: 65536,
            v2: false,
            lazy_refcounts: false,
            refcount_bits: 16,
            extended_l2: false,
            compression: CompressionType::Zlib,
            backing: None,
            copy_on_read: false,
        }
    }
}

/// Checks options the way qemu-img does, with its messages.
pub fn validate(o: &Options) -> Result<()> {
    crate::check_size(o.size)?;
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(Error::invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return Err(Error::invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    let v3 = "compatibility level 1.1 and above (use version=v3 or greater)";
    if o.v2 {
        if o.lazy_refcounts {
            return Err(Error::invalid(format!(
                "Lazy refcounts only supported with {v3}"
            )));
        }
        if o.refcount_bits != 16 {
            return Err(Error::invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
            ));
        }
        if o.extended_l2 {
            return Err(Error::invalid(format!(
                "Extended L2 entries are only supported with {v3}"
            )));
        }
        if o.compression != CompressionType::Zlib {
            return Err(Error::invalid(format!(
                "Non-zlib compression type is only supported with {v3}"
            )));
        }
    }
    if o.extended_l2 && cs < 16384 {
        return Err(Error::invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    if let Some(b) = &o.backing {
        if b.name.len() > header::MAX_BACKING_NAME {
            return Err(Error::invalid("Backing file name too long"));
        }
    }
    if l1_size(o) * 8 > header::MAX_L1_BYTES {
        return Err(Error::invalid(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
        ));
    }
    Ok(())
}

fn l1_size(o: &Options) -> u64 {
    let l2_entries = o.cluster_size / if o.extended_l2 { 16 } else { 8 };
    align_up(o.size, 512)
        .div_ceil(o.cluster_size)
        .div_ceil(l2_entries)
}

/// Writes a new, empty image into `s` (which must be empty) and syncs it.
pub fn create(s: &dyn Storage, o: &Options) -> Result<()> {
    validate(o)?;
    let cs = o.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let refcount_order = o.refcount_bits.trailing_zeros();
    let rgeo = RefGeometry {
        cluster_bits,
        refcount_order,
    };
    let l1_entries = l1_size(o);
    let l1_clusters = (l1_entries * 8).div_ceil(cs);

    // Smallest refcount table and block count that describe the header and the L1 table,
    // themselves included.
    let refs = refcount_structures(rgeo, 1 + l1_clusters)?;
    let (tables, blocks) = (refs.table_clusters, refs.blocks);
    let reftable_offset = cs;
    // qemu's order: header, refcount table, the first refcount block, the L1 table, and the
    // blocks the L1 table needs beyond the first one behind it. (When the refcount table
    // itself needs more than a cluster, qemu moves it as it grows; cowimg then puts all the
    // refcount structures before the L1 table instead: same sizes, also valid.)
    let qemu_order = tables == 1;
    let block_offset = |i: u64| -> u64 {
        if !qemu_order || i == 0 {
            (1 + tables + i) * cs
        } else {
            (3 + l1_clusters + i - 1) * cs
        }
    };
    // A zero-sized image has no L1 table at all (offset 0), as qemu makes it.
    let l1_offset = match (l1_entries, qemu_order) {
        (0, _) => 0,
        (_, true) => 3 * cs,
        (_, false) => (1 + tables + blocks) * cs,
    };
    let total = 1 + tables + blocks + l1_clusters;

    let mut h = Header {
        version: if o.v2 { 2 } else { 3 },
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: align_up(o.size, 512),
        crypt_method: 0,
        l1_size: l1_entries as u32,
        l1_table_offset: l1_offset,
        refcount_table_offset: reftable_offset,
        refcount_table_clusters: tables as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: if o.lazy_refcounts {
            header::COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order,
        header_length: if o.v2 {
            header::V2_HEADER_LEN
        } else {
            header::V3_HEADER_LEN
        },
        compression_type: 0,
        extra_fields: Vec::new(),
        extensions: Vec::new(),
        extensions_end: 0,
        backing_name: None,
    };
    if o.extended_l2 {
        h.incompatible_features |= header::INCOMPAT_EXTL2;
    }
    if o.compression == CompressionType::Zstd {
        h.incompatible_features |= header::INCOMPAT_COMPRESSION;
        h.compression_type = 1;
    }
    if let Some(fmt) = o.backing.as_ref().and_then(|b| b.format.clone()) {
        h.extensions.push(Extension {
            kind: header::EXT_BACKING_FORMAT,
            data: fmt.into_bytes(),
        });
    }
    // qemu writes the feature name table only into clusters of 8 KiB and more.
    if !o.v2 && cs >= 8192 {
        h.extensions.push(Extension {
            kind: header::EXT_FEATURE_TABLE,
            data: header::standard_feature_table(),
        });
    }
    if o.copy_on_read {
        let mut d = vec![0u8; 8];
        put_be32(&mut d, 0, header::COWIMG_FLAG_COPY_ON_READ);
        h.extensions.push(Extension {
            kind: header::EXT_COWIMG,
            data: d,
        });
    }
    let ext = h.encode_extensions(true);
    let mut cluster0 = h.encode_fixed();
    cluster0.extend_from_slice(&ext);
    if let Some(b) = &o.backing {
        h.backing_file_offset = cluster0.len() as u64;
        h.backing_file_size = b.name.len() as u32;
        cluster0 = h.encode_fixed();
        cluster0.extend_from_slice(&ext);
        cluster0.extend_from_slice(b.name.as_bytes());
    }
    if cluster0.len() as u64 > cs {
        return Err(Error::Refused("No space left in the file header".into()));
    }
    cluster0.resize(cs as usize, 0);

    let mut reftable = vec![0u8; (tables * cs) as usize];
    for i in 0..blocks {
        reftable[8 * i as usize..8 * i as usize + 8]
            .copy_from_slice(&block_offset(i).to_be_bytes());
    }
    let mut refblocks = vec![0u8; (blocks * cs) as usize];
    for c in 0..total {
        let (bi, idx) = rgeo.locate(c);
        let block = &mut refblocks[(bi * cs) as usize..((bi + 1) * cs) as usize];
        rgeo.set(block, idx, 1);
    }

    write_all(s, &cluster0, 0, "the header")?;
    write_all(s, &reftable, reftable_offset, "the refcount table")?;
    for i in 0..blocks {
        let block = &refblocks[(i * cs) as usize..((i + 1) * cs) as usize];
        write_all(s, block, block_offset(i), "a refcount block")?;
    }
    // The L1 table is all zeros: the file ends right after it (or after the last refcount
    // block behind it), as qemu leaves it.
    let end = (0..blocks).map(|i| block_offset(i) + cs).max().unwrap_or(0);
    let end = if l1_entries == 0 {
        end
    } else {
        end.max(l1_offset + l1_entries * 8)
    };
    s.set_len(end)
        .map_err(|e| Error::io("sizing the new image", e))?;
    sync(s)
}
