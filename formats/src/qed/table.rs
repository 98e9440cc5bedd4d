//! QED L2 tables, cached in pages of at most 64 KiB.
//!
//! A QED table is `table_size` clusters (up to 16 x 64 MiB), far more than is worth holding
//! whole, so tables are read and written in pages. Staged pages stay pinned until the commit.

use std::collections::{BTreeSet, HashMap};

use crate::io::{read_exact, write_all, Storage};
use crate::Result;

const PAGE_ENTRIES: u64 = 8192;
const CACHE_BYTES: u64 = 32 << 20;

pub struct Page {
    pub entries: Vec<u64>,
    /// Entry range changed since the last commit (pages of tables already on disk).
    pub dirty: Option<(usize, usize)>,
    /// A page of a table allocated in this batch: written whole by the commit.
    pub new: bool,
    last_use: u64,
}

pub struct Pages {
    page_entries: u64,
    pages: HashMap<(u64, u64), Page>,
    /// Tables allocated since the last commit (their offsets).
    pub new_tables: BTreeSet<u64>,
    tick: u64,
}

impl Pages {
    pub fn new(table_entries: u64) -> Pages {
        Pages {
            page_entries: table_entries.min(PAGE_ENTRIES),
            pages: HashMap::new(),
            new_tables: BTreeSet::new(),
            tick: 0,
        }
    }

    pub fn is_new_table(&self, table: u64) -> bool {
        self.new_tables.contains(&table)
    }

    fn page(&mut self, s: &dyn Storage, table: u64, idx: u64) -> Result<(&mut Page, usize)> {
        let key = (table, idx / self.page_entries);
        let n = self.page_entries as usize;
        self.tick += 1;
        if !self.pages.contains_key(&key) {
            self.evict();
            let page = if self.new_tables.contains(&table) {
                Page {
                    entries: vec![0; n],
                    dirty: None,
                    new: true,
                    last_use: 0,
                }
            } else {
                let mut buf = vec![0u8; n * 8];
                read_exact(
                    s,
                    &mut buf,
                    table + key.1 * self.page_entries * 8,
                    "an L2 table",
                )?;
                let entries = buf
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                Page {
                    entries,
                    dirty: None,
                    new: false,
                    last_use: 0,
                }
            };
            self.pages.insert(key, page);
        }
        let page = self.pages.get_mut(&key).expect("inserted above");
        page.last_use = self.tick;
        Ok((page, (idx % self.page_entries) as usize))
    }

    pub fn get(&mut self, s: &dyn Storage, table: u64, idx: u64) -> Result<u64> {
        let (page, i) = self.page(s, table, idx)?;
        Ok(page.entries[i])
    }

    pub fn set(&mut self, s: &dyn Storage, table: u64, idx: u64, value: u64) -> Result<()> {
        let (page, i) = self.page(s, table, idx)?;
        page.entries[i] = value;
        if !page.new {
            page.dirty = Some(page.dirty.map_or((i, i), |(a, b)| (a.min(i), b.max(i))));
        }
        Ok(())
    }

    fn evict(&mut self) {
        let budget = (CACHE_BYTES / (self.page_entries * 8)).max(8) as usize;
        while self.pages.len() >= budget {
            let victim = self
                .pages
                .iter()
                .filter(|(_, p)| !p.new && p.dirty.is_none())
                .min_by_key(|(_, p)| p.last_use)
                .map(|(&k, _)| k);
            match victim {
                Some(k) => {
                    self.pages.remove(&k);
                }
                None => return,
            }
        }
    }

    /// Writes the touched pages of new tables (the rest of a new table reads as zeros).
    pub fn write_new(&mut self, s: &dyn Storage) -> Result<()> {
        let pe = self.page_entries;
        for (&(table, p), page) in self.pages.iter_mut().filter(|(_, p)| p.new) {
            write_all(
                s,
                &encode(&page.entries),
                table + p * pe * 8,
                "a new L2 table",
            )?;
            page.new = false;
        }
        self.new_tables.clear();
        Ok(())
    }

    /// Writes changed entries of existing tables.
    pub fn write_dirty(&mut self, s: &dyn Storage) -> Result<()> {
        let pe = self.page_entries;
        for (&(table, p), page) in self.pages.iter_mut() {
            if let Some((a, b)) = page.dirty.take() {
                write_all(
                    s,
                    &encode(&page.entries[a..=b]),
                    table + (p * pe + a as u64) * 8,
                    "L2 entries",
                )?;
            }
        }
        Ok(())
    }
}

pub fn encode(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}
