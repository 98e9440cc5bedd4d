//! Cluster allocation and the crash-safe commit.
//!
//! Allocation is append-only: new clusters come from the end of the file, so a cluster that
//! was freed (or leaked by a crash) is never handed out again while something might still
//! point at it. Reference counts change in memory as clusters are allocated and are written
//! by [`Qcow2::commit_impl`] in the order that keeps the image consistent at every instant:
//!
//! 1. data clusters (already written by the writers), new L2 tables, new refcount blocks and a
//!    new refcount table are written whole, and refcount entries in existing blocks; sync
//!    (none of it is pointed to yet: a refcount points at nothing);
//! 2. refcount table entries pointing at new blocks (or the header, when the table moved),
//!    only when there are any; sync;
//! 3. L2 entries in existing tables and L1 entries; sync;
//! 4. refcount decrements of clusters no longer referenced, only when there are any; sync.
//!
//! The common batch therefore costs two syncs.
//!
//! Nothing is pointed to before it is on disk and a refcount never lags a reference, so an
//! interruption at any point leaves at worst leaked clusters.

use std::collections::{BTreeSet, HashMap};

use super::cache::Meta;
use super::header::Header;
use super::refcount::{reftable_block, RefGeometry};
use super::table::{self, Geometry, OFFSET_MASK};
use super::Qcow2;
use crate::io::{read_exact, sync, write_all, Storage};
use crate::util::align_up;
use crate::{Error, Result};

/// The image's state, prepared for writing (see [`crate::prepared`]).
pub(super) type Writing<'m> = crate::prepared::Writing<'m, Meta>;

impl crate::prepared::Allocating for Meta {
    type Allocator = Allocator;
    fn allocator(&mut self) -> Option<&mut Allocator> {
        self.alloc.as_mut()
    }
}

/// The state with its allocator loaded without the checks of a first write: for a repair's
/// own writes, which are what clears the bits those checks refuse.
pub(super) fn unchecked<'m>(m: &'m mut Meta, s: &dyn Storage) -> Result<Writing<'m>> {
    if m.alloc.is_none() {
        m.alloc = Some(Allocator::load(s, &m.header, m.file_len)?);
    }
    Ok(Writing::prepared(m))
}

/// A refcount block in memory.
struct Block {
    offset: u64,
    data: Vec<u8>,
    /// Byte range changed since the last write-out.
    dirty: Option<(usize, usize)>,
    new: bool,
}

/// Allocation state of a writable image.
pub struct Allocator {
    /// Next free host offset.
    pub end: u64,
    /// Clusters allocated since the last commit: (host offset, count).
    pub new_clusters: Vec<(u64, u64)>,
    /// Host clusters whose refcount drops once the references to them are gone.
    pub frees: Vec<u64>,
    /// Host clusters set aside (by [`Qcow2::reserve_impl`]) for guest clusters not written
    /// yet, by guest offset; counted only once a write takes them.
    set_aside: HashMap<u64, u64>,
    /// Data written in place since the last commit (needs a sync even without metadata).
    pub data_written: bool,
    /// Where the next compressed cluster may go: the next free byte of the host cluster
    /// compressed data was last packed into, and how many references that cluster has.
    cursor: Option<(u64, u64)>,
    /// Host clusters gaining one more reference (a further compressed cluster packed in).
    extra_refs: Vec<u64>,
    rgeo: RefGeometry,
    cluster_size: u64,
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u32,
    table_dirty: BTreeSet<usize>,
    /// The refcount table replaced in this batch (offset, clusters), freed after the switch.
    moved_from: Option<(u64, u32)>,
    blocks: HashMap<u64, Block>,
}

