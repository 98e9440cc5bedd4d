//! Creating, applying (reverting to) and deleting internal snapshots, as qemu's
//! `qcow2-snapshot.c` does, with the same refcount rules (a data cluster counts one reference
//! per L1 table it is reachable from, an L2 table one per L1 table naming it) but in an order
//! where every switch is one header write:
//!
//! - create: the snapshot's copy of the active L1 table is written (counted, unreferenced);
//!   the active tables lose their COPIED flags, then every L2 table and data cluster they
//!   reach gains a reference; the new snapshot table is written; one header write switches
//!   the table offset and count; the old table is freed;
//! - apply: the snapshot's referents gain a reference; a copy of its L1 table is written; one
//!   header write switches the active L1 table, its size and the virtual size; then the old
//!   active tables' referents lose a reference, the old L1 table is freed, and entries whose
//!   refcount fell to one get their COPIED flag back;
//! - delete: one header write switches to a table without the snapshot; its referents lose a
//!   reference, its L1 table is freed, and COPIED flags are set where refcounts fell to one.
//!
//! A refcount never lags a reference, so an interruption leaves leaks at worst, except in the
//! one window every snapshot change has (qemu's too): between clearing (or setting) COPIED
//! flags and changing the refcounts they describe, `check` reports OFLAG_COPIED mismatches.
//! Those states are safe (a cleared COPIED flag only makes the next write copy the cluster)
//! and `check -r all`, or running the same command again, puts them right.

use std::time::{SystemTime, UNIX_EPOCH};

