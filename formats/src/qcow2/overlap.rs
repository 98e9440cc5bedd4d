//! The image's metadata ranges, checked once before the first write.
//!
//! A damaged image can point an L2 table at the L1 table or a refcount block, or a data
//! cluster at metadata. qemu catches such writes with its overlap checks and marks the image
//! corrupt. cowimg maps the metadata when it starts writing: structures that overlap each other
//! make it refuse to write at all, and a write in place into a cluster that is metadata is
//! refused. `check -r all` repairs such images.

use super::header::Header;
use super::refcount;
use super::snapshot::Snapshot;
use super::table::OFFSET_MASK;
use crate::util::align_up;
use crate::{Error, Result};

pub struct MetadataMap {
    /// (start, end, what), sorted by start, disjoint.
    ranges: Vec<(u64, u64, &'static str)>,
}

impl MetadataMap {
    /// Maps the header, the active L1 table and its L2 tables, the refcount table and blocks,
    /// the snapshot table and the snapshots' L1 tables.
    pub fn build(
        h: &Header,
        l1: &[u64],
        reftable: &[u64],
        snapshots: &[Snapshot],
        snapshot_table_len: u64,
    ) -> Result<MetadataMap> {
        let cs = h.cluster_size();
        let mut r: Vec<(u64, u64, &'static str)> = vec![(0, cs, "the header")];
        let table = |off: u64, bytes: u64| (off, off + align_up(bytes.max(1), cs));
        if h.l1_size > 0 {
            let (a, b) = table(h.l1_table_offset, u64::from(h.l1_size) * 8);
            r.push((a, b, "the active L1 table"));
        }
        let (a, b) = table(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        );
        r.push((a, b, "the refcount table"));
        for e in reftable
            .iter()
            .map(|&e| refcount::reftable_block(e))
            .filter(|&e| e != 0)
        {
            r.push((e, e + cs, "a refcount block"));
        }
        if h.nb_snapshots > 0 {
            let (a, b) = table(h.snapshots_offset, snapshot_table_len);
            r.push((a, b, "the snapshot table"));
        }
        for s in snapshots.iter().filter(|s| s.l1_size > 0) {
            let (a, b) = table(s.l1_table_offset, u64::from(s.l1_size) * 8);
            r.push((a, b, "a snapshot's L1 table"));
        }
        for e in l1.iter().map(|e| e & OFFSET_MASK).filter(|&e| e != 0) {
            r.push((e, e + cs, "an L2 table"));
        }
        r.sort_unstable();
        for w in r.windows(2) {
            let ((a0, a1, what_a), (b0, _, what_b)) = (w[0], w[1]);
            if a1 > b0 {
                return Err(Error::NeedsRepair(format!(
                    "image is corrupt: {what_b} at {b0:#x} overlaps {what_a} at {a0:#x}; refusing to write"
                )));
            }
        }
        Ok(MetadataMap { ranges: r })
    }

    /// Refuses a write in place into `[host, host + len)` when it is metadata.
    pub fn check_data(&self, host: u64, len: u64) -> Result<()> {
        let i = self.ranges.partition_point(|&(_, end, _)| end <= host);
        match self.ranges.get(i) {
            Some(&(start, _, what)) if start < host + len => Err(Error::NeedsRepair(format!(
                "image is corrupt: a data cluster at {host:#x} overlaps {what} at {start:#x}; refusing to write"
            ))),
            _ => Ok(()),
        }
    }
}
