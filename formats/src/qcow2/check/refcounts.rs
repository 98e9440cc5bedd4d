//! The stored refcounts: read, compared with the computed counts, and corrected.

use super::*;

/// Stored refcounts, as read from the refcount table and blocks.
pub(super) struct Stored {
    pub(super) reftable: Vec<u64>,
    /// Stored counts that differ from the computed ones, as count + 1 (0: the same). Only
    /// damage takes memory here.
    pub(super) diff: Counts,
    /// The highest cluster of the compared range with a non-zero stored count.
    pub(super) highest: Option<u64>,
    /// Refcount table indices whose block cannot be read (misaligned, or past qemu's
    /// largest readable offset): their counts are unknown.
    pub(super) bad_blocks: BTreeSet<u64>,
    /// Non-zero stored counts of clusters past the compared range (past the end of the file).
    pub(super) beyond: Vec<(u64, u64)>,
}

impl Checker<'_, '_> {
    // ---- stored refcounts ----

    /// Reads the stored refcounts of clusters `0..n` and keeps those that differ from the
    /// computed ones; with `beyond`, also every non-zero count of later clusters (a repair
    /// clears those).
    pub(super) fn load_stored(&mut self, n: u64, beyond: bool) -> Result<Stored> {
        let reftable = self.read_reftable()?;
        let epb = self.rgeo.entries_per_block();
        let blocks_needed = n.div_ceil(epb);
        let mut st = Stored {
            reftable,
            diff: Counts::with_len(n),
            highest: None,
            bad_blocks: BTreeSet::new(),
            beyond: Vec::new(),
        };
        let last = if beyond {
            st.reftable.len() as u64
        } else {
            blocks_needed.min(st.reftable.len() as u64)
        };
        let mut wanted: Vec<(u64, u64)> = Vec::new();
        for bi in 0..blocks_needed.max(last) {
            let e = st.reftable.get(bi as usize).copied().unwrap_or(0);
            let off = reftable_block(e);
            if off != 0 && self.unreadable_block(off) {
                st.bad_blocks.insert(bi);
                continue;
            }
            if bi >= blocks_needed
                && (off == 0 || off >= self.file_len || e & REFT_RESERVED_MASK != 0)
            {
                continue;
            }
            if off == 0 {
                // No block: every count of its range is 0.
                let (lo, hi) = (bi * epb, ((bi + 1) * epb).min(n));
                if !self.refs.any(lo, hi) {
                    continue;
                }
                for c in lo..hi {
                    if self.refs.get(c) != 0 {
                        st.diff.set(c, 1);
                    }
                }
                continue;
            }
            wanted.push((bi, off));
        }
        let per_window = (WINDOW_BYTES / self.cs).max(1) as usize;
        let mut tables = Tables::new(self.cs);
        for win in wanted.chunks(per_window) {
            let offs: Vec<u64> = win.iter().map(|&(_, o)| o).collect();
            tables.load(self.s, &offs, "a refcount block")?;
            for &(bi, off) in win {
                let block = tables.get(off);
                let base = bi * epb;
                for idx in 0..epb as usize {
                    let v = self.rgeo.get(block, idx);
                    let c = base + idx as u64;
                    if c < n {
                        if v != self.refs.get(c) {
                            st.diff.set(c, v + 1);
                        }
                        if v != 0 {
                            st.highest = Some(c);
                        }
                    } else if v != 0 {
                        st.beyond.push((c, v));
                    }
                }
            }
        }
        Ok(st)
    }

    /// The stored count of cluster `i` (below the compared range, outside a bad block).
    pub(super) fn stored_get(&self, st: &Stored, i: u64) -> u64 {
        match st.diff.get(i) {
            0 => self.refs.get(i),
            d => d - 1,
        }
    }

    /// The stored refcount of any cluster, `None` when it cannot be read (qemu's
    /// `qcow2_get_refcount` failing).
    /// A refcount block qemu cannot read: misaligned (qemu refuses), or so far out that
    /// reading it fails rather than reading zeros past the end of the file.
    pub(super) fn unreadable_block(&self, off: u64) -> bool {
        off % self.cs != 0 || off.saturating_add(self.cs) > MAX_READABLE
    }

    pub(super) fn stored_refcount(&mut self, st: &Stored, cluster: u64) -> Result<Option<u64>> {
        let bi = cluster >> self.rgeo.block_bits();
        if st.bad_blocks.contains(&bi) {
            return Ok(None);
        }
        if cluster < st.diff.len() {
            return Ok(Some(self.stored_get(st, cluster)));
        }
        let Some(&e) = st.reftable.get(bi as usize) else {
            return Ok(Some(0));
        };
        let off = reftable_block(e);
        if off == 0 {
            return Ok(Some(0));
        }
        if self.unreadable_block(off) {
            return Ok(None);
        }
        let mut block = vec![0u8; self.cs as usize];
        read_exact(self.s, &mut block, off, "a refcount block")?;
        let (_, idx) = self.rgeo.locate(cluster);
        Ok(Some(self.rgeo.get(&block, idx)))
    }

