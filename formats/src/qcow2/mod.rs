//! qcow2: QEMU's copy-on-write format, versions 2 and 3.
//!
//! Module map, by concern: `header` (cluster 0), `table` (L1/L2 entries), `cache` (the
//! in-memory L1 and L2 tables, the single owner of metadata state), `refcount` (entry
//! encoding), `alloc` (allocation and the crash-safe commit), `write` (guest writes),
//! `compress`, `snapshot` (snapshot table, bitmap directory), `snapshot_ops` (snapshot
//! create, apply, delete), `create`, `check`.

mod alloc;
mod amend;
mod cache;
pub(crate) mod check;
pub mod compress;
pub mod create;
pub(crate) mod header;
pub(crate) mod layout;
mod overlap;
pub(crate) mod refcount;
mod resize;
pub mod snapshot;
mod snapshot_ops;
mod snapshot_view;
pub(crate) mod table;
pub use snapshot_view::SnapshotRef;
mod write;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use crate::io::{read_exact, Storage};
use crate::util::{align_down, be32};
use crate::{
    push_run, push_status, Alloc, BackingRef, CheckMode, CheckReport, Details, Error, Format,
    Image, ReadBelow, Result, Run, Status,
};
use cache::Meta;
use compress::CompressionType;
use header::Header;
pub use snapshot::{Bitmap, Snapshot};
use table::{Geometry, Kind, OFFSET_MASK};

/// Opens a file named by the image (its external data file).
pub type Opener<'a> = &'a dyn Fn(&str) -> Result<Arc<dyn Storage>>;

/// How to open an image.
#[derive(Default)]
pub struct OpenOptions<'a> {
    /// For writing too.
    pub writable: bool,
    /// Opens the external data file by the name the header records; without it, images with
    /// an external data file are refused.
    pub data_file: Option<Opener<'a>>,
    /// Opened to be checked and repaired (qemu's BDRV_O_CHECK): an image with the corrupt
    /// bit may then be opened read-write (guest writes stay refused until a repair clears
    /// it), and a misplaced snapshot table is left for the check to report.
    pub repair: bool,
}

/// What `info` shows of a qcow2 image.
#[derive(Clone, Debug, PartialEq)]
pub struct Qcow2Details {
    /// 2 or 3 (`compat` 0.10 or 1.1).
    pub version: u32,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// The lazy refcounts compatible feature.
    pub lazy_refcounts: bool,
    /// Width of a refcount entry in bits.
    pub refcount_bits: u32,
    /// The corrupt bit is set.
    pub corrupt: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// The persistent dirty bitmaps.
    pub bitmaps: Vec<Bitmap>,
    /// The external data file's name, if any.
    pub data_file: Option<String>,
    /// The external data file is a raw image valid on its own.
    pub data_file_raw: bool,
    /// The internal snapshots.
    pub snapshots: Vec<Snapshot>,
}

/// An open qcow2 image.
pub struct Qcow2 {
    storage: Arc<dyn Storage>,
    /// The external data file, when the image has one; data clusters live there.
    data_file: Option<Arc<dyn Storage>>,
    geo: Geometry,
    /// The virtual size (changed only by `resize`, under the exclusive gate).
    size: AtomicU64,
    /// The compression type's header value (changed only by a downgrade, under the gate).
    compression: AtomicU8,
    writable: bool,
    /// The snapshot table (replaced by snapshot create/apply/delete, under the gate).
    snapshots: RwLock<Vec<Snapshot>>,
    bitmaps: Vec<Bitmap>,
    /// All metadata state: header, L1, cached L2 tables, refcounts, allocation.
    meta: Mutex<Meta>,
    /// Writers hold it shared while they work; `commit` and header changes take it alone, so
    /// a commit never sees a write half done.
    gate: RwLock<()>,
    /// Guest clusters being written: writes touching one cluster run one at a time.
    clusters: crate::clusters::ClusterLocks,
    /// Whether the image looks metadata-preallocated (decided on first use, as qemu does).
    prealloc: OnceLock<bool>,
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if self.writable {
            crate::commit_on_drop(self);
        }
    }
}

