//! The in-memory metadata of an open qcow2 image: header, L1 table and a bounded cache of L2
//! tables. It is the single owner of metadata state: lookups see staged (not yet committed)
//! entries, and staged tables stay pinned in memory until `commit` has written them.

use std::collections::{BTreeSet, HashMap};

use super::alloc::Allocator;
use super::header::Header;
use super::table::{self, Geometry};
use crate::io::{read_exact, Storage};
use crate::{Error, Result};

/// Memory given to clean cached L2 tables.
const L2_CACHE_BYTES: u64 = 32 << 20;

/// One cached L2 table, as 64-bit words (two per entry with extended L2).
pub struct L2Slot {
    pub words: Vec<u64>,
    last_use: u64,
    /// Word range changed since the last commit (tables already on disk).
    pub dirty: Option<(usize, usize)>,
    /// Allocated in this batch: written whole by the commit, before anything points at it.
    pub new: bool,
    extended: bool,
}

impl L2Slot {
    /// The entry for cluster `idx` of the table, with its subcluster bitmap (0 if none).
    pub fn entry(&self, idx: usize) -> (u64, u64) {
        if self.extended {
            (self.words[2 * idx], self.words[2 * idx + 1])
        } else {
            (self.words[idx], 0)
        }
    }

    pub fn set_entry(&mut self, idx: usize, entry: u64, bitmap: u64) {
        let (first, last) = if self.extended {
            self.words[2 * idx] = entry;
            self.words[2 * idx + 1] = bitmap;
            (2 * idx, 2 * idx + 1)
        } else {
            self.words[idx] = entry;
            (idx, idx)
        };
        if !self.new {
            self.dirty = Some(match self.dirty {
                Some((a, b)) => (a.min(first), b.max(last)),
                None => (first, last),
            });
        }
    }

    fn pinned(&self) -> bool {
        self.new || self.dirty.is_some()
    }
}

pub struct Meta {
    pub header: Header,
    pub l1: Vec<u64>,
    /// L1 indices changed since the last commit.
    pub l1_dirty: BTreeSet<usize>,
    pub l2: HashMap<u64, L2Slot>,
    tick: u64,
    /// File length as far as metadata validation is concerned.
    pub file_len: u64,
    /// Allocation and refcount state; created by the first write.
    pub alloc: Option<Allocator>,
    /// Where the image's metadata lies; mapped by the first write.
    pub metadata: Option<super::overlap::MetadataMap>,
}

impl Meta {
    pub fn new(header: Header, l1: Vec<u64>, file_len: u64) -> Meta {
        Meta {
            header,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: HashMap::new(),
            tick: 0,
            file_len,
            alloc: None,
            metadata: None,
        }
    }

    /// Whether anything is staged that a commit must write: allocations, refcount changes,
    /// in-place data, or table entries (a zero write may change only entries).
    pub fn has_staged(&self) -> bool {
        self.alloc.as_ref().is_some_and(|a| a.has_work())
            || !self.l1_dirty.is_empty()
            || self.l2.values().any(|s| s.new || s.dirty.is_some())
    }

    /// The L2 table at host offset `offset`, read and validated on a miss.
    pub fn l2_table(
        &mut self,
        storage: &dyn Storage,
        geo: &Geometry,
        offset: u64,
    ) -> Result<&mut L2Slot> {
        self.tick += 1;
        let tick = self.tick;
        if !self.l2.contains_key(&offset) {
            let cs = geo.cluster_size();
            if offset % cs != 0 {
                return Err(Error::Corrupt(format!(
                    "L2 table offset {offset:#x} unaligned"
                )));
            }
            if offset + cs > self.file_len {
                return Err(Error::PastEnd {
                    what: "L2 table",
                    offset,
                    file_len: self.file_len,
                });
            }
            let mut buf = vec![0u8; cs as usize];
            read_exact(storage, &mut buf, offset, "an L2 table")?;
            self.evict(cs);
            self.l2.insert(
                offset,
                L2Slot {
                    words: table::decode(&buf),
                    last_use: tick,
                    dirty: None,
                    new: false,
                    extended: geo.extended_l2,
                },
            );
        }
        let slot = self.l2.get_mut(&offset).expect("inserted above");
        slot.last_use = tick;
        Ok(slot)
    }

    /// Puts a table made in memory (new, or a copy of a shared one) into the cache, pinned.
    pub fn insert_new_l2(&mut self, offset: u64, words: Vec<u64>, extended: bool) {
        self.tick += 1;
        self.l2.insert(
            offset,
            L2Slot {
                words,
                last_use: self.tick,
                dirty: None,
                new: true,
                extended,
            },
        );
    }

    /// Drops least recently used clean tables until one more fits in the budget.
    fn evict(&mut self, cluster_size: u64) {
        let budget = (L2_CACHE_BYTES / cluster_size).max(8) as usize;
        while self.l2.len() >= budget {
            let victim = self
                .l2
                .iter()
                .filter(|(_, s)| !s.pinned())
                .min_by_key(|(_, s)| s.last_use)
                .map(|(&k, _)| k);
            match victim {
                Some(k) => {
                    self.l2.remove(&k);
                }
                // Everything is pinned by staged writes: grow until the commit.
                None => return,
            }
        }
    }
}
