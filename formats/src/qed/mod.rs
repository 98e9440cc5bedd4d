//! QED: QEMU Enhanced Disk. Two-level tables of little-endian offsets, append-only allocation,
//! no reference counts. Entry 0 is unallocated, 1 is a zero cluster.
//!
//! Module map: `header` (the 64-byte header and cowimg's record), `table` (cached pieces of
//! L2 tables), `write` (guest writes, commit, header changes), `create`, `check`.

pub(crate) mod check;
pub mod create;
pub(crate) mod header;
mod table;
mod write;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::io::{read_exact, Storage};
use crate::util::align_down;
use crate::{
    push_run, Alloc, BackingRef, CheckMode, CheckReport, Details, Error, Format, Image, ReadBelow,
    Result, Run, Status,
};
use header::Header;
use table::Pages;

/// qemu-compatible cap on the part of the L1 table cowimg loads (it covers the image size).
const MAX_L1_BYTES: u64 = 32 << 20;

/// What `info` can show of a QED image (qemu shows none of it; cowimg's info adds a few).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QedDetails {
    /// Clusters per table.
    pub table_size: u32,
    /// Clusters of the header.
    pub header_size: u32,
    /// The need-check flag (set while written; a clean close clears it).
    pub need_check: bool,
}

/// An open QED image.
pub struct Qed {
    storage: Arc<dyn Storage>,
    writable: bool,
    meta: Mutex<Meta>,
    gate: RwLock<()>,
    /// Guest clusters being written: writes touching one cluster run one at a time.
    clusters: crate::clusters::ClusterLocks,
}

pub(crate) struct Meta {
    pub header: Header,
    pub backing_name: Option<String>,
    pub cowimg_flags: u32,
    /// The part of the L1 table that covers the image.
    pub l1: Vec<u64>,
    pub l1_dirty: BTreeSet<usize>,
    pub pages: Pages,
    pub file_len: u64,
    pub alloc: Option<write::Allocator>,
}

impl Drop for Qed {
    fn drop(&mut self) {
        if self.writable {
            crate::commit_on_drop(self);
        }
    }
}

impl Qed {
    /// Opens the QED image in `storage`, for writing too when `writable`.
    pub fn open(storage: Arc<dyn Storage>, writable: bool) -> Result<Qed> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the file size", e))?;
        let mut first = [0u8; 4096];
        read_exact(&*storage, &mut first, 0, "the QED header")?;
        if file_len < header::HEADER_LEN as u64 {
            return Err(Error::invalid("Image not in QED format"));
        }
        let h = Header::parse(&first, file_len)?;
        let backing_name = if h.features & header::F_BACKING_FILE != 0 {
            let mut name = vec![0u8; h.backing_filename_size as usize];
            read_exact(
                &*storage,
                &mut name,
                u64::from(h.backing_filename_offset),
                "the backing file name",
            )?;
            Some(String::from_utf8_lossy(&name).into_owned())
        } else {
            None
        };
        let cowimg_flags = if h.header_size >= 1 {
            header::decode_record(
                &first[header::COWIMG_RECORD_OFFSET as usize
                    ..header::COWIMG_RECORD_OFFSET as usize + header::COWIMG_RECORD_LEN],
            )
        } else {
            0
        };
        let l1_span = h.table_entries() * h.cluster_size;
        let l1_used = h.image_size.div_ceil(l1_span).max(1);
        if l1_used * 8 > MAX_L1_BYTES {
            return Err(Error::invalid("QED L1 table too large"));
        }
        let mut buf = vec![0u8; (l1_used * 8) as usize];
        read_exact(&*storage, &mut buf, h.l1_table_offset, "the L1 table")?;
        let l1 = buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let pages = Pages::new(h.table_entries());
        Ok(Qed {
            storage,
            writable,
            meta: Mutex::new(Meta {
                header: h,
                backing_name,
                cowimg_flags,
                l1,
                l1_dirty: BTreeSet::new(),
                pages,
                file_len,
                alloc: None,
            }),
            gate: RwLock::new(()),
            clusters: Default::default(),
        })
    }

    fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the header as it is now.
    pub(crate) fn header(&self) -> Header {
        self.meta().header.clone()
    }

    /// Validates an L2 table offset read from the L1 table.
    /// As qemu: aligned, behind the header, its last cluster starting inside the file.
    fn check_table_offset(h: &Header, offset: u64, file_len: u64) -> Result<()> {
        let last = offset.checked_add(h.table_bytes() - h.cluster_size);
        if offset % h.cluster_size != 0
            || offset < h.header_bytes()
            || last.is_none_or(|l| l >= align_down(file_len, h.cluster_size))
        {
            return Err(Error::Corrupt(format!(
                "L2 table offset {offset:#x} is invalid"
            )));
        }
        Ok(())
    }
}

impl Image for Qed {
    fn format(&self) -> Format {
        Format::Qed
    }

