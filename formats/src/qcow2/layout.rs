//! Layout arithmetic of qcow2 metadata: how many refcount structures an image needs.
//!
//! Refcount blocks and the refcount table live in clusters too, so they need refcounts of
//! their own: the count is a fixed point. `create` (the structures of a new image), `measure`
//! (qemu's `qcow2_refcount_metadata_size`, for a fully allocated image) and `check`'s rebuild
//! (new structures appended past the end of the file, covering a sparse set of old blocks)
//! all ask this one function.

use super::refcount::RefGeometry;
use crate::{Error, Result};

/// Sizes of a set of refcount structures that count themselves too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefcountStructures {
    /// Clusters of the refcount table (at least one: every qcow2 image has a table).
    pub table_clusters: u64,
    /// Refcount blocks, one cluster each.
    pub blocks: u64,
}

impl RefcountStructures {
    /// Clusters the structures take: the table and the blocks.
    pub fn clusters(&self) -> u64 {
        self.table_clusters + self.blocks
    }
}

/// The smallest refcount table and block count for an image whose clusters `0..clusters`
/// are in use, when the structures themselves take the clusters that follow (or any others:
/// only their number matters for a dense image).
///
/// The answer is qemu's (`qcow2_refcount_metadata_size`, and the layout of `qemu-img
/// create`): the least fixed point of "the blocks cover every cluster, theirs and the
/// table's included; the table has an entry for every block". An error, not a wrap, when
/// the counts do not fit in 64 bits.
pub fn refcount_structures(geo: RefGeometry, clusters: u64) -> Result<RefcountStructures> {
    // Blocks with an index below `clusters`' block are all in use; the rest are the range the
    // new clusters reach, which also holds the (partly used) block of cluster `clusters`.
    appended_refcount_structures(geo, clusters, clusters >> geo.block_bits())
}