    /// qemu's `compare_refcounts`. Returns the highest cluster in use. With a repair mode the
    /// corrections are written block by block (each block's entries between the old and the
    /// right value, so every intermediate state is at least as good), then synced.
    pub(super) fn compare(&mut self, st: &mut Stored, fix: CheckMode) -> Result<u64> {
        let n = self.refs.len().max(st.diff.len());
        let epb = self.rgeo.entries_per_block();
        let mut highest = st.highest.unwrap_or(0);
        // The highest computed reference outside unreadable blocks.
        let mut bi = n.div_ceil(epb);
        while bi > 0 {
            bi -= 1;
            let (a, b) = (bi * epb, ((bi + 1) * epb).min(n));
            if st.bad_blocks.contains(&bi) || !self.refs.any(a, b) {
                continue;
            }
            if let Some(i) = (a..b).rev().find(|&i| self.refs.get(i) != 0) {
                highest = highest.max(i);
            }
            break;
        }
        let mut wrote = false;
        let mut bi = 0;
        while bi * epb < n {
            let (a, b) = (bi * epb, ((bi + 1) * epb).min(n));
            let bad = st.bad_blocks.contains(&bi);
            if !bad && !st.diff.any(a, b) {
                bi += 1;
                continue;
            }
            if bad {
                if !self.signalled {
                    self.signalled = true;
                    let off = reftable_block(st.reftable.get(bi as usize).copied().unwrap_or(0));
                    self.say(format!(
                        "qcow2: Image is corrupt: Refblock offset {off:#x} unaligned (reftable index: {}); further non-fatal corruption events will be suppressed",
                        c_hex(bi)
                    ));
                }
                for i in a..b {
                    self.say(format!(
                        "Can't get refcount for cluster {i}: Input/output error"
                    ));
                    self.res.check_errors += 1;
                }
                bi += 1;
                continue;
            }
            let mut changes: Vec<(u64, u64)> = Vec::new();
            for i in a..b {
                if st.diff.get(i) == 0 {
                    continue;
                }
                let r1 = self.stored_get(st, i);
                let r2 = self.refs.get(i);
                let fixed = if r1 == 0 {
                    self.rebuild = true;
                    false
                } else {
                    (r1 > r2 && fix.repairs()) || (r1 < r2 && fix == CheckMode::RepairAll)
                };
                let word = if fixed {
                    "Repairing"
                } else if r1 < r2 {
                    "ERROR"
                } else {
                    "Leaked"
                };
                self.say(format!("{word} cluster {i} refcount={r1} reference={r2}"));
                if fixed {
                    changes.push((i, r2));
                    if r1 > r2 {
                        self.res.leaks_fixed += 1;
                    } else {
                        self.res.corruptions_fixed += 1;
                    }
                } else if r1 < r2 {
                    self.res.corruptions += 1;
                } else {
                    self.res.leaks += 1;
                }
            }
            if !changes.is_empty() {
                self.write_refcounts(st, &changes)?;
                wrote = true;
            }
            bi += 1;
        }
        if fix.repairs() && !st.beyond.is_empty() {
            // cowimg: counts stored for clusters past the end of the file would make its
            // allocator, which appends after the last counted cluster, leave a hole.
            let beyond = std::mem::take(&mut st.beyond);
            for &(c, v) in &beyond {
                self.say(format!(
                    "Repairing cluster {c} refcount={v} reference=0 (past the end of the file)"
                ));
                self.res.leaks_fixed += 1;
            }
            let zeroed: Vec<(u64, u64)> = beyond.iter().map(|&(c, _)| (c, 0)).collect();
            self.write_refcounts(st, &zeroed)?;
            wrote = true;
        }
        if wrote {
            sync(self.s)?;
        }
        Ok(highest)
    }

    /// Writes refcount corrections into their blocks (not synced).
    pub(super) fn write_refcounts(
        &mut self,
        st: &mut Stored,
        changes: &[(u64, u64)],
    ) -> Result<()> {
        let mut by_block: BTreeMap<u64, Vec<(usize, u64)>> = BTreeMap::new();
        for &(c, v) in changes {
            let (bi, idx) = self.rgeo.locate(c);
            by_block.entry(bi).or_default().push((idx, v));
            if c < st.diff.len() {
                let same = v == self.refs.get(c);
                st.diff.set(c, if same { 0 } else { v + 1 });
            }
        }
        for (bi, list) in by_block {
            let Some(&e) = st.reftable.get(bi as usize) else {
                continue;
            };
            let off = reftable_block(e);
            if off == 0 || self.unreadable_block(off) {
                continue;
            }
            let mut block = vec![0u8; self.cs as usize];
            read_exact(self.s, &mut block, off, "a refcount block")?;
            let (mut lo, mut hi) = (usize::MAX, 0);
            for (idx, v) in list {
                self.rgeo.set(&mut block, idx, v.min(self.rgeo.max()));
                let (a, b) = self.rgeo.byte_range(idx);
                lo = lo.min(a);
                hi = hi.max(b);
            }
            write_all(self.s, &block[lo..hi], off + lo as u64, "refcount entries")?;
        }
        Ok(())
    }
}
