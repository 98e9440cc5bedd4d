//! On-disk formats of QEMU disk images: qcow2, QED and raw.
//!
//! This crate knows bytes on disk and nothing else: no command line, no printing, no thread
//! policy. Every format implements [`Image`]: a size, a cluster size, a backing reference, a
//! *mapping* query that answers in coalesced [`Run`]s, reads of the data a layer holds, and a
//! crash-safe writing engine (writes are staged, then [`Image::commit`] makes them durable in an
//! order that keeps the image consistent at every instant).
//!
//! All methods take `&self` and may be called from many threads: I/O is positional and
//! metadata sits behind short locks.
//!
//! ```
//! use std::sync::Arc;
//! use cowimg_formats::qcow2::{create, OpenOptions};
//! use cowimg_formats::{open, Alloc, Format, MemStorage, Storage, ZerosBelow};
//!
//! # fn main() -> cowimg_formats::Result<()> {
//! // A 4 MiB qcow2 image in memory (a FileStorage for a file).
//! let storage: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new(), "disk.qcow2"));
//! create::create(&*storage, &create::Options { size: 4 << 20, ..Default::default() })?;
//! let img = open(storage, Format::Qcow2, OpenOptions { writable: true, ..Default::default() })?;
//!
//! // A write is staged, then committed: data first, metadata after, in a crash-safe order.
//! img.write(1 << 20, &[0xab; 4096], &ZerosBelow)?;
//! img.commit()?;
//!
//! // The map says where it is; the cluster around it was completed with zeros below.
//! let runs = img.map(0, img.virtual_size())?;
//! assert_eq!(runs[0].alloc, Alloc::Unallocated);
//! let data = runs.iter().find(|r| matches!(r.alloc, Alloc::Data { .. })).unwrap();
//! assert_eq!((data.start, data.len), (1 << 20, 64 << 10));
//! let Alloc::Data { host } = data.alloc else { unreachable!() };
//! let mut buf = vec![0; 4096];
//! img.read_host(host, &mut buf)?;
//! assert_eq!(buf, [0xab; 4096]);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod check;
pub mod clusters;
pub mod error;
pub mod io;
pub mod measure;
mod open;
mod prepared;
pub mod probe;
pub mod qcow2;
pub mod qed;
pub mod raw;
mod util;

pub use check::{CheckMode, CheckReport, LostData};
pub use error::{Error, Result};
pub use io::{FileStorage, MemStorage, Storage};
pub use open::open;
pub use util::is_zero;

use std::sync::Arc;

/// The largest virtual size an image may have: qemu's `INT64_MAX` (its sizes are signed, and
/// qemu-img refuses larger ones). Checked before any rounding, so nothing wraps.
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Refuses a virtual size beyond [`MAX_SIZE`], in qemu-img's words.
pub fn check_size(size: u64) -> Result<()> {
    if size > MAX_SIZE {
        return Err(Error::invalid(format!(
            "Invalid image size specified. Must be between 0 and {MAX_SIZE}."
        )));
    }
    Ok(())
}

/// An image format cowimg reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// QEMU copy-on-write, version 2 or 3.
    Qcow2,
    /// QEMU enhanced disk.
    Qed,
    /// The guest's bytes as they are.
    Raw,
}

impl Format {
    /// The name qemu uses for the format (`-f`, `backing_fmt`, info's `format`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Qed => "qed",
            Format::Raw => "raw",
        }
    }

    /// Parses a qemu format name; `None` for formats cowimg does not handle.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "qcow2" => Some(Format::Qcow2),
            "qed" => Some(Format::Qed),
            "raw" => Some(Format::Raw),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The backing file an image names: the name exactly as stored, and the recorded format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingRef {
    /// The name as stored in the image (relative names are relative to the image's directory).
    pub name: String,
    /// The recorded format name, if the image records one (qcow2 extension, QED no-probe bit).
    pub format: Option<String>,
}

