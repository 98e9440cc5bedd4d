//! Bodies of the fuzz targets, shared by the libFuzzer binaries (`fuzz/fuzz_targets/`) and the
//! in-tree mutation fuzzer (`tests/reliability_fuzz.rs`, which includes this file by path).
//!
//! Each takes the bytes of an image file, held in memory (no host file is ever opened: a
//! qcow2 external data file is refused rather than opened by its fuzzed name), and must end
//! without a panic, a hang or a large allocation, whatever the bytes.

use std::sync::Arc;

use cowimg::chain::{Chain, Layer};
use cowimg_formats::probe::{probe, Probed};
use cowimg_formats::qcow2::{self, Qcow2};
use cowimg_formats::qed::Qed;
use cowimg_formats::{Alloc, CheckMode, Format, Image, MemStorage, Storage};

/// Guest bytes read at most per input (so that a huge virtual size costs no time).
pub const READ_CAP: u64 = 16 << 20;
/// Longest a fuzzed image may grow while being written or repaired (the vector holding it may
/// double, and must stay under the fuzzers' allocation caps; a real file would just be
/// sparse).
const MAX_LEN: u64 = 64 << 20;

/// Opens `data` as `format` (probed when `None`), as cowimg opens a top image, minus the
/// external data file.
pub fn open(
    data: &[u8],
    format: Option<Format>,
    writable: bool,
    repair: bool,
) -> Option<Arc<dyn Image>> {
    let st: Arc<dyn Storage> =
        Arc::new(MemStorage::new(data.to_vec(), "fuzz.img").with_max_len(MAX_LEN));
    let format = match format {
        Some(f) => f,
        None => match probe(&*st).ok()? {
            Probed::Known(f) => f,
            Probed::Other(_) => return None,
        },
    };
    let image: Arc<dyn Image> = match format {
        Format::Qcow2 => Arc::new(
            Qcow2::open(
                st,
                qcow2::OpenOptions {
                    writable,
                    data_file: None,
                    repair,
                },
            )
            .ok()?,
        ),
        Format::Qed => Arc::new(Qed::open(st, writable).ok()?),
        Format::Raw => return None,
    };
    Some(image)
}

/// Header parsing: open, and ask what `info` asks.
pub fn header(data: &[u8], format: Format) {
    if let Some(img) = open(data, Some(format), false, false) {
        let _ = img.virtual_size();
        let _ = img.cluster_size();
        let _ = img.allocation_unit();
        let _ = img.backing();
        let _ = img.details();
        let _ = img.is_dirty();
        let _ = img.copy_on_read();
    }
}

/// Table walking: map and block status of the whole disk, then reads of what the map
/// shows (data, compressed clusters) and through a one-layer chain, up to [`READ_CAP`].
pub fn map_read(data: &[u8]) {
    let Some(img) = open(data, None, false, false) else {
        return;
    };
    let size = img.virtual_size();
    let Ok(runs) = img.map(0, size) else { return };
    let _ = img.status(0, size);
    let mut budget = READ_CAP;
    let cs = img.cluster_size().unwrap_or(512);
    for r in &runs {
        if budget == 0 {
            break;
        }
        let n = r.len.min(budget).min(1 << 20);
        match r.alloc {
            Alloc::Data { host } => {
                let mut b = vec![0u8; n as usize];
                let _ = img.read_host(host, &mut b);
                budget -= n;
            }
            Alloc::Compressed { host, len } => {
                let mut b = vec![0u8; cs as usize];
                let _ = img.read_compressed(host, len, &mut b);
                budget = budget.saturating_sub(cs);
            }
            _ => {}
        }
    }
    let format = img.format();
    let chain = Chain::from_layers(vec![Layer {
        image: img,
        filename: "fuzz.img".into(),
        format,
        probed: true,
    }]);
    let mut at = 0;
    let mut buf = vec![0u8; 256 << 10];
    while at < size && at < READ_CAP {
        let n = (size - at).min(buf.len() as u64) as usize;
        if chain.read_from(0, at, &mut buf[..n]).is_err() {
            // Skip the piece that failed; later ones may still read.
        }
        at += n as u64;
    }
}

/// What a check of a fuzzed image found.
#[derive(Debug, Default)]
pub struct CheckOutcome {
    pub opened: bool,
    pub corruptions_before: u64,
    /// Corruptions a read-only check still finds after `check -r all`.
    pub corruptions_after_repair: Option<u64>,
    /// The same after a second `check -r all` (when the first left some).
    pub corruptions_after_second_repair: Option<u64>,
}

/// check: a read-only pass, then `check -r all` on a copy and a read-only pass over the
/// repaired image.
pub fn check(data: &[u8]) -> CheckOutcome {
    let mut out = CheckOutcome::default();
    if let Some(img) = open(data, None, false, false) {
        out.opened = true;
        if let Ok(r) = img.check(CheckMode::ReadOnly) {
            out.corruptions_before = r.corruptions;
        }
    }
    if let Some(img) = open(data, None, true, true) {
        out.opened = true;
        if let Ok(r) = img.check(CheckMode::RepairAll) {
            if r.failed.is_none() {
                out.corruptions_after_repair =
                    img.check(CheckMode::ReadOnly).ok().map(|r| r.corruptions);
            }
        }
    }
    out
}

/// The writing engine on a hostile image: a few writes and zero writes (places and sizes
/// taken from the input's own bytes), a commit, a header change, then a read-only check.
pub fn write(data: &[u8]) {
    use cowimg_formats::{BackingRef, ZerosBelow};
    let Some(img) = open(data, None, true, false) else {
        return;
    };
    let size = img.virtual_size();
    if size == 0 {
        return;
    }
    let unit = img.allocation_unit().max(512);
    // FNV-1a of the input: the same input always writes the same places.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data.iter().take(4096) {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    for k in 0..4u64 {
        h = h.rotate_left(17).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k;
        let off = (h % size) / 512 * 512;
        let len = (unit.min(64 << 10) + (h >> 40) % 128 * 512)
            .min(size - off)
            .max(1);
        let ok = if k == 2 {
            img.write_zeroes(off, len, &ZerosBelow)
        } else {
            img.write(off, &vec![0x5a ^ k as u8; len as usize], &ZerosBelow)
        };
        if ok.is_err() {
            break;
        }
    }
    let _ = img.commit();
    if img.backing().is_some() {
        let _ = img.set_backing(Some(&BackingRef {
            name: "other.img".into(),
            format: Some("raw".into()),
        }));
    }
    let _ = img.check(CheckMode::ReadOnly);
}