    fn virtual_size(&self) -> u64 {
        self.meta().header.image_size
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.meta().header.cluster_size)
    }

    fn backing(&self) -> Option<BackingRef> {
        let m = self.meta();
        let raw = m.header.features & header::F_BACKING_FORMAT_NO_PROBE != 0;
        m.backing_name.clone().map(|name| BackingRef {
            name,
            format: raw.then(|| "raw".to_string()),
        })
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn map(&self, start: u64, len: u64) -> Result<Vec<Run>> {
        let mut guard = self.meta();
        let m = &mut *guard;
        let h = m.header.clone();
        let cs = h.cluster_size;
        let n = h.table_entries();
        let l1_span = n * cs;
        let end = start.saturating_add(len).min(h.image_size);
        let mut runs = Vec::new();
        let mut off = start;
        while off < end {
            let l1i = (off / l1_span) as usize;
            let region_end = end.min((l1i as u64 + 1) * l1_span);
            let table = m.l1.get(l1i).copied().unwrap_or(0);
            if table == 0 {
                push_run(
                    &mut runs,
                    Run {
                        start: off,
                        len: region_end - off,
                        alloc: Alloc::Unallocated,
                    },
                );
                off = region_end;
                continue;
            }
            if !m.pages.is_new_table(table) {
                Self::check_table_offset(&h, table, m.file_len)?;
            }
            while off < region_end {
                let cluster = align_down(off, cs);
                let idx = (off / cs) % n;
                let entry = m.pages.get(&*self.storage, table, idx)?;
                let cluster_end = region_end.min(cluster + cs);
                let alloc = match entry {
                    0 => Alloc::Unallocated,
                    1 => Alloc::Zero { host: None },
                    host => {
                        if host % cs != 0
                            || host < h.header_bytes()
                            || host >= m.file_len.max(m.alloc_end())
                        {
                            return Err(Error::Corrupt(format!(
                                "data cluster offset {host:#x} is invalid"
                            )));
                        }
                        Alloc::Data {
                            host: host + off - cluster,
                        }
                    }
                };
                push_run(
                    &mut runs,
                    Run {
                        start: off,
                        len: cluster_end - off,
                        alloc,
                    },
                );
                off = cluster_end;
            }
        }
        Ok(runs)
    }

    fn status(&self, start: u64, len: u64) -> Result<Vec<Status>> {
        let h = self.header();
        let l2_span = h.table_entries() * h.cluster_size;
        let end = start.saturating_add(len).min(h.image_size);
        let mut out = Vec::new();
        let mut off = start;
        // qemu's QED driver answers a status query from one L2 table at most
        // (qed_find_cluster limits the length to the L2 boundary): runs never merge across.
        while off < end {
            let region_end = end.min((off / l2_span).saturating_add(1) * l2_span);
            out.extend(
                self.map(off, region_end - off)?
                    .into_iter()
                    .map(Status::plain),
            );
            off = region_end;
        }
        Ok(out)
    }

    fn status_ahead(&self, start: u64, len: u64) -> Result<Vec<Status>> {
        let h = self.header();
        let span = h.table_entries() * h.cluster_size;
        crate::status_ahead_by_table(self, start, len, span, |i| {
            self.meta().l1.get(i).is_some_and(|&t| t != 0)
        })
    }

    fn read_host(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        read_exact(&*self.storage, buf, host, "data")
    }

    fn details(&self) -> Details {
        let h = self.header();
        Details::Qed(QedDetails {
            table_size: h.table_size,
            header_size: h.header_size,
            need_check: h.features & header::F_NEED_CHECK != 0,
        })
    }

    fn copy_on_read(&self) -> bool {
        self.meta().cowimg_flags & header::COWIMG_FLAG_COPY_ON_READ != 0
    }

    fn write(&self, offset: u64, data: &[u8], below: &dyn ReadBelow) -> Result<()> {
        self.write_impl(offset, data, below, false).map(|_| ())
    }

    fn reserve(&self, offset: u64, len: u64) -> Result<()> {
        self.reserve_impl(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn ReadBelow) -> Result<()> {
        self.write_zeroes_impl(offset, len, below)
    }

    fn fill_unallocated(&self, offset: u64, data: &[u8], below: &dyn ReadBelow) -> Result<u64> {
        self.write_impl(offset, data, below, true)
    }

    fn commit(&self) -> Result<()> {
        self.commit_impl()
    }

    fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        self.set_backing_impl(backing)
    }

    fn resize(&self, size: u64, prealloc: crate::Prealloc) -> Result<()> {
        self.resize_impl(size, prealloc)
    }

    fn set_copy_on_read(&self, on: bool) -> Result<()> {
        self.set_copy_on_read_impl(on)
    }

    fn check_logged(&self, mode: CheckMode, log: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        self.check_with(mode, log)
    }
}

impl Meta {
    /// End of allocated space, including clusters reserved but not yet committed.
    fn alloc_end(&self) -> u64 {
        self.alloc.as_ref().map_or(0, |a| a.end)
    }
}
