//! Guest writes into a QED image, the crash-safe commit, and header changes.
//!
//! Commit order: data clusters (written by the writers) and new L2 tables, sync; then L2
//! entries in existing tables and L1 entries, sync. Nothing is pointed to before it is on
//! disk, so the need-check bit, which qemu sets to cover its own unordered writes, is not
//! needed and cowimg never sets it.

use std::collections::HashMap;

use super::header::{self, Header};
use super::{Meta, Qed};
use crate::io::{read_exact, sync, write_all};
use crate::util::{align_down, align_up, place_outside};
use crate::{Error, ReadBelow, Result};

/// The image's state, prepared for writing (see [`crate::prepared`]).
type Writing<'m> = crate::prepared::Writing<'m, Meta>;

impl crate::prepared::Allocating for Meta {
    type Allocator = Allocator;
    fn allocator(&mut self) -> Option<&mut Allocator> {
        self.alloc.as_mut()
    }
}

/// Where new clusters go (QED allocates at the end of the file, and never frees).
pub struct Allocator {
    /// Next free host offset (append-only).
    pub end: u64,
    /// Something was written since the last commit.
    pub dirty: bool,
    /// Clusters set aside (by [`Qed::reserve_impl`]) for guest clusters not written yet, by
    /// guest offset.
    set_aside: HashMap<u64, u64>,
}

impl Allocator {
    fn reserve(&mut self, bytes: u64) -> u64 {
        let at = self.end;
        self.end += bytes;
        self.dirty = true;
        at
    }

    /// Sets the next cluster (of `cs` bytes) aside for the guest cluster at `guest`, unless
    /// one is set aside already. Until a write takes it (see [`Self::take`]), no table points
    /// at it.
    fn set_aside(&mut self, guest: u64, cs: u64) {
        if !self.set_aside.contains_key(&guest) {
            self.set_aside.insert(guest, self.end);
            self.end += cs;
        }
    }

    /// A fresh cluster of `cs` bytes for the guest cluster at `guest`: the one set aside for
    /// it, or else the next one.
    fn take(&mut self, guest: u64, cs: u64) -> u64 {
        match self.set_aside.remove(&guest) {
            Some(host) => {
                self.dirty = true;
                host
            }
            None => self.reserve(cs),
        }
    }
}

struct ClusterPlan {
    cluster: u64,
    lo: u64,
    hi: u64,
    host: u64,
    /// Entry before the write: 0 unallocated, 1 zero, else a host offset.
    old: u64,
    fresh: bool,
}

