//! `check` for QED, counting as qemu's `qed_check` (block/qed-check.c) counts: every L1 and L2
//! offset must be cluster aligned, behind the header and inside the file (a table with room
//! for all its clusters); each cluster may be referenced once; clusters after the header that
//! nothing references are leaks. Statistics (allocated, fragmented) are gathered per L2 table.
//!
//! Repair (any `-r`, as qemu): invalid entries are cleared (the range then reads from the
//! backing file, or zeros), and the need-check bit is cleared when no corruption remains.
//! cowimg also, where qemu leaves the problem:
//!
//! * gives back leaked clusters at the end of the file (truncation; QED allocates by
//!   appending, so space inside the file cannot be reused and stays leaked, as in qemu);
//! * with `-r all`, gives a data cluster referenced twice a private copy for every reference
//!   after the first, so both guest ranges keep reading what they read and a write to one no
//!   longer changes the other.
//!
//! Write order: cleared entries, sync; truncation, sync; copies, sync; their entries, sync;
//! the need-check bit last, sync. Nothing is pointed to before it is on disk.

use std::collections::BTreeMap;

use super::header::{self, Header};
use super::table::Pages;
use super::{Meta, Qed};
use crate::io::{read_exact, sync, write_all, Storage};
use crate::util::{align_down, align_up, le64};
use crate::{CheckMode, CheckReport, Error, LostData, Result};

/// Bytes of a table read per request.
const PAGE_BYTES: u64 = 8 << 20;
/// Most clusters a checked file may have (qcow2's limit, qemu's `int` counters).
const MAX_CLUSTERS: u64 = i32::MAX as u64;

/// One bit per cluster, in chunks allocated on first use (a sparse file of absurd length
/// costs nothing until its clusters are referenced).
struct Bits {
    chunks: Vec<Option<Box<[u64]>>>,
    len: u64,
}

const BITS_CHUNK: u64 = 1 << 16;

impl Bits {
    fn new(len: u64) -> Bits {
        Bits {
            chunks: (0..len.div_ceil(BITS_CHUNK)).map(|_| None).collect(),
            len,
        }
    }

    fn get(&self, i: u64) -> bool {
        match self.chunks.get((i / BITS_CHUNK) as usize) {
            Some(Some(c)) => {
                let j = i % BITS_CHUNK;
                c[(j / 64) as usize] & (1 << (j % 64)) != 0
            }
            _ => false,
        }
    }

    fn set(&mut self, i: u64) {
        if i >= self.len {
            return;
        }
        let c = self.chunks[(i / BITS_CHUNK) as usize]
            .get_or_insert_with(|| vec![0u64; (BITS_CHUNK / 64) as usize].into_boxed_slice());
        let j = i % BITS_CHUNK;
        c[(j / 64) as usize] |= 1 << (j % 64);
    }

    /// Clusters in `[from, len)` that are not set, and one past the last set one.
    fn unset_and_end(&self, from: u64) -> (u64, u64) {
        let mut unset = 0;
        let mut end = 0;
        for (ci, c) in self.chunks.iter().enumerate() {
            let base = ci as u64 * BITS_CHUNK;
            let hi = (base + BITS_CHUNK).min(self.len);
            let lo = base.max(from);
            match c {
                None => unset += hi.saturating_sub(lo),
                Some(words) => {
                    for i in base..hi {
                        let j = i - base;
                        let set = words[(j / 64) as usize] & (1 << (j % 64)) != 0;
                        if set {
                            end = i + 1;
                        } else if i >= from {
                            unset += 1;
                        }
                    }
                }
            }
        }
        (unset, end)
    }
}

/// A data cluster referenced again: where the second reference is.
struct Dup {
    entry_at: u64,
    host: u64,
    guest: u64,
}

struct Checker<'a, 'l> {
    s: &'a dyn Storage,
    h: Header,
    cs: u64,
    /// The file length in whole sectors, rounded down to whole clusters (qemu's `file_size`).
    file_size: u64,
    mode: CheckMode,
    log: &'l mut dyn FnMut(&str),
    used: Bits,
    res: CheckReport,
    /// Entry rewrites (file offset of a little-endian entry -> new value).
    edits: BTreeMap<u64, u64>,
    dups: Vec<Dup>,
}

impl Checker<'_, '_> {
    fn say(&mut self, line: String) {
        (self.log)(&line);
    }

