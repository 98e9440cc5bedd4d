//! Making a new QED image as `qemu-img create` does: header cluster, L1 table, nothing else.

use super::header::{self, Header};
use crate::io::{sync, write_all, Storage};
use crate::util::align_up;
use crate::{BackingRef, Error, Result};

/// What `qemu-img create -f qed` takes.
#[derive(Clone, Debug)]
pub struct Options {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes (a power of two from 4 KiB to 64 MiB; default 64 KiB).
    pub cluster_size: u64,
    /// Clusters per table (1 to 16, a power of two; default 4).
    pub table_size: u32,
    /// The backing file, if any.
    pub backing: Option<BackingRef>,
    /// Record cowimg's copy-on-read flag.
    pub copy_on_read: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            size: 0,
            cluster_size: 65536,
            table_size: 4,
            backing: None,
            copy_on_read: false,
        }
    }
}

/// Refuses options qemu refuses, with its words.
pub fn validate(o: &Options) -> Result<()> {
    crate::check_size(o.size)?;
    if !o.cluster_size.is_power_of_two()
        || !(header::MIN_CLUSTER_SIZE..=header::MAX_CLUSTER_SIZE).contains(&o.cluster_size)
    {
        return Err(Error::invalid(
            "QED cluster size must be within range [4096, 67108864] and power of 2",
        ));
    }
    if !o.table_size.is_power_of_two() || o.table_size > header::MAX_TABLE_SIZE {
        return Err(Error::invalid(
            "QED table size must be within range [1, 16] and power of 2",
        ));
    }
    if o.table_size == 1 {
        // qemu's table offset check rejects every table of one cluster (its overflow test is
        // `end <= start`), so qemu could not open such an image: refuse to make one.
        return Err(Error::invalid(
            "QED table size 1 makes images that qemu cannot open (it rejects one-cluster tables); use 2 or more",
        ));
    }
    let n = u64::from(o.table_size) * o.cluster_size / 8;
    let max = n.saturating_mul(n).saturating_mul(o.cluster_size);
    if align_up(o.size, 512) > max {
        return Err(Error::invalid(format!(
            "QED image size must be a non-zero multiple of cluster size and less than {max} bytes"
        )));
    }
    if let Some(b) = &o.backing {
        if b.name.len() > header::MAX_BACKING_NAME {
            return Err(Error::invalid("Backing file name too long"));
        }
    }
    Ok(())
}

/// Writes a new, empty image into `s` (which must be empty) and syncs it.
pub fn create(s: &dyn Storage, o: &Options) -> Result<()> {
    validate(o)?;
    let cs = o.cluster_size;
    let mut h = Header {
        cluster_size: cs,
        table_size: o.table_size,
        header_size: 1,
        features: 0,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: cs,
        image_size: align_up(o.size, 512),
        backing_filename_offset: 0,
        backing_filename_size: 0,
    };
    let mut cluster0 = vec![0u8; cs as usize];
    if let Some(b) = &o.backing {
        h.features |= header::F_BACKING_FILE;
        if b.format.as_deref() == Some("raw") {
            h.features |= header::F_BACKING_FORMAT_NO_PROBE;
        }
        h.backing_filename_offset = header::HEADER_LEN as u32;
        h.backing_filename_size = b.name.len() as u32;
        cluster0[header::HEADER_LEN..header::HEADER_LEN + b.name.len()]
            .copy_from_slice(b.name.as_bytes());
    }
    cluster0[..header::HEADER_LEN].copy_from_slice(&h.encode());
    if o.copy_on_read {
        let at = header::COWIMG_RECORD_OFFSET as usize;
        cluster0[at..at + header::COWIMG_RECORD_LEN]
            .copy_from_slice(&header::encode_record(header::COWIMG_FLAG_COPY_ON_READ));
    }
    write_all(s, &cluster0, 0, "the header")?;
    s.set_len(cs + h.table_bytes())
        .map_err(|e| Error::io("sizing the new image", e))?;
    sync(s)
}
