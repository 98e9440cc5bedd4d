//! New refcount structures written past the end of the file: a `-r all` rebuild, and a
//! change of refcount width (`amend -o refcount_bits`).

use super::*;

impl Checker<'_, '_> {
    // ---- rebuilding the refcount structures ----

    /// Writes a new refcount table and blocks that describe `self.refs` (less the references
    /// of the old structures, which nothing uses afterwards) into fresh clusters past the end
    /// of the file, syncs, switches the header to them with one write inside the first
    /// sector, and syncs. Returns the new table's (offset, clusters).
    pub(super) fn rebuild_structures(&mut self) -> Result<(u64, u32)> {
        let cs = self.cs;
        let cb = self.h.cluster_bits;
        let mut counts = self.refs.clone();
        for &(off, len) in &self.refstruct {
            for k in (off >> cb)..=((off + len - 1) >> cb) {
                let v = counts.get(k);
                counts.set(k, v.saturating_sub(1));
            }
        }
        let epb = self.rgeo.entries_per_block();
        let start = self.file_len.div_ceil(cs).max(counts.len());
        let mut used: BTreeSet<u64> = BTreeSet::new();
        let mut bi = 0;
        while bi * epb < start {
            if counts.any(bi * epb, ((bi + 1) * epb).min(start)) {
                used.insert(bi);
            }
            bi += 1;
        }
        // The layout: [start, start + rt) the table, then one cluster per block. The blocks are
        // those of the clusters in use (sparse: a block whose clusters are all free is left
        // out) and those that cover the new clusters themselves.
        let first_block = start / epb;
        let below: Vec<u64> = used.range(..first_block).copied().collect();
        let refs = appended_refcount_structures(self.rgeo, start, below.len() as u64)?;
        let rt = refs.table_clusters;
        let last_block = (start + refs.clusters() - 1) / epb;
        let blocks: Vec<u64> = below.into_iter().chain(first_block..=last_block).collect();
        if rt
            .checked_mul(cs)
            .is_none_or(|b| b > header::MAX_REFTABLE_BYTES)
            || rt > u64::from(u32::MAX)
        {
            return Err(Error::Unsupported(
                "rebuilding the refcount structures: the refcount table would exceed qemu's 8 MiB limit".into(),
            ));
        }
        let entries_per_cluster = cs / 8;
        let table_offset = start * cs;
        let mut reftable = vec![0u64; (rt * entries_per_cluster) as usize];
        for (n, &b) in blocks.iter().enumerate() {
            reftable[b as usize] = (start + rt + n as u64) * cs;
        }
        let end = start + rt + blocks.len() as u64;
        for c in start..end {
            counts.set(c, 1);
        }
        write_all(
            self.s,
            &table::encode(&reftable),
            table_offset,
            "the new refcount table",
        )?;
        let max = self.rgeo.max();
        for (n, &b) in blocks.iter().enumerate() {
            let mut block = vec![0u8; cs as usize];
            for idx in 0..epb {
                let v = counts.get(b * epb + idx);
                if v != 0 {
                    self.rgeo.set(&mut block, idx as usize, v.min(max));
                }
            }
            write_all(
                self.s,
                &block,
                (start + rt + n as u64) * cs,
                "a new refcount block",
            )?;
        }
        sync(self.s)?;
        // The switch: offset (8 bytes) and clusters (4 bytes) of the table, inside sector 0;
        // with a new refcount width, the fields up to the width's too, in the same write.
        let mut h = self.h.clone();
        h.refcount_table_offset = table_offset;
        h.refcount_table_clusters = rt as u32;
        h.refcount_order = self.rgeo.refcount_order;
        let end = if h.refcount_order == self.h.refcount_order {
            60
        } else {
            100
        };
        write_all(
            self.s,
            &h.encode_fixed()[48..end],
            48,
            "the header's refcount table pointer",
        )?;
        sync(self.s)?;
        Ok((table_offset, rt as u32))
    }
}

/// Rewrites the refcount structures with entries of `2^order` bits (`amend -o
/// refcount_bits`): counts every reference as `check` does, writes new structures past the end
/// of the file and switches the header to them in one write of sector 0 (the old structures
/// are then free space, as nothing counts them). Refused on an image `check` finds damaged,
/// and, in qemu's words, when a count does not fit in the new width. The caller holds the
/// image exclusively.
pub(in crate::qcow2) fn change_refcount_order(img: &Qcow2, m: &mut Meta, order: u32) -> Result<()> {
    if m.has_staged() {
        return Err(Error::Refused(
            "internal: refcount width change with uncommitted writes".into(),
        ));
    }
    let s: &dyn Storage = &*img.storage;
    let file_len = s.len().map_err(|e| Error::io("reading the file size", e))?;
    let mut quiet = |_: &str| {};
    let mut c = Checker::new(
        img,
        m.header.clone(),
        file_len,
        CheckMode::ReadOnly,
        &mut quiet,
    )?;
    c.calculate()?;
    let n = c.refs.len();
    let mut st = c.load_stored(n, false)?;
    c.compare(&mut st, CheckMode::ReadOnly)?;
    if c.rebuild || c.res.corruptions > 0 || c.res.check_errors > 0 {
        return Err(Error::NeedsRepair(
            "the image has errors in its refcounts; repair them before changing the refcount width"
                .into(),
        ));
    }
    let new = RefGeometry {
        cluster_bits: c.h.cluster_bits,
        refcount_order: order,
    };
    if let Some(i) = (0..n).find(|&i| c.refs.get(i) > new.max()) {
        return Err(Error::Refused(format!(
            "Cannot decrease refcount entry width to {} bits: Cluster at offset {} has a refcount of {}",
            1u32 << order,
            c_hex(i * c.cs),
            c.refs.get(i)
        )));
    }
    c.rgeo = new;
    let (offset, clusters) = c.rebuild_structures()?;
    m.header.refcount_table_offset = offset;
    m.header.refcount_table_clusters = clusters;
    m.header.refcount_order = order;
    // The tables and the allocator are read again from what is on disk now.
    refresh(img, m)
}
