//! The COPIED flags of L1 and L2 entries against the stored refcounts (qemu's
//! `check_oflag_copied`).

use super::*;

impl Checker<'_, '_> {
    // ---- OFLAG_COPIED (qemu's check_oflag_copied) ----

    pub(super) fn check_copied(&mut self, st: &Stored, fix: CheckMode) -> Result<()> {
        let repair = match fix {
            CheckMode::RepairAll => true,
            // Only when the refcounts are known to be right now.
            CheckMode::RepairLeaks => {
                self.res.check_errors == 0 && self.res.corruptions == 0 && self.res.leaks == 0
            }
            CheckMode::ReadOnly => false,
        };
        let word = if repair { "Repairing" } else { "ERROR" };
        let cs = self.cs;
        let cb = self.h.cluster_bits;
        let mut buf = vec![0u8; self.h.l1_size as usize * 8];
        read_exact(self.s, &mut buf, self.h.l1_table_offset, "the L1 table")?;
        let l1 = table::decode(&buf);
        let ext = self.geo.extended_l2;
        let esize = if ext { 16 } else { 8 };
        let per_window = (WINDOW_BYTES / cs).max(1) as usize;
        let mut tables = Tables::new(cs);
        let mut w = 0;
        while w < l1.len() {
            let end = (w + per_window).min(l1.len());
            let wanted: Vec<u64> = l1[w..end]
                .iter()
                .map(|e| e & OFFSET_MASK)
                .filter(|&o| o != 0)
                .collect();
            tables.load(self.s, &wanted, "an L2 table")?;
            for (i, &l1e) in l1.iter().enumerate().take(end).skip(w) {
                let l2_offset = l1e & OFFSET_MASK;
                if l2_offset == 0 {
                    continue;
                }
                let Some(rc) = self.stored_refcount(st, l2_offset >> cb)? else {
                    continue;
                };
                if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
                    self.res.corruptions += 1;
                    self.say(format!("{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"));
                    if repair {
                        let new = if rc == 1 {
                            l1e | OFLAG_COPIED
                        } else {
                            l1e & !OFLAG_COPIED
                        };
                        write_all(
                            self.s,
                            &new.to_be_bytes(),
                            self.h.l1_table_offset + 8 * i as u64,
                            "an L1 entry",
                        )?;
                        self.res.corruptions -= 1;
                        self.res.corruptions_fixed += 1;
                    }
                }
                // Copied only when an entry changes.
                let mut changed: Option<Vec<u8>> = None;
                let table = tables.get(l2_offset);
                let mut dirty = 0;
                for j in 0..table.len() / esize {
                    let entry = be64(table, j * esize);
                    if entry == 0 {
                        continue;
                    }
                    let ty = self.classify(entry);
                    if ty != Type::Normal && ty != Type::ZeroAlloc {
                        continue;
                    }
                    let rc = if self.data_file {
                        1
                    } else {
                        match self.stored_refcount(st, (entry & OFFSET_MASK) >> cb)? {
                            Some(rc) => rc,
                            None => continue,
                        }
                    };
                    if (rc == 1) != (entry & OFLAG_COPIED != 0) {
                        self.res.corruptions += 1;
                        self.say(format!(
                            "{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                        ));
                        if repair {
                            let new = if rc == 1 {
                                entry | OFLAG_COPIED
                            } else {
                                entry & !OFLAG_COPIED
                            };
                            changed.get_or_insert_with(|| table.to_vec())[j * esize..j * esize + 8]
                                .copy_from_slice(&new.to_be_bytes());
                            dirty += 1;
                        }
                    }
                }
                if dirty > 0 {
                    if let Some(what) = self.overlaps_fixed(l2_offset, cs) {
                        self.say(format!(
                            "ERROR: Could not write L2 table; metadata overlap check failed: the table overlaps {what}"
                        ));
                        self.res.check_errors += 1;
                        continue;
                    }
                    let table = changed.as_deref().unwrap_or(table);
                    write_all(self.s, table, l2_offset, "an L2 table")?;
                    self.res.corruptions -= dirty;
                    self.res.corruptions_fixed += dirty;
                }
            }
            w = end;
        }
        if repair {
            sync(self.s)?;
        }
        Ok(())
    }
}
