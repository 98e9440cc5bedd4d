//! `check` for qcow2: every host cluster's reference count is recomputed from the structures
//! that use it (header cluster, L1 and L2 tables, compressed clusters' sectors, the refcount
//! table and blocks, the snapshot table and every snapshot's tables, the bitmap directory and
//! bitmap tables) and compared with the stored refcounts; COPIED flags are compared with the
//! stored refcounts; offsets are checked for alignment and against the end of the file.
//!
//! The counts, the order of the per-problem lines and their wording follow qemu's
//! `qcow2_check_refcounts` (block/qcow2-refcount.c), so that scripts written against
//! `qemu-img check` read cowimg the same way. Repair follows qemu too, with these differences
//! (docs/check.md says why):
//!
//! * `-r all` drops mappings that cannot be right (a data cluster, compressed cluster or L2
//!   table that lies past the end of the file, is misaligned, or sits in the header, the
//!   active L1 table, the refcount table, the snapshot table or the bitmap directory) and
//!   reports the guest ranges whose old contents are lost; qemu leaves them corrupt.
//! * A refcount rebuild writes the new refcount table and blocks into fresh clusters past the
//!   end of the file, syncs, and only then switches the header to them, so an interruption
//!   leaves the old structures in charge; qemu reuses free clusters inside the file.
//! * `-r all` extends a file that ends inside an active L2 table to hold the whole table:
//!   qemu reads the missing part as zeros (unallocated entries), cowimg's reader refuses a
//!   cut table; the zeros on disk make both read it the same.
//! * Refcounts stored for clusters past the end of the file are cleared (qemu ignores them;
//!   cowimg's allocator appends after the last cluster with a refcount, so they would leave
//!   a hole in the file).
//!
//! Write order of a repair, so that an interruption leaves the image no worse: dropped
//! mappings, sync; refcount corrections (or the rebuilt structures, sync, the header switch),
//! sync; COPIED flags, sync; the dirty and corrupt bits last, sync. A refcount never drops
//! below the references that are still on disk.
//!
//! Memory is one compact counter per host cluster (allocated in chunks as clusters are
//! touched) for the computed counts and one for the stored counts; tables are read whole and
//! neighbouring tables in one request.
//!
//! The files follow the pass: [`scan`] counts the references and decides the mappings to
//! drop, [`refcounts`] reads the stored refcounts and compares and corrects them, [`copied`]
//! checks the COPIED flags, [`rebuild`] writes new refcount structures (a rebuild, or a new
//! refcount width); [`counts`] holds the compact counters and batched table reads they share.
//! This file holds the pass itself ([`run`]) and the checker's state.

use std::collections::{BTreeMap, BTreeSet};

use super::cache::Meta;
use super::header::{self, Header};
use super::layout::appended_refcount_structures;
use super::refcount::{reftable_block, RefGeometry, REFT_RESERVED_MASK};
use super::snapshot;
use super::table::{self, Geometry, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use super::Qcow2;
use crate::io::{read_exact, sync, write_all, Storage};
use crate::util::{be32, be64};
use crate::{CheckMode, CheckReport, Error, LostData, Result};

mod copied;
mod counts;
mod rebuild;
mod refcounts;
mod scan;

use counts::{Counts, Tables};
pub(super) use rebuild::change_refcount_order;
use refcounts::Stored;

/// Bits of an L1 entry that must be zero.
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard L2 entry that must be zero.
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Extended L2 bitmap halves.
const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
const BITMAP_ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
/// Bitmap table entries.
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
const BME_ALL_ONES: u64 = 1;
/// qemu refuses to check files of more clusters than this (its counters are `int`).
const MAX_CLUSTERS: u64 = i32::MAX as u64;
/// qemu's `BDRV_MAX_LENGTH`: a read reaching past it fails (EIO) instead of reading zeros.
const MAX_READABLE: u64 = 0x7fff_ffff_c000_0000;
/// Table bytes read per batch: neighbouring tables are fetched in one request.
const WINDOW_BYTES: u64 = 4 << 20;
/// Largest bitmap table cowimg reads (qemu's limit is 2^27 entries, far beyond any image).
const MAX_BITMAP_TABLE_BYTES: u64 = 64 << 20;

// ---------------------------------------------------------------------------------------------
// The checker

/// Whose tables are being scanned.
#[derive(Clone)]
enum Owner {
    Active,
    Snapshot(String),
}

impl Owner {
    fn name(&self) -> String {
        match self {
            Owner::Active => "active layer".into(),
            Owner::Snapshot(s) => format!("snapshot {s}"),
        }
    }
}

/// What qemu calls the cluster type of an L2 entry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Type {
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Unallocated,
}