impl Qed {
    /// Prepares the image for writing (the first write checks and loads the allocator);
    /// the state, prepared.
    fn prepare_write<'m>(&self, m: &'m mut Meta) -> Result<Writing<'m>> {
        if m.alloc.is_some() {
            return Ok(Writing::prepared(m));
        }
        if !self.writable {
            return Err(Error::Refused("the image is open read-only".into()));
        }
        if m.header.features & header::F_NEED_CHECK != 0 {
            // As qemu at a read-write open: an image whose writer was interrupted is checked
            // and repaired before anything is allocated. Its messages have no reader here.
            let report = super::check::run(self, m, crate::CheckMode::RepairAll, &mut |_| {})?;
            if report.check_errors > 0 || m.header.features & header::F_NEED_CHECK != 0 {
                return Err(Error::Corrupt(
                    "the image needs a consistency check (QED need-check bit) and the repair could not fix it".into(),
                ));
            }
        }
        if m.header.autoclear_features != 0 {
            // No autoclear bits are defined: a writer must clear the ones it finds.
            m.header.autoclear_features = 0;
            write_all(&*self.storage, &m.header.encode(), 0, "the header")?;
            sync(&*self.storage)?;
        }
        // Allocation appends. Clusters past the last referenced one are leaks of an
        // interrupted writer (ours or qemu's): give the space back before appending, so an
        // interruption does not leave a leak that QED could never reclaim.
        let cs = m.header.cluster_size;
        let end = self.referenced_end(m)?;
        if end < m.file_len {
            self.storage
                .set_len(end)
                .map_err(|e| Error::io("dropping unreferenced clusters at the end", e))?;
            sync(&*self.storage)?;
            m.file_len = end;
        }
        m.alloc = Some(Allocator {
            end: align_up(end, cs),
            dirty: false,
            set_aside: HashMap::new(),
        });
        Ok(Writing::prepared(m))
    }

    /// One past the last byte any table or data cluster of the image uses.
    fn referenced_end(&self, m: &Meta) -> Result<u64> {
        let h = &m.header;
        let cs = h.cluster_size;
        let mut end = h.header_bytes().max(h.l1_table_offset + h.table_bytes());
        let corrupt = |what: &str, off: u64| {
            Error::NeedsRepair(format!(
                "image is corrupt: {what} offset {off:#x} is invalid"
            ))
        };
        // The metadata must not overlap itself, nor any data cluster overlap it: writes through
        // a damaged table would change guest data or other tables (qemu's overlap checks).
        let mut tables = vec![
            (0, h.header_bytes()),
            (h.l1_table_offset, h.l1_table_offset + h.table_bytes()),
        ];
        for &table in m.l1.iter().filter(|&&t| t != 0) {
            Self::check_table_offset(h, table, m.file_len)
                .map_err(|_| corrupt("L2 table", table))?;
            tables.push((table, table + h.table_bytes()));
        }
        tables.sort_unstable();
        if let Some(w) = tables.windows(2).find(|w| w[0].1 > w[1].0) {
            return Err(Error::NeedsRepair(format!(
                "image is corrupt: the table at {:#x} overlaps the header or another table at {:#x}; refusing to write",
                w[1].0, w[0].0
            )));
        }
        let is_table = |c: u64| {
            let i = tables.partition_point(|&(_, e)| e <= c);
            tables.get(i).is_some_and(|&(s, _)| s <= c)
        };
        let mut buf = vec![0u8; h.table_bytes().min(1 << 20) as usize];
        for &table in m.l1.iter().filter(|&&t| t != 0) {
            end = end.max(table + h.table_bytes());
            let mut pos = 0;
            while pos < h.table_bytes() {
                let n = (h.table_bytes() - pos).min(buf.len() as u64) as usize;
                crate::io::read_exact(&*self.storage, &mut buf[..n], table + pos, "an L2 table")?;
                for e in buf[..n]
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                {
                    if e > 1 {
                        if e % cs != 0 || e >= m.file_len || is_table(e) {
                            return Err(corrupt("data cluster", e));
                        }
                        end = end.max(e + cs);
                    }
                }
                pos += n as u64;
            }
        }
        Ok(end)
    }

    /// The (staged) entry of the guest cluster at `cluster`.
    fn entry_at(&self, m: &mut Meta, cluster: u64) -> Result<u64> {
        let (l1i, idx) = locate(&m.header, cluster);
        let table = m.l1.get(l1i).copied().unwrap_or(0);
        if table == 0 {
            return Ok(0);
        }
        if !m.pages.is_new_table(table) {
            Self::check_table_offset(&m.header, table, m.file_len)?;
        }
        m.pages.get(&*self.storage, table, idx)
    }

    /// Sets aside, in call order, the L2 tables and clusters a write of
    /// `[offset, offset + len)` will take (see [`crate::Image::reserve`]).
    pub(super) fn reserve_impl(&self, offset: u64, len: u64) -> Result<()> {
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let (cs, size) = {
            let m = self.meta();
            (m.header.cluster_size, m.header.image_size)
        };
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(());
        }
        // A write in flight holds its clusters from planning to staging (see qcow2).
        let _held = self.clusters.hold(offset / cs, end.div_ceil(cs));
        let mut m = self.meta();
        let mut m = self.prepare_write(&mut m)?;
        let mut cluster = align_down(offset, cs);
        while cluster < end {
            if self.entry_at(&mut m, cluster)? <= 1 {
                self.table_for(&mut m, cluster);
                m.alloc().set_aside(cluster, cs);
            }
            cluster += cs;
        }
        Ok(())
    }

    /// A guest write; with `only_unallocated`, a copy-on-read fill
    /// ([`crate::Image::fill_unallocated`]): the allocation is then read under the held
    /// clusters, so a client write that allocated a cluster first is never overwritten. Returns
    /// the bytes written.
    pub(super) fn write_impl(
        &self,
        offset: u64,
        data: &[u8],
        below: &dyn ReadBelow,
        only_unallocated: bool,
    ) -> Result<u64> {
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let (cs, size) = {
            let m = self.meta();
            (m.header.cluster_size, m.header.image_size)
        };
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "write of {} bytes at {offset} is past the end of the image",
                    data.len()
                ))
            })?;
        let _held = self.clusters.hold(offset / cs, end.div_ceil(cs));
        if only_unallocated {
            return crate::fill_runs(self, offset, data, |start, part| {
                self.write_held(start, start + part.len() as u64, part, below)
            });
        }
        self.write_held(offset, end, data, below)?;
        Ok(data.len() as u64)
    }

    /// A write of `data` to `[offset, end)` whose clusters the caller holds.
    fn write_held(&self, offset: u64, end: u64, data: &[u8], below: &dyn ReadBelow) -> Result<()> {
        let plans = {
            let mut m = self.meta();
            let cs = m.header.cluster_size;
            let mut m = self.prepare_write(&mut m)?;
            let mut plans = Vec::new();
            let mut cluster = align_down(offset, cs);
            while cluster < end {
                let old = self.entry_at(&mut m, cluster)?;
                let fresh = old <= 1;
                let host = if fresh {
                    m.alloc().take(cluster, cs)
                } else {
                    old
                };
                let lo = offset.max(cluster) - cluster;
                let hi = end.min(cluster + cs) - cluster;
                plans.push(ClusterPlan {
                    cluster,
                    lo,
                    hi,
                    host,
                    old,
                    fresh,
                });
                cluster += cs;
            }
            plans
        };
        let cs = self.cluster_bytes();
        let mut i = 0;
        while i < plans.len() {
            let p = &plans[i];
            let at = (p.cluster + p.lo - offset) as usize;
            let full = p.lo == 0 && (p.hi == cs || !p.fresh);
            if !p.fresh || full {
                // Straight from the caller's buffer; merge clusters that continue each other.
                let mut j = i + 1;
                let mut len = (p.hi - p.lo) as usize;
                while j < plans.len()
                    && plans[j].lo == 0
                    && (plans[j].hi == cs || !plans[j].fresh)
                    && plans[j].host == p.host + p.lo + len as u64
                {
                    len += (plans[j].hi - plans[j].lo) as usize;
                    j += 1;
                }
                write_all(
                    &*self.storage,
                    &data[at..at + len],
                    p.host + p.lo,
                    "guest data",
                )?;
                i = j;
                continue;
            }
            let mut buf = vec![0u8; cs as usize];
            if p.old == 0 {
                below.read_below(p.cluster, &mut buf)?;
            }
            buf[p.lo as usize..p.hi as usize]
                .copy_from_slice(&data[at..at + (p.hi - p.lo) as usize]);
            write_all(&*self.storage, &buf, p.host, "guest data")?;
            i += 1;
        }
        let mut m = self.meta();
        let mut m = self.prepare_write(&mut m)?;
        for p in plans.iter() {
            if p.fresh {
                self.set_entry(&mut m, p.cluster, p.host)?;
            }
        }
        m.alloc().dirty = true;
        Ok(())
    }

    fn cluster_bytes(&self) -> u64 {
        self.meta().header.cluster_size
    }

    /// Stages an L2 entry, allocating the L2 table if there is none.
    fn set_entry(&self, m: &mut Writing, cluster: u64, value: u64) -> Result<()> {
        let (_, idx) = locate(&m.header, cluster);
        let table = self.table_for(m, cluster);
        m.pages.set(&*self.storage, table, idx, value)
    }

    /// The L2 table covering the guest cluster at `cluster`, allocated (staged, empty) if
    /// there is none.
    fn table_for(&self, m: &mut Writing, cluster: u64) -> u64 {
        let (l1i, _) = locate(&m.header, cluster);
        let mut table = m.l1[l1i];
        if table == 0 {
            let bytes = m.header.table_bytes();
            table = m.alloc().reserve(bytes);
            m.pages.new_tables.insert(table);
            m.l1[l1i] = table;
            m.l1_dirty.insert(l1i);
        }
        table
    }

    pub(super) fn write_zeroes_impl(
        &self,
        offset: u64,
        len: u64,
        below: &dyn ReadBelow,
    ) -> Result<()> {
        let (cs, size) = {
            let m = self.meta();
            (m.header.cluster_size, m.header.image_size)
        };
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "zero write of {len} bytes at {offset} is past the end of the image"
                ))
            })?;
        let (mid_lo, mid_hi) = (align_up(offset, cs), align_down(end, cs));
        let mut to_write = if mid_lo < mid_hi {
            vec![(offset, mid_lo), (mid_hi, end)]
        } else {
            vec![(offset, end)]
        };
        if mid_lo < mid_hi {
            let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
            let _held = self.clusters.hold(mid_lo / cs, mid_hi / cs);
            let mut m = self.meta();
            let mut m = self.prepare_write(&mut m)?;
            let mut c = mid_lo;
            while c < mid_hi {
                match self.entry_at(&mut m, c)? {
                    // QED cannot free a cluster: an allocated one gets written zeros instead of
                    // being leaked behind a zero entry.
                    e if e > 1 => to_write.push((c, c + cs)),
                    1 => {}
                    _ => {
                        self.set_entry(&mut m, c, 1)?;
                        m.alloc().dirty = true;
                    }
                }
                c += cs;
            }
        }
        let zeros = vec![0u8; (1 << 20).min(len) as usize];
        for (a, b) in to_write {
            let mut pos = a;
            while pos < b {
                let n = (b - pos).min(zeros.len() as u64);
                self.write_impl(pos, &zeros[..n as usize], below, false)?;
                pos += n;
            }
        }
        Ok(())
    }

    pub(super) fn commit_impl(&self) -> Result<()> {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut guard = self.meta();
        let m = &mut *guard;
        let s = &*self.storage;
        let Some(alloc) = m.alloc.as_mut() else {
            return Ok(());
        };
        if !alloc.dirty {
            return Ok(());
        }
        // 1. Data and new tables; a new table must lie whole inside the file.
        let table_ends: Vec<u64> = m
            .pages
            .new_tables
            .iter()
            .map(|t| t + m.header.table_bytes())
            .collect();
        m.pages.write_new(s)?;
        if let Some(&end) = table_ends.iter().max() {
            let len = s.len().map_err(|e| Error::io("reading the file size", e))?;
            if len < end {
                s.set_len(end)
                    .map_err(|e| Error::io("extending the file", e))?;
            }
        }
        sync(s)?;
        // 2. References.
        m.pages.write_dirty(s)?;
        for &i in &m.l1_dirty {
            write_all(
                s,
                &m.l1[i].to_le_bytes(),
                m.header.l1_table_offset + 8 * i as u64,
                "an L1 entry",
            )?;
        }
        m.l1_dirty.clear();
        sync(s)?;
        alloc.dirty = false;
        m.file_len = m
            .file_len
            .max(alloc.end)
            .max(s.len().map_err(|e| Error::io("reading the file size", e))?);
        Ok(())
    }

    /// Header changes must not race writes and need everything staged committed first.
    fn header_for_change(&self, m: &mut Meta) -> Result<Header> {
        let mut m = self.prepare_write(m)?;
        if m.alloc().dirty {
            return Err(Error::Refused(
                "internal: header change with uncommitted writes".into(),
            ));
        }
        Ok(m.header.clone())
    }

    /// Changes the backing file: the new name is written, and synced, where the current header
    /// does not point; then the 64-byte header switches to it in one sector write, synced.
    pub(super) fn set_backing_impl(&self, backing: Option<&crate::BackingRef>) -> Result<()> {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        let mut h = self.header_for_change(&mut m)?;
        let s = &*self.storage;
        h.features &= !(header::F_BACKING_FILE | header::F_BACKING_FORMAT_NO_PROBE);
        match backing {
            None => {
                h.backing_filename_offset = 0;
                h.backing_filename_size = 0;
            }
            Some(b) => {
                if h.compat_features != 0 {
                    // As qemu: the layout of data behind the header is unknown.
                    return Err(Error::Unsupported(
                        "changing the backing file of a QED image with unknown compat features"
                            .into(),
                    ));
                }
                if b.name.len() > header::MAX_BACKING_NAME {
                    return Err(Error::invalid(format!(
                        "backing file name is {} bytes; at most 1023",
                        b.name.len()
                    )));
                }
                let live: Vec<(u64, u64)> = m
                    .backing_name
                    .as_ref()
                    .map(|n| {
                        let a = u64::from(m.header.backing_filename_offset);
                        vec![(a, a + n.len() as u64)]
                    })
                    .unwrap_or_default();
                let hi = header::COWIMG_RECORD_OFFSET.min(h.header_bytes());
                let pos = place_outside(b.name.len() as u64, header::HEADER_LEN as u64, hi, &live)
                    .ok_or_else(|| Error::Refused("No space left in the file header".into()))?;
                write_all(s, b.name.as_bytes(), pos, "the backing file name")?;
                sync(s)?;
                h.features |= header::F_BACKING_FILE;
                if b.format.as_deref() == Some("raw") {
                    h.features |= header::F_BACKING_FORMAT_NO_PROBE;
                }
                h.backing_filename_offset = pos as u32;
                h.backing_filename_size = b.name.len() as u32;
            }
        }
        write_all(s, &h.encode(), 0, "the header")?;
        sync(s)?;
        m.header = h;
        m.backing_name = backing.map(|b| b.name.clone());
        Ok(())
    }

    /// Grows the image: the L1 table has room for the largest image its geometry allows, so
    /// growing is one synced write of the 64-byte header. Shrinking and preallocation are
    /// refused, as by qemu.
    pub(super) fn resize_impl(&self, size: u64, prealloc: crate::Prealloc) -> Result<()> {
        if prealloc != crate::Prealloc::Off {
            return Err(Error::Unsupported(format!(
                "Unsupported preallocation mode '{}'",
                prealloc.name()
            )));
        }
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        let mut h = self.header_for_change(&mut m)?;
        if size % 512 != 0 || size > h.max_image_size() {
            return Err(Error::invalid(format!(
                "Invalid image size specified (a QED image with {} byte clusters and {}-cluster tables holds at most {} bytes, in multiples of 512)",
                h.cluster_size,
                h.table_size,
                h.max_image_size()
            )));
        }
        if size < h.image_size {
            return Err(Error::Unsupported(
                "Shrinking images is currently not supported".into(),
            ));
        }
        // The L1 entries the larger image uses, read before the header makes them live.
        let l1_span = h.table_entries() * h.cluster_size;
        let used = size.div_ceil(l1_span).max(1) as usize;
        let mut l1 = m.l1.clone();
        if used > l1.len() {
            let mut buf = vec![0u8; (used - l1.len()) * 8];
            read_exact(
                &*self.storage,
                &mut buf,
                h.l1_table_offset + 8 * l1.len() as u64,
                "the L1 table",
            )?;
            l1.extend(
                buf.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
            );
        }
        h.image_size = size;
        write_all(&*self.storage, &h.encode(), 0, "the header")?;
        sync(&*self.storage)?;
        m.header = h;
        m.l1 = l1;
        Ok(())
    }

    pub(super) fn set_copy_on_read_impl(&self, on: bool) -> Result<()> {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        let h = self.header_for_change(&mut m)?;
        let rec_lo = header::COWIMG_RECORD_OFFSET;
        let rec_hi = rec_lo + header::COWIMG_RECORD_LEN as u64;
        let name_lo = u64::from(h.backing_filename_offset);
        let name_hi = name_lo + u64::from(h.backing_filename_size);
        if h.header_size == 0 || (m.backing_name.is_some() && name_lo < rec_hi && rec_lo < name_hi)
        {
            return Err(Error::Unsupported(
                "a copy-on-read flag in this QED image: its header area has no room for cowimg's record".into(),
            ));
        }
        let mut flags = m.cowimg_flags;
        if on {
            flags |= header::COWIMG_FLAG_COPY_ON_READ;
        } else {
            flags &= !header::COWIMG_FLAG_COPY_ON_READ;
        }
        write_all(
            &*self.storage,
            &header::encode_record(flags),
            rec_lo,
            "cowimg's record",
        )?;
        sync(&*self.storage)?;
        m.cowimg_flags = flags;
        Ok(())
    }
}

/// (L1 index, L2 index) of a guest offset.
fn locate(h: &Header, guest: u64) -> (usize, u64) {
    let n = h.table_entries();
    let cluster = guest / h.cluster_size;
    ((cluster / n) as usize, cluster % n)
}
