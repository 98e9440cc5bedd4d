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

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::cache::Meta;
use super::header::{self, Header};
use super::layout::appended_refcount_structures;
use super::refcount::RefGeometry;
use super::snapshot;
use super::table::{self, Geometry, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use super::Qcow2;
use crate::io::{read_exact, sync, write_all, Storage};
use crate::util::{be32, be64};
use crate::{CheckMode, CheckReport, Error, LostData, Result};

/// Bits of an L1 entry that must be zero.
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard L2 entry that must be zero.
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entries: offset bits and reserved bits.
use super::refcount::{reftable_block, REFT_RESERVED_MASK};
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
// Compact per-cluster counters

const CHUNK_BITS: u32 = 16;
const CHUNK: u64 = 1 << CHUNK_BITS;
/// A counter at this value lives in the spill map (counts that need more than 16 bits).
const SPILL: u16 = u16::MAX;

/// One counter per host cluster: 16 bits each, in chunks of 64 Ki clusters allocated on first
/// use, with the rare larger counts kept aside. 2 bytes per cluster at most, nothing for
/// untouched stretches.
#[derive(Clone, Default)]
pub(crate) struct Counts {
    chunks: Vec<Option<Box<[u16]>>>,
    spill: HashMap<u64, u64>,
    len: u64,
}

impl Counts {
    fn with_len(len: u64) -> Counts {
        let mut c = Counts::default();
        c.grow(len);
        c
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn grow(&mut self, len: u64) {
        if len > self.len {
            self.len = len;
            self.chunks
                .resize_with(len.div_ceil(CHUNK) as usize, || None);
        }
    }

    fn get(&self, i: u64) -> u64 {
        match self.chunks.get((i >> CHUNK_BITS) as usize) {
            Some(Some(c)) => match c[(i & (CHUNK - 1)) as usize] {
                SPILL => self.spill.get(&i).copied().unwrap_or(0),
                v => u64::from(v),
            },
            _ => 0,
        }
    }

    /// Sets counter `i` (grows to hold it).
    fn set(&mut self, i: u64, v: u64) {
        self.grow(i + 1);
        let slot = &mut self.chunks[(i >> CHUNK_BITS) as usize];
        if v == 0 && slot.is_none() {
            return;
        }
        let chunk = slot.get_or_insert_with(|| vec![0u16; CHUNK as usize].into_boxed_slice());
        let cell = &mut chunk[(i & (CHUNK - 1)) as usize];
        if v >= u64::from(SPILL) {
            *cell = SPILL;
            self.spill.insert(i, v);
        } else {
            if *cell == SPILL {
                self.spill.remove(&i);
            }
            *cell = v as u16;
        }
    }

    /// Whether any counter in `[a, b)` is non-zero (quick over untouched chunks).
    fn any(&self, a: u64, b: u64) -> bool {
        let b = b.min(self.len);
        let mut i = a;
        while i < b {
            let ci = (i >> CHUNK_BITS) as usize;
            let chunk_end = ((ci as u64 + 1) << CHUNK_BITS).min(b);
            if let Some(Some(c)) = self.chunks.get(ci) {
                let lo = (i & (CHUNK - 1)) as usize;
                let hi = lo + (chunk_end - i) as usize;
                if c[lo..hi].iter().any(|&v| v != 0) {
                    return true;
                }
            }
            i = chunk_end;
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// Batched table reads

/// A window of tables read in as few requests as possible: tables that follow each other on
/// disk are fetched together. One buffer serves every window (no allocation per table).
struct Tables {
    buf: Vec<u8>,
    at: HashMap<u64, usize>,
    size: usize,
}

impl Tables {
    fn new(size: u64) -> Tables {
        Tables {
            buf: Vec::new(),
            at: HashMap::new(),
            size: size as usize,
        }
    }

    /// Reads the tables at `offsets` (at most a window's worth), replacing the previous ones.
    fn load(&mut self, s: &dyn Storage, offsets: &[u64], what: &str) -> Result<()> {
        let mut sorted: Vec<u64> = offsets.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let size = self.size;
        if self.buf.len() < sorted.len() * size {
            self.buf.resize(sorted.len() * size, 0);
        }
        self.at.clear();
        let mut i = 0;
        while i < sorted.len() {
            let start = sorted[i];
            let mut j = i + 1;
            while j < sorted.len() && sorted[j] == sorted[j - 1].saturating_add(size as u64) {
                j += 1;
            }
            read_exact(s, &mut self.buf[i * size..j * size], start, what)?;
            for (k, &off) in sorted[i..j].iter().enumerate() {
                self.at.insert(off, (i + k) * size);
            }
            i = j;
        }
        Ok(())
    }

    fn get(&self, offset: u64) -> &[u8] {
        match self.at.get(&offset) {
            Some(&at) => &self.buf[at..at + self.size],
            // Every offset asked for was read; an empty table reads as unallocated.
            None => &[],
        }
    }
}

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

/// Stored refcounts, as read from the refcount table and blocks.
struct Stored {
    reftable: Vec<u64>,
    /// Stored counts that differ from the computed ones, as count + 1 (0: the same). Only
    /// damage takes memory here.
    diff: Counts,
    /// The highest cluster of the compared range with a non-zero stored count.
    highest: Option<u64>,
    /// Refcount table indices whose block cannot be read (misaligned, or past qemu's
    /// largest readable offset): their counts are unknown.
    bad_blocks: BTreeSet<u64>,
    /// Non-zero stored counts of clusters past the compared range (past the end of the file).
    beyond: Vec<(u64, u64)>,
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

    // ---- computing the references (qemu's calculate_refcounts) ----

    fn calculate(&mut self) -> Result<()> {
        self.inc(0, self.cs);
        let (l1_offset, l1_size) = (self.h.l1_table_offset, self.h.l1_size);
        self.scan_l1(l1_offset, l1_size, true, &Owner::Active)?;

        if self.data_file && !self.snapshots.is_empty() {
            self.say(format!(
                "ERROR {} snapshots in image with data file",
                self.snapshots.len()
            ));
            self.res.corruptions += 1;
        }
        for sn in std::mem::take(&mut self.snapshots).iter() {
            let owner = Owner::Snapshot(format!("{} ({})", sn.id, sn.name));
            if sn.l1_table_offset % self.cs != 0 {
                self.say(format!(
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id,
                    sn.name,
                    c_hex(sn.l1_table_offset)
                ));
                self.res.corruptions += 1;
                continue;
            }
            if u64::from(sn.l1_size) * 8 > header::MAX_L1_BYTES {
                self.say(format!(
                    "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                    sn.id,
                    sn.name,
                    c_hex(u64::from(sn.l1_size))
                ));
                self.res.corruptions += 1;
                continue;
            }
            self.scan_l1(sn.l1_table_offset, sn.l1_size, false, &owner)?;
        }
        self.inc(self.h.snapshots_offset, self.snapshots_size);

        let (rt_off, rt_len) = (
            self.h.refcount_table_offset,
            u64::from(self.h.refcount_table_clusters) * self.cs,
        );
        if self.inc(rt_off, rt_len) {
            self.refstruct.push((rt_off, rt_len));
        }
        self.bitmaps()?;
        self.check_refblocks()
    }

    /// Counts an L1 table, its L2 tables and everything they map.
    fn scan_l1(&mut self, l1_offset: u64, l1_size: u32, active: bool, owner: &Owner) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = u64::from(l1_size) * 8;
        self.inc(l1_offset, bytes);
        let mut buf = vec![0u8; bytes as usize];
        read_exact(self.s, &mut buf, l1_offset, "an L1 table")?;
        let l1 = table::decode(&buf);
        let cs = self.cs;
        let l1_span = cs << self.geo.l2_bits();
        let per_window = (WINDOW_BYTES / cs).max(1) as usize;
        let mut tables = Tables::new(cs);
        let mut w = 0;
        while w < l1.len() {
            let end = (w + per_window).min(l1.len());
            let wanted: Vec<u64> = l1[w..end]
                .iter()
                .filter(|&&e| e != 0 && self.l1_drop_reason(e & OFFSET_MASK).is_none())
                .map(|&e| e & OFFSET_MASK)
                .collect();
            tables.load(self.s, &wanted, "an L2 table")?;
            for (i, &entry) in l1.iter().enumerate().take(end).skip(w) {
                if entry == 0 {
                    continue;
                }
                if entry & L1E_RESERVED_MASK != 0 {
                    if self.fixing_errors() {
                        // cowimg: qemu reads through the entry with the bits masked off, so
                        // clearing them changes nothing that is read.
                        self.say(format!(
                            "Repairing L1 entry with reserved bits set: {entry:x}"
                        ));
                        self.res.corruptions_fixed += 1;
                        let clean = entry & !L1E_RESERVED_MASK;
                        self.edits
                            .insert(l1_offset + 8 * i as u64, clean.to_be_bytes().to_vec());
                    } else {
                        self.say(format!(
                            "ERROR found L1 entry with reserved bits set: {entry:x}"
                        ));
                        self.res.corruptions += 1;
                    }
                }
                let l2_offset = entry & OFFSET_MASK;
                if let Some(why) = self.l1_drop_reason(l2_offset) {
                    // cowimg's extra repair: the table cannot be there, so its mappings are
                    // unknowable; without the entry the range reads as unallocated, which is
                    // also what qemu reads through a table past the end of the file.
                    self.say(format!(
                        "Repairing l2_offset={l2_offset:x}: Table {why}; L1 entry corrupted"
                    ));
                    self.res.corruptions_fixed += 1;
                    self.edits
                        .insert(l1_offset + 8 * i as u64, 0u64.to_be_bytes().to_vec());
                    let guest = i as u64 * l1_span;
                    let reason = format!(
                        "its L2 table at {l2_offset:#x} {why}; the L1 entry was cleared and the range now reads as unallocated (from the backing file, or zeros)"
                    );
                    self.lose(owner, guest, l1_span, reason);
                    continue;
                }
                if active && self.fixing_errors() && self.cut_by_eof(l2_offset) {
                    self.extend_over(owner, l2_offset, i as u64 * l1_span);
                }
                self.inc(l2_offset, cs);
                if l2_offset % cs != 0 {
                    self.say(format!("ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"));
                    self.res.corruptions += 1;
                }
                self.scan_l2(
                    tables.get(l2_offset),
                    l2_offset,
                    i as u64 * l1_span,
                    active,
                    owner,
                );
            }
            w = end;
        }
        Ok(())
    }

    /// Whether the aligned L2 table at `l2_offset` starts inside the file and ends past it (a
    /// file cut short inside the table).
    fn cut_by_eof(&self, l2_offset: u64) -> bool {
        l2_offset % self.cs == 0
            && l2_offset < self.file_len
            && l2_offset.saturating_add(self.cs) > self.file_len
    }

    /// cowimg's extra repair of an active L2 table that the end of the file cuts: qemu reads
    /// the missing part as zeros (those entries unallocated), which cowimg's reader refuses to
    /// assume. Extending the file to hold the table writes that reading down (zeros) and
    /// changes nothing that qemu reads; the guest ranges of the entries past the old end are
    /// reported, since what they mapped is unknown.
    fn extend_over(&mut self, owner: &Owner, l2_offset: u64, guest: u64) {
        let end = l2_offset + self.cs;
        self.say(format!(
            "Repairing l2_offset={l2_offset:x}: Table is cut by the end of the file; file extended to {end:#x} to hold it"
        ));
        self.res.corruptions_fixed += 1;
        self.extend_to = self.extend_to.max(end);
        let entry_bytes = if self.geo.extended_l2 { 16 } else { 8 };
        let first = (self.file_len - l2_offset) / entry_bytes;
        let entries = self.cs / entry_bytes;
        let reason = format!(
            "its L2 table at {l2_offset:#x} was cut by the end of the file; the entries past it now read as unallocated (from the backing file, or zeros), as qemu reads them"
        );
        self.lose(
            owner,
            guest + first * self.cs,
            (entries - first) * self.cs,
            reason,
        );
    }

    /// Why an L2 table offset cannot be right, when `-r all` is to drop such entries.
    fn l1_drop_reason(&self, l2_offset: u64) -> Option<String> {
        if !self.fixing_errors() {
            return None;
        }
        if l2_offset % self.cs != 0 {
            return Some("is not cluster aligned".into());
        }
        if self.past_eof(l2_offset, self.cs) {
            return Some("lies past the end of the file".into());
        }
        self.overlaps_fixed(l2_offset, self.cs)
            .map(|what| format!("overlaps {what}"))
    }

    /// qemu's `check_refcounts_l2`, plus cowimg's dropping of impossible mappings.
    fn scan_l2(
        &mut self,
        table: &[u8],
        l2_offset: u64,
        guest_base: u64,
        frag: bool,
        owner: &Owner,
    ) {
        let ext = self.geo.extended_l2;
        let esize = if ext { 16 } else { 8 };
        let cs = self.cs;
        let mut next_contiguous = 0u64;
        for i in 0..(table.len() / esize) {
            let mut entry = be64(table, i * esize);
            let mut bitmap = if ext { be64(table, i * esize + 8) } else { 0 };
            if entry == 0 && bitmap == 0 {
                // Unallocated, nothing to count or check (most entries of a sparse image).
                continue;
            }
            let guest = guest_base + i as u64 * cs;
            let ty = self.classify(entry);
            if ty != Type::Compressed && entry & L2E_STD_RESERVED_MASK != 0 {
                if self.fixing_errors() {
                    // cowimg: qemu masks the bits off when it reads, so clearing them
                    // changes nothing that is read. Later decisions use the clean entry.
                    self.say(format!(
                        "Repairing l2 entry with reserved bits set: {entry:x}"
                    ));
                    self.res.corruptions_fixed += 1;
                    entry &= !L2E_STD_RESERVED_MASK;
                    self.edit_l2(l2_offset, i, entry, bitmap);
                } else {
                    self.say(format!(
                        "ERROR found l2 entry with reserved bits set: {entry:x}"
                    ));
                    self.res.corruptions += 1;
                }
            }
            match ty {
                Type::Compressed => {
                    let (coffset, csize) = self.geo.compressed(entry & !OFLAG_COPIED);
                    if entry & OFLAG_COPIED != 0 {
                        let mask = (1u64 << (62 - (self.h.cluster_bits - 8))) - 1;
                        if self.fixing_errors() {
                            // cowimg: the flag has one right value here, so set it.
                            self.say(format!(
                                "Repairing coffset={:#x}: copied flag must never be set for compressed clusters",
                                entry & mask
                            ));
                            self.res.corruptions_fixed += 1;
                            self.edit_l2(l2_offset, i, entry & !OFLAG_COPIED, bitmap);
                        } else {
                            self.say(format!(
                                "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                                entry & mask
                            ));
                            self.res.corruptions += 1;
                        }
                    }
                    if self.data_file {
                        self.say(format!(
                            "ERROR compressed cluster {i} with data file, entry={entry:#x}"
                        ));
                        self.res.corruptions += 1;
                        continue;
                    }
                    if bitmap != 0 {
                        self.say(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={entry:#x}"
                        ));
                        self.res.corruptions += 1;
                        continue;
                    }
                    if self.fixing_errors() && self.past_eof(coffset, csize) {
                        self.say(format!(
                            "Repairing coffset={coffset:#x}: Compressed cluster lies past the end of the file; L2 entry corrupted."
                        ));
                        self.res.corruptions_fixed += 1;
                        let (e, b) = self.dropped_entry(bitmap, true);
                        self.edit_l2(l2_offset, i, e, b);
                        let reason = format!(
                            "its compressed data at {coffset:#x} lies past the end of the file; the cluster now reads as zeros"
                        );
                        self.lose(owner, guest, cs, reason);
                        continue;
                    }
                    self.inc(coffset, csize);
                    if frag {
                        self.res.allocated_clusters += 1;
                        self.res.compressed_clusters += 1;
                        // Compressed clusters are fragmented by nature (qemu counts them so).
                        self.res.fragmented_clusters += 1;
                    }
                }
                Type::ZeroAlloc | Type::Normal => {
                    let offset = entry & OFFSET_MASK;
                    let both = (bitmap >> 32) & bitmap & BITMAP_ALL_ALLOC;
                    if both != 0 {
                        if self.fixing_errors() {
                            // cowimg: qemu cannot read such subclusters (I/O error); they
                            // become zero subclusters, reported lost.
                            self.say(format!(
                                "Repairing offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                            ));
                            self.res.corruptions_fixed += 1;
                            bitmap &= !both;
                            self.edit_l2(l2_offset, i, entry, bitmap);
                            self.lose_subclusters(
                                owner,
                                guest,
                                both,
                                "are marked both allocated and zero",
                            );
                        } else {
                            self.res.corruptions += 1;
                            self.say(format!(
                                "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                            ));
                        }
                    }
                    let contains_data = if ext {
                        bitmap & BITMAP_ALL_ALLOC != 0
                    } else {
                        entry & OFLAG_ZERO == 0
                    };
                    if offset % cs != 0 {
                        if !contains_data {
                            if self.fixing_errors() {
                                // As qemu: a preallocated zero cluster just becomes a zero one.
                                self.say(format!(
                                    "Repairing offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                                ));
                                self.res.corruptions_fixed += 1;
                                let (e, b) = self.dropped_entry(bitmap, false);
                                self.edit_l2(l2_offset, i, e, b);
                                continue;
                            }
                            self.say(format!(
                                "ERROR offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                            ));
                            self.res.corruptions += 1;
                        } else if self.fixing_errors() {
                            self.drop_data(
                                l2_offset,
                                i,
                                entry,
                                bitmap,
                                guest,
                                owner,
                                "is not properly aligned",
                            );
                            continue;
                        } else {
                            self.say(format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                            self.res.corruptions += 1;
                        }
                    }
                    if self.fixing_errors() && !self.data_file {
                        let why = if self.past_eof(offset, cs) {
                            Some("lies past the end of the file".to_string())
                        } else {
                            self.overlaps_fixed(offset, cs)
                                .map(|what| format!("overlaps {what}"))
                        };
                        if let Some(why) = why {
                            if contains_data {
                                self.drop_data(l2_offset, i, entry, bitmap, guest, owner, &why);
                            } else {
                                self.say(format!("Repairing offset={offset:x}: Preallocated cluster {why}; L2 entry corrupted."));
                                self.res.corruptions_fixed += 1;
                                let (e, b) = self.dropped_entry(bitmap, false);
                                self.edit_l2(l2_offset, i, e, b);
                            }
                            continue;
                        }
                    }
                    if frag {
                        self.res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset.wrapping_add(cs);
                    }
                    if !self.data_file {
                        self.inc(offset, cs);
                    }
                }
                Type::ZeroPlain => {}
                Type::Unallocated => {
                    let alloc = bitmap & BITMAP_ALL_ALLOC;
                    if alloc != 0 && self.fixing_errors() {
                        // cowimg: qemu cannot read these subclusters (no host cluster to read
                        // them from); they become zero subclusters, reported lost.
                        self.say(format!(
                            "Repairing l2 entry {entry:x}: Unallocated cluster has non-zero subcluster allocation map"
                        ));
                        self.res.corruptions_fixed += 1;
                        let (e, b) = self.dropped_entry(bitmap, false);
                        self.edit_l2(l2_offset, i, e, b);
                        self.lose_subclusters(
                            owner,
                            guest,
                            alloc,
                            "are marked allocated in a cluster without a host offset",
                        );
                    } else if alloc != 0 {
                        self.res.corruptions += 1;
                        self.say(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
    }

    /// cowimg's extra repair of a data mapping that cannot be right: the entry is rewritten
    /// to read zeros and the guest range is reported lost.
    #[allow(clippy::too_many_arguments)]
    fn drop_data(
        &mut self,
        l2_offset: u64,
        i: usize,
        entry: u64,
        bitmap: u64,
        guest: u64,
        owner: &Owner,
        why: &str,
    ) {
        let offset = entry & OFFSET_MASK;
        self.say(format!(
            "Repairing offset={offset:x}: Data cluster {why}; L2 entry corrupted, mapping dropped."
        ));
        self.res.corruptions_fixed += 1;
        let (e, b) = self.dropped_entry(bitmap, false);
        self.edit_l2(l2_offset, i, e, b);
        let now = if self.h.version >= 3 || self.geo.extended_l2 {
            "the cluster now reads as zeros"
        } else {
            "the cluster is now unallocated (reads from the backing file, or zeros)"
        };
        self.lose(
            owner,
            guest,
            self.cs,
            format!("its data cluster at {offset:#x} {why}; {now}"),
        );
    }

    /// qemu's `qcow2_check_bitmaps_refcounts`.
    fn bitmaps(&mut self) -> Result<()> {
        let Some((count, dir_size, dir_offset)) = self.bitmap_extension() else {
            return Ok(());
        };
        if count == 0 {
            return Ok(());
        }
        self.inc(dir_offset, dir_size);
        let Some(ext) = self.h.extension(header::EXT_BITMAPS).map(|e| e.to_vec()) else {
            return Ok(());
        };
        let bitmaps = match snapshot::read_bitmaps(self.s, &ext, self.file_len) {
            Ok((b, _, _)) => b,
            Err(e) => {
                self.say(format!("ERROR bitmap directory: {e}"));
                self.res.corruptions += 1;
                return Ok(());
            }
        };
        for bm in bitmaps {
            let bytes = u64::from(bm.table_size) * 8;
            self.inc(bm.table_offset, bytes);
            if bm.table_offset % self.cs != 0
                || bytes > MAX_BITMAP_TABLE_BYTES
                || bm
                    .table_offset
                    .checked_add(bytes)
                    .is_none_or(|e| e > self.file_len)
            {
                self.say(format!(
                    "ERROR bitmap '{}': the bitmap table is invalid",
                    bm.name
                ));
                self.res.corruptions += 1;
                continue;
            }
            let mut buf = vec![0u8; bytes as usize];
            read_exact(self.s, &mut buf, bm.table_offset, "a bitmap table")?;
            for entry in table::decode(&buf) {
                let offset = entry & BME_OFFSET_MASK;
                if entry & BME_RESERVED_MASK != 0
                    || (offset != 0 && (entry & BME_ALL_ONES != 0 || offset % self.cs != 0))
                {
                    self.res.corruptions += 1;
                    continue;
                }
                if offset != 0 {
                    self.inc(offset, self.cs);
                }
            }
        }
        Ok(())
    }

    fn read_reftable(&self) -> Result<Vec<u64>> {
        let mut buf = vec![0u8; self.h.refcount_table_clusters as usize * self.cs as usize];
        read_exact(
            self.s,
            &mut buf,
            self.h.refcount_table_offset,
            "the refcount table",
        )?;
        Ok(table::decode(&buf))
    }

    /// qemu's `check_refblocks`: every refcount block is counted and must be used once.
    fn check_refblocks(&mut self) -> Result<()> {
        let reftable = self.read_reftable()?;
        for (i, &e) in reftable.iter().enumerate() {
            let offset = reftable_block(e);
            let cluster = offset / self.cs;
            if e & REFT_RESERVED_MASK != 0 {
                self.say(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.res.corruptions += 1;
                self.rebuild = true;
                continue;
            }
            if offset % self.cs != 0 {
                self.say(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                self.res.corruptions += 1;
                self.rebuild = true;
                continue;
            }
            if cluster >= self.refs.len() {
                // qemu grows the file to hold the block; cowimg rebuilds the structures
                // instead (a hostile offset would otherwise make a huge file).
                self.say(format!("ERROR refcount block {i} is outside image"));
                self.res.corruptions += 1;
                if self.fixing_errors() {
                    self.rebuild = true;
                }
                continue;
            }
            if offset != 0 {
                if self.inc(offset, self.cs) {
                    self.refstruct.push((offset, self.cs));
                }
                let r = self.refs.get(cluster);
                if r != 1 {
                    self.say(format!("ERROR refcount block {i} refcount={r}"));
                    self.res.corruptions += 1;
                    self.rebuild = true;
                }
            }
        }
        Ok(())
    }

    // ---- stored refcounts ----

    /// Reads the stored refcounts of clusters `0..n` and keeps those that differ from the
    /// computed ones; with `beyond`, also every non-zero count of later clusters (a repair
    /// clears those).
    fn load_stored(&mut self, n: u64, beyond: bool) -> Result<Stored> {
        let reftable = self.read_reftable()?;
        let epb = self.rgeo.entries_per_block();
        let blocks_needed = n.div_ceil(epb);
        let mut st = Stored {
            reftable,
            diff: Counts::with_len(n),
            highest: None,
            bad_blocks: BTreeSet::new(),
            beyond: Vec::new(),
        };
        let last = if beyond {
            st.reftable.len() as u64
        } else {
            blocks_needed.min(st.reftable.len() as u64)
        };
        let mut wanted: Vec<(u64, u64)> = Vec::new();
        for bi in 0..blocks_needed.max(last) {
            let e = st.reftable.get(bi as usize).copied().unwrap_or(0);
            let off = reftable_block(e);
            if off != 0 && self.unreadable_block(off) {
                st.bad_blocks.insert(bi);
                continue;
            }
            if bi >= blocks_needed
                && (off == 0 || off >= self.file_len || e & REFT_RESERVED_MASK != 0)
            {
                continue;
            }
            if off == 0 {
                // No block: every count of its range is 0.
                let (lo, hi) = (bi * epb, ((bi + 1) * epb).min(n));
                if !self.refs.any(lo, hi) {
                    continue;
                }
                for c in lo..hi {
                    if self.refs.get(c) != 0 {
                        st.diff.set(c, 1);
                    }
                }
                continue;
            }
            wanted.push((bi, off));
        }
        let per_window = (WINDOW_BYTES / self.cs).max(1) as usize;
        let mut tables = Tables::new(self.cs);
        for win in wanted.chunks(per_window) {
            let offs: Vec<u64> = win.iter().map(|&(_, o)| o).collect();
            tables.load(self.s, &offs, "a refcount block")?;
            for &(bi, off) in win {
                let block = tables.get(off);
                let base = bi * epb;
                for idx in 0..epb as usize {
                    let v = self.rgeo.get(block, idx);
                    let c = base + idx as u64;
                    if c < n {
                        if v != self.refs.get(c) {
                            st.diff.set(c, v + 1);
                        }
                        if v != 0 {
                            st.highest = Some(c);
                        }
                    } else if v != 0 {
                        st.beyond.push((c, v));
                    }
                }
            }
        }
        Ok(st)
    }

    /// The stored count of cluster `i` (below the compared range, outside a bad block).
    fn stored_get(&self, st: &Stored, i: u64) -> u64 {
        match st.diff.get(i) {
            0 => self.refs.get(i),
            d => d - 1,
        }
    }

    /// The stored refcount of any cluster, `None` when it cannot be read (qemu's
    /// `qcow2_get_refcount` failing).
    /// A refcount block qemu cannot read: misaligned (qemu refuses), or so far out that
    /// reading it fails rather than reading zeros past the end of the file.
    fn unreadable_block(&self, off: u64) -> bool {
        off % self.cs != 0 || off.saturating_add(self.cs) > MAX_READABLE
    }

    fn stored_refcount(&mut self, st: &Stored, cluster: u64) -> Result<Option<u64>> {
        let bi = cluster >> self.rgeo.block_bits();
        if st.bad_blocks.contains(&bi) {
            return Ok(None);
        }
        if cluster < st.diff.len() {
            return Ok(Some(self.stored_get(st, cluster)));
        }
        let Some(&e) = st.reftable.get(bi as usize) else {
            return Ok(Some(0));
        };
        let off = reftable_block(e);
        if off == 0 {
            return Ok(Some(0));
        }
        if self.unreadable_block(off) {
            return Ok(None);
        }
        let mut block = vec![0u8; self.cs as usize];
        read_exact(self.s, &mut block, off, "a refcount block")?;
        let (_, idx) = self.rgeo.locate(cluster);
        Ok(Some(self.rgeo.get(&block, idx)))
    }

    /// qemu's `compare_refcounts`. Returns the highest cluster in use. With a repair mode the
    /// corrections are written block by block (each block's entries between the old and the
    /// right value, so every intermediate state is at least as good), then synced.
    fn compare(&mut self, st: &mut Stored, fix: CheckMode) -> Result<u64> {
        let n = self.refs.len().max(st.diff.len());
        let epb = self.rgeo.entries_per_block();
        let mut highest = st.highest.unwrap_or(0);
        // The highest computed reference outside unreadable blocks.
        let mut bi = n.div_ceil(epb);
        while bi > 0 {
            bi -= 1;
            let (a, b) = (bi * epb, ((bi + 1) * epb).min(n));
            if st.bad_blocks.contains(&bi) || !self.refs.any(a, b) {
                continue;
            }
            if let Some(i) = (a..b).rev().find(|&i| self.refs.get(i) != 0) {
                highest = highest.max(i);
            }
            break;
        }
        let mut wrote = false;
        let mut bi = 0;
        while bi * epb < n {
            let (a, b) = (bi * epb, ((bi + 1) * epb).min(n));
            let bad = st.bad_blocks.contains(&bi);
            if !bad && !st.diff.any(a, b) {
                bi += 1;
                continue;
            }
            if bad {
                if !self.signalled {
                    self.signalled = true;
                    let off = reftable_block(st.reftable.get(bi as usize).copied().unwrap_or(0));
                    self.say(format!(
                        "qcow2: Image is corrupt: Refblock offset {off:#x} unaligned (reftable index: {}); further non-fatal corruption events will be suppressed",
                        c_hex(bi)
                    ));
                }
                for i in a..b {
                    self.say(format!(
                        "Can't get refcount for cluster {i}: Input/output error"
                    ));
                    self.res.check_errors += 1;
                }
                bi += 1;
                continue;
            }
            let mut changes: Vec<(u64, u64)> = Vec::new();
            for i in a..b {
                if st.diff.get(i) == 0 {
                    continue;
                }
                let r1 = self.stored_get(st, i);
                let r2 = self.refs.get(i);
                let fixed = if r1 == 0 {
                    self.rebuild = true;
                    false
                } else {
                    (r1 > r2 && fix.repairs()) || (r1 < r2 && fix == CheckMode::RepairAll)
                };
                let word = if fixed {
                    "Repairing"
                } else if r1 < r2 {
                    "ERROR"
                } else {
                    "Leaked"
                };
                self.say(format!("{word} cluster {i} refcount={r1} reference={r2}"));
                if fixed {
                    changes.push((i, r2));
                    if r1 > r2 {
                        self.res.leaks_fixed += 1;
                    } else {
                        self.res.corruptions_fixed += 1;
                    }
                } else if r1 < r2 {
                    self.res.corruptions += 1;
                } else {
                    self.res.leaks += 1;
                }
            }
            if !changes.is_empty() {
                self.write_refcounts(st, &changes)?;
                wrote = true;
            }
            bi += 1;
        }
        if fix.repairs() && !st.beyond.is_empty() {
            // cowimg: counts stored for clusters past the end of the file would make its
            // allocator, which appends after the last counted cluster, leave a hole.
            let beyond = std::mem::take(&mut st.beyond);
            for &(c, v) in &beyond {
                self.say(format!(
                    "Repairing cluster {c} refcount={v} reference=0 (past the end of the file)"
                ));
                self.res.leaks_fixed += 1;
            }
            let zeroed: Vec<(u64, u64)> = beyond.iter().map(|&(c, _)| (c, 0)).collect();
            self.write_refcounts(st, &zeroed)?;
            wrote = true;
        }
        if wrote {
            sync(self.s)?;
        }
        Ok(highest)
    }

    /// Writes refcount corrections into their blocks (not synced).
    fn write_refcounts(&mut self, st: &mut Stored, changes: &[(u64, u64)]) -> Result<()> {
        let mut by_block: BTreeMap<u64, Vec<(usize, u64)>> = BTreeMap::new();
        for &(c, v) in changes {
            let (bi, idx) = self.rgeo.locate(c);
            by_block.entry(bi).or_default().push((idx, v));
            if c < st.diff.len() {
                let same = v == self.refs.get(c);
                st.diff.set(c, if same { 0 } else { v + 1 });
            }
        }
        for (bi, list) in by_block {
            let Some(&e) = st.reftable.get(bi as usize) else {
                continue;
            };
            let off = reftable_block(e);
            if off == 0 || self.unreadable_block(off) {
                continue;
            }
            let mut block = vec![0u8; self.cs as usize];
            read_exact(self.s, &mut block, off, "a refcount block")?;
            let (mut lo, mut hi) = (usize::MAX, 0);
            for (idx, v) in list {
                self.rgeo.set(&mut block, idx, v.min(self.rgeo.max()));
                let (a, b) = self.rgeo.byte_range(idx);
                lo = lo.min(a);
                hi = hi.max(b);
            }
            write_all(self.s, &block[lo..hi], off + lo as u64, "refcount entries")?;
        }
        Ok(())
    }

    /// Writes the entry rewrites the scan decided (dropped mappings), then syncs: references
    /// go before the refcount decrements that follow.
    fn apply_edits(&mut self) -> Result<()> {
        if self.extend_to > self.file_len {
            // First, so that the entry rewrites below never land past the end of the file.
            self.s
                .set_len(self.extend_to)
                .map_err(|e| Error::io("extending the file over a cut L2 table", e))?;
            sync(self.s)?;
        }
        if self.edits.is_empty() {
            return Ok(());
        }
        for (&off, bytes) in &self.edits {
            write_all(self.s, bytes, off, "a table entry")?;
        }
        self.edits.clear();
        sync(self.s)
    }

    // ---- OFLAG_COPIED (qemu's check_oflag_copied) ----

    fn check_copied(&mut self, st: &Stored, fix: CheckMode) -> Result<()> {
        let repair = match fix {
            CheckMode::RepairAll => true,
            // Only when the refcounts are known to be right now.
            CheckMode::RepairLeaks => {
                self.res.check_errors == 0 && self.res.corruptions == 0 && self.res.leaks == 0
            }
            CheckMode::ReadOnly => false,
        };
        let word = if repair { "Repairing" } else { "ERROR" };
        let cs = self.cs;
        let cb = self.h.cluster_bits;
        let mut buf = vec![0u8; self.h.l1_size as usize * 8];
        read_exact(self.s, &mut buf, self.h.l1_table_offset, "the L1 table")?;
        let l1 = table::decode(&buf);
        let ext = self.geo.extended_l2;
        let esize = if ext { 16 } else { 8 };
        let per_window = (WINDOW_BYTES / cs).max(1) as usize;
        let mut tables = Tables::new(cs);
        let mut w = 0;
        while w < l1.len() {
            let end = (w + per_window).min(l1.len());
            let wanted: Vec<u64> = l1[w..end]
                .iter()
                .map(|e| e & OFFSET_MASK)
                .filter(|&o| o != 0)
                .collect();
            tables.load(self.s, &wanted, "an L2 table")?;
            for (i, &l1e) in l1.iter().enumerate().take(end).skip(w) {
                let l2_offset = l1e & OFFSET_MASK;
                if l2_offset == 0 {
                    continue;
                }
                let Some(rc) = self.stored_refcount(st, l2_offset >> cb)? else {
                    continue;
                };
                if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
                    self.res.corruptions += 1;
                    self.say(format!("{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"));
                    if repair {
                        let new = if rc == 1 {
                            l1e | OFLAG_COPIED
                        } else {
                            l1e & !OFLAG_COPIED
                        };
                        write_all(
                            self.s,
                            &new.to_be_bytes(),
                            self.h.l1_table_offset + 8 * i as u64,
                            "an L1 entry",
                        )?;
                        self.res.corruptions -= 1;
                        self.res.corruptions_fixed += 1;
                    }
                }
                // Copied only when an entry changes.
                let mut changed: Option<Vec<u8>> = None;
                let table = tables.get(l2_offset);
                let mut dirty = 0;
                for j in 0..table.len() / esize {
                    let entry = be64(table, j * esize);
                    if entry == 0 {
                        continue;
                    }
                    let ty = self.classify(entry);
                    if ty != Type::Normal && ty != Type::ZeroAlloc {
                        continue;
                    }
                    let rc = if self.data_file {
                        1
                    } else {
                        match self.stored_refcount(st, (entry & OFFSET_MASK) >> cb)? {
                            Some(rc) => rc,
                            None => continue,
                        }
                    };
                    if (rc == 1) != (entry & OFLAG_COPIED != 0) {
                        self.res.corruptions += 1;
                        self.say(format!(
                            "{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                        ));
                        if repair {
                            let new = if rc == 1 {
                                entry | OFLAG_COPIED
                            } else {
                                entry & !OFLAG_COPIED
                            };
                            changed.get_or_insert_with(|| table.to_vec())[j * esize..j * esize + 8]
                                .copy_from_slice(&new.to_be_bytes());
                            dirty += 1;
                        }
                    }
                }
                if dirty > 0 {
                    if let Some(what) = self.overlaps_fixed(l2_offset, cs) {
                        self.say(format!(
                            "ERROR: Could not write L2 table; metadata overlap check failed: the table overlaps {what}"
                        ));
                        self.res.check_errors += 1;
                        continue;
                    }
                    let table = changed.as_deref().unwrap_or(table);
                    write_all(self.s, table, l2_offset, "an L2 table")?;
                    self.res.corruptions -= dirty;
                    self.res.corruptions_fixed += dirty;
                }
            }
            w = end;
        }
        if repair {
            sync(self.s)?;
        }
        Ok(())
    }

    // ---- rebuilding the refcount structures ----

    /// Writes a new refcount table and blocks that describe `self.refs` (less the references
    /// of the old structures, which nothing uses afterwards) into fresh clusters past the end
    /// of the file, syncs, switches the header to them with one write inside the first
    /// sector, and syncs. Returns the new table's (offset, clusters).
    fn rebuild_structures(&mut self) -> Result<(u64, u32)> {
        let cs = self.cs;
        let cb = self.h.cluster_bits;
        let mut counts = self.refs.clone();
        for &(off, len) in &self.refstruct {
            for k in (off >> cb)..=((off + len - 1) >> cb) {
                let v = counts.get(k);
                counts.set(k, v.saturating_sub(1));
            }
        }
        let epb = self.rgeo.entries_per_block();
        let start = self.file_len.div_ceil(cs).max(counts.len());
        let mut used: BTreeSet<u64> = BTreeSet::new();
        let mut bi = 0;
        while bi * epb < start {
            if counts.any(bi * epb, ((bi + 1) * epb).min(start)) {
                used.insert(bi);
            }
            bi += 1;
        }
        // The layout: [start, start + rt) the table, then one cluster per block. The blocks are
        // those of the clusters in use (sparse: a block whose clusters are all free is left
        // out) and those that cover the new clusters themselves.
        let first_block = start / epb;
        let below: Vec<u64> = used.range(..first_block).copied().collect();
        let refs = appended_refcount_structures(self.rgeo, start, below.len() as u64)?;
        let rt = refs.table_clusters;
        let last_block = (start + refs.clusters() - 1) / epb;
        let blocks: Vec<u64> = below.into_iter().chain(first_block..=last_block).collect();
        if rt
            .checked_mul(cs)
            .is_none_or(|b| b > header::MAX_REFTABLE_BYTES)
            || rt > u64::from(u32::MAX)
        {
            return Err(Error::Unsupported(
                "rebuilding the refcount structures: the refcount table would exceed qemu's 8 MiB limit".into(),
            ));
        }
        let entries_per_cluster = cs / 8;
        let table_offset = start * cs;
        let mut reftable = vec![0u64; (rt * entries_per_cluster) as usize];
        for (n, &b) in blocks.iter().enumerate() {
            reftable[b as usize] = (start + rt + n as u64) * cs;
        }
        let end = start + rt + blocks.len() as u64;
        for c in start..end {
            counts.set(c, 1);
        }
        write_all(
            self.s,
            &table::encode(&reftable),
            table_offset,
            "the new refcount table",
        )?;
        let max = self.rgeo.max();
        for (n, &b) in blocks.iter().enumerate() {
            let mut block = vec![0u8; cs as usize];
            for idx in 0..epb {
                let v = counts.get(b * epb + idx);
                if v != 0 {
                    self.rgeo.set(&mut block, idx as usize, v.min(max));
                }
            }
            write_all(
                self.s,
                &block,
                (start + rt + n as u64) * cs,
                "a new refcount block",
            )?;
        }
        sync(self.s)?;
        // The switch: offset (8 bytes) and clusters (4 bytes) of the table, inside sector 0;
        // with a new refcount width, the fields up to the width's too, in the same write.
        let mut h = self.h.clone();
        h.refcount_table_offset = table_offset;
        h.refcount_table_clusters = rt as u32;
        h.refcount_order = self.rgeo.refcount_order;
        let end = if h.refcount_order == self.h.refcount_order {
            60
        } else {
            100
        };
        write_all(
            self.s,
            &h.encode_fixed()[48..end],
            48,
            "the header's refcount table pointer",
        )?;
        sync(self.s)?;
        Ok((table_offset, rt as u32))
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

/// Rewrites the refcount structures with entries of `2^order` bits (`amend -o
/// refcount_bits`): counts every reference as `check` does, writes new structures past the end
/// of the file and switches the header to them in one write of sector 0 (the old structures
/// are then free space, as nothing counts them). Refused on an image `check` finds damaged,
/// and, in qemu's words, when a count does not fit in the new width. The caller holds the
/// image exclusively.
pub(super) fn change_refcount_order(img: &Qcow2, m: &mut Meta, order: u32) -> Result<()> {
    if m.has_staged() {
        return Err(Error::Refused(
            "internal: refcount width change with uncommitted writes".into(),
        ));
    }
    let s: &dyn Storage = &*img.storage;
    let file_len = s.len().map_err(|e| Error::io("reading the file size", e))?;
    let mut quiet = |_: &str| {};
    let mut c = Checker::new(
        img,
        m.header.clone(),
        file_len,
        CheckMode::ReadOnly,
        &mut quiet,
    )?;
    c.calculate()?;
    let n = c.refs.len();
    let mut st = c.load_stored(n, false)?;
    c.compare(&mut st, CheckMode::ReadOnly)?;
    if c.rebuild || c.res.corruptions > 0 || c.res.check_errors > 0 {
        return Err(Error::NeedsRepair(
            "the image has errors in its refcounts; repair them before changing the refcount width"
                .into(),
        ));
    }
    let new = RefGeometry {
        cluster_bits: c.h.cluster_bits,
        refcount_order: order,
    };
    if let Some(i) = (0..n).find(|&i| c.refs.get(i) > new.max()) {
        return Err(Error::Refused(format!(
            "Cannot decrease refcount entry width to {} bits: Cluster at offset {} has a refcount of {}",
            1u32 << order,
            c_hex(i * c.cs),
            c.refs.get(i)
        )));
    }
    c.rgeo = new;
    let (offset, clusters) = c.rebuild_structures()?;
    m.header.refcount_table_offset = offset;
    m.header.refcount_table_clusters = clusters;
    m.header.refcount_order = order;
    // The tables and the allocator are read again from what is on disk now.
    refresh(img, m)
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

pub fn check(img: &Qcow2, mode: CheckMode) -> Result<CheckReport> {
    let mut lines = Vec::new();
    let mut report = img.check_with(mode, &mut |l: &str| lines.push(l.to_string()))?;
    report.messages = lines;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_compact_and_exact() {
        let mut c = Counts::with_len(10);
        assert_eq!(c.get(3), 0);
        c.set(3, 2);
        c.set(200_000, 70_000);
        assert_eq!(c.get(3), 2);
        assert_eq!(c.get(200_000), 70_000);
        assert_eq!(c.len(), 200_001);
        assert!(c.any(0, 4) && !c.any(4, 200_000) && c.any(199_999, 200_001));
        c.set(200_000, 1);
        assert_eq!(c.get(200_000), 1);
        assert!(c.spill.is_empty());
        // Untouched chunks take no memory.
        assert_eq!(c.chunks.iter().filter(|x| x.is_some()).count(), 2);
    }
}
