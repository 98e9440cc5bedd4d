//! The internal snapshot table and the persistent bitmap directory: parsed for `info` (the
//! active layer is what cowimg reads) and for `check` (their clusters are referenced).

use crate::io::{read_exact, Storage};
use crate::util::{align_up, be16, be32, be64};
use crate::{Error, Result};

/// One internal snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Its entries.
    pub l1_size: u32,
    /// The snapshot's id ("1", "2", ...), as text.
    pub id: String,
    /// Its name, as text.
    pub name: String,
    /// When it was taken: seconds since the epoch...
    pub date_sec: u32,
    /// ...and nanoseconds.
    pub date_nsec: u32,
    /// The guest clock then, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of VM state saved with it (0 for a disk-only snapshot).
    pub vm_state_size: u64,
    /// Guest instruction count, when recorded (qemu 5.0+).
    pub icount: Option<u64>,
    /// The entry's extra data, ID and name as stored, for rewriting the table unchanged.
    pub extra: Vec<u8>,
    /// The id's bytes as stored.
    pub id_raw: Vec<u8>,
    /// The name's bytes as stored.
    pub name_raw: Vec<u8>,
}

/// Extra data qemu writes in every entry: 64-bit VM state size, disk size, icount.
const FULL_EXTRA: usize = 24;

impl Snapshot {
    /// A v3 image's entries must carry at least the 64-bit VM state size and the disk size.
    pub fn is_incomplete(&self) -> bool {
        self.extra.len() < 16
    }

    /// The disk size the entry records, or `image_size` where it records none (an old v2
    /// entry: qemu takes the image's size then).
    pub fn disk_size(&self, image_size: u64) -> u64 {
        if self.extra.len() >= 16 {
            be64(&self.extra, 8)
        } else {
            image_size
        }
    }
}

/// Encodes `snapshots` as a snapshot table, as qemu writes one: every entry with (at least)
/// the 24 bytes of extra data qemu knows; a missing disk size is the image's `size`, a
/// missing icount "none"; extra data qemu does not know is kept.
pub fn encode_table(snapshots: &[Snapshot], size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for sn in snapshots {
        out.resize(align_up(out.len() as u64, 8) as usize, 0);
        let mut extra = sn.extra.clone();
        let icount = if sn.extra.len() >= 24 {
            be64(&sn.extra, 16)
        } else {
            u64::MAX
        };
        let fields = [sn.vm_state_size, sn.disk_size(size), icount];
        if extra.len() < FULL_EXTRA {
            extra.resize(FULL_EXTRA, 0);
        }
        for (i, v) in fields.iter().enumerate() {
            extra[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&sn.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&sn.l1_size.to_be_bytes());
        out.extend_from_slice(&(sn.id_raw.len() as u16).to_be_bytes());
        out.extend_from_slice(&(sn.name_raw.len() as u16).to_be_bytes());
        out.extend_from_slice(&sn.date_sec.to_be_bytes());
        out.extend_from_slice(&sn.date_nsec.to_be_bytes());
        out.extend_from_slice(&sn.vm_clock_nsec.to_be_bytes());
        // Too large for 32 bits: 0, so that old readers see a disk-only snapshot.
        let small = u32::try_from(sn.vm_state_size).unwrap_or(0);
        out.extend_from_slice(&small.to_be_bytes());
        out.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&extra);
        out.extend_from_slice(&sn.id_raw);
        out.extend_from_slice(&sn.name_raw);
    }
    out
}

/// The snapshot table's extent in the file, for `check`.
pub const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;

