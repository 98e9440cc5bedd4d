//! The QED header (64 bytes, little-endian) and cowimg's record in the header cluster.

use crate::util::{le32, le64, put_le32, put_le64};
use crate::{Error, Result};

pub const MAGIC: &[u8; 4] = b"QED\0";
pub const HEADER_LEN: usize = 64;

/// `features` bits.
pub const F_BACKING_FILE: u64 = 0x1;
pub const F_NEED_CHECK: u64 = 0x2;
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x4;
pub const F_KNOWN: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;

pub const MIN_CLUSTER_SIZE: u64 = 4096;
pub const MAX_CLUSTER_SIZE: u64 = 64 << 20;
pub const MAX_TABLE_SIZE: u32 = 16;
/// The longest backing name cowimg writes (as qcow2's limit).
pub const MAX_BACKING_NAME: usize = 1023;
/// The longest backing name cowimg reads: qemu's limit (it reads names into a PATH_MAX
/// buffer, NUL included).
pub const MAX_READ_BACKING_NAME: usize = 4095;

/// cowimg's record: at a fixed place in cluster 0, well behind the header and any backing
/// name qemu writes (qemu only ever writes the 64-byte header and the name after it).
pub const COWIMG_RECORD_OFFSET: u64 = 0xE00;
const COWIMG_MAGIC: &[u8; 8] = b"cowimgQD";
pub const COWIMG_RECORD_LEN: usize = 20;
pub const COWIMG_FLAG_COPY_ON_READ: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub cluster_size: u64,
    pub table_size: u32,
    pub header_size: u32,
    pub features: u64,
    pub compat_features: u64,
    pub autoclear_features: u64,
    pub l1_table_offset: u64,
    pub image_size: u64,
    pub backing_filename_offset: u32,
    pub backing_filename_size: u32,
}

impl Header {
    /// Entries per L1 or L2 table.
    pub fn table_entries(&self) -> u64 {
        u64::from(self.table_size) * self.cluster_size / 8
    }

    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * self.cluster_size
    }

    /// Largest image the geometry can address.
    pub fn max_image_size(&self) -> u64 {
        let n = self.table_entries();
        n.saturating_mul(n).saturating_mul(self.cluster_size)
    }

    pub fn header_bytes(&self) -> u64 {
        u64::from(self.header_size) * self.cluster_size
    }

    /// Parses and validates, with qemu's messages.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header> {
        if b.len() < HEADER_LEN || &b[0..4] != MAGIC {
            return Err(Error::invalid("Image not in QED format"));
        }
        let h = Header {
            cluster_size: u64::from(le32(b, 4)),
            table_size: le32(b, 8),
            header_size: le32(b, 12),
            features: le64(b, 16),
            compat_features: le64(b, 24),
            autoclear_features: le64(b, 32),
            l1_table_offset: le64(b, 40),
            image_size: le64(b, 48),
            backing_filename_offset: le32(b, 56),
            backing_filename_size: le32(b, 60),
        };
        if h.features & !F_KNOWN != 0 {
            return Err(Error::Unsupported(format!(
                "QED features: {:x}",
                h.features & !F_KNOWN
            )));
        }
        if !h.cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&h.cluster_size)
        {
            return Err(Error::invalid("QED cluster size is invalid"));
        }
        if !h.table_size.is_power_of_two() || h.table_size > MAX_TABLE_SIZE {
            return Err(Error::invalid("QED table size is invalid"));
        }
        if h.image_size % 512 != 0 || h.image_size > h.max_image_size() {
            return Err(Error::invalid("QED image size is invalid"));
        }
        let l1_last = h
            .l1_table_offset
            .checked_add(h.table_bytes() - h.cluster_size);
        if h.l1_table_offset % h.cluster_size != 0
            || h.l1_table_offset < h.header_bytes()
            || l1_last.is_none_or(|l| l >= file_len / h.cluster_size * h.cluster_size)
        {
            return Err(Error::invalid("QED table offset is invalid"));
        }
        if h.features & F_BACKING_FILE != 0 {
            if u64::from(h.backing_filename_offset) + u64::from(h.backing_filename_size)
                > h.header_bytes()
            {
                return Err(Error::invalid(
                    "QED backing file name lies outside the header",
                ));
            }
            // qemu reads the name into a PATH_MAX buffer and refuses longer ones; the check
            // also keeps a hostile size from making cowimg allocate gigabytes.
            if h.backing_filename_size as usize > MAX_READ_BACKING_NAME {
                return Err(Error::invalid(format!(
                    "QED backing file name too long ({} bytes, at most {MAX_READ_BACKING_NAME})",
                    h.backing_filename_size
                )));
            }
        }
        Ok(h)
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(MAGIC);
        put_le32(&mut b, 4, self.cluster_size as u32);
        put_le32(&mut b, 8, self.table_size);
        put_le32(&mut b, 12, self.header_size);
        put_le64(&mut b, 16, self.features);
        put_le64(&mut b, 24, self.compat_features);
        put_le64(&mut b, 32, self.autoclear_features);
        put_le64(&mut b, 40, self.l1_table_offset);
        put_le64(&mut b, 48, self.image_size);
        put_le32(&mut b, 56, self.backing_filename_offset);
        put_le32(&mut b, 60, self.backing_filename_size);
        b
    }
}

/// Encodes cowimg's record: magic, flags, reserved, CRC-32 of the first 16 bytes.
pub fn encode_record(flags: u32) -> [u8; COWIMG_RECORD_LEN] {
    let mut r = [0u8; COWIMG_RECORD_LEN];
    r[..8].copy_from_slice(COWIMG_MAGIC);
    put_le32(&mut r, 8, flags);
    let crc = crc32fast::hash(&r[..16]);
    put_le32(&mut r, 16, crc);
    r
}

/// Decodes the record's flags; 0 when there is no (intact) record.
pub fn decode_record(r: &[u8]) -> u32 {
    if r.len() < COWIMG_RECORD_LEN
        || &r[..8] != COWIMG_MAGIC
        || crc32fast::hash(&r[..16]) != le32(r, 16)
    {
        return 0;
    }
    le32(r, 8)
}