/// The highest host cluster whose refcount is not zero.
fn last_in_use(
    storage: &dyn Storage,
    table: &[u64],
    rgeo: RefGeometry,
    file_len: u64,
) -> Result<Option<u64>> {
    let cs = 1u64 << rgeo.cluster_bits;
    for (bi, &e) in table.iter().enumerate().rev() {
        let offset = reftable_block(e);
        if offset == 0 {
            continue;
        }
        if offset % cs != 0 || offset + cs > file_len {
            return Err(Error::NeedsRepair(format!(
                "image is corrupt: refcount block {bi} at {offset:#x} is misaligned or past the end of the file"
            )));
        }
        let mut block = vec![0u8; cs as usize];
        read_exact(storage, &mut block, offset, "a refcount block")?;
        if let Some(idx) = (0..rgeo.entries_per_block() as usize)
            .rev()
            .find(|&i| rgeo.get(&block, i) != 0)
        {
            return Ok(Some(bi as u64 * rgeo.entries_per_block() + idx as u64));
        }
    }
    Ok(None)
}

impl Allocator {
    /// Loads the refcount table of the image described by `h`.
    pub fn load(storage: &dyn Storage, h: &Header, file_len: u64) -> Result<Allocator> {
        let cs = h.cluster_size();
        let mut buf = vec![0u8; h.refcount_table_clusters as usize * cs as usize];
        read_exact(
            storage,
            &mut buf,
            h.refcount_table_offset,
            "the refcount table",
        )?;
        let table = table::decode(&buf);
        let rgeo = RefGeometry {
            cluster_bits: h.cluster_bits,
            refcount_order: h.refcount_order,
        };
        // Append after the last cluster in use. Space behind it has refcount 0: it is free,
        // typically the data of an interrupted run that never got referenced.
        let end = match last_in_use(storage, &table, rgeo, file_len)? {
            Some(c) => (c + 1) * cs,
            None => align_up(file_len, cs),
        };
        Ok(Allocator {
            end,
            new_clusters: Vec::new(),
            frees: Vec::new(),
            set_aside: HashMap::new(),
            data_written: false,
            cursor: None,
            extra_refs: Vec::new(),
            rgeo,
            cluster_size: cs,
            table,
            table_offset: h.refcount_table_offset,
            table_clusters: h.refcount_table_clusters,
            table_dirty: BTreeSet::new(),
            moved_from: None,
            blocks: HashMap::new(),
        })
    }

    /// Reserves `n` contiguous clusters at the end of the file.
    pub fn reserve(&mut self, n: u64) -> u64 {
        let host = self.end;
        self.end += n * self.cluster_size;
        self.count(host, n);
        host
    }

    /// Schedules `n` clusters at `host` for their first reference at the commit.
    fn count(&mut self, host: u64, n: u64) {
        match self.new_clusters.last_mut() {
            Some((h, c)) if *h + *c * self.cluster_size == host => *c += n,
            _ => self.new_clusters.push((host, n)),
        }
    }

    /// Sets a host cluster at the end of the file aside for the guest cluster at `guest`,
    /// unless one is set aside already. It is not counted: until a write takes it (see
    /// [`Self::take`]), it is a hole no table refers to.
    pub fn set_aside(&mut self, guest: u64) {
        if !self.set_aside.contains_key(&guest) {
            self.set_aside.insert(guest, self.end);
            self.end += self.cluster_size;
        }
    }

    /// A fresh host cluster for the guest cluster at `guest`: the one set aside for it, or
    /// else the next one at the end of the file.
    pub fn take(&mut self, guest: u64) -> u64 {
        match self.set_aside.remove(&guest) {
            Some(host) => {
                self.count(host, 1);
                host
            }
            None => self.reserve(1),
        }
    }

    /// Space for `len` bytes of compressed data, packed after the previous compressed cluster
    /// as qemu packs them (several per host cluster, possibly spanning into the next one).
    /// Every host cluster the bytes touch gains a reference.
    pub fn alloc_bytes(&mut self, len: u64) -> u64 {
        let cs = self.cluster_size;
        if let Some((at, refs)) = self.cursor {
            let cluster_end = at / cs * cs + cs;
            // Continue in the same cluster while its refcount has room, and across its end
            // only into clusters allocated right behind it.
            let contiguous = at + len <= cluster_end || cluster_end == self.end;
            if at % cs != 0 && contiguous && refs < self.rgeo.max() {
                self.extra_refs.push(at / cs * cs);
                if at + len > cluster_end {
                    self.reserve((at + len - cluster_end).div_ceil(cs));
                }
                self.cursor = Some((at + len, if at + len > cluster_end { 1 } else { refs + 1 }));
                return at;
            }
        }
        let host = self.reserve(len.div_ceil(cs));
        self.cursor = Some((host + len, 1));
        host
    }