/// How a guest range is stored in one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alloc {
    /// Plain data at host offset `host` (of the first byte of the run; the run is contiguous).
    Data {
        /// Host offset of the run's first byte.
        host: u64,
    },
    /// A compressed cluster: compressed bytes start at `host` and span at most `len` bytes.
    /// The run lies inside one guest cluster.
    Compressed {
        /// Host offset of the compressed bytes.
        host: u64,
        /// How many bytes they span at most.
        len: u64,
    },
    /// Reads as zeros and hides the backing file; `host` is a preallocated cluster, if any.
    Zero {
        /// The preallocated host cluster, if any.
        host: Option<u64>,
    },
    /// Not stored in this layer: reads come from the backing file (zeros without one).
    Unallocated,
}

/// A guest range with one kind of allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// How it is stored.
    pub alloc: Alloc,
}

impl Run {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Appends `run` to `runs`, merging it into the previous run when they continue each other
/// (same kind, and contiguous host offsets for data).
pub fn push_run(runs: &mut Vec<Run>, run: Run) {
    if run.len == 0 {
        return;
    }
    if let Some(last) = runs.last_mut() {
        if last.end() == run.start {
            let merged = match (last.alloc, run.alloc) {
                (Alloc::Data { host: a }, Alloc::Data { host: b }) => a + last.len == b,
                (Alloc::Zero { host: None }, Alloc::Zero { host: None }) => true,
                (Alloc::Zero { host: Some(a) }, Alloc::Zero { host: Some(b) }) => a + last.len == b,
                (Alloc::Unallocated, Alloc::Unallocated) => true,
                _ => false,
            };
            if merged {
                last.len += run.len;
                return;
            }
        }
    }
    runs.push(run);
}

/// A guest range of one layer as qemu's block status describes it: a [`Run`] plus two facts
/// only reporting (`map`, strict `compare`) needs. Runs split where qemu's driver would end a
/// status query (the end of an L2 table), so that a query's length can be reproduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// How it is stored.
    pub alloc: Alloc,
    /// For an unallocated run: the host offset of space its cluster keeps for it (extended L2:
    /// a subcluster not written inside an allocated cluster, qemu's UNALLOCATED_ALLOC). qemu
    /// reports that offset although reads go to the backing file.
    pub reserved: Option<u64>,
    /// qcow2 with preallocated metadata: qemu asks the file about data clusters (its
    /// BDRV_BLOCK_RECURSE), and the run is data lying in a hole of the file (or past its end),
    /// which qemu reports as zero data.
    pub recurse: Option<bool>,
}

impl Status {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The status of a run that has nothing beyond its allocation to report.
    pub fn plain(run: Run) -> Status {
        Status {
            start: run.start,
            len: run.len,
            alloc: run.alloc,
            reserved: None,
            recurse: None,
        }
    }
}

/// Appends `st`, merging it into the previous status when it continues it as qemu's drivers
/// merge clusters into one answer (same kind, contiguous host offsets).
pub fn push_status(out: &mut Vec<Status>, st: Status) {
    if st.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        let contiguous = |a: Option<u64>, b: Option<u64>, len: u64| match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => a + len == b,
            _ => false,
        };
        if last.end() == st.start
            && last.recurse == st.recurse
            && contiguous(last.reserved, st.reserved, last.len)
        {
            let mut runs = vec![Run {
                start: last.start,
                len: last.len,
                alloc: last.alloc,
            }];
            push_run(
                &mut runs,
                Run {
                    start: st.start,
                    len: st.len,
                    alloc: st.alloc,
                },
            );
            if runs.len() == 1 {
                last.len += st.len;
                return;
            }
        }
    }
    out.push(st);
}

/// Commits what a dropped image still has staged (its `Drop`): a write is never lost because
/// its caller forgot to commit. The error has nowhere to go but stderr.
pub(crate) fn commit_on_drop(image: &dyn Image) {
    if let Err(e) = image.commit() {
        eprintln!(
            "cowimg: committing the writes staged in '{}' when it was closed failed: {e}",
            image.storage().path().display()
        );
    }
}

/// Allocated tables one [`Image::status_ahead`] call reads at most.
const AHEAD_TABLES: usize = 16;

