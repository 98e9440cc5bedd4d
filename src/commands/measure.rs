//! `cowimg measure`: the size a new image would need (qemu-img measure's figures).
//!
//! The layout arithmetic (qcow2's and QED's metadata, the bitmaps) is the formats crate's
//! (`cowimg_formats::measure`); this command parses the options, walks FILE's block status
//! for the clusters a copy writes, and prints qemu-img's two forms.
//!
//! Beyond qemu-img:
//! - `-O qed` (qemu has no QED measure and refuses it): the same rule over QED's layout.
//! - `-c` (qcow2): an *estimate* of the required size of a compressed copy, from compressing
//!   a deterministic sample of FILE's data clusters.

use rayon::prelude::*;

use cowimg_formats::measure::{self as layout, Figures, Source, Target};
use cowimg_formats::qcow2::compress::{compress, CompressionType};
use cowimg_formats::{qed, Details, Format, Prealloc};

use super::create::ImageOptions;
use super::map::{flags, Walker};
use cowimg::chain::{Chain, OpenOptions};
use cowimg::error::{Error, Result};

/// The arguments of `cowimg measure` (`cowimg measure --help` says what each flag does).
pub struct Args {
    /// The source image (None: measure an empty image of `size`).
    pub file: Option<String>,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// `-O`: the format to measure for.
    pub out_format: Format,
    /// `-o` options, as given.
    pub options: Vec<String>,
    /// The virtual size in bytes.
    pub size: Option<u64>,
    /// `-c`: store copied clusters compressed (qcow2).
    pub compress: bool,
    /// JSON output (`--output json`).
    pub json: bool,
    /// `-U`: read an image another process may be writing.
    pub force_share: bool,
}

/// Guest data compressed for the `-c` estimate, at most: enough clusters for a stable ratio,
/// few enough that measuring stays a matter of a second or two.
const SAMPLE_BYTES: u64 = 64 << 20;
/// qemu takes sizes as `int64_t`.
const MAX_SIZE: u64 = i64::MAX as u64;

/// Runs `cowimg measure`; returns the exit status.
pub fn run(a: &Args) -> Result<i32> {
    // qemu-img's checks, in its order and words.
    if a.file.is_none() && a.format.is_some() {
        return Err(Error::Usage("-f requires a filename argument.".into()));
    }
    if a.file.is_some() && a.size.is_some() {
        return Err(Error::Usage(
            "--size N cannot be used together with a filename.".into(),
        ));
    }
    if a.file.is_none() && a.size.is_none() {
        return Err(Error::Usage(
            "Either --size N or one filename must be specified.".into(),
        ));
    }
    if a.size.is_some_and(|s| s > MAX_SIZE) {
        return Err(Error::Usage(format!(
            "Invalid image size specified. Must be between 0 and {MAX_SIZE}."
        )));
    }
    if a.compress && a.out_format != Format::Qcow2 {
        return Err(Error::Usage(
            "Compression not supported for this file format".into(),
        ));
    }
    let target = parse_options(a.out_format, &a.options)?;
    let chain = match &a.file {
        Some(f) => Some(Chain::open(f, OpenOptions::read(a.format, a.force_share))?),
        None => None,
    };
    let m = measure(&target, chain.as_ref(), a.size.unwrap_or(0), a.compress)?;
    print!("{}", render(&m, a.json));
    Ok(0)
}