    fn valid_cluster(&self, off: u64) -> bool {
        off % self.cs == 0 && off >= self.h.header_bytes() && off < self.file_size
    }

    fn valid_table(&self, off: u64) -> bool {
        match off.checked_add(self.h.table_bytes() - self.cs) {
            Some(last) => self.valid_cluster(off) && self.valid_cluster(last),
            None => false,
        }
    }

    /// Why an offset is invalid, in words.
    fn why(&self, off: u64) -> &'static str {
        if off % self.cs != 0 {
            "is not cluster aligned"
        } else if off < self.h.header_bytes() {
            "lies inside the header"
        } else {
            "lies past the end of the file"
        }
    }

    /// qemu's `qed_set_used_clusters`: counts a corruption for every cluster already used.
    fn set_used(&mut self, offset: u64, n: u64) -> u64 {
        let first = offset / self.cs;
        let mut again = 0;
        for c in first..first + n {
            if self.used.get(c) {
                again += 1;
            }
            self.used.set(c);
        }
        self.res.corruptions += again;
        again
    }

    fn lose(&mut self, offset: u64, length: u64, reason: String) {
        let length = length.min(self.h.image_size.saturating_sub(offset));
        if length > 0 {
            self.res.lost.push(LostData {
                layer: "active layer".into(),
                offset,
                length,
                reason,
            });
        }
    }

    /// Reads `bytes` of a table at `offset` in pages, handing each page's entries to `f`
    /// with the index of its first entry.
    fn for_pages(
        &mut self,
        offset: u64,
        bytes: u64,
        mut f: impl FnMut(&mut Self, u64, &[u8]),
    ) -> Result<()> {
        let mut pos = 0;
        let mut buf = vec![0u8; bytes.min(PAGE_BYTES) as usize];
        while pos < bytes {
            let n = (bytes - pos).min(PAGE_BYTES) as usize;
            read_exact(self.s, &mut buf[..n], offset + pos, "a QED table")?;
            let page = buf[..n].to_vec();
            f(self, pos / 8, &page);
            pos += n as u64;
        }
        Ok(())
    }

    fn scan(&mut self) -> Result<()> {
        let h = self.h.clone();
        let n = h.table_entries();
        let cs = self.cs;
        self.set_used(h.l1_table_offset, u64::from(h.table_size));
        let mut tables: Vec<(u64, u64)> = Vec::new();
        self.for_pages(h.l1_table_offset, h.table_bytes(), |c, first, page| {
            for (k, e) in page.chunks_exact(8).enumerate() {
                let l1i = first + k as u64;
                let table = le64(e, 0);
                if table == 0 {
                    continue;
                }
                if !c.valid_table(table) {
                    let why = c.why(table);
                    let why = if why == "lies past the end of the file" { "leaves no room for the table" } else { why };
                    if c.mode.repairs() {
                        c.say(format!("Repairing L1 entry {l1i}: L2 table offset {table:#x} {why}; entry cleared"));
                        c.res.corruptions_fixed += 1;
                        c.edits.insert(h.l1_table_offset + 8 * l1i, 0);
                        let reason = format!(
                            "its L2 table offset {table:#x} {why}; the L1 entry was cleared and the range now reads from the backing file (or zeros)"
                        );
                        c.lose(l1i * n * cs, n * cs, reason);
                    } else {
                        c.say(format!("ERROR L1 entry {l1i}: L2 table offset {table:#x} {why}"));
                        c.res.corruptions += 1;
                    }
                    continue;
                }
                tables.push((l1i, table));
            }
        })?;
        for (l1i, table) in tables {
            let ts = u64::from(h.table_size);
            let again = (table / cs..table / cs + ts)
                .filter(|&c| self.used.get(c))
                .count() as u64;
            if again > 0 && self.mode == CheckMode::RepairAll {
                // cowimg: certain cases only. An entry past the image's end maps nothing the
                // guest can read; a "table" on the header or the L1 table (whose places the
                // header gives) cannot be one. Clearing them loses nothing readable.
                let beyond = l1i * n * cs >= h.image_size;
                let l1_clusters = h.l1_table_offset / cs..h.l1_table_offset / cs + ts;
                let on_fixed = (table / cs..table / cs + ts)
                    .any(|c| c < u64::from(h.header_size) || l1_clusters.contains(&c));
                if beyond || on_fixed {
                    let why = if beyond {
                        "lies past the end of the image"
                    } else {
                        "overlaps the header or the L1 table"
                    };
                    self.say(format!(
                        "Repairing L1 entry {l1i}: L2 table at {table:#x} {why}; entry cleared"
                    ));
                    self.res.corruptions_fixed += 1;
                    self.edits.insert(h.l1_table_offset + 8 * l1i, 0);
                    if !beyond {
                        let reason = format!(
                            "its L2 table at {table:#x} {why}; the L1 entry was cleared and the range now reads from the backing file (or zeros)"
                        );
                        self.lose(l1i * n * cs, n * cs, reason);
                    }
                    continue;
                }
            }
            if self.set_used(table, ts) > 0 {
                self.say(format!(
                    "ERROR L1 entry {l1i}: L2 table at {table:#x} overlaps clusters already in use; table skipped"
                ));
                continue;
            }
            let mut last = 0u64;
            self.for_pages(table, h.table_bytes(), |c, first, page| {
                for (k, e) in page.chunks_exact(8).enumerate() {
                    let idx = first + k as u64;
                    let off = le64(e, 0);
                    if off <= 1 {
                        continue;
                    }
                    c.res.allocated_clusters += 1;
                    if last != 0 && last.wrapping_add(cs) != off {
                        c.res.fragmented_clusters += 1;
                    }
                    last = off;
                    let guest = (l1i * n + idx) * cs;
                    if !c.valid_cluster(off) {
                        let why = c.why(off);
                        if c.mode.repairs() {
                            c.say(format!(
                                "Repairing L2 entry {idx} of table {table:#x}: data cluster offset {off:#x} {why}; entry cleared"
                            ));
                            c.res.corruptions_fixed += 1;
                            c.edits.insert(table + 8 * idx, 0);
                            let reason = format!(
                                "its data cluster offset {off:#x} {why}; the entry was cleared and the cluster now reads from the backing file (or zeros)"
                            );
                            c.lose(guest, cs, reason);
                        } else {
                            c.say(format!(
                                "ERROR L2 entry {idx} of table {table:#x}: data cluster offset {off:#x} {why}"
                            ));
                            c.res.corruptions += 1;
                        }
                        continue;
                    }
                    if c.set_used(off, 1) > 0 {
                        c.say(format!("ERROR cluster {} is referenced more than once (guest offset {guest:#x})", off / cs));
                        c.dups.push(Dup { entry_at: table + 8 * idx, host: off, guest });
                    }
                }
            })?;
        }
        Ok(())
    }

    /// Writes cleared entries, then syncs.
    fn apply_edits(&mut self) -> Result<()> {
        if self.edits.is_empty() {
            return Ok(());
        }
        for (&at, &v) in &self.edits {
            write_all(self.s, &v.to_le_bytes(), at, "a QED table entry")?;
        }
        self.edits.clear();
        sync(self.s)
    }

    /// Gives every data cluster referenced twice a private copy for the later references.
    /// Copies go past the end of the file and are synced before the entries switch to them.
    fn copy_dups(&mut self) -> Result<()> {
        if self.dups.is_empty() {
            return Ok(());
        }
        let len = self
            .s
            .len()
            .map_err(|e| Error::io("reading the file size", e))?;
        let mut end = align_up(len, self.cs);
        let mut buf = vec![0u8; self.cs as usize];
        let mut switches = Vec::new();
        for d in std::mem::take(&mut self.dups) {
            read_exact(self.s, &mut buf, d.host, "a data cluster")?;
            write_all(self.s, &buf, end, "a copy of a shared data cluster")?;
            switches.push((d.entry_at, end, d.host, d.guest));
            end += self.cs;
        }
        sync(self.s)?;
        for &(at, new, old, guest) in &switches {
            write_all(self.s, &new.to_le_bytes(), at, "a QED table entry")?;
            self.say(format!(
                "Repairing cluster {} referenced more than once: guest offset {guest:#x} now has its own copy at {new:#x}",
                old / self.cs
            ));
            self.res.corruptions -= 1;
            self.res.corruptions_fixed += 1;
        }
        sync(self.s)
    }
}