    /// Schedules the host clusters covering `[host, host + len)` for a refcount decrement.
    pub fn free_range(&mut self, host: u64, len: u64) {
        let cs = self.cluster_size;
        let mut c = host / cs * cs;
        while c < host + len {
            self.frees.push(c);
            c += cs;
        }
    }

    /// Schedules one more reference to each host cluster covering `[host, host + len)`
    /// (a cluster a snapshot comes to share), counted at the next commit before anything
    /// else is written.
    pub fn add_refs(&mut self, host: u64, len: u64) {
        let cs = self.cluster_size;
        let mut c = host / cs * cs;
        while c < host + len {
            self.extra_refs.push(c);
            c += cs;
        }
    }

    /// The refcount of the host cluster at `host`, as it stands in memory (changes of the
    /// last commit included).
    pub fn refcount(&mut self, storage: &dyn Storage, host: u64, file_len: u64) -> Result<u64> {
        let (bi, idx) = self.rgeo.locate(host / self.cluster_size);
        if reftable_block(self.table.get(bi as usize).copied().unwrap_or(0)) == 0
            && !self.blocks.contains_key(&bi)
        {
            return Ok(0);
        }
        let rgeo = self.rgeo;
        let block = self.block(storage, bi, file_len.max(self.end))?;
        Ok(rgeo.get(&block.data, idx))
    }

    pub fn has_work(&self) -> bool {
        !self.new_clusters.is_empty()
            || !self.frees.is_empty()
            || !self.extra_refs.is_empty()
            || self.data_written
    }

    /// The refcount block for table index `bi`, read on a miss.
    fn block(&mut self, storage: &dyn Storage, bi: u64, file_len: u64) -> Result<&mut Block> {
        if !self.blocks.contains_key(&bi) {
            let offset = reftable_block(self.table.get(bi as usize).copied().unwrap_or(0));
            if offset == 0 {
                return Err(Error::Corrupt(format!(
                    "refcount block {bi} is not allocated"
                )));
            }
            if offset % self.cluster_size != 0 || offset + self.cluster_size > file_len {
                return Err(Error::NeedsRepair(format!(
                    "image is corrupt: refcount block {bi} at {offset:#x} is misaligned or past the end of the file"
                )));
            }
            let mut data = vec![0u8; self.cluster_size as usize];
            read_exact(storage, &mut data, offset, "a refcount block")?;
            self.blocks.insert(
                bi,
                Block {
                    offset,
                    data,
                    dirty: None,
                    new: false,
                },
            );
        }
        Ok(self.blocks.get_mut(&bi).expect("inserted above"))
    }

    /// Changes the refcount of host cluster `cluster`: `1` gives a fresh cluster its first
    /// reference, `2` adds one more, `-1` drops one.
    fn adjust(
        &mut self,
        storage: &dyn Storage,
        cluster: u64,
        delta: i64,
        file_len: u64,
    ) -> Result<()> {
        let (bi, idx) = self.rgeo.locate(cluster);
        let rgeo = self.rgeo;
        let block = self.block(storage, bi, file_len)?;
        let old = rgeo.get(&block.data, idx);
        let new = match delta {
            2 if old >= 1 && old < rgeo.max() => old + 1,
            2 => {
                return Err(Error::Corrupt(format!(
                    "cluster {cluster} cannot take another reference (refcount {old})"
                )))
            }
            1 if old == 0 => 1,
            1 => {
                return Err(Error::NeedsRepair(format!(
                    "image is corrupt: cluster {cluster} is about to be allocated but its refcount is already {old}"
                )))
            }
            _ if old == 0 => {
                return Err(Error::Corrupt(format!(
                    "cluster {cluster} is freed but its refcount is already 0"
                )))
            }
            _ => old - 1,
        };
        rgeo.set(&mut block.data, idx, new);
        if !block.new {
            let (a, b) = rgeo.byte_range(idx);
            block.dirty = Some(match block.dirty {
                Some((x, y)) => (x.min(a), y.max(b)),
                None => (a, b),
            });
        }
        Ok(())
    }