/// Reads the `-o` lists. Creation options go through `ImageOptions` (one parser for create,
/// convert and measure); what only measure accepts is taken out first: qemu lets measure be
/// asked about preallocated images and passes the file layer's options (`nocow`,
/// `extent_size_hint`) through without effect on the figures.
fn parse_options(format: Format, lists: &[String]) -> Result<Target> {
    let mut o = ImageOptions::default();
    let mut prealloc = Prealloc::Off;
    for list in lists {
        let mut rest = Vec::new();
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, "on"));
            match key {
                "preallocation" => {
                    prealloc = match value {
                        "off" => Prealloc::Off,
                        "metadata" if format == Format::Qcow2 => Prealloc::Metadata,
                        "falloc" if format != Format::Qed => Prealloc::Falloc,
                        "full" if format != Format::Qed => Prealloc::Full,
                        _ => {
                            return Err(Error::Usage(format!(
                        "Parameter 'preallocation' does not accept value '{value}' for {format}"
                    )))
                        }
                    }
                }
                "nocow" | "extent_size_hint" => {}
                // qemu's qcow2 measure ignores an external data file: the figures are those of
                // the qcow2 file as if it held the data.
                "data_file" | "data_file_raw" if format == Format::Qcow2 => {}
                "encryption" | "encrypt.format" if format == Format::Qcow2 => {
                    return Err(Error::Usage(
                        "cowimg does not measure encrypted images (use qemu-img measure for that)"
                            .into(),
                    ))
                }
                _ => rest.push(item),
            }
        }
        o.apply(format, &rest.join(","))?;
    }
    let v3 = match o.compat.as_deref() {
        // qemu's measure knows only "0.10" and "1.1"; create also takes "v2" and "v3", and so
        // does cowimg here, so that one option list serves both.
        None | Some("1.1") | Some("v3") => true,
        Some("0.10") | Some("v2") => false,
        Some(c) => return Err(Error::Usage(format!("Invalid compatibility level: '{c}'"))),
    };
    let extended_l2 = o.extended_l2.unwrap_or(false);
    let cluster_size = match format {
        Format::Qcow2 => {
            let cs = o.cluster_size.unwrap_or(65536);
            if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
                return Err(Error::Usage(
                    "Cluster size must be a power of two between 512 and 2048k".into(),
                ));
            }
            if extended_l2 && cs < 16384 {
                return Err(Error::Usage(
                    "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes".into(),
                ));
            }
            cs
        }
        Format::Qed => o
            .cluster_size
            .unwrap_or(qed::create::Options::default().cluster_size),
        Format::Raw => 512,
    };
    let refcount_bits = o.refcount_bits.unwrap_or(16);
    if format == Format::Qcow2 {
        if refcount_bits == 0 || refcount_bits > 64 || !refcount_bits.is_power_of_two() {
            return Err(Error::Usage(
                "Refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        if !v3 && refcount_bits != 16 {
            return Err(Error::Usage(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
                    .into(),
            ));
        }
    }
    Ok(Target {
        format,
        size: o.size,
        cluster_size,
        v3,
        refcount_bits,
        extended_l2,
        prealloc,
        backing_file: o.backing_file.is_some(),
        compression: o.compression_type.unwrap_or(CompressionType::Zlib),
        table_size: o
            .table_size
            .unwrap_or(qed::create::Options::default().table_size),
    })
}

/// The figures for `t`, from `chain` (or for an empty image of `size` without one).
fn measure(t: &Target, chain: Option<&Chain>, size: u64, want_compressed: bool) -> Result<Figures> {
    // The size asked for is checked before FILE is read, as qemu does.
    layout::check(t, chain.is_some(), size).map_err(usage)?;
    let cs = t.cluster_size;
    let data = match chain {
        Some(c) if t.format != Format::Raw => Some(allocated(c, cs)?),
        _ => None,
    };
    let bitmaps = chain.and_then(|c| match c.top().image.details() {
        // Only a qcow2 v3 source can hold persistent bitmaps (qemu asks the driver).
        Details::Qcow2(d) if d.version >= 3 => Some(d.bitmaps),
        _ => None,
    });
    let source = chain.map(|c| Source {
        virtual_size: c.size(),
        data: data.as_ref().map_or(0, |d| d.required),
        bitmaps: bitmaps.as_deref(),
    });
    let mut figures = layout::measure(t, source.as_ref(), size).map_err(usage)?;
    if want_compressed {
        let estimate = if t.preallocates_data() {
            // A preallocated file holds every cluster at full size whatever it contains.
            None
        } else {
            let chain_data = chain.zip(data.as_ref());
            Some(estimate_compressed(
                chain_data,
                figures.data,
                cs,
                t.compression,
            )?)
        };
        figures.set_compressed(estimate).map_err(usage)?;
    }
    Ok(figures)
}

/// The layout's refusals are about the options given: usage errors, in qemu's words.
fn usage(e: cowimg_formats::Error) -> Error {
    Error::Usage(e.to_string())
}

/// Output clusters a copy of the source writes.
#[derive(Debug, Default)]
struct Data {
    /// Bytes of those clusters (qemu's `required` before metadata is added).
    required: u64,
    /// The clusters, as cluster-aligned guest ranges `[start, end)` in order; the last one
    /// may reach past the end of the image.
    ranges: Vec<(u64, u64)>,
}

/// qemu's walk in `qcow2_measure`: the block status of the whole chain, range by range.
/// Zero ranges (read as zero, whatever holds them) are skipped; each range of allocated data
/// counts every output cluster it touches, and the walk then continues after the last of
/// them, so no cluster is counted twice.
fn allocated(chain: &Chain, cs: u64) -> Result<Data> {
    let size = chain.size();
    // The clusters counted do not depend on where answers end: merged answers are exact.
    let walker = Walker::coalescing(chain);
    let mut d = Data::default();
    let mut offset = 0u64;
    while offset < size {
        let st = walker.status_above(offset, size - offset)?;
        if st.len == 0 {
            return Err(Error::image(
                &chain.top().filename,
                cowimg_formats::Error::invalid(format!("no block status at offset {offset}")),
            ));
        }
        let allocated_data = st.has(flags::DATA) && st.has(flags::ALLOCATED);
        if st.has(flags::ZERO) || !allocated_data {
            offset += st.len;
            continue;
        }
        let start = offset / cs * cs;
        let end = (offset + st.len).div_ceil(cs).saturating_mul(cs);
        d.required += end - start;
        match d.ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => d.ranges.push((start, end)),
        }
        offset = end;
    }
    Ok(d)
}

