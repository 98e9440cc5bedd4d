//! Reading an internal snapshot as a disk (qemu's `bdrv_snapshot_load_tmp`, which
//! `qemu-img convert -l` uses): the snapshot's L1 table over the image's current size and
//! backing file, read-only. Guest ranges past the snapshot's L1 table (the image grew after
//! it was taken) read as unallocated, as in qemu.

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock, RwLock};

use super::cache::Meta;
use super::Qcow2;
use crate::{Error, Result};

/// Which snapshot: by id, by name, or both (a snapshot matching both), as qemu's
/// `snapshot.id=` and `snapshot.name=` options name it.
#[derive(Clone, Copy, Debug, Default)]
pub struct SnapshotRef<'a> {
    /// The snapshot's id.
    pub id: Option<&'a str>,
    /// The snapshot's name.
    pub name: Option<&'a str>,
}

impl Qcow2 {
    /// A read-only view of snapshot `which`; `None` when no snapshot matches.
    pub(super) fn snapshot_view_impl(&self, which: SnapshotRef<'_>) -> Result<Option<Qcow2>> {
        if which.id.is_none() && which.name.is_none() {
            return Ok(None);
        }
        let list = self
            .snapshots
            .read()
            .map_err(|_| Error::Invalid("the snapshot table lock was poisoned".into()))?
            .clone();
        let Some(sn) = list.iter().find(|s| {
            which.id.is_none_or(|id| s.id == id) && which.name.is_none_or(|n| s.name == n)
        }) else {
            return Ok(None);
        };
        let (header, l1, file_len) = {
            let m = self.meta();
            let l1 = self.snapshot_l1(&m, sn)?;
            let mut header = m.header.clone();
            header.l1_table_offset = sn.l1_table_offset;
            header.l1_size = sn.l1_size;
            (header, l1, m.file_len)
        };
        Ok(Some(Qcow2 {
            storage: self.storage.clone(),
            data_file: self.data_file.clone(),
            geo: self.geo,
            size: AtomicU64::new(self.size()),
            compression: std::sync::atomic::AtomicU8::new(
                self.compression.load(std::sync::atomic::Ordering::Relaxed),
            ),
            writable: false,
            snapshots: RwLock::new(list),
            bitmaps: self.bitmaps.clone(),
            meta: Mutex::new(Meta::new(header, l1, file_len)),
            gate: RwLock::new(()),
            clusters: Default::default(),
            prealloc: OnceLock::new(),
        }))
    }
}