    /// Gives every cluster allocated in this batch its refcount of one, allocating refcount
    /// blocks (and a larger refcount table) as needed; those count themselves in.
    fn count_new_clusters(&mut self, storage: &dyn Storage, file_len: u64) -> Result<()> {
        let cs = self.cluster_size;
        let mut pending: Vec<u64> = Vec::new();
        for &(host, n) in &self.new_clusters {
            pending.extend((0..n).map(|i| host / cs + i));
        }
        let mut i = 0;
        while i < pending.len() {
            let cluster = pending[i];
            i += 1;
            let (bi, _) = self.rgeo.locate(cluster);
            if bi as usize >= self.table.len() {
                pending.extend(self.grow_table(bi));
            }
            if reftable_block(self.table[bi as usize]) == 0 && !self.blocks.contains_key(&bi) {
                let offset = self.end;
                self.end += cs;
                pending.push(offset / cs);
                self.table[bi as usize] = offset;
                self.table_dirty.insert(bi as usize);
                self.blocks.insert(
                    bi,
                    Block {
                        offset,
                        data: vec![0u8; cs as usize],
                        dirty: None,
                        new: true,
                    },
                );
            }
            self.adjust(storage, cluster, 1, file_len.max(self.end))?;
        }
        for c in std::mem::take(&mut self.extra_refs) {
            self.adjust(storage, c / cs, 2, file_len.max(self.end))?;
        }
        Ok(())
    }

    /// Moves the refcount table to a larger one at the end of the file that has room for
    /// index `bi`; returns the new table's clusters (to be counted).
    fn grow_table(&mut self, bi: u64) -> Vec<u64> {
        let cs = self.cluster_size;
        let entries_per_cluster = cs / 8;
        // Room for the blocks that will describe the table itself, and slack to grow into.
        let want = (bi + 2).max(self.table.len() as u64 * 2);
        let clusters = want.div_ceil(entries_per_cluster) as u32;
        let offset = self.end;
        self.end += u64::from(clusters) * cs;
        if self.moved_from.is_none() {
            self.moved_from = Some((self.table_offset, self.table_clusters));
        }
        self.table
            .resize((u64::from(clusters) * entries_per_cluster) as usize, 0);
        self.table_offset = offset;
        self.table_clusters = clusters;
        (0..u64::from(clusters)).map(|i| offset / cs + i).collect()
    }

    /// Writes new refcount blocks and a moved refcount table whole.
    fn write_new(&mut self, storage: &dyn Storage) -> Result<()> {
        for b in self.blocks.values_mut().filter(|b| b.new) {
            write_all(storage, &b.data, b.offset, "a new refcount block")?;
            b.new = false;
        }
        if self.moved_from.is_some() {
            write_all(
                storage,
                &table::encode(&self.table),
                self.table_offset,
                "the new refcount table",
            )?;
            self.table_dirty.clear();
        }
        Ok(())
    }

    /// Writes changed refcount entries and refcount table entries.
    fn write_dirty_blocks(&mut self, storage: &dyn Storage) -> Result<()> {
        for b in self.blocks.values_mut() {
            if let Some((a, z)) = b.dirty.take() {
                write_all(
                    storage,
                    &b.data[a..z],
                    b.offset + a as u64,
                    "refcount entries",
                )?;
            }
        }
        Ok(())
    }

    /// Writes changed refcount table entries; true if there were any.
    fn write_table_entries(&mut self, storage: &dyn Storage) -> Result<bool> {
        let any = !self.table_dirty.is_empty();
        for &i in &self.table_dirty {
            write_all(
                storage,
                &self.table[i].to_be_bytes(),
                self.table_offset + 8 * i as u64,
                "a refcount table entry",
            )?;
        }
        self.table_dirty.clear();
        Ok(any)
    }

    /// Drops clean blocks so memory stays bounded across batches.
    fn trim(&mut self) {
        if self.blocks.len() > 64 {
            self.blocks.retain(|_, b| b.new || b.dirty.is_some());
        }
    }
}