impl Qcow2 {
    /// Opens and validates a qcow2 image.
    pub fn open(storage: Arc<dyn Storage>, opts: OpenOptions<'_>) -> Result<Qcow2> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the file size", e))?;
        let mut first = [0u8; 512];
        read_exact(&*storage, &mut first, 0, "the qcow2 header")?;
        if file_len < 72 || &first[0..4] != header::MAGIC {
            return Err(Error::invalid("Image is not in qcow2 format"));
        }
        let cluster_bits = be32(&first, 20);
        if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::Unsupported(format!(
                "cluster size: 2^{cluster_bits}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut cluster0 = vec![0u8; cluster_size.min(file_len.max(512)) as usize];
        read_exact(&*storage, &mut cluster0, 0, "the qcow2 header cluster")?;
        let header = Header::parse(&cluster0, file_len)?;

        if opts.writable
            && !opts.repair
            && header.incompatible_features & header::INCOMPAT_CORRUPT != 0
        {
            return Err(Error::NeedsRepair(
                "qcow2: Image is corrupt; cannot be opened read/write".into(),
            ));
        }
        let data_file = match header.data_file_name() {
            Some(name) => match opts.data_file {
                Some(open) => Some(open(&name)?),
                None => {
                    return Err(Error::Unsupported(format!(
                        "external data file '{name}' (not opened)"
                    )))
                }
            },
            None => None,
        };
        let geo = Geometry {
            cluster_bits,
            extended_l2: header.extended_l2(),
            data_file: data_file.is_some(),
        };

        let mut l1_buf = vec![0u8; header.l1_size as usize * 8];
        read_exact(
            &*storage,
            &mut l1_buf,
            header.l1_table_offset,
            "the L1 table",
        )?;
        let l1 = table::decode(&l1_buf);

        // As qemu's check mode: a misplaced snapshot table is for `check` to report, and
        // nothing else is read from it then.
        let snapshots = match header.check_snapshot_table() {
            Ok(()) => {
                snapshot::read_snapshots(
                    &*storage,
                    header.snapshots_offset,
                    header.nb_snapshots,
                    file_len,
                )?
                .0
            }
            Err(_) if opts.repair => Vec::new(),
            Err(e) => return Err(e),
        };
        let bitmaps = match header.extension(header::EXT_BITMAPS) {
            // Without the autoclear bit the extension is stale: qemu ignores it, so do we.
            Some(ext) if header.autoclear_features & header::AUTOCLEAR_BITMAPS != 0 => {
                snapshot::read_bitmaps(&*storage, ext, file_len)?.0
            }
            _ => Vec::new(),
        };
        Ok(Qcow2 {
            data_file,
            geo,
            // qemu counts a qcow2 disk in whole 512-byte sectors (total_sectors = size / 512):
            // a size field that is not a multiple of 512, which only a damaged or hostile
            // header has, is rounded down, and every command sees the same disk.
            size: AtomicU64::new(header.size / 512 * 512),
            compression: AtomicU8::new(header.compression_type),
            writable: opts.writable,
            snapshots: RwLock::new(snapshots),
            bitmaps,
            meta: Mutex::new(Meta::new(header, l1, file_len)),
            gate: RwLock::new(()),
            clusters: Default::default(),
            prealloc: OnceLock::new(),
            storage,
        })
    }

    /// The virtual size.
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn meta(&self) -> MutexGuard<'_, Meta> {
        // A panic while holding the lock leaves no half-applied state that matters: the
        // in-memory tables are rebuilt from disk on the next open.
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current header (a copy).
    /// A copy of the header as it is now.
    pub(crate) fn header(&self) -> Header {
        self.meta().header.clone()
    }

    /// The compression of the image's compressed clusters.
    pub fn compression(&self) -> CompressionType {
        CompressionType::from_header(self.compression.load(Ordering::Relaxed))
    }

    fn data_storage(&self) -> &dyn Storage {
        self.data_file.as_deref().unwrap_or(&*self.storage)
    }

    /// Walks the L2 entries of `[start, start + len)` (clipped to the virtual size) in
    /// order, handing `f` one piece at a time (an unallocated L1 range, a cluster, or with
    /// extended L2 a subcluster) with, for an unallocated subcluster of an allocated cluster,
    /// the host offset its cluster keeps for it.
    fn walk(&self, start: u64, len: u64, f: &mut dyn FnMut(Run, Option<u64>)) -> Result<()> {
        let end = start.saturating_add(len).min(self.size());
        let cs = self.geo.cluster_size();
        let sc = self.geo.subcluster_size();
        let l1_span = cs << self.geo.l2_bits();
        let mut meta = self.meta();
        let mut off = start;
        while off < end {
            let l1i = (off / l1_span) as usize;
            let region_end = end.min((l1i as u64 + 1) * l1_span);
            let l2_offset = meta.l1.get(l1i).copied().unwrap_or(0) & OFFSET_MASK;
            if l2_offset == 0 {
                f(
                    Run {
                        start: off,
                        len: region_end - off,
                        alloc: Alloc::Unallocated,
                    },
                    None,
                );
                off = region_end;
                continue;
            }
            let table = meta.l2_table(&*self.storage, &self.geo, l2_offset)?;
            while off < region_end {
                let cluster_start = align_down(off, cs);
                let idx = ((off / cs) & (self.geo.l2_entries() - 1)) as usize;
                let (entry, bitmap) = table.entry(idx);
                let cluster_end = region_end.min(cluster_start + cs);
                if !self.geo.extended_l2 || entry & table::OFLAG_COMPRESSED != 0 {
                    let kind = self.geo.kind(entry, 0, 0)?;
                    let alloc = Self::to_alloc(kind, off - cluster_start);
                    f(
                        Run {
                            start: off,
                            len: cluster_end - off,
                            alloc,
                        },
                        None,
                    );
                    off = cluster_end;
                } else {
                    let sub = ((off - cluster_start) / sc) as u32;
                    let sub_start = cluster_start + u64::from(sub) * sc;
                    let sub_end = cluster_end.min(sub_start + sc);
                    let kind = self.geo.kind(entry, bitmap, sub)?;
                    let alloc = Self::to_alloc(kind, off - sub_start);
                    let host = entry & OFFSET_MASK;
                    let reserved = (alloc == Alloc::Unallocated && self.geo.allocated(entry))
                        .then_some(host + (off - cluster_start));
                    f(
                        Run {
                            start: off,
                            len: sub_end - off,
                            alloc,
                        },
                        reserved,
                    );
                    off = sub_end;
                }
            }
        }
        Ok(())
    }

    /// Guest bytes one L2 table covers.
    fn l2_span(&self) -> u64 {
        self.geo.cluster_size() << self.geo.l2_bits()
    }

    /// The statuses of `[off, end)`, a range inside one L2 table's span.
    fn region_status(&self, off: u64, end: u64) -> Result<Vec<Status>> {
        let recurse = self.metadata_preallocated();
        let mut region = Vec::new();
        let mut failed = None;
        self.walk(off, end - off, &mut |run, reserved| {
            let st = Status {
                start: run.start,
                len: run.len,
                alloc: run.alloc,
                reserved,
                recurse: None,
            };
            match (recurse, run.alloc) {
                (true, Alloc::Data { host }) => {
                    if let Err(e) = self.push_recursed(&mut region, st, host) {
                        failed.get_or_insert(e);
                    }
                }
                _ => push_status(&mut region, st),
            }
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(region),
        }
    }

    /// Appends the status of a data run of an image with preallocated metadata: qemu asks the
    /// file about the run's host range, and reports the parts lying in a hole of the file (or
    /// past its end) as zero data.
    fn push_recursed(&self, out: &mut Vec<Status>, st: Status, host: u64) -> Result<()> {
        let file = self.data_storage();
        let extents = file
            .data_extents(host, host + st.len)
            .map_err(|e| Error::io("finding holes in the data file", e))?;
        let mut pos = host;
        let piece = |a: u64, b: u64, hole: bool| Status {
            start: st.start + (a - host),
            len: b - a,
            alloc: Alloc::Data { host: a },
            reserved: None,
            recurse: Some(hole),
        };
        for (a, b) in extents {
            push_status(out, piece(pos, a, true));
            push_status(out, piece(a, b, false));
            pos = b;
        }
        push_status(out, piece(pos, host + st.len, true));
        Ok(())
    }

    /// Whether the image looks preallocated with `preallocation=metadata`: many more clusters
    /// have a reference count than the file has clusters on disk. qemu decides this once per
    /// open the same way (qcow2_detect_metadata_preallocation: referenced clusters reach
    /// max(real * 10 / 9, real + 2)), and then asks the file about data clusters; images it
    /// cannot judge (damaged refcounts) count as not preallocated, as in qemu.
    pub fn metadata_preallocated(&self) -> bool {
        *self
            .prealloc
            .get_or_init(|| self.detect_metadata_preallocation().unwrap_or(false))
    }

    fn detect_metadata_preallocation(&self) -> Result<bool> {
        let h = self.header();
        let cs = self.geo.cluster_size();
        let io = |e| Error::io("reading the file size", e);
        let file_len = self.storage.len().map_err(io)?;
        let real_clusters = self.storage.allocated_bytes().map_err(io)? / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = file_len.div_ceil(cs);
        let rgeo = refcount::RefGeometry {
            cluster_bits: h.cluster_bits,
            refcount_order: h.refcount_order,
        };
        let table_len = u64::from(h.refcount_table_clusters) * cs;
        let mut table = vec![0u8; table_len as usize];
        read_exact(
            &*self.storage,
            &mut table,
            h.refcount_table_offset,
            "the refcount table",
        )?;
        let per_block = rgeo.entries_per_block();
        // Nonzero entries per refcount block, by block offset: a table may name one block
        // many times, and a hostile one must not cost a read (and a count) per entry.
        let mut counted: std::collections::HashMap<(u64, u64), u64> =
            std::collections::HashMap::new();
        let mut count = 0u64;
        for (bi, e) in table::decode(&table).into_iter().enumerate() {
            let first = bi as u64 * per_block;
            if first >= end_cluster || count >= threshold {
                break;
            }
            let block = refcount::reftable_block(e);
            if block == 0 {
                continue;
            }
            if block % cs != 0 || block.checked_add(cs).is_none_or(|b| b > file_len) {
                return Err(Error::Corrupt(format!(
                    "refcount block offset {block:#x} is invalid"
                )));
            }
            let n = (end_cluster - first).min(per_block);
            if let Some(c) = counted.get(&(block, n)) {
                count += c;
                continue;
            }
            let mut buf = vec![0u8; cs as usize];
            read_exact(&*self.storage, &mut buf, block, "a refcount block")?;
            let c = (0..n as usize).filter(|&i| rgeo.get(&buf, i) != 0).count() as u64;
            counted.insert((block, n), c);
            count += c;
        }
        Ok(count >= threshold)
    }

    /// Converts a decoded entry kind at `intra` bytes into its cluster to an [`Alloc`].
    fn to_alloc(kind: Kind, intra: u64) -> Alloc {
        match kind {
            Kind::Unallocated => Alloc::Unallocated,
            Kind::Zero => Alloc::Zero { host: None },
            Kind::ZeroAlloc(h) => Alloc::Zero {
                host: Some(h + intra),
            },
            Kind::Normal(h) => Alloc::Data { host: h + intra },
            Kind::Compressed { host, len } => Alloc::Compressed { host, len },
        }
    }
}

impl Image for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.size()
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.geo.cluster_size())
    }