/// Reads `count` snapshot entries starting at `offset`. Returns them and the table's size.
pub fn read_snapshots(
    s: &dyn Storage,
    offset: u64,
    count: u32,
    file_len: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut pos = offset;
    for i in 0..count {
        let mut fixed = [0u8; 40];
        if pos + 40 > file_len || pos - offset > MAX_SNAPSHOT_TABLE {
            return Err(Error::invalid(format!(
                "snapshot table entry {i} lies past the end of the file"
            )));
        }
        read_exact(s, &mut fixed, pos, "snapshot table")?;
        let id_len = u64::from(be16(&fixed, 12));
        let name_len = u64::from(be16(&fixed, 14));
        let extra_len = u64::from(be32(&fixed, 36));
        if extra_len > 1024 {
            return Err(Error::invalid(format!(
                "snapshot {i} has {extra_len} bytes of extra data (at most 1024)"
            )));
        }
        let var_len = extra_len + id_len + name_len;
        if pos + 40 + var_len > file_len {
            return Err(Error::invalid(format!(
                "snapshot table entry {i} lies past the end of the file"
            )));
        }
        let mut var = vec![0u8; var_len as usize];
        read_exact(s, &mut var, pos + 40, "snapshot table")?;
        let extra = &var[..extra_len as usize];
        let mut vm_state_size = u64::from(be32(&fixed, 32));
        if extra.len() >= 8 {
            vm_state_size = be64(extra, 0);
        }
        let icount = (extra.len() >= 24)
            .then(|| be64(extra, 16))
            .filter(|&c| c != u64::MAX);
        let id_end = (extra_len + id_len) as usize;
        let id_raw = var[extra_len as usize..id_end].to_vec();
        let name_raw = var[id_end..].to_vec();
        out.push(Snapshot {
            l1_table_offset: be64(&fixed, 0),
            l1_size: be32(&fixed, 8),
            id: String::from_utf8_lossy(&id_raw).into_owned(),
            name: String::from_utf8_lossy(&name_raw).into_owned(),
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size,
            icount,
            extra: extra.to_vec(),
            id_raw,
            name_raw,
        });
        pos = align_up(pos + 40 + var_len, 8);
    }
    Ok((out, pos - offset))
}

/// One persistent dirty bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    /// Its name.
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// In use by a running qemu (or left so by one that died): inconsistent.
    pub in_use: bool,
    /// Tracks writes to the active layer automatically.
    pub auto: bool,
    /// Host offset of its bitmap table.
    pub table_offset: u64,
    /// Entries of the table.
    pub table_size: u32,
}

/// Reads the bitmap directory named by the bitmaps extension.
pub fn read_bitmaps(s: &dyn Storage, ext: &[u8], file_len: u64) -> Result<(Vec<Bitmap>, u64, u64)> {
    if ext.len() < 24 {
        return Err(Error::invalid("bitmaps extension is too short"));
    }
    let count = be32(ext, 0);
    let dir_size = be64(ext, 8);
    let dir_offset = be64(ext, 16);
    if count > 65535
        || dir_size > 64 << 20
        || dir_offset
            .checked_add(dir_size)
            .is_none_or(|e| e > file_len)
    {
        return Err(Error::invalid("bitmap directory is invalid"));
    }
    let mut dir = vec![0u8; dir_size as usize];
    read_exact(s, &mut dir, dir_offset, "bitmap directory")?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..count {
        if pos + 24 > dir.len() {
            return Err(Error::invalid("bitmap directory is truncated"));
        }
        let flags = be32(&dir, pos + 12);
        let gran_bits = u32::from(dir[pos + 17]);
        let name_len = be16(&dir, pos + 18) as usize;
        let extra_len = be32(&dir, pos + 20) as usize;
        let name_at = pos + 24 + extra_len;
        if name_at + name_len > dir.len() || gran_bits > 63 {
            return Err(Error::invalid("bitmap directory entry is invalid"));
        }
        out.push(Bitmap {
            name: String::from_utf8_lossy(&dir[name_at..name_at + name_len]).into_owned(),
            granularity: 1 << gran_bits,
            in_use: flags & 1 != 0,
            auto: flags & 2 != 0,
            table_offset: be64(&dir, pos),
            table_size: be32(&dir, pos + 8),
        });
        pos = align_up((name_at + name_len) as u64, 8) as usize;
    }
    Ok((out, dir_offset, dir_size))
}