use super::alloc::Writing;
use super::cache::Meta;
use super::header::{MAX_L1_BYTES, MAX_SNAPSHOTS};
use super::snapshot::{encode_table, read_snapshots, Snapshot};
use super::table::{self, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::Qcow2;
use crate::io::{read_exact, sync, write_all};
use crate::{Error, Result};

/// Bytes of extra data qemu writes in a new entry: VM state size, disk size, icount.
const EXTRA_LEN: usize = 24;

impl Qcow2 {
    /// The snapshot table as it is on disk now, and its length in bytes.
    fn current_snapshots(&self, m: &Meta) -> Result<(Vec<Snapshot>, u64)> {
        read_snapshots(
            &*self.storage,
            m.header.snapshots_offset,
            m.header.nb_snapshots,
            m.file_len,
        )
    }

    /// Runs a snapshot change exclusively (see [`Qcow2::exclusively`]) and then reads the
    /// snapshot table again for `info`.
    fn with_exclusive(&self, f: impl FnOnce(&mut Writing) -> Result<()>) -> Result<()> {
        self.exclusively("snapshot change", |m| {
            f(m)?;
            let (list, _) = self.current_snapshots(m)?;
            *self.snapshots.write().unwrap_or_else(|e| e.into_inner()) = list;
            Ok(())
        })
    }

    /// Creates a snapshot named `name` of the active state (see the module comment).
    pub(super) fn snapshot_create_impl(&self, name: &str) -> Result<()> {
        if name.len() > u16::MAX as usize {
            return Err(Error::invalid("snapshot name is too long"));
        }
        self.with_exclusive(|m| {
            let (mut list, old_len) = self.current_snapshots(m)?;
            if m.header.refcount_order == 0 && m.l1.iter().any(|e| e & OFFSET_MASK != 0) {
                // One-bit refcounts cannot count a second reference (qemu fails half-way).
                return Err(Error::Refused(
                    "a snapshot of data needs refcounts of at least 2 bits; this image has \
                     refcount_bits=1 (convert it with -o refcount_bits=16 first)"
                        .into(),
                ));
            }
            if list.len() as u64 >= u64::from(MAX_SNAPSHOTS) {
                return Err(Error::Refused("Too many snapshots".into()));
            }
            // qemu's find_new_snapshot_id: one more than the largest numeric id.
            let id = list
                .iter()
                .map(|s| s.id.parse::<u64>().unwrap_or(0))
                .max()
                .unwrap_or(0)
                + 1;
            let active = m.l1.clone();
            self.check_room_for_references(m, &active)?;
            let cs = self.geo.cluster_size();
            let l1_copy: Vec<u64> = m.l1.iter().map(|e| e & !OFLAG_COPIED).collect();
            let l1_offset = if l1_copy.is_empty() {
                0
            } else {
                let clusters = (l1_copy.len() as u64 * 8).div_ceil(cs);
                let host = m.alloc().reserve(clusters);
                let mut buf = table::encode(&l1_copy);
                buf.resize((clusters * cs) as usize, 0);
                write_all(&*self.storage, &buf, host, "the snapshot's L1 table")?;
                host
            };
            self.commit_locked(m)?;
            for (i, &l1e) in active.iter().enumerate() {
                if l1e & OFFSET_MASK != 0 {
                    self.share_l2(m, i)?;
                }
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let size = self.size();
            let mut extra = vec![0u8; EXTRA_LEN];
            extra[8..16].copy_from_slice(&size.to_be_bytes());
            let id = id.to_string();
            list.push(Snapshot {
                l1_table_offset: l1_offset,
                l1_size: l1_copy.len() as u32,
                id: id.clone(),
                name: name.to_string(),
                date_sec: now.as_secs() as u32,
                // qemu-img takes the time in microseconds.
                date_nsec: now.subsec_micros() * 1000,
                vm_clock_nsec: 0,
                vm_state_size: 0,
                icount: Some(0),
                extra,
                id_raw: id.into_bytes(),
                name_raw: name.as_bytes().to_vec(),
            });
            self.switch_snapshot_table(m, &list, old_len)
        })
    }

    /// Makes the L2 table at L1 index `l1i` shared with a snapshot being created: its entries
    /// and its L1 entry lose COPIED (written first), then it and every cluster it reaches
    /// gain a reference.
    fn share_l2(&self, m: &mut Writing, l1i: usize) -> Result<()> {
        let geo = self.geo;
        let l2 = m.l1[l1i] & OFFSET_MASK;
        let slot = m.l2_table(&*self.storage, &geo, l2)?;
        let step = if geo.extended_l2 { 2 } else { 1 };
        let mut refs = vec![(l2, geo.cluster_size())];
        for idx in 0..(slot.words.len() / step) {
            let (entry, bitmap) = slot.entry(idx);
            if entry & OFLAG_COPIED != 0 {
                slot.set_entry(idx, entry & !OFLAG_COPIED, bitmap);
            }
            refs.extend(self.entry_host(entry & !OFLAG_COPIED));
        }
        if m.l1[l1i] & OFLAG_COPIED != 0 {
            m.l1[l1i] &= !OFLAG_COPIED;
            m.l1_dirty.insert(l1i);
        }
        self.commit_locked(m)?;
        let alloc = m.alloc();
        for (host, len) in refs {
            alloc.add_refs(host, len);
        }
        self.commit_locked(m)
    }

    /// Refuses, before anything is changed, a new reference that narrow refcounts cannot
    /// hold (qemu fails half-way there, leaving leaks): every cluster the L1 table `l1`
    /// reaches must have room for one more reference per path to it (several for a host
    /// cluster packed with compressed clusters).
    fn check_room_for_references(&self, m: &mut Writing, l1: &[u64]) -> Result<()> {
        let rgeo = super::refcount::RefGeometry {
            cluster_bits: self.geo.cluster_bits,
            refcount_order: m.header.refcount_order,
        };
        if rgeo.bits() >= 32 {
            // Billions of references to one cluster: not reachable by a table walk.
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let s = &*self.storage;
        let mut wanted: std::collections::HashMap<u64, u64> = Default::default();
        for &l1e in l1 {
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            for (host, len) in self.l2_referents(m, l2)? {
                let mut c = host / cs * cs;
                while c < host + len {
                    *wanted.entry(c).or_default() += 1;
                    c += cs;
                }
            }
        }
        let file_len = m.file_len;
        let alloc = m.alloc();
        for (&c, &n) in &wanted {
            let now = alloc.refcount(s, c, file_len)?;
            if now.saturating_add(n) > rgeo.max() {
                return Err(Error::Refused(format!(
                    "the cluster at {c:#x} would need {} references, more than refcount_bits={}                      can count ({}); convert the image with -o refcount_bits=16 first",
                    now + n,
                    rgeo.bits(),
                    rgeo.max()
                )));
            }
        }
        Ok(())
    }

    /// Finds a snapshot as qemu does: by id first, then by name (the first match).
    fn find_snapshot(list: &[Snapshot], id_or_name: &str) -> Option<usize> {
        list.iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| list.iter().position(|s| s.name == id_or_name))
    }

    /// Reads and validates a snapshot's L1 table.
    pub(super) fn snapshot_l1(&self, m: &Meta, sn: &Snapshot) -> Result<Vec<u64>> {
        let bytes = u64::from(sn.l1_size) * 8;
        let cs = self.geo.cluster_size();
        if bytes > MAX_L1_BYTES
            || sn.l1_table_offset % cs != 0
            || sn.l1_table_offset.saturating_add(bytes) > m.file_len
        {
            return Err(Error::Corrupt(format!(
                "snapshot {} ({}) has an invalid L1 table (offset {:#x}, {} entries)",
                sn.id, sn.name, sn.l1_table_offset, sn.l1_size
            )));
        }
        let mut buf = vec![0u8; bytes as usize];
        read_exact(
            &*self.storage,
            &mut buf,
            sn.l1_table_offset,
            "a snapshot's L1 table",
        )?;
        Ok(table::decode(&buf))
    }

    /// Host ranges one L1 table's L2 table at `l2` reaches, the table itself included.
    fn l2_referents(&self, m: &mut Meta, l2: u64) -> Result<Vec<(u64, u64)>> {
        let geo = self.geo;
        let slot = m.l2_table(&*self.storage, &geo, l2)?;
        let step = if geo.extended_l2 { 2 } else { 1 };
        let mut refs = vec![(l2, geo.cluster_size())];
        refs.extend(
            slot.words
                .iter()
                .step_by(step)
                .filter_map(|&e| self.entry_host(e & !OFLAG_COPIED)),
        );
        Ok(refs)
    }

    /// Adds (`add`) or drops one reference to everything the L1 table `l1` reaches, one L2
    /// table per commit so that memory stays bounded.
    fn adjust_l1_referents(&self, m: &mut Writing, l1: &[u64], add: bool) -> Result<()> {
        for &l1e in l1 {
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let refs = self.l2_referents(m, l2)?;
            let alloc = m.alloc();
            for (host, len) in refs {
                if add {
                    alloc.add_refs(host, len);
                } else {
                    alloc.free_range(host, len);
                }
            }
            self.commit_locked(m)?;
        }
        Ok(())
    }

    /// Gives the active tables their COPIED flags back where a refcount is one (after
    /// references were dropped), as qemu's refcount update with addend 0 does.
    fn restore_copied(&self, m: &mut Writing) -> Result<()> {
        let geo = self.geo;
        let s = &*self.storage;
        let file_len = m.file_len;
        for l1i in 0..m.l1.len() {
            let l2 = m.l1[l1i] & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let alloc = m.alloc();
            if alloc.refcount(s, l2, file_len)? != 1 {
                // Shared with a snapshot: so is everything it reaches.
                continue;
            }
            let words = m.l2_table(s, &geo, l2)?.words.clone();
            let step = if geo.extended_l2 { 2 } else { 1 };
            let mut set = Vec::new();
            for (idx, &entry) in words.iter().step_by(step).enumerate() {
                let host = entry & OFFSET_MASK;
                if entry & (OFLAG_COPIED | OFLAG_COMPRESSED) != 0 || host == 0 {
                    continue;
                }
                let alloc = m.alloc();
                if alloc.refcount(s, host, file_len)? == 1 {
                    set.push(idx);
                }
            }
            let slot = m.l2_table(s, &geo, l2)?;
            for idx in set {
                let (entry, bitmap) = slot.entry(idx);
                slot.set_entry(idx, entry | OFLAG_COPIED, bitmap);
            }
            if m.l1[l1i] & OFLAG_COPIED == 0 {
                m.l1[l1i] |= OFLAG_COPIED;
                m.l1_dirty.insert(l1i);
            }
            self.commit_locked(m)?;
        }
        Ok(())
    }

    /// Writes `list` as the new snapshot table, then switches the header to it (offset and
    /// count in one write), then frees the old table of `old_len` bytes.
    fn switch_snapshot_table(
        &self,
        m: &mut Writing,
        list: &[Snapshot],
        old_len: u64,
    ) -> Result<()> {
        let s = &*self.storage;
        let cs = self.geo.cluster_size();
        let host = if list.is_empty() {
            0
        } else {
            let mut buf = encode_table(list, self.size());
            let clusters = (buf.len() as u64).div_ceil(cs);
            buf.resize((clusters * cs) as usize, 0);
            let host = m.alloc().reserve(clusters);
            write_all(s, &buf, host, "the snapshot table")?;
            host
        };
        self.commit_locked(m)?;
        let (old, old_count) = (m.header.snapshots_offset, m.header.nb_snapshots);
        m.header.snapshots_offset = host;
        m.header.nb_snapshots = list.len() as u32;
        write_all(s, &m.header.encode_fixed(), 0, "the header")?;
        sync(s)?;
        if old_count > 0 && old_len > 0 {
            m.alloc().free_range(old, old_len);
            self.commit_locked(m)?;
        }
        Ok(())
    }

    /// Reverts the active state to snapshot `id_or_name` (see the module comment). Returns
    /// false when there is no such snapshot.
    pub(super) fn snapshot_apply_impl(&self, id_or_name: &str) -> Result<bool> {
        if !self.bitmaps.is_empty() {
            // qemu's refusal: reverting would leave the bitmaps describing other data.
            return Err(Error::Refused("Device has active dirty bitmaps".into()));
        }
        let mut found = true;
        self.with_exclusive(|m| {
            let (list, _) = self.current_snapshots(m)?;
            let Some(i) = Self::find_snapshot(&list, id_or_name) else {
                found = false;
                return Ok(());
            };
            let sn = &list[i];
            let sn_l1 = self.snapshot_l1(m, sn)?;
            let size = if sn.extra.len() >= 16 {
                crate::util::be64(&sn.extra, 8)
            } else {
                self.size()
            };
            crate::check_size(size)?;
            let need = size.div_ceil(self.l2_span());
            if need > sn_l1.len() as u64 {
                return Err(Error::Corrupt(format!(
                    "snapshot {} ({}) has an L1 table of {} entries, too small for its {size} byte disk",
                    sn.id, sn.name, sn_l1.len()
                )));
            }
            self.check_room_for_references(m, &sn_l1)?;
            // 1. The snapshot's referents gain the new active table's reference.
            self.adjust_l1_referents(m, &sn_l1, true)?;
            // 2. Its L1 table, copied to new clusters (no COPIED flag: all of it is shared).
            let cs = self.geo.cluster_size();
            let new_l1: Vec<u64> = sn_l1.iter().map(|e| e & !OFLAG_COPIED).collect();
            let new_offset = if new_l1.is_empty() {
                0
            } else {
                let clusters = (new_l1.len() as u64 * 8).div_ceil(cs);
                let host = m.alloc().reserve(clusters);
                let mut buf = table::encode(&new_l1);
                buf.resize((clusters * cs) as usize, 0);
                write_all(&*self.storage, &buf, host, "the new L1 table")?;
                host
            };
            self.commit_locked(m)?;
            // 3. The switch: L1 table, its size and the disk size in one header write.
            let old_l1 = std::mem::replace(&mut m.l1, new_l1);
            let (old_offset, old_len) = (m.header.l1_table_offset, old_l1.len() as u64 * 8);
            m.header.l1_table_offset = new_offset;
            m.header.l1_size = m.l1.len() as u32;
            m.header.size = size;
            write_all(&*self.storage, &m.header.encode_fixed(), 0, "the header")?;
            sync(&*self.storage)?;
            self.size.store(size, std::sync::atomic::Ordering::Relaxed);
            // 4. The old active tables' referents lose its reference, then the table goes.
            self.adjust_l1_referents(m, &old_l1, false)?;
            if old_len > 0 {
                self.free_now(m, old_offset, old_len)?;
            }
            // 5. COPIED where the active tables are the only owner again.
            self.restore_copied(m)
        })?;
        Ok(found)
    }

    /// Deletes the first snapshot named `name` (see the module comment): by name only, as
    /// qemu-img snapshot -d finds it. Returns false when there is no such snapshot.
    pub(super) fn snapshot_delete_impl(&self, name: &str) -> Result<bool> {
        let mut found = true;
        self.with_exclusive(|m| {
            let (mut list, old_len) = self.current_snapshots(m)?;
            let Some(i) = list.iter().position(|s| s.name == name) else {
                found = false;
                return Ok(());
            };
            let sn = list.remove(i);
            let sn_l1 = self.snapshot_l1(m, &sn)?;
            self.switch_snapshot_table(m, &list, old_len)?;
            self.adjust_l1_referents(m, &sn_l1, false)?;
            if sn.l1_size > 0 {
                self.free_now(m, sn.l1_table_offset, u64::from(sn.l1_size) * 8)?;
            }
            self.restore_copied(m)
        })?;
        Ok(found)
    }
}