/// The check pass. The caller holds the image exclusively.
pub(super) fn run(
    img: &Qed,
    m: &mut Meta,
    mode: CheckMode,
    log: &mut dyn FnMut(&str),
) -> Result<CheckReport> {
    if mode.repairs() && !img.writable {
        return Err(Error::Refused(
            "repairing needs the image opened read-write".into(),
        ));
    }
    if m.alloc.as_ref().is_some_and(|a| a.dirty) {
        return Err(Error::Refused(
            "internal: check with uncommitted writes".into(),
        ));
    }
    let s: &dyn Storage = &*img.storage;
    let file_len = s.len().map_err(|e| Error::io("reading the file size", e))?;
    let h = m.header.clone();
    let cs = h.cluster_size;
    // qemu's block layer sees files in whole 512-byte sectors, so a partial last cluster
    // that ends within the final sector counts as a whole one (and as a leak if unused).
    let file_size = align_down(file_len.div_ceil(512).saturating_mul(512), cs);
    if file_size / cs > MAX_CLUSTERS {
        // A (sparse) file of absurd length: refuse as qemu does when it cannot allocate
        // its cluster bitmap, rather than walk billions of clusters.
        return Ok(CheckReport {
            check_errors: 1,
            failed: Some("File too large".into()),
            ..CheckReport::default()
        });
    }
    let mut c = Checker {
        s,
        cs,
        file_size,
        mode,
        log,
        used: Bits::new(file_size / cs),
        res: CheckReport {
            total_clusters: h.image_size.div_ceil(cs),
            ..CheckReport::default()
        },
        edits: BTreeMap::new(),
        dups: Vec::new(),
        h,
    };
    let result = (|| {
        c.scan()?;
        if mode.repairs() {
            c.apply_edits()?;
        }
        let header_clusters = u64::from(c.h.header_size);
        let (leaks, used_end) = c.used.unset_and_end(header_clusters);
        c.res.leaks = leaks;
        if mode.repairs() {
            // Leaks at the end of the file can be given back (nothing can reuse space
            // inside the file: QED allocates by appending).
            let keep = (used_end * cs)
                .max(c.h.header_bytes())
                .max(c.h.l1_table_offset + c.h.table_bytes());
            if keep < file_len {
                let tail = (file_size.saturating_sub(keep)) / cs;
                s.set_len(keep).map_err(|e| {
                    Error::io("giving back leaked clusters at the end of the file", e)
                })?;
                sync(s)?;
                if tail > 0 {
                    c.say(format!("Repairing {tail} leaked clusters at the end of the file (file truncated to {keep} bytes)"));
                }
                c.res.leaks -= tail.min(c.res.leaks);
                c.res.leaks_fixed += tail;
            }
            if mode == CheckMode::RepairAll {
                c.copy_dups()?;
            }
            if c.res.corruptions == 0
                && c.res.check_errors == 0
                && m.header.features & header::F_NEED_CHECK != 0
            {
                sync(s)?;
                m.header.features &= !header::F_NEED_CHECK;
                write_all(
                    s,
                    &m.header.features.to_le_bytes(),
                    16,
                    "the header's features",
                )?;
                sync(s)?;
            }
        }
        Ok(())
    })();
    if mode.repairs() {
        refresh(img, m)?;
    }
    result.map(|()| c.res)
}

/// Reloads what a repair may have changed.
fn refresh(img: &Qed, m: &mut Meta) -> Result<()> {
    let s: &dyn Storage = &*img.storage;
    let mut buf = vec![0u8; m.l1.len() * 8];
    read_exact(s, &mut buf, m.header.l1_table_offset, "the L1 table")?;
    m.l1 = buf.chunks_exact(8).map(|e| le64(e, 0)).collect();
    m.l1_dirty.clear();
    m.pages = Pages::new(m.header.table_entries());
    m.file_len = s.len().map_err(|e| Error::io("reading the file size", e))?;
    m.alloc = None;
    Ok(())
}

impl Qed {
    /// Checks (and with a repair mode repairs) the image, handing each per-problem line to
    /// `log` as it is found.
    pub fn check_with(&self, mode: CheckMode, log: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        run(self, &mut m, mode, log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_count_unset_clusters_and_the_end() {
        let mut b = Bits::new(200_000);
        b.set(3);
        b.set(70_000);
        b.set(300_000); // out of range: ignored
        assert!(b.get(3) && b.get(70_000) && !b.get(4));
        let (unset, end) = b.unset_and_end(1);
        assert_eq!(end, 70_001);
        assert_eq!(unset, 200_000 - 1 - 2);
    }
}
