//! The checker's memory: compact per-cluster counters and batched table reads.

use std::collections::HashMap;

use crate::io::{read_exact, Storage};
use crate::Result;

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
    pub(super) fn with_len(len: u64) -> Counts {
        let mut c = Counts::default();
        c.grow(len);
        c
    }

    pub(super) fn len(&self) -> u64 {
        self.len
    }

    pub(super) fn grow(&mut self, len: u64) {
        if len > self.len {
            self.len = len;
            self.chunks
                .resize_with(len.div_ceil(CHUNK) as usize, || None);
        }
    }

    pub(super) fn get(&self, i: u64) -> u64 {
        match self.chunks.get((i >> CHUNK_BITS) as usize) {
            Some(Some(c)) => match c[(i & (CHUNK - 1)) as usize] {
                SPILL => self.spill.get(&i).copied().unwrap_or(0),
                v => u64::from(v),
            },
            _ => 0,
        }
    }

    /// Sets counter `i` (grows to hold it).
    pub(super) fn set(&mut self, i: u64, v: u64) {
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
    pub(super) fn any(&self, a: u64, b: u64) -> bool {
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
pub(super) struct Tables {
    buf: Vec<u8>,
    at: HashMap<u64, usize>,
    size: usize,
}

impl Tables {
    pub(super) fn new(size: u64) -> Tables {
        Tables {
            buf: Vec::new(),
            at: HashMap::new(),
            size: size as usize,
        }
    }

    /// Reads the tables at `offsets` (at most a window's worth), replacing the previous ones.
    pub(super) fn load(&mut self, s: &dyn Storage, offsets: &[u64], what: &str) -> Result<()> {
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

    pub(super) fn get(&self, offset: u64) -> &[u8] {
        match self.at.get(&offset) {
            Some(&at) => &self.buf[at..at + self.size],
            // Every offset asked for was read; an empty table reads as unallocated.
            None => &[],
        }
    }
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
