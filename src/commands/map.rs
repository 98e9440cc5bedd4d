//! `cowimg map`: where each guest range of a chain comes from, as qemu-img map prints it. The
//! block status itself is [`cowimg::blockstatus`]; this module parses nothing and prints.

use cowimg_formats::Format;

use cowimg::blockstatus::{entries, Entry};
use cowimg::chain::{Chain, OpenOptions};
use cowimg::error::{Error, Result};

// `commands/measure.rs` still names these through `commands::map`; they live in the library.
pub use cowimg::blockstatus::{flags, Walker};

/// The arguments of `cowimg map` (`cowimg map --help` says what each flag does).
pub struct Args {
    /// The image.
    pub file: String,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// JSON output (`--output json`).
    pub json: bool,
    /// `-U`: read an image another process may be writing.
    pub force_share: bool,
    /// `--start-offset`.
    pub start: u64,
    /// `--max-length`.
    pub max_length: Option<u64>,
}

/// Runs `cowimg map`; returns the exit status.
pub fn run(a: &Args) -> Result<i32> {
    let chain = Chain::open(&a.file, OpenOptions::read(a.format, a.force_share))?;
    let size = chain.size();
    let end = a
        .max_length
        .map_or(size, |l| a.start.saturating_add(l).min(size));
    let mut list = entries(&chain, a.start.min(size), end)?;
    if list.is_empty() {
        // Nothing to map (an empty image, or a window past the end): qemu-img still prints
        // its initial, empty entry at the start offset.
        list.push(Entry {
            start: a.start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            layer: 0,
            file: None,
        });
    }
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
        out += &format!(
            "{:<16}{:<16}{:<16}{}\n",
            "Offset", "Length", "Mapped to", "File"
        );
        for e in &list {
            // Data without a host offset (compressed clusters) cannot be shown as a mapping:
            // qemu-img stops there with this error, after the lines before it.
            let (true, Some(host)) = (e.data, e.offset) else {
                if e.data {
                    print!("{out}");
                    return Err(Error::Msg(
                        "File contains external, encrypted or compressed clusters.".into(),
                    ));
                }
                continue;
            };
            if e.zero {
                continue;
            }
            out += &format!(
                "{:<16}{:<16}{:<16}{}\n",
                hex(e.start),
                hex(e.length),
                hex(host),
                e.file.as_deref().unwrap_or_default()
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