/// The bytes a compressed copy would store for the source's data clusters, estimated from a
/// sample: up to `SAMPLE_BYTES` of them, spread evenly over the data (the midpoints of equal
/// shares, so the same image always gives the same sample). Each sampled cluster counts what
/// `convert -c` would store: nothing for a cluster of zeros (the copy skips it), the
/// compressed stream where it shrinks, else the whole cluster. The sampled ratio is applied
/// to the bytes qemu's rule counts as required.
fn estimate_compressed(
    source: Option<(&Chain, &Data)>,
    required: u64,
    cs: u64,
    kind: CompressionType,
) -> Result<u64> {
    let Some((chain, data)) = source else {
        return Ok(0);
    };
    let total: u64 = data.ranges.iter().map(|(s, e)| (e - s) / cs).sum();
    if total == 0 {
        // Nothing to sample: FILE holds no data, and what is required is then either nothing
        // or (with a backing file) qemu's every-cluster assumption, kept as it is.
        return Ok(required);
    }
    let k = total.min((SAMPLE_BYTES / cs).max(1));
    // Cumulative cluster counts, to find the j-th data cluster's guest offset.
    let mut starts = Vec::with_capacity(data.ranges.len());
    let mut acc = 0u64;
    for (s, e) in &data.ranges {
        starts.push(acc);
        acc += (e - s) / cs;
    }
    let offsets: Vec<u64> = (0..k)
        .map(|j| {
            let idx = ((2 * u128::from(j) + 1) * u128::from(total) / (2 * u128::from(k))) as u64;
            // starts[0] is 0 and idx < total, so a range always holds idx.
            let r = starts.partition_point(|&c| c <= idx).saturating_sub(1);
            data.ranges[r].0 + (idx - starts[r]) * cs
        })
        .collect();
    let size = chain.size();
    let stored: Vec<u64> = offsets
        .par_iter()
        .map(|&off| -> Result<u64> {
            let mut buf = vec![0u8; cs as usize];
            // The last cluster may pass the end of the image: the rest reads as zeros, and
            // that is how a copy compresses it too.
            let n = (size.saturating_sub(off)).min(cs) as usize;
            chain.read(off, &mut buf[..n])?;
            if buf.iter().all(|&b| b == 0) {
                return Ok(0);
            }
            Ok(
                match compress(kind, &buf).map_err(|e| Error::image(&chain.top().filename, e))? {
                    Some(c) => c.len() as u64,
                    None => cs,
                },
            )
        })
        .collect::<Result<_>>()?;
    let sampled: u128 = stored.iter().map(|&b| u128::from(b)).sum();
    let estimate = (sampled * u128::from(required)).div_ceil(u128::from(k) * u128::from(cs));
    // Compressed clusters are packed back to back; the file still ends on a whole cluster.
    // (`required` is whole clusters and `sampled` at most `k` of them: this fits.)
    Ok(u64::try_from(estimate.div_ceil(u128::from(cs)) * u128::from(cs)).unwrap_or(u64::MAX))
}

/// qemu-img's two forms: lines, or its pretty JSON (four-space indent, and the key order its
/// QDict iteration gives: "bitmaps" first).
fn render(m: &Figures, json: bool) -> String {
    let mut fields: Vec<(&str, &str, u64)> = Vec::new();
    if json {
        if let Some(b) = m.bitmaps {
            fields.push(("bitmaps", "", b));
        }
    }
    match m.compressed {
        Some(c) => {
            fields.push(("required", "required size", c));
            fields.push((
                "required-uncompressed",
                "required size (uncompressed)",
                m.required,
            ));
        }
        None => fields.push(("required", "required size", m.required)),
    }
    fields.push(("fully-allocated", "fully allocated size", m.fully_allocated));
    if !json {
        if let Some(b) = m.bitmaps {
            fields.push(("", "bitmaps size", b));
        }
    }
    if json {
        let body: Vec<String> = fields
            .iter()
            .map(|(k, _, v)| format!("    \"{k}\": {v}"))
            .collect();
        format!("{{\n{}\n}}\n", body.join(",\n"))
    } else {
        fields
            .iter()
            .map(|(_, h, v)| format!("{h}: {v}\n"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_human_forms() {
        let m = Figures {
            required: 1,
            fully_allocated: 2,
            bitmaps: Some(0),
            compressed: None,
            metadata: 1,
            data: 0,
        };
        assert_eq!(
            render(&m, true),
            "{\n    \"bitmaps\": 0,\n    \"required\": 1,\n    \"fully-allocated\": 2\n}\n"
        );
        assert_eq!(
            render(&m, false),
            "required size: 1\nfully allocated size: 2\nbitmaps size: 0\n"
        );
    }
}
