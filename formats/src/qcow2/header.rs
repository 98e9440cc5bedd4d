//! The qcow2 header (cluster 0): fixed fields, header extensions and the backing file name.
//!
//! Layout facts are from qemu's docs/interop/qcow2.rst. Integers are big-endian.

use crate::util::{align_up, be32, be64, put_be32, put_be64};
use crate::{Error, Result};

pub const MAGIC: &[u8; 4] = b"QFI\xfb";

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bits.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bits.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// cowimg's own extension ("cowi"): flags of the tool; bit 0 = copy-on-read.
/// qemu ignores unknown extensions and keeps them through every header rewrite.
pub const EXT_COWIMG: u32 = 0x636f_7769;
pub const COWIMG_FLAG_COPY_ON_READ: u32 = 1 << 0;

/// Size of the v2 header; v3 headers are at least 104 bytes, qemu writes 112.
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 112;
pub const MAX_BACKING_NAME: usize = 1023;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's limits on table sizes; a header asking for more is refused before any allocation.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Bytes of a snapshot table entry's fixed part (qemu's `QCowSnapshotHeader`).
const SNAPSHOT_HEADER_LEN: u64 = 40;
/// Length of the bitmaps extension (qemu's `Qcow2BitmapHeaderExt`).
const BITMAPS_EXT_LEN: usize = 24;
/// qemu's QCOW2_MAX_BITMAPS.
const MAX_BITMAPS: u32 = 65535;
/// qemu's QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;

/// A header extension, kept in its stored order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The parsed header of a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// Header bytes past the fields cowimg knows (v3 "additional fields"), kept as they are.
    pub extra_fields: Vec<u8>,
    /// Header extensions other than the end marker, in stored order.
    pub extensions: Vec<Extension>,
    /// Where the extension area ends (offset of the end marker + 8).
    pub extensions_end: u64,
    pub backing_name: Option<String>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    pub fn set_extension(&mut self, kind: u32, data: Option<Vec<u8>>) {
        match data {
            Some(data) => match self.extensions.iter_mut().find(|e| e.kind == kind) {
                Some(e) => e.data = data,
                None => {
                    // The backing format goes first, as qemu writes it.
                    let at = if kind == EXT_BACKING_FORMAT {
                        0
                    } else {
                        self.extensions.len()
                    };
                    self.extensions.insert(at, Extension { kind, data });
                }
            },
            None => self.extensions.retain(|e| e.kind != kind),
        }
    }

    pub fn backing_format(&self) -> Option<String> {
        self.extension(EXT_BACKING_FORMAT).map(ext_string)
    }

    pub fn data_file_name(&self) -> Option<String> {
        self.extension(EXT_DATA_FILE).map(ext_string)
    }

    pub fn cowimg_flags(&self) -> u32 {
        self.extension(EXT_COWIMG)
            .filter(|d| d.len() >= 4)
            .map(|d| be32(d, 0))
            .unwrap_or(0)
    }

    /// Parses and validates the header from the start of the file (`buf` holds at least the
    /// first cluster, or the whole file if shorter). `file_len` bounds the table offsets.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize || &buf[0..4] != MAGIC {
            return Err(Error::invalid("Image is not in qcow2 format"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::Unsupported(format!(
                "cluster size: 2^{cluster_bits}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            extra_fields: Vec::new(),
            extensions: Vec::new(),
            extensions_end: 0,
            backing_name: None,
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(Error::invalid("qcow2 header too short"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(Error::invalid("qcow2 header too short"));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > buf.len() {
                return Err(Error::invalid("qcow2 header exceeds cluster size"));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
            if h.header_length > V3_HEADER_LEN {
                h.extra_fields = buf[V3_HEADER_LEN as usize..h.header_length as usize].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(Error::invalid(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        let cluster0 = &buf[..buf.len().min(cluster_size as usize)];
        h.parse_extensions(cluster0)?;

        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "qcow2 feature(s): {}",
                h.name_features(0, unknown)
            )));
        }
        if h.crypt_method != 0 {
            let what = if h.crypt_method == 1 { "AES" } else { "LUKS" };
            return Err(Error::Unsupported(format!(
                "qcow2 encryption ({what}); decrypt the image with qemu-img convert first"
            )));
        }
        let has_compression_bit = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match (h.compression_type, has_compression_bit) {
            (0, false) | (1, true) => {}
            (0, true) => {
                return Err(Error::invalid(
                    "Compression type incompatible feature bit must not be set for zlib",
                ))
            }
            (1, false) => {
                return Err(Error::invalid(
                    "Compression type incompatible feature bit must be set for zstd",
                ))
            }
            (t, _) => return Err(Error::Unsupported(format!("compression type {t}"))),
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(Error::invalid(
                "Unsupported subcluster size: extended L2 needs clusters of at least 16 KiB",
            ));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 && h.data_file_name().is_none() {
            return Err(Error::Unsupported(
                "qcow2 image with an external data file that the header does not name".into(),
            ));
        }
        if h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
            && h.incompatible_features & INCOMPAT_DATA_FILE == 0
        {
            // qemu's wording: the raw-data bit says every guest cluster lies at its own
            // offset in a data file that the image does not have.
            return Err(Error::invalid("data-file-raw requires a data file"));
        }

        // Backing file name: inside cluster 0, at most 1023 bytes.
        if h.backing_file_offset != 0 {
            let len = u64::from(h.backing_file_size);
            if h.backing_file_offset > cluster_size {
                return Err(Error::invalid("Invalid backing file offset"));
            }
            if len > (MAX_BACKING_NAME as u64).min(cluster_size - h.backing_file_offset) {
                return Err(Error::invalid("Backing file name too long"));
            }
            let start = h.backing_file_offset as usize;
            let end = start + len as usize;
            if end > cluster0.len() {
                return Err(Error::invalid(
                    "Backing file name lies past the end of the file",
                ));
            }
            h.backing_name = Some(String::from_utf8_lossy(&cluster0[start..end]).into_owned());
        }

        // Tables: aligned, sized within qemu's limits, inside the file.
        check_table(
            "Reference count table",
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cluster_size,
            MAX_REFTABLE_BYTES,
            cluster_size,
            file_len,
        )?;
        if h.refcount_table_clusters == 0 {
            return Err(Error::invalid(
                "Image does not contain a reference count table",
            ));
        }
        check_table(
            "Active L1 table",
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            MAX_L1_BYTES,
            cluster_size,
            file_len,
        )?;
        let l2_entries = cluster_size / h.l2_entry_size();
        let needed = h.size.div_ceil(cluster_size).div_ceil(l2_entries);
        if u64::from(h.l1_size) < needed || (h.size > 0 && h.l1_size == 0) {
            return Err(Error::invalid("L1 table is too small"));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::invalid("Too many snapshots"));
        }
        // A table that starts past the end of the file cannot be read (check included).
        if h.nb_snapshots > 0 && h.snapshots_offset >= file_len {
            return Err(Error::invalid("Snapshot table offset invalid"));
        }
        Ok(h)
    }

    /// qemu's validation of the snapshot table's place (`qcow2_validate_table`), which holds
    /// even for an image without snapshots: cluster-aligned and within `i64`. Opening checks
    /// it; `check` reports it instead, as qemu's check mode skips the table at open.
    pub fn check_snapshot_table(&self) -> Result<()> {
        let bytes = u64::from(self.nb_snapshots) * SNAPSHOT_HEADER_LEN;
        if self.snapshots_offset % self.cluster_size() != 0
            || self.snapshots_offset > i64::MAX as u64 - bytes
        {
            return Err(Error::invalid("Snapshot table offset invalid"));
        }
        Ok(())
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2 (entry + subcluster bitmap).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    fn parse_extensions(&mut self, cluster0: &[u8]) -> Result<()> {
        let mut off = u64::from(self.header_length);
        // qemu reads extensions up to the backing name, or to the end of cluster 0.
        let end = if self.backing_file_offset != 0 {
            self.backing_file_offset.min(cluster0.len() as u64)
        } else {
            cluster0.len() as u64
        };
        loop {
            if off >= end {
                // No end marker before the limit: qemu accepts this (v2 images without
                // extensions end right at the backing name).
                self.extensions_end = off;
                return Ok(());
            }
            // qemu reads an extension header wherever one starts before the limit, so one
            // that does not fit before it is refused, not ignored.
            if off + 8 > end {
                return Err(Error::invalid("Header extension too large"));
            }
            let kind = be32(cluster0, off as usize);
            let len = u64::from(be32(cluster0, off as usize + 4));
            off += 8;
            if kind == EXT_END {
                self.extensions_end = off;
                return Ok(());
            }
            if len > end - off {
                return Err(Error::invalid("Header extension too large"));
            }
            let data = cluster0[off as usize..(off + len) as usize].to_vec();
            if kind == EXT_BACKING_FORMAT && data.len() >= 16 {
                return Err(Error::invalid(format!(
                    "ext_backing_format: len={} too large (>=16)",
                    data.len()
                )));
            }
            if kind == EXT_BITMAPS {
                self.check_bitmaps_extension(&data)?;
            }
            if self.extensions.iter().any(|e| e.kind == kind) {
                return Err(Error::invalid(format!(
                    "header extension {kind:#010x} appears twice"
                )));
            }
            self.extensions.push(Extension { kind, data });
            off += align_up(len, 8);
        }
    }

    /// qemu's checks of the bitmaps extension when it reads the header (in its order and
    /// words): the length always; the fields only when the autoclear bit says the bitmaps
    /// are current (otherwise qemu ignores the extension, and so does cowimg).
    fn check_bitmaps_extension(&self, data: &[u8]) -> Result<()> {
        if data.len() != BITMAPS_EXT_LEN {
            return Err(Error::invalid("bitmaps_ext: Invalid extension length"));
        }
        if self.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let (count, reserved) = (be32(data, 0), be32(data, 4));
        let (dir_size, dir_offset) = (be64(data, 8), be64(data, 16));
        if reserved != 0 {
            return Err(Error::invalid("bitmaps_ext: Reserved field is not zero"));
        }
        if count > MAX_BITMAPS {
            return Err(Error::invalid(format!(
                "bitmaps_ext: Image has {count} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
            )));
        }
        if count == 0 {
            return Err(Error::invalid("found bitmaps extension with zero bitmaps"));
        }
        if dir_offset % self.cluster_size() != 0 {
            return Err(Error::invalid(
                "bitmaps_ext: invalid bitmap directory offset",
            ));
        }
        if dir_size > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(Error::invalid(format!(
                "bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum supported size ({MAX_BITMAP_DIRECTORY_SIZE})"
            )));
        }
        Ok(())
    }

    /// Names feature bits of `kind` (0 incompatible, 1 compatible, 2 autoclear) from the
    /// feature name table, as qemu does ("Unknown incompatible feature: 10000000000" otherwise).
    fn name_features(&self, kind: u8, mut bits: u64) -> String {
        let mut names = Vec::new();
        if let Some(table) = self.extension(EXT_FEATURE_TABLE) {
            for entry in table.chunks_exact(48) {
                let bit = u32::from(entry[1]);
                if entry[0] == kind && bit < 64 && bits & (1 << bit) != 0 {
                    bits &= !(1 << bit);
                    names.push(ext_string(&entry[2..48]));
                }
            }
        }
        if bits != 0 {
            names.push(format!("Unknown incompatible feature: {bits:x}"));
        }
        names.join(", ")
    }

    /// The fixed header fields (`header_length` bytes).
    pub fn encode_fixed(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.header_length as usize];
        b[0..4].copy_from_slice(MAGIC);
        put_be32(&mut b, 4, self.version);
        put_be64(&mut b, 8, self.backing_file_offset);
        put_be32(&mut b, 16, self.backing_file_size);
        put_be32(&mut b, 20, self.cluster_bits);
        put_be64(&mut b, 24, self.size);
        put_be32(&mut b, 32, self.crypt_method);
        put_be32(&mut b, 36, self.l1_size);
        put_be64(&mut b, 40, self.l1_table_offset);
        put_be64(&mut b, 48, self.refcount_table_offset);
        put_be32(&mut b, 56, self.refcount_table_clusters);
        put_be32(&mut b, 60, self.nb_snapshots);
        put_be64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put_be64(&mut b, 72, self.incompatible_features);
            put_be64(&mut b, 80, self.compatible_features);
            put_be64(&mut b, 88, self.autoclear_features);
            put_be32(&mut b, 96, self.refcount_order);
            put_be32(&mut b, 100, self.header_length);
            if self.header_length > 104 {
                b[104] = self.compression_type;
            }
            if !self.extra_fields.is_empty() {
                b[V3_HEADER_LEN as usize..].copy_from_slice(&self.extra_fields);
            }
        }
        b
    }

    /// The extension area, end marker included; the feature name table only if asked.
    pub fn encode_extensions(&self, feature_table: bool) -> Vec<u8> {
        let mut b = Vec::new();
        for e in &self.extensions {
            if e.kind == EXT_FEATURE_TABLE && !feature_table {
                continue;
            }
            let mut rec = [0u8; 8];
            put_be32(&mut rec, 0, e.kind);
            put_be32(&mut rec, 4, e.data.len() as u32);
            b.extend_from_slice(&rec);
            b.extend_from_slice(&e.data);
            b.resize(align_up(b.len() as u64, 8) as usize, 0);
        }
        b.extend_from_slice(&[0u8; 8]);
        b
    }

    /// Byte ranges of cluster 0 that this header references (fixed part, extensions, name).
    pub fn live_ranges(&self) -> Vec<(u64, u64)> {
        let mut r = vec![(0, self.extensions_end.max(u64::from(self.header_length)))];
        if self.backing_file_offset != 0 {
            r.push((
                self.backing_file_offset,
                self.backing_file_offset + u64::from(self.backing_file_size),
            ));
        }
        r
    }
}

/// The standard feature name table qemu writes into new v3 images.
pub fn standard_feature_table() -> Vec<u8> {
    let entries: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut b = Vec::with_capacity(48 * entries.len());
    for (kind, bit, name) in entries {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        b.extend_from_slice(&e);
    }
    b
}

/// A string stored in an extension: up to the first NUL.
fn ext_string(d: &[u8]) -> String {
    let end = d.iter().position(|&c| c == 0).unwrap_or(d.len());
    String::from_utf8_lossy(&d[..end]).into_owned()
}

/// qemu's `qcow2_validate_table`, plus a bound by the file length (a table past EOF would read
/// as zeros and hide the damage).
fn check_table(
    what: &str,
    offset: u64,
    bytes: u64,
    max: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<()> {
    if bytes > max {
        return Err(Error::invalid(format!("{what} too large")));
    }
    if offset % cluster_size != 0 || offset.checked_add(bytes).is_none() {
        return Err(Error::invalid(format!("{what} offset invalid")));
    }
    if bytes > 0 && offset + bytes > file_len {
        return Err(Error::invalid(format!("{what} lies past the end of the file (offset {offset:#x}, {bytes} bytes, file {file_len} bytes)")));
    }
    Ok(())
}
