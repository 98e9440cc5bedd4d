//! Reference counts: the refcount table, refcount blocks and their entries.
//!
//! Entries are `refcount_bits` wide (1 to 64). Widths of 8 bits and more are big-endian;
//! narrower ones are packed LSB-first inside each byte.

/// Host offset bits of a refcount table entry (bits 9..=63). Unlike L1/L2 entries, a refcount
/// table entry has no flag bits at the top: qemu's `REFT_OFFSET_MASK`.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of a refcount table entry (must be zero).
pub const REFT_RESERVED_MASK: u64 = 0x1ff;

/// The host offset of the refcount block a refcount table entry points at (0: none).
///
/// Every reader of the refcount table decodes entries here, so the writer, `check` and qemu
/// agree on which block an entry names, even when a hostile entry sets the high bits.
pub fn reftable_block(entry: u64) -> u64 {
    entry & REFT_OFFSET_MASK
}

/// Layout of refcount entries for one image.
#[derive(Clone, Copy, Debug)]
pub struct RefGeometry {
    pub cluster_bits: u32,
    pub refcount_order: u32,
}

impl RefGeometry {
    pub fn bits(&self) -> u32 {
        1 << self.refcount_order
    }

    pub fn max(&self) -> u64 {
        if self.bits() == 64 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }

    /// log2 of the entries per refcount block.
    pub fn block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }

    pub fn entries_per_block(&self) -> u64 {
        1 << self.block_bits()
    }

    /// (refcount table index, index inside the block) of a host cluster index.
    pub fn locate(&self, cluster: u64) -> (u64, usize) {
        (
            cluster >> self.block_bits(),
            (cluster & (self.entries_per_block() - 1)) as usize,
        )
    }

    /// Byte range of the block that holds entry `idx` (for writing back only what changed).
    pub fn byte_range(&self, idx: usize) -> (usize, usize) {
        let bits = self.bits() as usize;
        let start = idx * bits / 8;
        (start, start + bits.div_ceil(8))
    }

    pub fn get(&self, block: &[u8], idx: usize) -> u64 {
        let bits = self.bits() as usize;
        if bits >= 8 {
            let n = bits / 8;
            block[idx * n..idx * n + n]
                .iter()
                .fold(0u64, |acc, &b| acc << 8 | u64::from(b))
        } else {
            let bit = idx * bits;
            u64::from((block[bit / 8] >> (bit % 8)) & ((1u8 << bits) - 1))
        }
    }

    pub fn set(&self, block: &mut [u8], idx: usize, value: u64) {
        let bits = self.bits() as usize;
        debug_assert!(value <= self.max());
        if bits >= 8 {
            let n = bits / 8;
            for (i, b) in block[idx * n..idx * n + n].iter_mut().enumerate() {
                *b = (value >> (8 * (n - 1 - i))) as u8;
            }
        } else {
            let bit = idx * bits;
            let mask = ((1u8 << bits) - 1) << (bit % 8);
            block[bit / 8] = (block[bit / 8] & !mask) | ((value as u8) << (bit % 8));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn entries_do_not_disturb_neighbours(order in 0u32..=6, idx in 0usize..4096, v in any::<u64>()) {
            let g = RefGeometry { cluster_bits: 12, refcount_order: order };
            let v = v & g.max();
            let mut block = vec![0xa5u8; 4096];
            let before: Vec<u64> = (0..g.entries_per_block() as usize).map(|i| g.get(&block, i)).collect();
            let idx = idx % g.entries_per_block() as usize;
            g.set(&mut block, idx, v);
            prop_assert_eq!(g.get(&block, idx), v);
            for (i, &b) in before.iter().enumerate() {
                if i != idx {
                    prop_assert_eq!(g.get(&block, i), b);
                }
            }
        }
    }

    #[test]
    fn sixteen_bit_entries_are_big_endian() {
        let g = RefGeometry {
            cluster_bits: 16,
            refcount_order: 4,
        };
        let mut block = vec![0u8; 65536];
        g.set(&mut block, 3, 0x0102);
        assert_eq!(&block[6..8], &[1, 2]);
        assert_eq!(g.locate(32768 + 5), (1, 5));
    }
}
