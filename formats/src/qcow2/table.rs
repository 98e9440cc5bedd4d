//! L1 and L2 tables: entry encoding and the kinds of cluster an entry describes.

use crate::{Error, Result};

/// Host offset bits of L1 and standard L2 entries (bits 9..=55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Refcount is exactly one": the cluster may be written in place.
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Reads as zeros (v3, standard L2 only).
pub const OFLAG_ZERO: u64 = 1;

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// What one L2 entry (or one subcluster of it) says about its guest range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Unallocated,
    Zero,
    /// Zero, with a host cluster kept allocated.
    ZeroAlloc(u64),
    Normal(u64),
    Compressed {
        host: u64,
        len: u64,
    },
}

/// Geometry needed to decode entries.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub extended_l2: bool,
    /// The image keeps its data in an external data file, where host offset 0 is a valid
    /// cluster (told from "unallocated" by the COPIED flag, as qemu does).
    pub data_file: bool,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest clusters per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2 { 16 } else { 8 }
    }

    pub fn l2_bits(&self) -> u32 {
        self.l2_entries().trailing_zeros()
    }

    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / u64::from(SUBCLUSTERS)
        } else {
            self.cluster_size()
        }
    }

    /// Bit position of the sector count in a compressed descriptor.
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Decodes a compressed descriptor into (host byte offset, bytes to read).
    pub fn compressed(&self, entry: u64) -> (u64, u64) {
        let shift = self.csize_shift();
        let host = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        (host, sectors * 512 - (host & 511))
    }

    /// Encodes a compressed descriptor for `len` bytes of compressed data at `host`.
    pub fn compressed_entry(&self, host: u64, len: u64) -> u64 {
        let sectors = (host + len).div_ceil(512) - host / 512 - 1;
        OFLAG_COMPRESSED | (sectors << self.csize_shift()) | host
    }

    /// Whether a (non-compressed) entry points at a host cluster. Offset 0 means
    /// unallocated, except in an external data file, where 0 is a valid offset and all
    /// clusters have refcount 1, so the COPIED flag tells (qemu's qcow2_get_cluster_type).
    pub fn allocated(&self, entry: u64) -> bool {
        entry & OFFSET_MASK != 0 || (self.data_file && entry & OFLAG_COPIED != 0)
    }

    /// The kind of the whole cluster described by a standard entry, or of subcluster `sc`
    /// of an extended entry (`bitmap` is the second word). Mirrors qemu's cluster and
    /// subcluster types, including which combinations it refuses as corrupt.
    pub fn kind(&self, entry: u64, bitmap: u64, sc: u32) -> Result<Kind> {
        if entry & OFLAG_COMPRESSED != 0 {
            let (host, len) = self.compressed(entry);
            return Ok(Kind::Compressed { host, len });
        }
        let host = entry & OFFSET_MASK;
        if !self.extended_l2 {
            if entry & OFLAG_ZERO != 0 {
                if host == 0 {
                    return Ok(Kind::Zero);
                }
                self.check_aligned(host)?;
                return Ok(Kind::ZeroAlloc(host));
            }
            return Ok(if self.allocated(entry) {
                self.check_aligned(host)?;
                Kind::Normal(host)
            } else {
                Kind::Unallocated
            });
        }
        let alloc = bitmap & (1 << sc) != 0;
        let zero = bitmap & (1 << (sc + 32)) != 0;
        if !self.allocated(entry) {
            // No host cluster: no subcluster may be allocated.
            if bitmap & u64::from(u32::MAX) != 0 {
                return Err(Error::Corrupt(format!(
                    "subclusters are allocated but their cluster has no host offset (L2 bitmap {bitmap:#018x})"
                )));
            }
            return Ok(if zero { Kind::Zero } else { Kind::Unallocated });
        }
        if (bitmap >> 32) & bitmap & u64::from(u32::MAX) != 0 {
            return Err(Error::Corrupt(format!(
                "subclusters are marked both allocated and zero (L2 bitmap {bitmap:#018x})"
            )));
        }
        self.check_aligned(host)?;
        let sub = host + u64::from(sc) * self.subcluster_size();
        Ok(match (alloc, zero) {
            (true, _) => Kind::Normal(sub),
            // A zero subcluster of an allocated cluster keeps its host space (qemu's
            // ZERO_ALLOC, whose offset qemu reports).
            (false, true) => Kind::ZeroAlloc(sub),
            (false, false) => Kind::Unallocated,
        })
    }

    fn check_aligned(&self, host: u64) -> Result<()> {
        if host & (self.cluster_size() - 1) != 0 {
            return Err(Error::Corrupt(format!(
                "Cluster allocation offset {host:#x} unaligned"
            )));
        }
        Ok(())
    }
}