/// [`Image::status_ahead`] for formats whose answers end at an L2 table covering `span` guest
/// bytes: the image's own [`Image::status`], table by table, merged. `allocated(i)` tells
/// whether table `i` (the L1 index) exists: unallocated table ranges cost nothing, and the walk
/// stops after [`AHEAD_TABLES`] allocated ones.
pub(crate) fn status_ahead_by_table(
    image: &dyn Image,
    start: u64,
    len: u64,
    span: u64,
    allocated: impl Fn(usize) -> bool,
) -> Result<Vec<Status>> {
    let end = start.saturating_add(len).min(image.virtual_size());
    let mut out = Vec::new();
    let mut tables = 0;
    let mut off = start;
    while off < end && tables < AHEAD_TABLES {
        let region_end = end.min((off / span).saturating_add(1).saturating_mul(span));
        if allocated((off / span) as usize) {
            tables += 1;
        }
        for st in image.status(off, region_end - off)? {
            push_status(&mut out, st);
        }
        off = region_end;
    }
    Ok(out)
}

/// The body of [`Image::fill_unallocated`] once the caller holds the clusters of the range:
/// `write` gets each unallocated run of `[offset, offset + data.len())` with its part of
/// `data`. Returns the bytes written.
pub(crate) fn fill_runs(
    image: &dyn Image,
    offset: u64,
    data: &[u8],
    mut write: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    let mut filled = 0;
    for run in image.map(offset, data.len() as u64)? {
        if run.alloc == Alloc::Unallocated {
            let at = (run.start - offset) as usize;
            write(run.start, &data[at..at + run.len as usize])?;
            filled += run.len;
        }
    }
    Ok(filled)
}