/// One pass over the image's metadata.
struct Checker<'a, 'l> {
    s: &'a dyn Storage,
    h: Header,
    geo: Geometry,
    rgeo: RefGeometry,
    cs: u64,
    file_len: u64,
    data_file: bool,
    snapshots: Vec<snapshot::Snapshot>,
    snapshots_size: u64,
    mode: CheckMode,
    log: &'l mut dyn FnMut(&str),
    refs: Counts,
    res: CheckReport,
    rebuild: bool,
    /// Byte ranges counted for the refcount table and blocks (not referenced after a rebuild).
    refstruct: Vec<(u64, u64)>,
    /// Cluster ranges whose place the header itself gives: nothing else may live there.
    fixed_meta: Vec<(u64, u64, &'static str)>,
    /// Entry rewrites decided by the scan (file offset -> bytes), applied before refcounts.
    edits: BTreeMap<u64, Vec<u8>>,
    /// The corruption message for an unreadable refcount block is shown once, as qemu does.
    signalled: bool,
    /// The length the file is extended to before the edits (cut L2 tables; 0: none).
    extend_to: u64,
}

impl<'a, 'l> Checker<'a, 'l> {
    fn new(
        img: &'a Qcow2,
        h: Header,
        file_len: u64,
        mode: CheckMode,
        log: &'l mut dyn FnMut(&str),
    ) -> Result<Self> {
        let s: &dyn Storage = &*img.storage;
        let cs = h.cluster_size();
        let (snapshots, snapshots_size) = if h.nb_snapshots > 0 {
            snapshot::read_snapshots(s, h.snapshots_offset, h.nb_snapshots, file_len)?
        } else {
            (Vec::new(), 0)
        };
        let rgeo = RefGeometry {
            cluster_bits: h.cluster_bits,
            refcount_order: h.refcount_order,
        };
        let mut c = Checker {
            s,
            geo: img.geo,
            rgeo,
            cs,
            file_len,
            data_file: img.data_file.is_some(),
            snapshots,
            snapshots_size,
            mode,
            log,
            refs: Counts::with_len(file_len.div_ceil(cs)),
            res: CheckReport::default(),
            rebuild: false,
            refstruct: Vec::new(),
            fixed_meta: Vec::new(),
            edits: BTreeMap::new(),
            signalled: false,
            extend_to: 0,
            h,
        };
        c.res.total_clusters = c.h.size.div_ceil(512).saturating_mul(512).div_ceil(cs);
        c.fixed_meta = c.fixed_metadata();
        Ok(c)
    }

    fn say(&mut self, line: String) {
        (self.log)(&line);
    }

    fn fixing_errors(&self) -> bool {
        self.mode == CheckMode::RepairAll
    }

    /// The clusters of the structures whose place the header gives directly. A data cluster or
    /// L2 table found there is certainly wrong (the header is validated when the image opens).
    fn fixed_metadata(&self) -> Vec<(u64, u64, &'static str)> {
        let cs = self.cs;
        let span = |off: u64, len: u64| (off / cs, off.saturating_add(len).div_ceil(cs));
        let mut v = vec![(0, 1, "the image header")];
        let h = &self.h;
        if h.l1_size > 0 {
            let (a, b) = span(h.l1_table_offset, u64::from(h.l1_size) * 8);
            v.push((a, b, "the active L1 table"));
        }
        let (a, b) = span(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        );
        v.push((a, b, "the refcount table"));
        if self.snapshots_size > 0 {
            let (a, b) = span(h.snapshots_offset, self.snapshots_size);
            v.push((a, b, "the snapshot table"));
        }
        if let Some((_, size, off)) = self.bitmap_extension() {
            if size > 0 {
                let (a, b) = span(off, size);
                v.push((a, b, "the bitmap directory"));
            }
        }
        v
    }