impl Qcow2 {
    /// Makes staged writes durable (see the module comment for the order).
    pub(super) fn commit_impl(&self) -> Result<()> {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut guard = self.meta();
        self.commit_locked(&mut guard)
    }

    /// [`Self::commit_impl`] for a caller that holds the image exclusively already.
    pub(super) fn commit_locked(&self, m: &mut Meta) -> Result<()> {
        let s: &dyn Storage = &*self.storage;
        if !m.has_staged() {
            return Ok(());
        }
        let Some(alloc) = m.alloc.as_mut() else {
            return Ok(());
        };
        let file_len = m.file_len;
        alloc.count_new_clusters(s, file_len)?;

        // 1. Everything new, written whole, and the refcounts of new clusters in existing
        // blocks: nothing points at any of it yet (refcounts point at nothing).
        for (&off, slot) in m.l2.iter_mut().filter(|(_, slot)| slot.new) {
            write_all(s, &table::encode(&slot.words), off, "a new L2 table")?;
            slot.new = false;
        }
        alloc.write_new(s)?;
        alloc.write_dirty_blocks(s)?;
        sync(s)?;

        // 2. The refcount table's pointers to new blocks (rare), before any reference that
        // needs those blocks to be found.
        if alloc.write_table_entries(s)? {
            sync(s)?;
        }
        if let Some((old_offset, old_clusters)) = alloc.moved_from.take() {
            m.header.refcount_table_offset = alloc.table_offset;
            m.header.refcount_table_clusters = alloc.table_clusters;
            write_all(s, &m.header.encode_fixed(), 0, "the header")?;
            sync(s)?;
            alloc.free_range(old_offset, u64::from(old_clusters) * alloc.cluster_size);
        }

        // 3. References.
        for (&off, slot) in m.l2.iter_mut() {
            if let Some((a, z)) = slot.dirty.take() {
                write_all(
                    s,
                    &table::encode(&slot.words[a..=z]),
                    off + 8 * a as u64,
                    "L2 entries",
                )?;
            }
        }
        for &i in &m.l1_dirty {
            write_all(
                s,
                &m.l1[i].to_be_bytes(),
                m.header.l1_table_offset + 8 * i as u64,
                "an L1 entry",
            )?;
        }
        m.l1_dirty.clear();
        sync(s)?;

        // 4. Clusters nothing points at any more.
        let frees = std::mem::take(&mut alloc.frees);
        if !frees.is_empty() {
            let len = file_len.max(alloc.end);
            for c in frees {
                alloc.adjust(s, c / alloc.cluster_size, -1, len)?;
            }
            alloc.write_dirty_blocks(s)?;
            sync(s)?;
        }
        alloc.new_clusters.clear();
        alloc.data_written = false;
        alloc.trim();
        m.file_len = m.file_len.max(alloc.end);
        Ok(())
    }