/// Reads guest data from whatever lies below a layer (its backing chain). Used to fill the
/// untouched part of a cluster when a partial write allocates it.
pub trait ReadBelow: Sync {
    /// Fills `buf` with the guest bytes at `offset` as the layers below read them.
    fn read_below(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// Nothing below: reads as zeros.
pub struct ZerosBelow;

impl ReadBelow for ZerosBelow {
    fn read_below(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
}

/// How `resize` provides the space of a grown range (qemu's `--preallocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prealloc {
    /// Nothing is allocated: the new range reads zeros and costs no space.
    Off,
    /// qcow2: clusters and their table entries are allocated; the data stays a hole.
    Metadata,
    /// The space is reserved in the file (cowimg writes zeros, which reserves it too).
    Falloc,
    /// Zeros are written over the new range.
    Full,
}

impl Prealloc {
    /// The name qemu uses.
    pub fn name(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

/// Format-specific facts for `info`.
#[derive(Clone, Debug, PartialEq)]
pub enum Details {
    /// A qcow2 image's version, features, snapshots, bitmaps...
    Qcow2(qcow2::Qcow2Details),
    /// A QED image's table size and flags.
    Qed(qed::QedDetails),
    /// Raw has none.
    Raw,
}

/// An open image of any format.
pub trait Image: Send + Sync {
    /// The image's format.
    fn format(&self) -> Format;
    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;
    /// Cluster size in bytes; `None` for raw.
    fn cluster_size(&self) -> Option<u64>;
    /// The smallest unit a write allocates: the subcluster with extended L2, else the cluster
    /// (512 for raw).
    fn allocation_unit(&self) -> u64 {
        self.cluster_size().unwrap_or(512)
    }
    /// The backing file this image names, if any.
    fn backing(&self) -> Option<BackingRef>;
    /// The storage holding the image.
    fn storage(&self) -> &Arc<dyn Storage>;
    /// Coalesced runs covering `[start, start + len)`, clipped to the virtual size.
    fn map(&self, start: u64, len: u64) -> Result<Vec<Run>>;
    /// The runs of `[start, start + len)` as qemu's block status reports them (see
    /// [`Status`]); reads need only [`Image::map`].
    fn status(&self, start: u64, len: u64) -> Result<Vec<Status>> {
        Ok(self
            .map(start, len)?
            .into_iter()
            .map(Status::plain)
            .collect())
    }
    /// The runs from `start` on, as [`Image::status`] reports them but merged across L2
    /// tables, for walks whose result does not depend on where qemu's answers end (`map`'s
    /// merged output, `convert`, `stream`). The answer covers at least one run and at most
    /// `len` bytes, and may stop early: after a bounded number of allocated tables, so that
    /// memory and time per call grow with the data, never with the range asked (an
    /// unallocated table range of any size is one run).
    fn status_ahead(&self, start: u64, len: u64) -> Result<Vec<Status>> {
        let mut out = Vec::new();
        for st in self.status(start, len)? {
            push_status(&mut out, st);
        }
        Ok(out)
    }
    /// The storage that holds the guest data ([`Alloc::Data`] host offsets point into it):
    /// the image file itself, or a qcow2 image's external data file.
    fn data_storage(&self) -> &Arc<dyn Storage> {
        self.storage()
    }
    /// Reads data this layer holds at host offset `host` (see [`Alloc::Data`]).
    fn read_host(&self, host: u64, buf: &mut [u8]) -> Result<()>;
    /// Decompresses the cluster described by [`Alloc::Compressed`] into `out` (one cluster).
    fn read_compressed(&self, host: u64, len: u64, out: &mut [u8]) -> Result<()> {
        let _ = (host, len, out);
        Err(Error::Unsupported(format!(
            "compressed clusters in {}",
            self.format()
        )))
    }
    /// Facts for `info`.
    fn details(&self) -> Details;
    /// qcow2 dirty bit (lazy refcounts not yet written back).
    fn is_dirty(&self) -> bool {
        false
    }
    /// Whether the image carries cowimg's copy-on-read flag.
    fn copy_on_read(&self) -> bool {
        false
    }

    // ---- writing (only on images opened writable) ----

    /// Writes guest data at `offset`. Clusters that are not allocated in this layer are
    /// allocated; a partial cluster is completed from `below`. The data is written at once;
    /// the metadata that makes it visible is staged until [`Image::commit`]. Any threads may
    /// write any ranges at once: writes touching one cluster run one after the other (see
    /// [`clusters`]), others in parallel.
    fn write(&self, offset: u64, data: &[u8], below: &dyn ReadBelow) -> Result<()>;
    /// Sets aside, now, the host space a later [`Image::write`] of `[offset, offset + len)`
    /// will allocate (data clusters this layer does not hold yet, and their tables), so that
    /// the file's layout follows the order of these calls rather than the order in which
    /// parallel writes happen to land: parallel copies reserve in guest order and produce the
    /// same file on every run. Nothing is counted or pointed to until the write takes the
    /// space; space set aside and never written stays a hole nothing refers to. Optional: a
    /// write to a range not reserved allocates when it runs.
    fn reserve(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Compresses one cluster's data for [`Image::write_compressed`] (pure computation, for
    /// the copy workers); `None` when the format has no compression or the data does not
    /// shrink.
    fn compress_cluster(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        let _ = data;
        Ok(None)
    }
    /// Stores compressed data as the cluster at `offset`, packed after the previous compressed
    /// cluster; returns false when nothing was written (the caller writes the data plainly).
    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<bool> {
        let _ = (offset, compressed);
        Ok(false)
    }
    /// Copy-on-read fill: writes `data` (what the layers below read at `offset`) into the
    /// units of `[offset, offset + data.len())` that are still unallocated in this layer, and
    /// leaves allocated ones alone. The allocation is decided while the clusters are held
    /// (see [`clusters`]), so a fill racing a [`Image::write`] of the same range never
    /// replaces the newer data with the older: the write either allocated first (the fill
    /// skips it) or waits for the fill and lands on top. Returns the bytes filled. `offset`
    /// and the length should be multiples of [`Image::allocation_unit`] (or end at the
    /// image's end); a partial unit is completed from `below`.
    fn fill_unallocated(&self, offset: u64, data: &[u8], below: &dyn ReadBelow) -> Result<u64>;
    /// Makes `[offset, offset + len)` read as zeros, hiding the backing file, with zero
    /// clusters where the format has them (whole units) and written zeros elsewhere.
    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn ReadBelow) -> Result<()>;
    /// Makes every staged write durable, in crash-safe order: data and new tables, sync;
    /// reference counts, sync; table entries, sync.
    ///
    /// An image dropped with staged writes commits them itself (an error can then only be
    /// printed on stderr): writes are never lost silently. Call `commit` (or
    /// [`Image::close`]) where the outcome matters.
    fn commit(&self) -> Result<()>;
    /// Commits what is staged before the image is let go, returning the outcome: the way to
    /// end a writing session when errors must be seen.
    fn close(&self) -> Result<()> {
        self.commit()
    }
    /// Points the image at a new backing file (or none); written last, crash-safely, synced.
    /// Must follow a [`Image::commit`].
    fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()>;
    /// Changes the virtual size to `size` (a multiple of 512), crash-safely: whatever
    /// grows the tables is written and counted first, the size changes with one header write,
    /// and what the change leaves unused is freed last. Shrinking drops the data past the new
    /// end; the caller decides whether that is wanted (qemu's `--shrink`). Formats that cannot
    /// resize as asked say so in qemu's words.
    fn resize(&self, size: u64, prealloc: Prealloc) -> Result<()> {
        let _ = (size, prealloc);
        Err(Error::Unsupported(format!(
            "resizing {} images",
            self.format()
        )))
    }
    /// Drops every cluster the image holds itself, so that it reads as its backing file
    /// (qemu's make_empty, which `commit` runs on the committed image). Crash-safe: table
    /// entries are cleared before the clusters are freed, so an interruption leaves some
    /// clusters emptied and the rest as they were, never a dangling reference. Formats
    /// without it (QED and raw, as in qemu) return [`Error::Unsupported`].
    fn make_empty(&self) -> Result<()> {
        Err(Error::Unsupported(format!(
            "emptying {} images",
            self.format()
        )))
    }
    /// Creates an internal snapshot named `name` of the image's current state (qcow2;
    /// crash-safe, the snapshot table switched by one header write). Formats without
    /// internal snapshots (QED, raw, as in qemu) return [`Error::Unsupported`].
    fn snapshot_create(&self, name: &str) -> Result<()> {
        let _ = name;
        Err(Error::Unsupported(format!(
            "internal snapshots in {} images",
            self.format()
        )))
    }
    /// A read-only view of the image as internal snapshot `which` holds it (qemu's
    /// `bdrv_snapshot_load_tmp`, as `qemu-img convert -l` reads it): the snapshot's tables
    /// over the image's current size and backing file. `None` when no snapshot matches;
    /// formats without internal snapshots return [`Error::Unsupported`].
    fn snapshot_view(
        &self,
        which: qcow2::SnapshotRef<'_>,
    ) -> Result<Option<std::sync::Arc<dyn Image>>> {
        let _ = which;
        Err(Error::Unsupported(format!(
            "temporarily loading internal snapshots in {} images",
            self.format()
        )))
    }
    /// Reverts the image to the internal snapshot with id (or else name) `id_or_name`, its
    /// size included; false when there is none. Crash-safe: the active L1 table is switched
    /// by one header write.
    fn snapshot_apply(&self, id_or_name: &str) -> Result<bool> {
        let _ = id_or_name;
        Err(Error::Unsupported(format!(
            "internal snapshots in {} images",
            self.format()
        )))
    }
    /// Deletes the (first) internal snapshot named `name`, freeing what only it used; false
    /// when there is none. By name only, as qemu-img snapshot -d.
    fn snapshot_delete(&self, name: &str) -> Result<bool> {
        let _ = name;
        Err(Error::Unsupported(format!(
            "internal snapshots in {} images",
            self.format()
        )))
    }
    /// Changes qcow2's version (`compat=0.10` is 2, `compat=1.1` is 3) as `qemu-img amend`
    /// does: an upgrade rewrites the header (and a snapshot table with short entries); a
    /// downgrade expands zero clusters first and is refused where v2 cannot hold the image.
    fn set_qcow2_version(&self, version: u32) -> Result<()> {
        let _ = version;
        Err(Error::Unsupported(format!(
            "the compatibility level of {} images",
            self.format()
        )))
    }
    /// Rewrites qcow2's refcount structures with entries of `bits` bits (a power of two up
    /// to 64; v3), as `qemu-img amend -o refcount_bits=N` does.
    fn set_refcount_bits(&self, bits: u32) -> Result<()> {
        let _ = bits;
        Err(Error::Unsupported(format!(
            "the refcount width of {} images",
            self.format()
        )))
    }
    /// Sets or clears qcow2's lazy refcounts bit (v3; one header write, synced). cowimg's
    /// writer keeps refcounts exact either way: the bit only lets qemu defer them.
    fn set_lazy_refcounts(&self, on: bool) -> Result<()> {
        let _ = on;
        Err(Error::Unsupported(format!(
            "lazy refcounts in {} images",
            self.format()
        )))
    }
    /// Sets or clears cowimg's copy-on-read flag (header area; synced).
    fn set_copy_on_read(&self, on: bool) -> Result<()> {
        let _ = on;
        Err(Error::Unsupported(format!(
            "the copy-on-read flag in {} images",
            self.format()
        )))
    }

    // ---- checking ----

    /// Checks the image's metadata and, with a repair mode, fixes what can be fixed. The
    /// per-problem lines are collected in [`CheckReport::messages`].
    fn check(&self, mode: CheckMode) -> Result<CheckReport> {
        let mut lines = Vec::new();
        let mut report = self.check_logged(mode, &mut |l: &str| lines.push(l.to_string()))?;
        report.messages = lines;
        Ok(report)
    }

    /// As [`Image::check`], but hands each per-problem line to `log` as it is found (a damaged
    /// image can produce one line per cluster; nothing is collected).
    fn check_logged(&self, mode: CheckMode, log: &mut dyn FnMut(&str)) -> Result<CheckReport>;
}

#[cfg(test)]
mod fill_tests {
    use super::*;

    /// A backing chain's stand-in: every byte below reads as `0xbb`.
    struct Old;

    impl ReadBelow for Old {
        fn read_below(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
            buf.fill(0xbb);
            Ok(())
        }
    }

    const CS: u64 = 65536;

    fn images() -> Vec<Arc<dyn Image>> {
        let backing = Some(BackingRef {
            name: "base.raw".into(),
            format: Some("raw".into()),
        });
        let q: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new(), "t.qcow2"));
        qcow2::create::create(
            &*q,
            &qcow2::create::Options {
                size: 64 * CS,
                backing: backing.clone(),
                ..Default::default()
            },
        )
        .unwrap();
        let e: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new(), "t.qed"));
        qed::create::create(
            &*e,
            &qed::create::Options {
                size: 64 * CS,
                backing,
                ..Default::default()
            },
        )
        .unwrap();
        let opts = qcow2::OpenOptions {
            writable: true,
            data_file: None,
            repair: false,
        };
        vec![
            Arc::new(qcow2::Qcow2::open(q, opts).unwrap()),
            Arc::new(qed::Qed::open(e, true).unwrap()),
        ]
    }

