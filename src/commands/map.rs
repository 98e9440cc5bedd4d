//! `cowimg map`: where each guest range of a chain comes from, as qemu-img map reports it.

use cowimg_formats::{Alloc, Format};

use crate::chain::{Chain, OpenOptions};
use crate::error::{Error, Result};

pub struct Args {
    pub file: String,
    pub format: Option<Format>,
    pub json: bool,
    pub force_share: bool,
    pub start: u64,
    pub max_length: Option<u64>,
}

/// One range with one status (qemu-img's MapEntry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub start: u64,
    pub length: u64,
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
    /// Layer index the offset refers to.
    pub layer: usize,
}

impl Entry {
    /// qemu-img merges entries that continue each other with the same status.
    fn continues(&self, next: &Entry) -> bool {
        self.start + self.length == next.start
            && self.present == next.present
            && self.depth == next.depth
            && self.data == next.data
            && self.zero == next.zero
            && self.compressed == next.compressed
            && self.offset.is_some() == next.offset.is_some()
            && self.offset.is_none_or(|o| Some(o + self.length) == next.offset)
            && self.layer == next.layer
    }
}

/// The status of `[start, end)` of layer `i` and what shows through from below it.
pub fn status(chain: &Chain, i: usize, start: u64, end: u64, out: &mut Vec<Entry>) -> Result<()> {
    let layer = &chain.layers[i];
    let runs = layer.image.map(start, end - start).map_err(|e| Error::image(&layer.filename, e))?;
    for r in runs {
        let base = Entry {
            start: r.start,
            length: r.len,
            depth: i,
            present: true,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            layer: i,
        };
        match r.alloc {
            Alloc::Data { host } => out.push(Entry { data: true, offset: Some(host), ..base }),
            Alloc::Compressed { .. } => out.push(Entry { data: true, compressed: true, ..base }),
            Alloc::Zero { host } => out.push(Entry { zero: true, offset: host, ..base }),
            Alloc::Unallocated => {
                let Some(next) = chain.layers.get(i + 1) else {
                    out.push(Entry { present: false, zero: true, ..base });
                    continue;
                };
                // Past the end of a shorter backing file the image reads zeros.
                let split = r.end().min(next.size()).max(r.start);
                if split > r.start {
                    status(chain, i + 1, r.start, split, out)?;
                }
                if split < r.end() {
                    out.push(Entry { start: split, length: r.end() - split, present: false, zero: true, ..base });
                }
            }
        }
    }
    Ok(())
}

/// Merged entries for `[start, end)` of the chain's top.
pub fn entries(chain: &Chain, start: u64, end: u64) -> Result<Vec<Entry>> {
    let mut raw = Vec::new();
    if start < end {
        status(chain, 0, start, end, &mut raw)?;
    }
    let mut merged: Vec<Entry> = Vec::with_capacity(raw.len());
    for e in raw {
        match merged.last_mut() {
            Some(last) if last.continues(&e) => last.length += e.length,
            _ => merged.push(e),
        }
    }
    Ok(merged)
}

pub fn run(a: &Args) -> Result<i32> {
    let chain = Chain::open(&a.file, OpenOptions::read(a.format, a.force_share))?;
    let size = chain.size();
    let end = a.max_length.map_or(size, |l| a.start.saturating_add(l).min(size));
    let list = entries(&chain, a.start.min(size), end)?;
    let mut out = String::new();
    if a.json {
        out.push('[');
        for (i, e) in list.iter().enumerate() {
            out += &format!(
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            );
            if let Some(o) = e.offset {
                out += &format!(", \"offset\": {o}");
            }
            out.push('}');
            if i + 1 < list.len() {
                out += ",\n";
            }
        }
        out += "]\n";
    } else {
        out += &format!("{:<16}{:<16}{:<16}{}\n", "Offset", "Length", "Mapped to", "File");
        for e in list.iter().filter(|e| e.data && e.offset.is_some()) {
            out += &format!(
                "{:<16}{:<16}{:<16}{}\n",
                hex(e.start),
                hex(e.length),
                hex(e.offset.unwrap_or(0)),
                chain.layers[e.layer].filename
            );
        }
    }
    print!("{out}");
    Ok(0)
}

/// C's `%#x`: no prefix for zero.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
