//! The size a new image would need: the layout arithmetic of `qemu-img measure`.
//!
//! qemu's answer has two parts. *fully allocated* is the file of an image whose every cluster
//! is written: data plus all the metadata it needs (for qcow2 `qcow2_calc_prealloc_size`:
//! header, L2 and L1 tables, refcount blocks and table at their fixed point). *required* is
//! the same metadata plus only the clusters a copy of the source would write (the caller
//! finds them through the source's block status). The metadata is deliberately not shrunk
//! to match: qemu keeps it as an upper bound. The figures here are qemu's to the byte.
//!
//! Beyond qemu: QED (qemu has no QED measure): the same rule over QED's layout.

use crate::qcow2::compress::CompressionType;
use crate::qcow2::layout::refcount_structures;
use crate::qcow2::refcount::RefGeometry;
use crate::qcow2::snapshot::Bitmap;
use crate::{qed, Error, Format, Prealloc, Result};

/// qemu's limit on the L1 table (QCOW_MAX_L1_SIZE), which bounds the image size measured.
const QCOW2_MAX_L1_BYTES: u128 = 32 << 20;

/// The output image measured, as its creation options describe it (qemu's defaults filled
/// in by the caller).
#[derive(Clone, Debug)]
pub struct Target {
    /// The output format.
    pub format: Format,
    /// `-o size` (only checked, as qemu does: the size measured is the source's, or the one
    /// asked for without a source).
    pub size: Option<u64>,
    /// Cluster size (512 for raw).
    pub cluster_size: u64,
    /// qcow2 version 3 (`compat=1.1`).
    pub v3: bool,
    /// qcow2 refcount width.
    pub refcount_bits: u32,
    /// qcow2 extended L2 entries.
    pub extended_l2: bool,
    /// `preallocation=` (qemu's PreallocMode).
    pub prealloc: Prealloc,
    /// Whether the output gets a backing file.
    pub backing_file: bool,
    /// qcow2 compression type (for the `-c` estimate the caller makes).
    pub compression: CompressionType,
    /// QED table size in clusters.
    pub table_size: u32,
}

impl Target {
    /// Whether the output holds every cluster at full size whatever the source contains.
    pub fn preallocates_data(&self) -> bool {
        matches!(self.prealloc, Prealloc::Full | Prealloc::Falloc)
    }
}

/// What of the source the figures depend on. The caller reads it through the source's chain.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    /// The source's virtual size.
    pub virtual_size: u64,
    /// Bytes of the output clusters a copy writes: those holding a byte whose block status
    /// (through the whole chain) is allocated data and not zero.
    pub data: u64,
    /// The source's persistent bitmaps, when it can hold any (qcow2 version 3).
    pub bitmaps: Option<&'a [Bitmap]>,
}

/// What measure reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Figures {
    /// qemu's *required size*: the metadata and the clusters a copy writes.
    pub required: u64,
    /// qemu's *fully allocated size*.
    pub fully_allocated: u64,
    /// The persistent bitmaps' size; qemu shows it when both the source and the output
    /// support them.
    pub bitmaps: Option<u64>,
    /// The `-c` estimate of `required` for a compressed copy (see [`Figures::set_compressed`]).
    pub compressed: Option<u64>,
    /// The metadata counted in both sizes.
    pub metadata: u64,
    /// The data bytes counted in `required` (every cluster when the output is preallocated
    /// or gets a backing file).
    pub data: u64,
}

impl Figures {
    /// Records the `-c` figure: `estimate` is the bytes a compressed copy stores for the
    /// data (capped at the uncompressed data); `None` for a preallocated output, which
    /// stores every cluster whole.
    pub fn set_compressed(&mut self, estimate: Option<u64>) -> Result<()> {
        let stored = estimate.unwrap_or(self.data).min(self.data);
        self.compressed = Some(to_u64(u128::from(self.metadata) + u128::from(stored))?);
        Ok(())
    }
}