    fn read(img: &dyn Image, offset: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0xbb; len as usize];
        for r in img.map(offset, len).unwrap() {
            let at = (r.start - offset) as usize;
            if let Alloc::Data { host } = r.alloc {
                img.read_host(host, &mut out[at..at + r.len as usize])
                    .unwrap();
            }
        }
        out
    }

    #[test]
    fn a_fill_leaves_allocated_clusters_alone() {
        for img in images() {
            img.write(CS + 100, &[0xaa; 10], &Old).unwrap();
            let filled = img
                .fill_unallocated(0, &[0xbb; 4 * CS as usize], &Old)
                .unwrap();
            assert_eq!(filled, 3 * CS, "{}", img.format());
            let got = read(&*img, 0, 4 * CS);
            let mut want = vec![0xbb; 4 * CS as usize];
            want[CS as usize + 100..CS as usize + 110].fill(0xaa);
            assert!(got == want, "{}: the write survives the fill", img.format());
            assert!(img
                .map(0, 4 * CS)
                .unwrap()
                .iter()
                .all(|r| r.alloc != Alloc::Unallocated));
            assert_eq!(
                img.fill_unallocated(0, &[0; 4 * CS as usize], &Old)
                    .unwrap(),
                0
            );
            img.commit().unwrap();
            let report = img.check(CheckMode::ReadOnly).unwrap();
            assert_eq!(
                (report.corruptions, report.leaks),
                (0, 0),
                "{}",
                img.format()
            );
        }
    }

    #[test]
    fn a_fill_racing_a_write_never_replaces_the_newer_data() {
        for img in images() {
            for round in 0..64u64 {
                let c = round;
                std::thread::scope(|s| {
                    s.spawn(|| {
                        img.fill_unallocated(c * CS, &[0xbb; CS as usize], &Old)
                            .unwrap()
                    });
                    s.spawn(|| img.write(c * CS + 512, &[0xaa; 512], &Old).unwrap());
                });
                let got = read(&*img, c * CS + 512, 512);
                assert!(
                    got.iter().all(|&b| b == 0xaa),
                    "{} round {round}",
                    img.format()
                );
            }
            img.commit().unwrap();
        }
    }
}