    /// Prepares the image for writing (its first write loads the allocator: refuses what
    /// must not be written, clears autoclear bits cowimg does not maintain, loads the
    /// refcount table); the state, prepared.
    pub(super) fn prepare_write<'m>(&self, m: &'m mut Meta) -> Result<Writing<'m>> {
        if m.alloc.is_some() {
            return Ok(Writing::prepared(m));
        }
        if !self.writable {
            return Err(Error::Refused("the image is open read-only".into()));
        }
        if self.data_file.is_some() {
            return Err(Error::Unsupported(
                "writing to qcow2 images with an external data file".into(),
            ));
        }
        if m.header.incompatible_features & super::header::INCOMPAT_CORRUPT != 0 {
            return Err(Error::NeedsRepair(
                "qcow2: Image is corrupt; refusing to write to it".into(),
            ));
        }
        if m.header.incompatible_features & super::header::INCOMPAT_DIRTY != 0 {
            // As qemu does at a read-write open: the refcounts of a dirty image (lazy
            // refcounts, interrupted) cannot be trusted, so they are repaired before anything
            // is allocated. The repair's messages have no reader here; its outcome decides.
            let report = super::check::run(self, m, crate::CheckMode::RepairAll, &mut |_| {})?;
            if report.failed.is_some()
                || report.check_errors > 0
                || m.header.incompatible_features & super::header::INCOMPAT_DIRTY != 0
            {
                return Err(Error::Corrupt(
                    "Could not repair dirty image: corruption remains".into(),
                ));
            }
        }
        let h = &m.header;
        // Unknown autoclear bits must be cleared by any writer that does not understand them.
        // cowimg does not update persistent bitmaps, so the "bitmaps are consistent" bit goes
        // too, as the specification asks of such programs; qemu then drops the stale bitmaps.
        let keep = super::header::AUTOCLEAR_DATA_FILE_RAW;
        if h.autoclear_features & !keep != 0 {
            m.header.autoclear_features &= keep;
            write_all(&*self.storage, &m.header.encode_fixed(), 0, "the header")?;
            sync(&*self.storage)?;
        }
        let reclaimable = self.reclaim_leaks(m)?;
        let alloc = Allocator::load(&*self.storage, &m.header, m.file_len)?;
        if reclaimable && m.file_len > alloc.end {
            // Nothing is counted past the last cluster in use: give the tail back.
            let io = |e| Error::io("cutting the unreferenced end of the file", e);
            self.storage.set_len(alloc.end).map_err(io)?;
            self.storage.sync().map_err(io)?;
            m.file_len = alloc.end;
        }
        // Map the metadata before anything is written: a damaged image whose structures
        // overlap must not be written through them (qemu's overlap checks).
        let (_, snapshot_table_len) = super::snapshot::read_snapshots(
            &*self.storage,
            m.header.snapshots_offset,
            m.header.nb_snapshots,
            m.file_len,
        )?;
        m.metadata = Some(super::overlap::MetadataMap::build(
            &m.header,
            &m.l1,
            &alloc.table,
            &self.snapshots.read().unwrap_or_else(|e| e.into_inner()),
            snapshot_table_len,
        )?);
        m.alloc = Some(alloc);
        Ok(Writing::prepared(m))
    }

    /// Frees leaked clusters before the first allocation of a session, as `check -r leaks`
    /// would. A run killed inside a commit leaves what it allocated counted but unreferenced
    /// (its refcounts are synced before the references, by design); allocation is
    /// append-only, so without this the space would never be reused and the file would only
    /// grow. Returns whether the image checked clean, so that the end of the file past the
    /// last cluster in use may be cut. A check that cannot finish (a damaged image) leaves
    /// everything as it is: writing goes on as before, and `check` reports the damage.
    fn reclaim_leaks(&self, m: &mut Meta) -> Result<bool> {
        match super::check::run(self, m, crate::CheckMode::RepairLeaks, &mut |_| {}) {
            Ok(r) => Ok(r.failed.is_none() && r.corruptions == 0 && r.check_errors == 0),
            Err(e @ Error::Io { .. }) => Err(e),
            Err(_) => Ok(false),
        }
    }

    /// The L2 table covering L1 index `l1i`, made writable: a new table when there is none,
    /// a private copy when it is shared with a snapshot (no COPIED flag). Returns its offset.
    pub(super) fn writable_l2(&self, m: &mut Writing, geo: &Geometry, l1i: usize) -> Result<u64> {
        let l1e = m.l1[l1i];
        let old = l1e & OFFSET_MASK;
        if old != 0 && l1e & table::OFLAG_COPIED != 0 {
            m.l2_table(&*self.storage, geo, old)?;
            return Ok(old);
        }
        let words = if old == 0 {
            vec![0u64; (geo.cluster_size() / 8) as usize]
        } else {
            m.l2_table(&*self.storage, geo, old)?.words.clone()
        };
        let alloc = m.alloc();
        let new = alloc.reserve(1);
        if old != 0 {
            // A data cluster's refcount counts the L1 tables it is reachable from, so moving
            // the active L1's reference from the shared table to a copy leaves data refcounts
            // as they are; only the shared table loses the active layer's reference.
            alloc.free_range(old, geo.cluster_size());
        }
        m.insert_new_l2(new, words, geo.extended_l2);
        m.l1[l1i] = new | table::OFLAG_COPIED;
        m.l1_dirty.insert(l1i);
        Ok(new)
    }
}