    /// What fixed structure, if any, covers host bytes `[off, off + len)`.
    fn overlaps_fixed(&self, off: u64, len: u64) -> Option<&'static str> {
        let a = off / self.cs;
        let b = off.saturating_add(len).div_ceil(self.cs);
        self.fixed_meta
            .iter()
            .find(|&&(s, e, _)| a < e && s < b)
            .map(|&(_, _, what)| what)
    }

    /// (count, directory size, directory offset) of a bitmaps extension qemu trusts.
    fn bitmap_extension(&self) -> Option<(u32, u64, u64)> {
        if self.h.autoclear_features & header::AUTOCLEAR_BITMAPS == 0 {
            return None;
        }
        let e = self.h.extension(header::EXT_BITMAPS)?;
        if e.len() < 24 {
            return None;
        }
        Some((be32(e, 0), be64(e, 8), be64(e, 16)))
    }

    /// Whether `[offset, offset + size)` ends a cluster or more past the end of the file
    /// (qemu tolerates a last cluster that is only partly in the file).
    fn past_eof(&self, offset: u64, size: u64) -> bool {
        i128::from(offset) + i128::from(size) - i128::from(self.file_len) >= i128::from(self.cs)
    }

    /// qemu's `qcow2_inc_refcounts_imrt`: counts one reference to every cluster of the range.
    /// Returns whether the range was counted.
    fn inc(&mut self, offset: u64, size: u64) -> bool {
        if size == 0 {
            return false;
        }
        if self.past_eof(offset, size) {
            self.say(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            self.res.corruptions += 1;
            return false;
        }
        let cb = self.h.cluster_bits;
        let first = offset >> cb;
        let last = (offset + size - 1) >> cb;
        let max = self.rgeo.max();
        for k in first..=last {
            let r = self.refs.get(k);
            if r >= max {
                self.say(format!("ERROR: overflow cluster offset={:#x}", k << cb));
                self.say(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing"
                        .into(),
                );
                self.res.corruptions += 1;
                continue;
            }
            self.refs.set(k, r + 1);
        }
        true
    }

    /// qemu's `qcow2_get_cluster_type`.
    fn classify(&self, entry: u64) -> Type {
        if entry & OFLAG_COMPRESSED != 0 {
            Type::Compressed
        } else if entry & OFLAG_ZERO != 0 && !self.geo.extended_l2 {
            if entry & OFFSET_MASK != 0 {
                Type::ZeroAlloc
            } else {
                Type::ZeroPlain
            }
        } else if entry & OFFSET_MASK == 0 {
            if self.data_file && entry & OFLAG_COPIED != 0 {
                Type::Normal
            } else {
                Type::Unallocated
            }
        } else {
            Type::Normal
        }
    }

    /// The entry (and bitmap) that replaces a broken mapping: the guest range reads as zeros,
    /// as qemu reads a cluster past the end of the file. Version 2 has no zero clusters: the
    /// entry becomes unallocated (zeros without a backing file).
    fn dropped_entry(&self, bitmap: u64, compressed: bool) -> (u64, u64) {
        if self.geo.extended_l2 {
            let alloc = if compressed {
                BITMAP_ALL_ALLOC
            } else {
                bitmap & BITMAP_ALL_ALLOC
            };
            (0, (bitmap & BITMAP_ALL_ZEROES) | (alloc << 32))
        } else if self.h.version >= 3 {
            (OFLAG_ZERO, 0)
        } else {
            (0, 0)
        }
    }

    fn edit_l2(&mut self, l2_offset: u64, i: usize, entry: u64, bitmap: u64) {
        let mut b = entry.to_be_bytes().to_vec();
        let esize = if self.geo.extended_l2 {
            b.extend_from_slice(&bitmap.to_be_bytes());
            16
        } else {
            8
        };
        self.edits.insert(l2_offset + esize * i as u64, b);
    }

    /// Reports the subclusters of `mask` (bit n = subcluster n) of the cluster at `guest` lost,
    /// one range per run of subclusters.
    fn lose_subclusters(&mut self, owner: &Owner, guest: u64, mask: u64, why: &str) {
        let sc = self.geo.subcluster_size();
        let mut n = 0u64;
        while n < 32 {
            if mask & (1 << n) == 0 {
                n += 1;
                continue;
            }
            let start = n;
            while n < 32 && mask & (1 << n) != 0 {
                n += 1;
            }
            let which = if n - start == 1 {
                format!("subcluster {start} of the cluster")
            } else {
                format!("subclusters {start}-{} of the cluster", n - 1)
            };
            let reason = format!("{which} {why}; now read as zeros");
            self.lose(owner, guest + start * sc, (n - start) * sc, reason);
        }
    }

    fn lose(&mut self, owner: &Owner, offset: u64, length: u64, reason: String) {
        let length = length.min(self.h.size.saturating_sub(offset));
        if length > 0 {
            self.res.lost.push(LostData {
                layer: owner.name(),
                offset,
                length,
                reason,
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The pass

/// Checks the image (qemu's `qcow2_co_check_locked`): refcounts and COPIED flags, and with a
/// repair mode repairs them; clears the dirty and corrupt bits when nothing is left broken.
/// The caller holds the image exclusively.
pub(super) fn run(
    img: &Qcow2,
    m: &mut Meta,
    mode: CheckMode,
    log: &mut dyn FnMut(&str),
) -> Result<CheckReport> {
    if mode.repairs() && !img.writable {
        return Err(Error::Refused(
            "repairing needs the image opened read-write".into(),
        ));
    }
    if m.has_staged() {
        return Err(Error::Refused(
            "internal: check with uncommitted writes".into(),
        ));
    }
    let s: &dyn Storage = &*img.storage;
    let file_len = s.len().map_err(|e| Error::io("reading the file size", e))?;
    let cs = m.header.cluster_size();
    if file_len.div_ceil(cs) > MAX_CLUSTERS {
        return Ok(CheckReport {
            check_errors: 1,
            failed: Some("File too large".into()),
            ..CheckReport::default()
        });
    }
    // qemu's check reads the snapshot table first and stops at a misplaced one, repair or
    // not (nothing else can be trusted to be where the header says).
    if m.header.check_snapshot_table().is_err() {
        return Ok(CheckReport {
            check_errors: 1,
            failed: Some("Invalid argument".into()),
            failed_because: Some("ERROR snapshot table offset invalid".into()),
            ..CheckReport::default()
        });
    }
    let result = pass(img, m, mode, file_len, log);
    if mode.repairs() {
        // What the repair changed on disk is the truth now: reload the in-memory state.
        refresh(img, m)?;
    }
    result
}

fn pass(
    img: &Qcow2,
    m: &mut Meta,
    mode: CheckMode,
    file_len: u64,
    log: &mut dyn FnMut(&str),
) -> Result<CheckReport> {
    let s: &dyn Storage = &*img.storage;
    let mut c = Checker::new(img, m.header.clone(), file_len, mode, log)?;
    // v3 snapshot table entries without the 64-bit VM state size and the disk size: a
    // corruption, repaired after the refcounts by rewriting the table (qemu's order).
    let snapshots = (c.h.version >= 3 && c.snapshots.iter().any(|sn| sn.is_incomplete()))
        .then(|| (c.snapshots.clone(), c.snapshots_size));
    if let Some((list, _)) = &snapshots {
        let word = if c.fixing_errors() {
            "Repairing"
        } else {
            "ERROR"
        };
        for (i, _) in list.iter().enumerate().filter(|(_, sn)| sn.is_incomplete()) {
            c.say(format!("{word} snapshot table entry {i} is incomplete"));
        }
    }
    c.calculate()?;
    if mode == CheckMode::RepairAll {
        c.apply_edits()?;
    }
    let n = c.refs.len();
    let mut st = c.load_stored(n, mode.repairs())?;
    let pre = c.res.clone();
    let mut highest = c.compare(&mut st, CheckMode::ReadOnly)?;

    if c.rebuild && mode == CheckMode::RepairAll {
        c.say("Rebuilding refcount structure".into());
        let old = c.res.clone();
        let (offset, clusters) = c.rebuild_structures()?;
        m.header.refcount_table_offset = offset;
        m.header.refcount_table_clusters = clusters;
        // Recount from scratch against the new structures (qemu does the same).
        let file_len = s.len().map_err(|e| Error::io("reading the file size", e))?;
        let log = c.log;
        let mut f = Checker::new(img, m.header.clone(), file_len, CheckMode::ReadOnly, log)?;
        f.calculate()?;
        let n = f.refs.len();
        st = f.load_stored(n, false)?;
        let h = f.compare(&mut st, CheckMode::ReadOnly)?;
        highest = h;
        f.res.corruptions_fixed =
            old.corruptions_fixed + old.corruptions.saturating_sub(f.res.corruptions);
        f.res.leaks_fixed = old.leaks_fixed + old.leaks.saturating_sub(f.res.leaks);
        f.res.lost = old.lost;
        f.mode = mode;
        c = f;
    } else if mode.repairs() {
        if c.rebuild {
            c.say("ERROR need to rebuild refcount structures".into());
            c.res.check_errors += 1;
            c.res.failed = Some(
                "Input/output error (the refcount structures must be rebuilt: use `-r all`)".into(),
            );
            return Ok(c.res);
        }
        if c.res.leaks > 0 || c.res.corruptions > 0 || !st.beyond.is_empty() {
            c.res = pre;
            highest = c.compare(&mut st, mode)?;
        }
    }

    c.check_copied(&st, mode)?;
    c.res.image_end_offset = (highest + 1) * cs_of(&c.h);

    if let Some((list, old_len)) = snapshots {
        let incomplete = list.iter().filter(|sn| sn.is_incomplete()).count() as u64;
        if mode == CheckMode::RepairAll {
            let table = snapshot::encode_table(&list, m.header.size);
            // The allocator must see the repaired file (tables, refcounts, length).
            let replaced = refresh(img, m)
                .and_then(|()| img.replace_snapshot_table_locked(m, &table, old_len));
            match replaced {
                Ok(()) => c.res.corruptions_fixed += incomplete,
                Err(e) => {
                    c.say(format!("ERROR failed to update snapshot table: {e}"));
                    c.res.check_errors += 1;
                    c.res.corruptions += incomplete;
                }
            }
        } else {
            c.res.corruptions += incomplete;
        }
    }

    if mode.repairs() && c.res.check_errors == 0 && c.res.corruptions == 0 {
        mark_clean(s, &mut m.header)?;
    }
    Ok(c.res)
}

/// C's `%#x`: no prefix for zero.
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

fn cs_of(h: &Header) -> u64 {
    h.cluster_size()
}

/// Clears the dirty and corrupt bits (qemu's `qcow2_mark_clean` and `qcow2_mark_consistent`),
/// after everything else is on disk.
fn mark_clean(s: &dyn Storage, h: &mut Header) -> Result<()> {
    let bits = header::INCOMPAT_DIRTY | header::INCOMPAT_CORRUPT;
    if h.version < 3 || h.incompatible_features & bits == 0 {
        return Ok(());
    }
    sync(s)?;
    h.incompatible_features &= !bits;
    write_all(
        s,
        &h.incompatible_features.to_be_bytes(),
        72,
        "the header's incompatible features",
    )?;
    sync(s)
}

/// Reloads what a repair may have changed: the L1 table, cached tables, allocation state.
fn refresh(img: &Qcow2, m: &mut Meta) -> Result<()> {
    let s: &dyn Storage = &*img.storage;
    let mut buf = vec![0u8; m.header.l1_size as usize * 8];
    read_exact(s, &mut buf, m.header.l1_table_offset, "the L1 table")?;
    m.l1 = table::decode(&buf);
    m.l2.clear();
    m.alloc = None;
    m.file_len = s.len().map_err(|e| Error::io("reading the file size", e))?;
    Ok(())
}

impl Qcow2 {
    /// Checks (and with a repair mode repairs) the image, handing each per-problem line to
    /// `log` as it is found.
    pub fn check_with(&self, mode: CheckMode, log: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        run(self, &mut m, mode, log)
    }
}