/// The smallest refcount table and block count when the table and then the blocks are
/// appended at cluster `first`, and `blocks_below` blocks with an index below `first`'s block
/// (`first >> block_bits`) are needed for clusters before `first` (a rebuild over a sparse
/// image needs only the blocks of the clusters in use).
///
/// The new structures take clusters `first .. first + table_clusters + blocks`; every block
/// of that range is needed (`first`'s block included, so the caller does not count it in
/// `blocks_below`), and the table must reach the highest of them. Iterating from below
/// reaches the least fixed point: each step can only grow the counts, and never past it.
pub fn appended_refcount_structures(
    geo: RefGeometry,
    first: u64,
    blocks_below: u64,
) -> Result<RefcountStructures> {
    let too_large = || {
        Error::invalid(format!(
            "the refcount structures for {first} clusters do not fit in a 64-bit image"
        ))
    };
    let block_bits = geo.block_bits();
    let entries_per_table_cluster = 1u64 << (geo.cluster_bits - 3);
    let first_block = first >> block_bits;
    let mut s = RefcountStructures {
        table_clusters: 1,
        blocks: 0,
    };
    loop {
        // The last cluster the structures take, and the highest block index that covers it.
        let last = first.checked_add(s.clusters() - 1).ok_or_else(too_large)?;
        let last_block = last >> block_bits;
        let blocks = blocks_below
            .checked_add(last_block - first_block + 1)
            .ok_or_else(too_large)?;
        let table_clusters = (last_block + 1).div_ceil(entries_per_table_cluster);
        if blocks <= s.blocks && table_clusters <= s.table_clusters {
            return Ok(s);
        }
        s.blocks = s.blocks.max(blocks);
        s.table_clusters = s.table_clusters.max(table_clusters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// qemu's loop in `qcow2_refcount_metadata_size`, in wide integers: the reference.
    fn qemu_reference(clusters: u128, geo: RefGeometry) -> (u128, u128) {
        let per_table_cluster = 1u128 << (geo.cluster_bits - 3);
        let per_block = 1u128 << geo.block_bits();
        let (mut table, mut blocks, mut last, mut n) = (0u128, 0u128, None, 0u128);
        while last != Some(n) {
            last = Some(n);
            blocks = (clusters + table + blocks).div_ceil(per_block);
            table = blocks.div_ceil(per_table_cluster);
            n = clusters + blocks + table;
        }
        (table, blocks)
    }

    fn geo(cluster_bits: u32, refcount_order: u32) -> RefGeometry {
        RefGeometry {
            cluster_bits,
            refcount_order,
        }
    }

    #[test]
    fn a_new_image_needs_one_table_cluster_and_one_block() {
        let s = refcount_structures(geo(16, 4), 2).ok();
        assert_eq!(
            s,
            Some(RefcountStructures {
                table_clusters: 1,
                blocks: 1
            })
        );
    }

    #[test]
    fn the_structures_count_themselves_across_a_block_boundary() {
        // 512-byte clusters, 64-bit refcounts: 64 entries a block. 63 clusters in use leave
        // room for one more: the table; the block itself needs a second block.
        let s = refcount_structures(geo(9, 6), 63).ok();
        assert_eq!(
            s,
            Some(RefcountStructures {
                table_clusters: 1,
                blocks: 2
            })
        );
    }

    #[test]
    fn sizes_near_two_to_the_64_are_an_error() {
        for order in 0..=6 {
            assert!(refcount_structures(geo(9, order), u64::MAX).is_err());
            assert!(refcount_structures(geo(21, order), u64::MAX - 1).is_err());
        }
        assert!(appended_refcount_structures(geo(9, 6), u64::MAX - 3, u64::MAX).is_err());
    }

    proptest! {
        #[test]
        fn dense_counts_are_qemus(cb in 9u32..=21, order in 0u32..=6, clusters in 1u64..(1 << 56)) {
            let g = geo(cb, order);
            let s = refcount_structures(g, clusters).unwrap();
            let (table, blocks) = qemu_reference(u128::from(clusters), g);
            prop_assert_eq!((u128::from(s.table_clusters), u128::from(s.blocks)), (table, blocks));
        }

        #[test]
        fn wide_inputs_never_wrap(cb in 9u32..=21, order in 0u32..=6, clusters in any::<u64>()) {
            let g = geo(cb, order);
            match refcount_structures(g, clusters) {
                Ok(s) => {
                    // A true fixed point: the blocks cover every cluster, theirs included,
                    // and the table holds an entry for every block.
                    let total = u128::from(clusters) + u128::from(s.clusters());
                    prop_assert!(u128::from(s.blocks) << g.block_bits() >= total);
                    prop_assert!(u128::from(s.table_clusters) << (cb - 3) >= u128::from(s.blocks));
                    let (table, blocks) = qemu_reference(u128::from(clusters), g);
                    prop_assert_eq!((u128::from(s.table_clusters), u128::from(s.blocks)), (table, blocks));
                }
                Err(_) => {
                    let (table, blocks) = qemu_reference(u128::from(clusters), g);
                    prop_assert!(u128::from(clusters) + table + blocks > u128::from(u64::MAX));
                }
            }
        }

        #[test]
        fn appended_structures_cover_themselves(cb in 9u32..=16, order in 0u32..=6, first in 1u64..(1 << 40), used in 0u64..1000) {
            let g = geo(cb, order);
            let blocks_below = used.min(first >> g.block_bits());
            let s = appended_refcount_structures(g, first, blocks_below).unwrap();
            let last = first + s.clusters() - 1;
            let range = (last >> g.block_bits()) - (first >> g.block_bits()) + 1;
            prop_assert_eq!(s.blocks, blocks_below + range);
            prop_assert!(s.table_clusters << (cb - 3) > last >> g.block_bits());
            // Least table: one cluster fewer could not hold the highest block.
            prop_assert!(s.table_clusters == 1 || (s.table_clusters - 1) << (cb - 3) <= last >> g.block_bits());
        }
    }
}
