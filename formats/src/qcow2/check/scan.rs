//! Counting the references (qemu's `calculate_refcounts`): the header, L1 and L2 tables of
//! the active layer and of every snapshot, compressed clusters, the refcount structures, the
//! snapshot table and the bitmaps; and the mapping rewrites `-r all` decides on the way.

use super::*;

impl Checker<'_, '_> {
    // ---- computing the references (qemu's calculate_refcounts) ----

    pub(super) fn calculate(&mut self) -> Result<()> {
        self.inc(0, self.cs);
        let (l1_offset, l1_size) = (self.h.l1_table_offset, self.h.l1_size);
        self.scan_l1(l1_offset, l1_size, true, &Owner::Active)?;

        if self.data_file && !self.snapshots.is_empty() {
            self.say(format!(
                "ERROR {} snapshots in image with data file",
                self.snapshots.len()
            ));
            self.res.corruptions += 1;
        }
        for sn in std::mem::take(&mut self.snapshots).iter() {
            let owner = Owner::Snapshot(format!("{} ({})", sn.id, sn.name));
            if sn.l1_table_offset % self.cs != 0 {
                self.say(format!(
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id,
                    sn.name,
                    c_hex(sn.l1_table_offset)
                ));
                self.res.corruptions += 1;
                continue;
            }
            if u64::from(sn.l1_size) * 8 > header::MAX_L1_BYTES {
                self.say(format!(
                    "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                    sn.id,
                    sn.name,
                    c_hex(u64::from(sn.l1_size))
                ));
                self.res.corruptions += 1;
                continue;
            }
            self.scan_l1(sn.l1_table_offset, sn.l1_size, false, &owner)?;
        }
        self.inc(self.h.snapshots_offset, self.snapshots_size);

        let (rt_off, rt_len) = (
            self.h.refcount_table_offset,
            u64::from(self.h.refcount_table_clusters) * self.cs,
        );
        if self.inc(rt_off, rt_len) {
            self.refstruct.push((rt_off, rt_len));
        }
        self.bitmaps()?;
        self.check_refblocks()
    }