/// Decodes a table of big-endian u64 entries.
pub fn decode(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Encodes entries as big-endian bytes.
pub fn encode(entries: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        b.extend_from_slice(&e.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_round_trips() {
        // From qemu-img's output (64 KiB clusters): 0x40400000000501da is 2 sectors at 0x501da.
        let g = Geometry {
            cluster_bits: 16,
            extended_l2: false,
            data_file: false,
        };
        let (host, len) = g.compressed(0x4040_0000_0005_01da);
        assert_eq!(host, 0x501da);
        assert_eq!(len, 2 * 512 - 0x1da);
        assert_eq!(g.compressed_entry(host, len), 0x4040_0000_0005_01da);
        let g = Geometry {
            cluster_bits: 21,
            extended_l2: false,
            data_file: false,
        };
        let e = g.compressed_entry(0x1234_5600, 70_000);
        assert_eq!(g.compressed(e), (0x1234_5600, 70_144));
    }

    #[test]
    fn extended_entries_decode_per_subcluster() {
        let g = Geometry {
            cluster_bits: 16,
            extended_l2: true,
            data_file: false,
        };
        let entry = OFLAG_COPIED | 0x50000;
        let bitmap = 0x0000_0004_0000_0001;
        assert_eq!(g.kind(entry, bitmap, 0).unwrap(), Kind::Normal(0x50000));
        assert_eq!(g.kind(entry, bitmap, 1).unwrap(), Kind::Unallocated);
        assert_eq!(
            g.kind(entry, bitmap, 2).unwrap(),
            Kind::ZeroAlloc(0x50000 + 2 * 2048)
        );
        assert_eq!(g.kind(0, 1 << 34, 2).unwrap(), Kind::Zero);
        assert!(g.kind(entry, 1 | 1 << 32, 0).is_err());
        // qemu refuses the whole cluster when any subcluster is both allocated and zero.
        assert!(g.kind(entry, 1 | 1 << 33 | 1 << 1, 0).is_err());
        // Allocated subclusters need a host cluster; with a data file, offset 0 is one.
        assert!(g.kind(0, 1, 0).is_err());
        let d = Geometry {
            data_file: true,
            ..g
        };
        assert_eq!(d.kind(OFLAG_COPIED, 1, 0).unwrap(), Kind::Normal(0));
        assert_eq!(d.kind(OFLAG_COPIED, 1, 1).unwrap(), Kind::Unallocated);
        assert!(d.allocated(OFLAG_COPIED) && !g.allocated(OFLAG_COPIED));
    }

    #[test]
    fn copied_offset_zero_is_unallocated_without_a_data_file() {
        let g = Geometry {
            cluster_bits: 16,
            extended_l2: false,
            data_file: false,
        };
        assert_eq!(g.kind(OFLAG_COPIED, 0, 0).unwrap(), Kind::Unallocated);
        let d = Geometry {
            data_file: true,
            ..g
        };
        assert_eq!(d.kind(OFLAG_COPIED, 0, 0).unwrap(), Kind::Normal(0));
        assert!(g.kind(OFLAG_ZERO | 0x50200, 0, 0).is_err());
    }
}
