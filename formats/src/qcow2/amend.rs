//! `amend -o compat=0.10|1.1` and `-o refcount_bits=N`: the qcow2 version and the refcount
//! width, changed in place as qemu-img amend changes them (qemu's `qcow2_upgrade`,
//! `qcow2_downgrade` and `qcow2_change_refcount_order`), each in an order that keeps the
//! image consistent at every instant: new structures are written and synced before one write
//! of sector 0 switches to them, and what the old header referenced is freed last.

use super::cache::Meta;
use super::header::{self, Header};
use super::table::{OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use super::{snapshot, Qcow2};
use crate::{Error, Result};

impl Qcow2 {
    /// Changes the qcow2 version to 2 (`compat=0.10`) or 3 (`compat=1.1`); nothing to do when
    /// the image has it already.
    pub(super) fn set_version_impl(&self, version: u32) -> Result<()> {
        match (self.header().version, version) {
            (a, b) if a == b => Ok(()),
            (2, 3) => self.upgrade(),
            (3, 2) => self.downgrade(),
            _ => Err(Error::Unsupported(format!("qcow2 version {version}"))),
        }
    }

    /// v2 -> v3. A v3 snapshot table entry must carry the 64-bit VM state size and the disk
    /// size, so a table with shorter entries is rewritten first (into new clusters, which
    /// the v2 header then points at); then the header becomes v3 in one write.
    fn upgrade(&self) -> Result<()> {
        let mut h = self.header_for_change()?;
        {
            let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
            let mut m = self.meta();
            let s = &*self.storage;
            let (list, len) = snapshot::read_snapshots(
                s,
                m.header.snapshots_offset,
                m.header.nb_snapshots,
                m.file_len,
            )?;
            if list.iter().any(|sn| sn.is_incomplete()) {
                let table = snapshot::encode_table(&list, m.header.size);
                self.replace_snapshot_table_locked(&mut m, &table, len)?;
                let (list, _) = snapshot::read_snapshots(
                    s,
                    m.header.snapshots_offset,
                    m.header.nb_snapshots,
                    m.file_len,
                )?;
                *self.snapshots.write().unwrap_or_else(|e| e.into_inner()) = list;
                h = m.header.clone();
            }
        }
        as_version(&mut h, 3);
        self.rewrite_header(h)
    }

    /// v3 -> v2, refused in qemu's words where v2 cannot express the image: another
    /// refcount width, an external data file, snapshots of another disk size or with a VM
    /// state too large for 32 bits, incompatible features other than the compression type
    /// (extended L2 entries), zstd-compressed clusters. Zero clusters, which v2 does not
    /// have, are expanded in the active layer as qemu does: unallocated where nothing is
    /// below, else zeroed data clusters (synced before the entries point at them).
    fn downgrade(&self) -> Result<()> {
        let current = self.header();
        if current.refcount_order != 4 {
            return Err(Error::Refused(
                "compat=0.10 requires refcount_bits=16".into(),
            ));
        }
        if current.incompatible_features & header::INCOMPAT_DATA_FILE != 0 {
            return Err(Error::Refused(
                "Cannot downgrade an image with a data file".into(),
            ));
        }
        let size = self.size();
        let snapshots_differ = self
            .snapshots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|sn| sn.vm_state_size > u64::from(u32::MAX) || sn.disk_size(size) != size);
        if snapshots_differ {
            return Err(Error::Refused(
                "Internal snapshots prevent downgrade of image".into(),
            ));
        }
        // Opening for the change repairs a dirty image first (qemu's qcow2_mark_clean).
        let h = self.header_for_change()?;
        let other = h.incompatible_features & !header::INCOMPAT_COMPRESSION;
        if other != 0 {
            return Err(Error::Refused(format!(
                "Cannot downgrade an image with incompatible features {other:#x} set"
            )));
        }
        {
            let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
            let mut m = self.meta();
            // Checked before anything changes (qemu checks after expanding the zeros).
            if h.incompatible_features & header::INCOMPAT_COMPRESSION != 0
                && self.has_compressed_clusters(&mut m)?
            {
                return Err(Error::Refused(
                    "Cannot downgrade an image with zstd compression type and existing compressed clusters".into(),
                ));
            }
            self.expand_zero_clusters(&mut m)?;
        }
        let mut h = self.header();
        as_version(&mut h, 2);
        self.rewrite_header(h)?;
        self.compression
            .store(0, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether the active layer has a compressed cluster.
    fn has_compressed_clusters(&self, m: &mut Meta) -> Result<bool> {
        let geo = self.geo;
        for l1i in 0..m.l1.len() {
            let l2 = m.l1[l1i] & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let slot = m.l2_table(&*self.storage, &geo, l2)?;
            if (0..geo.l2_entries() as usize).any(|i| slot.entry(i).0 & OFLAG_COMPRESSED != 0) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// qemu's `qcow2_expand_zero_clusters` (active layer; standard L2 entries only, as the
    /// downgrade refuses extended L2): one L2 table at a time, committed before the next.
    fn expand_zero_clusters(&self, m: &mut Meta) -> Result<()> {
        let s = &*self.storage;
        let geo = self.geo;
        let cs = geo.cluster_size();
        let backed = m.header.backing_name.is_some();
        // As qemu: the range is made to read as zeros the storage's cheapest way (a hole).
        let zero = |host: u64| {
            s.write_zeroes_unmap(host, cs)
                .map_err(|e| Error::io(format!("zeroing the cluster at {host:#x}"), e))
        };
        for l1i in 0..m.l1.len() {
            let l2 = m.l1[l1i] & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let zero_entries: Vec<(usize, u64)> = {
                let slot = m.l2_table(s, &geo, l2)?;
                (0..geo.l2_entries() as usize)
                    .map(|i| (i, slot.entry(i).0))
                    .filter(|&(_, e)| e & OFLAG_COMPRESSED == 0 && e & OFLAG_ZERO != 0)
                    .collect()
            };
            if zero_entries.is_empty() {
                continue;
            }
            let file_len = m.file_len;
            let alloc = m
                .alloc
                .as_mut()
                .ok_or_else(|| Error::Refused("internal: downgrade before prepare".into()))?;
            // A table shared with snapshots: each of them reaches the new clusters too.
            let l2_refs = alloc.refcount(s, l2, file_len)?;
            let copied = if l2_refs == 1 { OFLAG_COPIED } else { 0 };
            let mut staged = Vec::with_capacity(zero_entries.len());
            for (i, entry) in zero_entries {
                let host = entry & OFFSET_MASK;
                let new = if host == 0 {
                    if !backed {
                        0
                    } else {
                        let host = alloc.reserve(1);
                        for _ in 1..l2_refs {
                            alloc.add_refs(host, cs);
                        }
                        zero(host)?;
                        host | copied
                    }
                } else {
                    // qemu zeroes the preallocated cluster in place; one that something
                    // else references too would change under it, so that is refused.
                    if alloc.refcount(s, host, file_len)? > l2_refs {
                        return Err(Error::Corrupt(format!(
                            "the zero cluster at host offset {host:#x} is shared; see `check`"
                        )));
                    }
                    zero(host)?;
                    host | copied
                };
                staged.push((i, new));
            }
            let slot = m.l2_table(s, &geo, l2)?;
            for (i, new) in staged {
                slot.set_entry(i, new, 0);
            }
            // The zeroed clusters and their refcounts are synced before the entries change.
            self.commit_locked(m)?;
        }
        Ok(())
    }

    /// Rewrites the refcount structures with entries of `bits` bits (a power of two up to
    /// 64; v3 only, as in qemu).
    pub(super) fn set_refcount_bits_impl(&self, bits: u32) -> Result<()> {
        if bits == 0 || bits > 64 || !bits.is_power_of_two() {
            return Err(Error::Refused(
                "Refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        let h = self.header_for_change()?;
        if h.refcount_bits() == bits {
            return Ok(());
        }
        if h.version < 3 {
            return Err(Error::Refused(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into(),
            ));
        }
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        super::check::change_refcount_order(self, &mut m, bits.trailing_zeros())
    }
}

/// The header fields of `version` for an image whose other features are gone: no feature bits
/// (the upgrade starts from none, the downgrade has removed them), zlib, 16-bit refcounts in
/// v2, qemu's 112-byte v3 header with its feature name table (v2 has no bits to name).
fn as_version(h: &mut Header, version: u32) {
    h.version = version;
    h.extra_fields.clear();
    h.incompatible_features = 0;
    h.compatible_features = 0;
    h.autoclear_features = 0;
    h.compression_type = 0;
    if version >= 3 {
        h.header_length = header::V3_HEADER_LEN;
        h.set_extension(
            header::EXT_FEATURE_TABLE,
            Some(header::standard_feature_table()),
        );
    } else {
        h.header_length = header::V2_HEADER_LEN;
        h.refcount_order = 4;
        h.set_extension(header::EXT_FEATURE_TABLE, None);
    }
}