/// The figures for `t`, from `source` (or for an empty image of `size` without one).
pub fn measure(t: &Target, source: Option<&Source>, size: u64) -> Result<Figures> {
    let cs = t.cluster_size;
    if t.format == Format::Raw {
        // A raw file is all data, allocated or not; qemu counts the source's length (whole
        // sectors) or the size asked, rounded up to a sector.
        let n = match source {
            Some(s) => s.virtual_size,
            None => size.div_ceil(512).saturating_mul(512),
        };
        return Ok(Figures {
            required: n,
            fully_allocated: n,
            bitmaps: None,
            compressed: None,
            metadata: 0,
            data: n,
        });
    }
    check(t, source.is_some(), size)?;
    let virtual_size = source.map_or(size, |s| s.virtual_size);
    let aligned = u128::from(virtual_size).div_ceil(u128::from(cs)) * u128::from(cs);
    // qemu cannot know what a new backing file shares with the source, so it assumes every
    // cluster is written; so does a preallocated output.
    let data = match source {
        _ if t.preallocates_data() => aligned,
        Some(_) if t.backing_file => aligned,
        Some(s) => u128::from(s.data),
        None => 0,
    };
    let fully = match t.format {
        Format::Qcow2 => {
            qcow2_fully_allocated(aligned, cs, t.refcount_bits.trailing_zeros(), t.extended_l2)?
        }
        _ => qed_fully_allocated(aligned, cs, t.table_size),
    };
    let metadata = fully - aligned;
    let bitmaps = match source.and_then(|s| s.bitmaps) {
        // Only a qcow2 v3 output can take persistent bitmaps.
        Some(list) if t.format == Format::Qcow2 && t.v3 => {
            Some(bitmaps_size(list, virtual_size, cs)?)
        }
        _ => None,
    };
    Ok(Figures {
        required: to_u64(metadata + data)?,
        fully_allocated: to_u64(fully)?,
        bitmaps,
        compressed: None,
        metadata: to_u64(metadata)?,
        data: to_u64(data)?,
    })
}

/// qemu's checks of the size asked for, made before anything is read (and again by
/// [`measure`]): `--size` without a source, else `-o size`; not the source's.
pub fn check(t: &Target, has_source: bool, size: u64) -> Result<()> {
    let asked = if has_source {
        t.size.unwrap_or(0)
    } else {
        size
    };
    let cs = t.cluster_size;
    match t.format {
        Format::Qcow2 => {
            let l2_entry = if t.extended_l2 { 16 } else { 8 };
            let clusters = u128::from(asked).div_ceil(u128::from(cs));
            let l2_tables = clusters.div_ceil(u128::from(cs / l2_entry));
            if l2_tables * 8 > QCOW2_MAX_L1_BYTES {
                return Err(too_large());
            }
            Ok(())
        }
        Format::Qed => qed::create::validate(&qed::create::Options {
            size: asked,
            cluster_size: cs,
            table_size: t.table_size,
            backing: None,
            copy_on_read: false,
        }),
        Format::Raw => Ok(()),
    }
}

fn to_u64(v: u128) -> Result<u64> {
    u64::try_from(v).map_err(|_| too_large())
}

/// qemu's words for a size whose metadata would not fit.
fn too_large() -> Error {
    Error::invalid("The image size is too large (try using a larger cluster size)")
}

/// qemu's `qcow2_refcount_metadata_size`: the bytes of the refcount blocks and table for
/// `clusters` clusters, found as the fixed point where they also count themselves.
fn qcow2_refcount_metadata_size(clusters: u128, cs: u64, refcount_order: u32) -> Result<u128> {
    let geo = RefGeometry {
        cluster_bits: cs.trailing_zeros(),
        refcount_order,
    };
    let clusters = u64::try_from(clusters).map_err(|_| too_large())?;
    let refs = refcount_structures(geo, clusters).map_err(|_| too_large())?;
    Ok(u128::from(refs.clusters()) * u128::from(cs))
}

/// qemu's `qcow2_calc_prealloc_size`: a qcow2 file with all of `aligned` (a whole number of
/// clusters) allocated, with every table it needs.
pub fn qcow2_fully_allocated(
    aligned: u128,
    cs: u64,
    refcount_order: u32,
    extended_l2: bool,
) -> Result<u128> {
    let cs128 = u128::from(cs);
    let l2_entry = if extended_l2 { 16 } else { 8 };
    let mut meta = cs128; // header
    let l2_entries = (aligned / cs128).div_ceil(cs128 / l2_entry) * (cs128 / l2_entry);
    meta += l2_entries * l2_entry;
    let l1_entries = (l2_entries * l2_entry / cs128).div_ceil(cs128 / 8) * (cs128 / 8);
    meta += l1_entries * 8;
    meta += qcow2_refcount_metadata_size((meta + aligned) / cs128, cs, refcount_order)?;
    Ok(meta + aligned)
}