    fn allocation_unit(&self) -> u64 {
        self.geo.subcluster_size()
    }

    fn backing(&self) -> Option<BackingRef> {
        let m = self.meta();
        m.header.backing_name.clone().map(|name| BackingRef {
            name,
            format: m.header.backing_format(),
        })
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn map(&self, start: u64, len: u64) -> Result<Vec<Run>> {
        let mut runs = Vec::new();
        self.walk(start, len, &mut |run, _| push_run(&mut runs, run))?;
        Ok(runs)
    }

    fn status(&self, start: u64, len: u64) -> Result<Vec<Status>> {
        let end = start.saturating_add(len).min(self.size());
        let mut out = Vec::new();
        let mut off = start;
        // qemu answers a status query from one L2 table at most: runs never merge across.
        while off < end {
            let region_end = end.min((off / self.l2_span()).saturating_add(1) * self.l2_span());
            out.extend(self.region_status(off, region_end)?);
            off = region_end;
        }
        Ok(out)
    }

    fn status_ahead(&self, start: u64, len: u64) -> Result<Vec<Status>> {
        crate::status_ahead_by_table(self, start, len, self.l2_span(), |i| {
            self.meta().l1.get(i).is_some_and(|e| e & OFFSET_MASK != 0)
        })
    }

    fn data_storage(&self) -> &Arc<dyn Storage> {
        self.data_file.as_ref().unwrap_or(&self.storage)
    }

    fn read_host(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        read_exact(self.data_storage(), buf, host, "data")
    }

    fn read_compressed(&self, host: u64, len: u64, out: &mut [u8]) -> Result<()> {
        let file_len = self
            .storage
            .len()
            .map_err(|e| Error::io("reading the file size", e))?;
        if host >= file_len {
            return Err(Error::Corrupt(format!(
                "compressed cluster at {host:#x} lies past the end of the file"
            )));
        }
        let mut input = vec![0u8; len as usize];
        read_exact(&*self.storage, &mut input, host, "a compressed cluster")?;
        compress::decompress(self.compression(), &input, out)
    }

    fn details(&self) -> Details {
        let h = self.header();
        Details::Qcow2(Qcow2Details {
            version: h.version,
            compression_type: self.compression().name(),
            lazy_refcounts: h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
            refcount_bits: h.refcount_bits(),
            corrupt: h.incompatible_features & header::INCOMPAT_CORRUPT != 0,
            extended_l2: h.extended_l2(),
            bitmaps: self.bitmaps.clone(),
            data_file: h.data_file_name(),
            data_file_raw: h.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW != 0,
            snapshots: self
                .snapshots
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        })
    }

    fn is_dirty(&self) -> bool {
        self.meta().header.incompatible_features & header::INCOMPAT_DIRTY != 0
    }

    fn copy_on_read(&self) -> bool {
        self.meta().header.cowimg_flags() & header::COWIMG_FLAG_COPY_ON_READ != 0
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

    fn compress_cluster(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        self.compress_cluster_impl(data)
    }

    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<bool> {
        self.write_compressed_impl(offset, compressed)
    }

    fn commit(&self) -> Result<()> {
        self.commit_impl()
    }

    fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        self.set_backing_impl(backing)
    }

    fn set_copy_on_read(&self, on: bool) -> Result<()> {
        self.set_cowimg_flags_impl(on)
    }

    fn set_lazy_refcounts(&self, on: bool) -> Result<()> {
        self.set_lazy_refcounts_impl(on)
    }

    fn set_qcow2_version(&self, version: u32) -> Result<()> {
        self.set_version_impl(version)
    }

    fn set_refcount_bits(&self, bits: u32) -> Result<()> {
        self.set_refcount_bits_impl(bits)
    }

    fn resize(&self, size: u64, prealloc: crate::Prealloc) -> Result<()> {
        self.resize_impl(size, prealloc)
    }

    fn make_empty(&self) -> Result<()> {
        self.make_empty_impl()
    }

    fn snapshot_create(&self, name: &str) -> Result<()> {
        self.snapshot_create_impl(name)
    }

    fn snapshot_view(&self, which: SnapshotRef<'_>) -> Result<Option<Arc<dyn Image>>> {
        Ok(self
            .snapshot_view_impl(which)?
            .map(|v| Arc::new(v) as Arc<dyn Image>))
    }

    fn snapshot_apply(&self, id_or_name: &str) -> Result<bool> {
        self.snapshot_apply_impl(id_or_name)
    }

    fn snapshot_delete(&self, id_or_name: &str) -> Result<bool> {
        self.snapshot_delete_impl(id_or_name)
    }

    fn check_logged(&self, mode: CheckMode, log: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        self.check_with(mode, log)
    }
}
