//! Changing a qcow2 image's virtual size, and emptying it (what `commit` does to the image it
//! committed).
//!
//! Every step keeps the image consistent at every instant, in the order of `alloc`'s commit:
//! - growing past the L1 table: a new, larger L1 table is written at the end of the file and
//!   counted (synced), then one header write switches size, `l1_size` and `l1_table_offset`
//!   together (synced), and only then is the old table freed. An interruption before the
//!   switch leaves the old image and a leaked table, never a reference to something unwritten;
//! - shrinking: the size changes first (one header write), so the guest sees the old disk or
//!   the new one and nothing in between; the clusters past the new end are dropped after,
//!   entries first, refcounts last. An interruption after the switch leaves clusters past the
//!   end still allocated, which a second run (or `check -r leaks` once nothing points at them)
//!   gives back;
//! - emptying: L1 entries are cleared (synced) before the tables and clusters they reached are
//!   freed; an interruption leaves some tables emptied and the others as they were.

use super::alloc::Writing;
use super::cache::Meta;
use super::header::MAX_L1_BYTES;
use super::table::{self, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::Qcow2;
use crate::io::{sync, write_all};
use crate::util::align_up;
use crate::{Error, Prealloc, Result};

impl Qcow2 {
    pub(super) fn resize_impl(&self, size: u64, prealloc: Prealloc) -> Result<()> {
        crate::check_size(size)?;
        if size % 512 != 0 {
            return Err(Error::invalid("The new size must be a multiple of 512"));
        }
        let old = self.size();
        if prealloc != Prealloc::Off && size < old {
            return Err(Error::invalid(
                "Preallocation can only be used for growing images",
            ));
        }
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        if m.header.nb_snapshots > 0 && m.header.version < 3 {
            return Err(Error::Refused(
                "Can't resize a v2 image which has snapshots".into(),
            ));
        }
        let mut m = self.prepare_write(&mut m)?;
        if m.has_staged() {
            return Err(Error::Refused(
                "internal: resize with uncommitted writes".into(),
            ));
        }
        let need_l1 = size.div_ceil(self.l2_span());
        if need_l1 * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "Failed to grow the L1 table: File too large (a {} byte image needs {need_l1} L1 entries; qcow2 allows {} with {} byte clusters)",
                size,
                MAX_L1_BYTES / 8,
                self.geo.cluster_size()
            )));
        }
        let result = if need_l1 > m.l1.len() as u64 {
            self.grow_l1(&mut m, size, need_l1 as usize)
        } else {
            m.header.size = size;
            self.write_fixed_header(&m)
        };
        // Whatever happened, the tables are read again from disk by the next write.
        let done = result.and_then(|()| {
            self.size.store(size, std::sync::atomic::Ordering::Relaxed);
            if size < old {
                self.discard_from(&mut m, align_up(size, self.geo.cluster_size()))
            } else if prealloc != Prealloc::Off {
                self.preallocate(&mut m, old, size, prealloc != Prealloc::Metadata)
            } else {
                Ok(())
            }
        });
        Self::forget_tables(&mut m);
        done
    }

    /// Writes the header's fixed fields (size, L1 and refcount table pointers) in one write,
    /// synced.
    fn write_fixed_header(&self, m: &Meta) -> Result<()> {
        let s = &*self.storage;
        write_all(s, &m.header.encode_fixed(), 0, "the header")?;
        sync(s)
    }

    /// Moves the active L1 table to a new one of `entries` entries and sets the size to
    /// `size`, in the order the module comment describes.
    fn grow_l1(&self, m: &mut Writing, size: u64, entries: usize) -> Result<()> {
        let cs = self.geo.cluster_size();
        let bytes = entries as u64 * 8;
        let clusters = bytes.div_ceil(cs);
        let alloc = m.alloc();
        let host = alloc.reserve(clusters);
        let mut l1 = m.l1.clone();
        l1.resize(entries, 0);
        let mut buf = table::encode(&l1);
        buf.resize((clusters * cs) as usize, 0);
        write_all(&*self.storage, &buf, host, "the new L1 table")?;
        // Written, counted and synced before the header points at it.
        self.commit_locked(m)?;
        let (old_offset, old_len) = (m.header.l1_table_offset, u64::from(m.header.l1_size) * 8);
        m.header.l1_table_offset = host;
        m.header.l1_size = entries as u32;
        m.header.size = size;
        self.write_fixed_header(m)?;
        m.l1 = l1;
        if old_len > 0 {
            self.free_now(m, old_offset, old_len)?;
        }
        Ok(())
    }

    /// Drops every cluster of the active tables at guest offsets from `from` (a cluster
    /// boundary) on: whole L2 tables past it leave the L1 table, entries of the table that
    /// straddles it are cleared. One commit per L2 table keeps the memory bounded.
    fn discard_from(&self, m: &mut Writing, from: u64) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let span = self.l2_span();
        for l1i in 0..m.l1.len() {
            let l2 = m.l1[l1i] & OFFSET_MASK;
            let (start, end) = (l1i as u64 * span, (l1i as u64 + 1) * span);
            if l2 == 0 || end <= from {
                continue;
            }
            if start >= from {
                // The whole table goes: each cluster it reaches loses the active L1's
                // reference, and so does the table (a table shared with a snapshot keeps the
                // snapshot's).
                let words = m.l2_table(&*self.storage, &geo, l2)?.words.clone();
                let step = if geo.extended_l2 { 2 } else { 1 };
                let mut frees: Vec<(u64, u64)> = words
                    .iter()
                    .step_by(step)
                    .filter_map(|&e| self.entry_host(e))
                    .collect();
                frees.push((l2, cs));
                m.l1[l1i] = 0;
                m.l1_dirty.insert(l1i);
                let alloc = m.alloc();
                for (h, l) in frees {
                    alloc.free_range(h, l);
                }
            } else {
                let mut cluster = from;
                while cluster < end {
                    let (entry, bitmap) = self.entry_at(m, cluster)?;
                    if entry != 0 || bitmap != 0 {
                        self.set_entry(m, cluster, 0, 0)?;
                        if let Some((h, l)) = self.entry_host(entry) {
                            m.alloc().free_range(h, l);
                        }
                    }
                    cluster += cs;
                }
            }
            self.commit_locked(m)?;
        }
        Ok(())
    }

    /// The host bytes an L2 entry holds (a data cluster, a preallocated zero cluster, or a
    /// compressed cluster's bytes).
    pub(super) fn entry_host(&self, entry: u64) -> Option<(u64, u64)> {
        if entry & OFLAG_COMPRESSED != 0 {
            return Some(self.geo.compressed(entry));
        }
        let host = entry & OFFSET_MASK;
        (host != 0).then_some((host, self.geo.cluster_size()))
    }

    /// Allocates the clusters of `[old, new)` that start at or after `old` (qemu leaves the
    /// cluster holding `old` as it is too): table entries pointing at fresh clusters, with
    /// zeros written into them when `zeros` (full, falloc), a hole in the file otherwise
    /// (metadata). The file is extended before anything points past its end.
    fn preallocate(&self, m: &mut Writing, old: u64, new: u64, zeros: bool) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let span = self.l2_span();
        let s = &*self.storage;
        // With extended L2 every subcluster of a fresh cluster is allocated.
        let bitmap = if geo.extended_l2 {
            u64::from(u32::MAX)
        } else {
            0
        };
        let zero_buf = vec![0u8; if zeros { cs as usize } else { 0 }];
        let mut cluster = align_up(old, cs);
        while cluster < new {
            let table_end = new.min((cluster / span + 1) * span);
            while cluster < table_end {
                let (entry, _) = self.entry_at(m, cluster)?;
                if entry == 0 {
                    let host = m.alloc().reserve(1);
                    if zeros {
                        write_all(s, &zero_buf, host, "preallocated zeros")?;
                    }
                    self.set_entry(m, cluster, host | OFLAG_COPIED, bitmap)?;
                }
                cluster += cs;
            }
            let end = m.alloc().end;
            if end > m.file_len {
                s.set_len(end)
                    .map_err(|e| Error::io("extending the file for preallocation", e))?;
                m.file_len = end;
            }
            self.commit_locked(m)?;
        }
        Ok(())
    }

    pub(super) fn make_empty_impl(&self) -> Result<()> {
        self.exclusively("emptying", |m| {
            self.discard_from(m, 0)?;
            // Give back the end of the file that nothing uses any more: a fresh start of the
            // allocator checks the image and cuts the unreferenced tail.
            Self::forget_tables(m);
            self.prepare_write(m).map(drop)
        })
    }

    /// Frees the clusters of `[offset, offset + len)` (a table nothing points at any more)
    /// and commits.
    pub(super) fn free_now(&self, m: &mut Writing, offset: u64, len: u64) -> Result<()> {
        m.alloc().free_range(offset, len);
        self.commit_locked(m)
    }

    /// Runs a change of the table layout (`what`, for the message) holding the image alone,
    /// prepared for writing with nothing staged, and drops the in-memory tables afterwards
    /// whatever happened, so that the next write reads them from disk.
    pub(super) fn exclusively(
        &self,
        what: &str,
        f: impl FnOnce(&mut Writing) -> Result<()>,
    ) -> Result<()> {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        let mut m = self.prepare_write(&mut m)?;
        if m.has_staged() {
            return Err(Error::Refused(format!(
                "internal: {what} with uncommitted writes"
            )));
        }
        let done = f(&mut m);
        Self::forget_tables(&mut m);
        done
    }

    /// Drops the in-memory tables and allocation state after the table layout changed, so
    /// that the next write reads them from disk and maps the metadata again.
    pub(super) fn forget_tables(m: &mut Meta) {
        m.alloc = None;
        m.metadata = None;
        m.l2.retain(|_, slot| slot.new || slot.dirty.is_some());
    }
}
