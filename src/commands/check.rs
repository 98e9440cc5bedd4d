//! `cowimg check`: qemu-img check's output and exit codes (0 clean, 1 check could not
//! complete, 2 corruptions, 3 leaks only, 63 no check for this format).
//!
//! As qemu-img: per-problem lines go to stderr as they are found; the summary (human or JSON)
//! goes to stdout, and `-q` silences stdout only. After a repair that changed something, the
//! image is checked a second time ("Double checking the fixed image now...") and that pass's
//! numbers are reported, with the repaired counts of the first.

use serde_json::{Map, Value};

use cowimg_formats::{CheckMode, CheckReport, Format, LostData};

use cowimg::chain::{open_image_for, Chain};
use cowimg::error::{Error, Result};
use cowimg::lock::Access;

/// The arguments of `cowimg check` (`cowimg check --help` says what each flag does).
pub struct Args {
    /// The image.
    pub file: String,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// `-r leaks|all`: what to repair.
    pub repair: CheckMode,
    /// JSON output (`--output json`).
    pub json: bool,
    /// `-q`: print nothing on success.
    pub quiet: bool,
    /// `-U`: read an image another process may be writing.
    pub force_share: bool,
}

/// Runs `cowimg check`; returns the exit status.
pub fn run(a: &Args) -> Result<i32> {
    // Only the image itself is checked, but its backing chain is opened as qemu-img check
    // opens it: an image whose backing file cannot be opened is refused, never called clean.
    let access = if a.repair.repairs() {
        Access::Write
    } else if a.force_share {
        Access::ReadShared
    } else {
        Access::Read
    };
    let layer = open_image_for(&a.file, a.format, access, true)?;
    let mut chain = Chain::from_layers(vec![layer]);
    chain.open_backing(if a.force_share {
        Access::ReadShared
    } else {
        Access::Read
    })?;
    let layer = chain.top();
    if layer.format == Format::Raw {
        eprintln!("cowimg: This image format does not support checks");
        return Ok(63);
    }
    let image = &layer.image;
    let mut log = |line: &str| eprintln!("{line}");
    let check_failed = |e: cowimg_formats::Error| Error::Msg(format!("Check failed: {e}"));

    let first = image
        .check_logged(a.repair, &mut log)
        .map_err(check_failed)?;
    if let Some(why) = &first.failed {
        if let Some(cause) = &first.failed_because {
            eprintln!("cowimg: {cause}");
        }
        return Err(Error::Msg(format!("Check failed: {why}")));
    }
    let report = if first.repaired() {
        if !a.json && !a.quiet {
            print!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                first.leaks_fixed, first.corruptions_fixed
            );
        }
        let mut second = image
            .check_logged(CheckMode::ReadOnly, &mut log)
            .map_err(check_failed)?;
        if let Some(why) = &second.failed {
            return Err(Error::Msg(format!("Check failed: {why}")));
        }
        second.leaks_fixed = first.leaks_fixed;
        second.corruptions_fixed = first.corruptions_fixed;
        second.lost = first.lost;
        second
    } else {
        first
    };

    if !a.quiet {
        if a.json {
            println!(
                "{}",
                super::pretty_json(&to_json(&a.file, layer.format, &report))
            );
        } else {
            print!("{}", to_human(&report));
        }
    }
    for l in &report.lost {
        eprintln!("{}", lost_line(l));
    }
    if report.check_errors > 0 {
        eprintln!("cowimg: Check failed");
        return Ok(1);
    }
    Ok(if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}

/// qemu-img's human summary (dump_human_image_check).
pub fn to_human(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters),
        ));
    }
    if r.image_end_offset != 0 {
        out.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    out
}

/// qemu-img's JSON keys: `filename`, `format`, `check-errors` always, the others only when
/// non-zero. cowimg adds `lost-data` when a repair dropped broken mappings.
pub fn to_json(filename: &str, format: Format, r: &CheckReport) -> Value {
    let mut m = Map::new();
    let mut opt = |k: &str, v: u64| {
        if v != 0 {
            m.insert(k.to_string(), Value::from(v));
        }
    };
    opt("image-end-offset", r.image_end_offset);
    opt("total-clusters", r.total_clusters);
    opt("corruptions", r.corruptions);
    opt("leaks", r.leaks);
    opt("corruptions-fixed", r.corruptions_fixed);
    opt("leaks-fixed", r.leaks_fixed);
    opt("allocated-clusters", r.allocated_clusters);
    opt("fragmented-clusters", r.fragmented_clusters);
    opt("compressed-clusters", r.compressed_clusters);
    m.insert("check-errors".into(), Value::from(r.check_errors));
    m.insert("filename".into(), Value::from(filename));
    m.insert("format".into(), Value::from(format.name()));
    if !r.lost.is_empty() {
        let lost = r
            .lost
            .iter()
            .map(|l| {
                serde_json::json!({
                    "layer": l.layer,
                    "offset": l.offset,
                    "length": l.length,
                    "reason": l.reason,
                })
            })
            .collect();
        m.insert("lost-data".into(), Value::Array(lost));
    }
    Value::Object(m)
}

fn lost_line(l: &LostData) -> String {
    format!(
        "Data lost ({}): guest bytes {:#x}..{:#x} ({} bytes): {}",
        l.layer,
        l.offset,
        l.offset + l.length,
        l.length,
        l.reason
    )
}