/// cowimg's QED counterpart (qemu has none): the header cluster, the L1 table, an L2 table
/// for every L1 entry the size reaches, and the data. Tables are `table_size` clusters.
pub fn qed_fully_allocated(aligned: u128, cs: u64, table_size: u32) -> u128 {
    let table = u128::from(table_size) * u128::from(cs);
    let l2_span = table / 8 * u128::from(cs);
    let l2_tables = aligned.div_ceil(l2_span);
    u128::from(cs) + table + l2_tables * table + aligned
}

/// qemu's `qcow2_get_persistent_dirty_bitmap_size`: the bitmaps of the source copied into
/// an image of cluster size `cs`, each assumed wholly allocated, with its table, plus the
/// bitmap directory.
pub fn bitmaps_size(bitmaps: &[Bitmap], virtual_size: u64, cs: u64) -> Result<u64> {
    let cs = u128::from(cs);
    let mut total = 0u128;
    let mut directory = 0u128;
    for b in bitmaps {
        let granularity = u128::from(b.granularity.max(1));
        let bytes = u128::from(virtual_size).div_ceil(granularity).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        total += clusters * cs;
        total += (clusters * 8).div_ceil(cs) * cs;
        // A directory entry: 24 bytes and the name, padded to 8.
        directory += (24 + b.name.len() as u128).div_ceil(8) * 8;
    }
    total += directory.div_ceil(cs) * cs;
    to_u64(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_formula_matches_qemu_reference_values() {
        // From qemu's iotest 178/190 outputs.
        let gib = 1u128 << 30;
        let fully = |aligned, cs| qcow2_fully_allocated(aligned, cs, 4, false).ok();
        assert_eq!(fully(gib, 65536), Some(1_074_135_040));
        assert_eq!(fully(0, 65536), Some(196_608));
        assert_eq!(fully(2 << 40, 65536), Some(2_199_359_062_016));
        assert_eq!(fully(2 << 40, 2 << 20), Some(2_199_042_129_920));
    }

    #[test]
    fn bitmaps_match_qemu_reference_value() {
        let bm = |name: &str, granularity| Bitmap {
            name: name.into(),
            granularity,
            in_use: false,
            auto: true,
            table_offset: 0,
            table_size: 0,
        };
        let list = [bm("b1", 512), bm("b2", 2 << 20)];
        assert_eq!(bitmaps_size(&list, 2 << 40, 65536).ok(), Some(537_198_592));
        assert_eq!(
            bitmaps_size(&list, 2 << 40, 2 << 20).ok(),
            Some(545_259_520)
        );
    }

    fn qcow2_target() -> Target {
        Target {
            format: Format::Qcow2,
            size: None,
            cluster_size: 65536,
            v3: true,
            refcount_bits: 16,
            extended_l2: false,
            prealloc: Prealloc::Off,
            backing_file: false,
            compression: CompressionType::Zlib,
            table_size: 4,
        }
    }

    #[test]
    fn required_is_the_metadata_and_the_data_written() {
        let t = qcow2_target();
        let src = Source {
            virtual_size: 1 << 30,
            data: 3 << 16,
            bitmaps: None,
        };
        let f = measure(&t, Some(&src), 0).ok();
        let f = f.as_ref();
        assert_eq!(f.map(|f| f.fully_allocated), Some(1_074_135_040));
        assert_eq!(
            f.map(|f| f.required),
            Some(1_074_135_040 - (1 << 30) + (3 << 16))
        );
        // A backing file makes every cluster count, as qemu assumes.
        let t = Target {
            backing_file: true,
            ..qcow2_target()
        };
        let f = measure(&t, Some(&src), 0).ok();
        assert_eq!(f.map(|f| f.required), Some(1_074_135_040));
    }

    #[test]
    fn too_large_sizes_are_refused_in_qemus_words() {
        let t = Target {
            cluster_size: 512,
            ..qcow2_target()
        };
        let e = measure(&t, None, crate::MAX_SIZE)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("The image size is too large (try using a larger cluster size)")
        );
    }
}