    /// Counts an L1 table, its L2 tables and everything they map.
    pub(super) fn scan_l1(
        &mut self,
        l1_offset: u64,
        l1_size: u32,
        active: bool,
        owner: &Owner,
    ) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = u64::from(l1_size) * 8;
        self.inc(l1_offset, bytes);
        let mut buf = vec![0u8; bytes as usize];
        read_exact(self.s, &mut buf, l1_offset, "an L1 table")?;
        let l1 = table::decode(&buf);
        let cs = self.cs;
        let l1_span = cs << self.geo.l2_bits();
        let per_window = (WINDOW_BYTES / cs).max(1) as usize;
        let mut tables = Tables::new(cs);
        let mut w = 0;
        while w < l1.len() {
            let end = (w + per_window).min(l1.len());
            let wanted: Vec<u64> = l1[w..end]
                .iter()
                .filter(|&&e| e != 0 && self.l1_drop_reason(e & OFFSET_MASK).is_none())
                .map(|&e| e & OFFSET_MASK)
                .collect();
            tables.load(self.s, &wanted, "an L2 table")?;
            for (i, &entry) in l1.iter().enumerate().take(end).skip(w) {
                if entry == 0 {
                    continue;
                }
                if entry & L1E_RESERVED_MASK != 0 {
                    if self.fixing_errors() {
                        // cowimg: qemu reads through the entry with the bits masked off, so
                        // clearing them changes nothing that is read.
                        self.say(format!(
                            "Repairing L1 entry with reserved bits set: {entry:x}"
                        ));
                        self.res.corruptions_fixed += 1;
                        let clean = entry & !L1E_RESERVED_MASK;
                        self.edits
                            .insert(l1_offset + 8 * i as u64, clean.to_be_bytes().to_vec());
                    } else {
                        self.say(format!(
                            "ERROR found L1 entry with reserved bits set: {entry:x}"
                        ));
                        self.res.corruptions += 1;
                    }
                }
                let l2_offset = entry & OFFSET_MASK;
                if let Some(why) = self.l1_drop_reason(l2_offset) {
                    // cowimg's extra repair: the table cannot be there, so its mappings are
                    // unknowable; without the entry the range reads as unallocated, which is
                    // also what qemu reads through a table past the end of the file.
                    self.say(format!(
                        "Repairing l2_offset={l2_offset:x}: Table {why}; L1 entry corrupted"
                    ));
                    self.res.corruptions_fixed += 1;
                    self.edits
                        .insert(l1_offset + 8 * i as u64, 0u64.to_be_bytes().to_vec());
                    let guest = i as u64 * l1_span;
                    let reason = format!(
                        "its L2 table at {l2_offset:#x} {why}; the L1 entry was cleared and the range now reads as unallocated (from the backing file, or zeros)"
                    );
                    self.lose(owner, guest, l1_span, reason);
                    continue;
                }
                if active && self.fixing_errors() && self.cut_by_eof(l2_offset) {
                    self.extend_over(owner, l2_offset, i as u64 * l1_span);
                }
                self.inc(l2_offset, cs);
                if l2_offset % cs != 0 {
                    self.say(format!("ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"));
                    self.res.corruptions += 1;
                }
                self.scan_l2(
                    tables.get(l2_offset),
                    l2_offset,
                    i as u64 * l1_span,
                    active,
                    owner,
                );
            }
            w = end;
        }
        Ok(())
    }

    /// Whether the aligned L2 table at `l2_offset` starts inside the file and ends past it (a
    /// file cut short inside the table).
    pub(super) fn cut_by_eof(&self, l2_offset: u64) -> bool {
        l2_offset % self.cs == 0
            && l2_offset < self.file_len
            && l2_offset.saturating_add(self.cs) > self.file_len
    }

    /// cowimg's extra repair of an active L2 table that the end of the file cuts: qemu reads
    /// the missing part as zeros (those entries unallocated), which cowimg's reader refuses to
    /// assume. Extending the file to hold the table writes that reading down (zeros) and
    /// changes nothing that qemu reads; the guest ranges of the entries past the old end are
    /// reported, since what they mapped is unknown.
    pub(super) fn extend_over(&mut self, owner: &Owner, l2_offset: u64, guest: u64) {
        let end = l2_offset + self.cs;
        self.say(format!(
            "Repairing l2_offset={l2_offset:x}: Table is cut by the end of the file; file extended to {end:#x} to hold it"
        ));
        self.res.corruptions_fixed += 1;
        self.extend_to = self.extend_to.max(end);
        let entry_bytes = if self.geo.extended_l2 { 16 } else { 8 };
        let first = (self.file_len - l2_offset) / entry_bytes;
        let entries = self.cs / entry_bytes;
        let reason = format!(
            "its L2 table at {l2_offset:#x} was cut by the end of the file; the entries past it now read as unallocated (from the backing file, or zeros), as qemu reads them"
        );
        self.lose(
            owner,
            guest + first * self.cs,
            (entries - first) * self.cs,
            reason,
        );
    }

    /// Why an L2 table offset cannot be right, when `-r all` is to drop such entries.
    pub(super) fn l1_drop_reason(&self, l2_offset: u64) -> Option<String> {
        if !self.fixing_errors() {
            return None;
        }
        if l2_offset % self.cs != 0 {
            return Some("is not cluster aligned".into());
        }
        if self.past_eof(l2_offset, self.cs) {
            return Some("lies past the end of the file".into());
        }
        self.overlaps_fixed(l2_offset, self.cs)
            .map(|what| format!("overlaps {what}"))
    }

    /// qemu's `check_refcounts_l2`, plus cowimg's dropping of impossible mappings.
    pub(super) fn scan_l2(
        &mut self,
        table: &[u8],
        l2_offset: u64,
        guest_base: u64,
        frag: bool,
        owner: &Owner,
    ) {
        let ext = self.geo.extended_l2;
        let esize = if ext { 16 } else { 8 };
        let cs = self.cs;
        let mut next_contiguous = 0u64;
        for i in 0..(table.len() / esize) {
            let mut entry = be64(table, i * esize);
            let mut bitmap = if ext { be64(table, i * esize + 8) } else { 0 };
            if entry == 0 && bitmap == 0 {
                // Unallocated, nothing to count or check (most entries of a sparse image).
                continue;
            }
            let guest = guest_base + i as u64 * cs;
            let ty = self.classify(entry);
            if ty != Type::Compressed && entry & L2E_STD_RESERVED_MASK != 0 {
                if self.fixing_errors() {
                    // cowimg: qemu masks the bits off when it reads, so clearing them
                    // changes nothing that is read. Later decisions use the clean entry.
                    self.say(format!(
                        "Repairing l2 entry with reserved bits set: {entry:x}"
                    ));
                    self.res.corruptions_fixed += 1;
                    entry &= !L2E_STD_RESERVED_MASK;
                    self.edit_l2(l2_offset, i, entry, bitmap);
                } else {
                    self.say(format!(
                        "ERROR found l2 entry with reserved bits set: {entry:x}"
                    ));
                    self.res.corruptions += 1;
                }
            }
            match ty {
                Type::Compressed => {
                    let (coffset, csize) = self.geo.compressed(entry & !OFLAG_COPIED);
                    if entry & OFLAG_COPIED != 0 {
                        let mask = (1u64 << (62 - (self.h.cluster_bits - 8))) - 1;
                        if self.fixing_errors() {
                            // cowimg: the flag has one right value here, so set it.
                            self.say(format!(
                                "Repairing coffset={:#x}: copied flag must never be set for compressed clusters",
                                entry & mask
                            ));
                            self.res.corruptions_fixed += 1;
                            self.edit_l2(l2_offset, i, entry & !OFLAG_COPIED, bitmap);
                        } else {
                            self.say(format!(
                                "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                                entry & mask
                            ));
                            self.res.corruptions += 1;
                        }
                    }
                    if self.data_file {
                        self.say(format!(
                            "ERROR compressed cluster {i} with data file, entry={entry:#x}"
                        ));
                        self.res.corruptions += 1;
                        continue;
                    }
                    if bitmap != 0 {
                        self.say(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={entry:#x}"
                        ));
                        self.res.corruptions += 1;
                        continue;
                    }
                    if self.fixing_errors() && self.past_eof(coffset, csize) {
                        self.say(format!(
                            "Repairing coffset={coffset:#x}: Compressed cluster lies past the end of the file; L2 entry corrupted."
                        ));
                        self.res.corruptions_fixed += 1;
                        let (e, b) = self.dropped_entry(bitmap, true);
                        self.edit_l2(l2_offset, i, e, b);
                        let reason = format!(
                            "its compressed data at {coffset:#x} lies past the end of the file; the cluster now reads as zeros"
                        );
                        self.lose(owner, guest, cs, reason);
                        continue;
                    }
                    self.inc(coffset, csize);
                    if frag {
                        self.res.allocated_clusters += 1;
                        self.res.compressed_clusters += 1;
                        // Compressed clusters are fragmented by nature (qemu counts them so).
                        self.res.fragmented_clusters += 1;
                    }
                }
                Type::ZeroAlloc | Type::Normal => {
                    let offset = entry & OFFSET_MASK;
                    let both = (bitmap >> 32) & bitmap & BITMAP_ALL_ALLOC;
                    if both != 0 {
                        if self.fixing_errors() {
                            // cowimg: qemu cannot read such subclusters (I/O error); they
                            // become zero subclusters, reported lost.
                            self.say(format!(
                                "Repairing offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                            ));
                            self.res.corruptions_fixed += 1;
                            bitmap &= !both;
                            self.edit_l2(l2_offset, i, entry, bitmap);
                            self.lose_subclusters(
                                owner,
                                guest,
                                both,
                                "are marked both allocated and zero",
                            );
                        } else {
                            self.res.corruptions += 1;
                            self.say(format!(
                                "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                            ));
                        }
                    }
                    let contains_data = if ext {
                        bitmap & BITMAP_ALL_ALLOC != 0
                    } else {
                        entry & OFLAG_ZERO == 0
                    };
                    if offset % cs != 0 {
                        if !contains_data {
                            if self.fixing_errors() {
                                // As qemu: a preallocated zero cluster just becomes a zero one.
                                self.say(format!(
                                    "Repairing offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                                ));
                                self.res.corruptions_fixed += 1;
                                let (e, b) = self.dropped_entry(bitmap, false);
                                self.edit_l2(l2_offset, i, e, b);
                                continue;
                            }
                            self.say(format!(
                                "ERROR offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                            ));
                            self.res.corruptions += 1;
                        } else if self.fixing_errors() {
                            self.drop_data(
                                l2_offset,
                                i,
                                entry,
                                bitmap,
                                guest,
                                owner,
                                "is not properly aligned",
                            );
                            continue;
                        } else {
                            self.say(format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                            self.res.corruptions += 1;
                        }
                    }
                    if self.fixing_errors() && !self.data_file {
                        let why = if self.past_eof(offset, cs) {
                            Some("lies past the end of the file".to_string())
                        } else {
                            self.overlaps_fixed(offset, cs)
                                .map(|what| format!("overlaps {what}"))
                        };
                        if let Some(why) = why {
                            if contains_data {
                                self.drop_data(l2_offset, i, entry, bitmap, guest, owner, &why);
                            } else {
                                self.say(format!("Repairing offset={offset:x}: Preallocated cluster {why}; L2 entry corrupted."));
                                self.res.corruptions_fixed += 1;
                                let (e, b) = self.dropped_entry(bitmap, false);
                                self.edit_l2(l2_offset, i, e, b);
                            }
                            continue;
                        }
                    }
                    if frag {
                        self.res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset.wrapping_add(cs);
                    }
                    if !self.data_file {
                        self.inc(offset, cs);
                    }
                }
                Type::ZeroPlain => {}
                Type::Unallocated => {
                    let alloc = bitmap & BITMAP_ALL_ALLOC;
                    if alloc != 0 && self.fixing_errors() {
                        // cowimg: qemu cannot read these subclusters (no host cluster to read
                        // them from); they become zero subclusters, reported lost.
                        self.say(format!(
                            "Repairing l2 entry {entry:x}: Unallocated cluster has non-zero subcluster allocation map"
                        ));
                        self.res.corruptions_fixed += 1;
                        let (e, b) = self.dropped_entry(bitmap, false);
                        self.edit_l2(l2_offset, i, e, b);
                        self.lose_subclusters(
                            owner,
                            guest,
                            alloc,
                            "are marked allocated in a cluster without a host offset",
                        );
                    } else if alloc != 0 {
                        self.res.corruptions += 1;
                        self.say(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
    }

    /// cowimg's extra repair of a data mapping that cannot be right: the entry is rewritten
    /// to read zeros and the guest range is reported lost.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn drop_data(
        &mut self,
        l2_offset: u64,
        i: usize,
        entry: u64,
        bitmap: u64,
        guest: u64,
        owner: &Owner,
        why: &str,
    ) {
        let offset = entry & OFFSET_MASK;
        self.say(format!(
            "Repairing offset={offset:x}: Data cluster {why}; L2 entry corrupted, mapping dropped."
        ));
        self.res.corruptions_fixed += 1;
        let (e, b) = self.dropped_entry(bitmap, false);
        self.edit_l2(l2_offset, i, e, b);
        let now = if self.h.version >= 3 || self.geo.extended_l2 {
            "the cluster now reads as zeros"
        } else {
            "the cluster is now unallocated (reads from the backing file, or zeros)"
        };
        self.lose(
            owner,
            guest,
            self.cs,
            format!("its data cluster at {offset:#x} {why}; {now}"),
        );
    }

    /// qemu's `qcow2_check_bitmaps_refcounts`.
    pub(super) fn bitmaps(&mut self) -> Result<()> {
        let Some((count, dir_size, dir_offset)) = self.bitmap_extension() else {
            return Ok(());
        };
        if count == 0 {
            return Ok(());
        }
        self.inc(dir_offset, dir_size);
        let Some(ext) = self.h.extension(header::EXT_BITMAPS).map(|e| e.to_vec()) else {
            return Ok(());
        };
        let bitmaps = match snapshot::read_bitmaps(self.s, &ext, self.file_len) {
            Ok((b, _, _)) => b,
            Err(e) => {
                self.say(format!("ERROR bitmap directory: {e}"));
                self.res.corruptions += 1;
                return Ok(());
            }
        };
        for bm in bitmaps {
            let bytes = u64::from(bm.table_size) * 8;
            self.inc(bm.table_offset, bytes);
            if bm.table_offset % self.cs != 0
                || bytes > MAX_BITMAP_TABLE_BYTES
                || bm
                    .table_offset
                    .checked_add(bytes)
                    .is_none_or(|e| e > self.file_len)
            {
                self.say(format!(
                    "ERROR bitmap '{}': the bitmap table is invalid",
                    bm.name
                ));
                self.res.corruptions += 1;
                continue;
            }
            let mut buf = vec![0u8; bytes as usize];
            read_exact(self.s, &mut buf, bm.table_offset, "a bitmap table")?;
            for entry in table::decode(&buf) {
                let offset = entry & BME_OFFSET_MASK;
                if entry & BME_RESERVED_MASK != 0
                    || (offset != 0 && (entry & BME_ALL_ONES != 0 || offset % self.cs != 0))
                {
                    self.res.corruptions += 1;
                    continue;
                }
                if offset != 0 {
                    self.inc(offset, self.cs);
                }
            }
        }
        Ok(())
    }

    pub(super) fn read_reftable(&self) -> Result<Vec<u64>> {
        let mut buf = vec![0u8; self.h.refcount_table_clusters as usize * self.cs as usize];
        read_exact(
            self.s,
            &mut buf,
            self.h.refcount_table_offset,
            "the refcount table",
        )?;
        Ok(table::decode(&buf))
    }

    /// qemu's `check_refblocks`: every refcount block is counted and must be used once.
    pub(super) fn check_refblocks(&mut self) -> Result<()> {
        let reftable = self.read_reftable()?;
        for (i, &e) in reftable.iter().enumerate() {
            let offset = reftable_block(e);
            let cluster = offset / self.cs;
            if e & REFT_RESERVED_MASK != 0 {
                self.say(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.res.corruptions += 1;
                self.rebuild = true;
                continue;
            }
            if offset % self.cs != 0 {
                self.say(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                self.res.corruptions += 1;
                self.rebuild = true;
                continue;
            }
            if cluster >= self.refs.len() {
                // qemu grows the file to hold the block; cowimg rebuilds the structures
                // instead (a hostile offset would otherwise make a huge file).
                self.say(format!("ERROR refcount block {i} is outside image"));
                self.res.corruptions += 1;
                if self.fixing_errors() {
                    self.rebuild = true;
                }
                continue;
            }
            if offset != 0 {
                if self.inc(offset, self.cs) {
                    self.refstruct.push((offset, self.cs));
                }
                let r = self.refs.get(cluster);
                if r != 1 {
                    self.say(format!("ERROR refcount block {i} refcount={r}"));
                    self.res.corruptions += 1;
                    self.rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Writes the entry rewrites the scan decided (dropped mappings), then syncs: references
    /// go before the refcount decrements that follow.
    pub(super) fn apply_edits(&mut self) -> Result<()> {
        if self.extend_to > self.file_len {
            // First, so that the entry rewrites below never land past the end of the file.
            self.s
                .set_len(self.extend_to)
                .map_err(|e| Error::io("extending the file over a cut L2 table", e))?;
            sync(self.s)?;
        }
        if self.edits.is_empty() {
            return Ok(());
        }
        for (&off, bytes) in &self.edits {
            write_all(self.s, bytes, off, "a table entry")?;
        }
        self.edits.clear();
        sync(self.s)
    }
}
