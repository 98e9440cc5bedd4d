//! `cowimg compare`: qemu-img compare's messages and exit codes (0 identical, 1 different,
//! 2 error). Ranges that read as zero in both images are not read at all.

use cowimg_formats::{is_zero, Format};

use crate::blockstatus::Walker;
use crate::chain::{Chain, OpenOptions};
use crate::commands::pretty_json;
use crate::diff::{diff, Diff};
use crate::error::{Error, Result};

pub struct Args {
    pub a: String,
    pub b: String,
    pub format_a: Option<Format>,
    pub format_b: Option<Format>,
    pub strict: bool,
    pub quiet: bool,
    pub force_share: bool,
    /// Copy what each image's backing chain provides into it as it is read (`--copy-on-read`);
    /// otherwise both images are only read, flagged copy-on-read or not.
    pub copy_on_read: bool,
    /// `--diff`: list every differing range instead of the first offset.
    pub diff: Option<DiffArgs>,
}

/// Options of `--diff`.
pub struct DiffArgs {
    /// `--max`: stop after this many ranges.
    pub max: Option<usize>,
    pub json: bool,
}

const IO: u64 = 2 << 20;

/// Outcome of a comparison.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Identical { size_mismatch: bool },
    Mismatch { offset: u64, size_mismatch: bool },
    StrictSize,
    StrictStatus(u64),
}

pub fn run(a: &Args) -> Result<i32> {
    let open = |file: &str, format| {
        let mut opts = OpenOptions::read(format, a.force_share);
        opts.copy_on_read = a.copy_on_read;
        Chain::open(file, opts)
    };
    let c1 = open(&a.a, a.format_a)?;
    let c2 = open(&a.b, a.format_b)?;
    if let Some(d) = &a.diff {
        let found = diff(&c1, &c2, d.max)?;
        c1.finish()?;
        c2.finish()?;
        if !a.quiet {
            print!("{}", show_diff(&found, d));
        }
        return Ok(if found.identical() { 0 } else { 1 });
    }
    let outcome = compare(&c1, &c2, a.strict)?;
    c1.finish()?;
    c2.finish()?;
    let say = |s: String| {
        if !a.quiet {
            println!("{s}");
        }
    };
    Ok(match outcome {
        Outcome::StrictSize => {
            say("Strict mode: Image size mismatch!".into());
            1
        }
        Outcome::StrictStatus(off) => {
            say(format!("Strict mode: Offset {off} block status mismatch!"));
            1
        }
        Outcome::Mismatch {
            offset,
            size_mismatch,
        } => {
            if size_mismatch {
                say("Warning: Image size mismatch!".into());
            }
            say(format!("Content mismatch at offset {offset}!"));
            1
        }
        Outcome::Identical { size_mismatch } => {
            if size_mismatch {
                say("Warning: Image size mismatch!".into());
            }
            say("Images are identical.".into());
            0
        }
    })
}

/// qemu-img compare's loop (img_compare), answer by answer: both chains are asked for their
/// block status at the same offset, and the shorter answer decides how far to go. In strict
/// mode the two answers' flags must be equal, exactly as qemu compares them (so an answer that
/// reaches the end of an image, and carries `EOF`, differs from one that does not). Ranges
/// that read as zero in both are not read; where only one side is allocated, its bytes must
/// be zero.
pub fn compare(c1: &Chain, c2: &Chain, strict: bool) -> Result<Outcome> {
    use crate::blockstatus::flags::{ALLOCATED, ZERO};
    let (s1, s2) = (c1.size(), c2.size());
    if strict && s1 != s2 {
        return Ok(Outcome::StrictSize);
    }
    // Only strict mode prints where two answers differ; otherwise the first differing sector
    // is the same however the answers are cut.
    let walker = |c| {
        if strict {
            Walker::new(c)
        } else {
            Walker::coalescing(c)
        }
    };
    let (w1, w2) = (walker(c1), walker(c2));
    let min = s1.min(s2);
    let mut buf1 = vec![0u8; IO as usize];
    let mut buf2 = vec![0u8; IO as usize];
    let mut offset = 0;
    while offset < min {
        let st1 = w1.status_above(offset, s1 - offset)?;
        let st2 = w2.status_above(offset, s2 - offset)?;
        let mut chunk = st1.len.min(st2.len);
        if chunk == 0 {
            return Err(Error::Msg(format!(
                "no allocation status at offset {offset}"
            )));
        }
        if strict && st1.flags != st2.flags {
            return Ok(Outcome::StrictStatus(offset));
        }
        let (a1, a2) = (st1.has(ALLOCATED), st2.has(ALLOCATED));
        if st1.has(ZERO) && st2.has(ZERO) {
            // Both read as zero: nothing to read.
        } else if a1 == a2 {
            if a1 {
                chunk = chunk.min(IO);
                let n = chunk as usize;
                c1.read(offset, &mut buf1[..n])?;
                c2.read(offset, &mut buf2[..n])?;
                if let Some(d) = first_diff_sector(&buf1[..n], &buf2[..n]) {
                    return Ok(Outcome::Mismatch {
                        offset: offset + d,
                        size_mismatch: false,
                    });
                }
            }
        } else {
            chunk = chunk.min(IO);
            let n = chunk as usize;
            let (c, buf) = if a1 { (c1, &mut buf1) } else { (c2, &mut buf2) };
            c.read(offset, &mut buf[..n])?;
            if let Some(d) = first_nonzero_sector(&buf[..n]) {
                return Ok(Outcome::Mismatch {
                    offset: offset + d,
                    size_mismatch: false,
                });
            }
        }
        offset += chunk;
    }
    if s1 != s2 {
        // The longer image must read zeros past the shorter one's end.
        let (longer, walker) = if s1 > s2 { (c1, &w1) } else { (c2, &w2) };
        let max = s1.max(s2);
        let mut offset = min;
        while offset < max {
            let st = walker.status_above(offset, max - offset)?;
            let mut chunk = st.len;
            if chunk == 0 {
                return Err(Error::Msg(format!(
                    "no allocation status at offset {offset}"
                )));
            }
            if st.has(ALLOCATED) && !st.has(ZERO) {
                chunk = chunk.min(IO);
                let n = chunk as usize;
                longer.read(offset, &mut buf1[..n])?;
                if let Some(d) = first_nonzero_sector(&buf1[..n]) {
                    return Ok(Outcome::Mismatch {
                        offset: offset + d,
                        size_mismatch: true,
                    });
                }
            }
            offset += chunk;
        }
        return Ok(Outcome::Identical {
            size_mismatch: true,
        });
    }
    Ok(Outcome::Identical {
        size_mismatch: false,
    })
}

/// Offset of the first 512-byte sector that differs (qemu reports sector offsets, counted
/// from the start of the chunk it read).
fn first_diff_sector(a: &[u8], b: &[u8]) -> Option<u64> {
    a.chunks(512)
        .zip(b.chunks(512))
        .position(|(x, y)| x != y)
        .map(|i| i as u64 * 512)
}

fn first_nonzero_sector(a: &[u8]) -> Option<u64> {
    a.chunks(512)
        .position(|x| !is_zero(x))
        .map(|i| i as u64 * 512)
}

/// `--diff` output: a table of the ranges and a summary line, or one JSON object.
fn show_diff(d: &Diff, args: &DiffArgs) -> String {
    if args.json {
        let ranges: Vec<_> = d
            .ranges
            .iter()
            .map(|r| {
                serde_json::json!({
                    "offset": r.offset,
                    "length": r.length,
                    "a": r.a.name(),
                    "b": r.b.name(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "identical": d.identical(),
            "size-a": d.size_a,
            "size-b": d.size_b,
            "ranges": ranges,
            "truncated": d.truncated,
        });
        return pretty_json(&v) + "\n";
    }
    let mut out = String::new();
    if d.size_a != d.size_b {
        out += "Warning: Image size mismatch!\n";
    }
    if d.identical() {
        return out + "Images are identical.\n";
    }
    out += &format!("{:<16}{:<16}{:<10}{}\n", "Offset", "Length", "A", "B");
    for r in &d.ranges {
        out += &format!(
            "{:<16}{:<16}{:<10}{}\n",
            r.offset,
            r.length,
            r.a.name(),
            r.b.name()
        );
    }
    let bytes: u64 = d.ranges.iter().map(|r| r.length).sum();
    let n = d.ranges.len();
    let s = if n == 1 { "" } else { "s" };
    out += &if d.truncated {
        format!("Images differ: the first {n} range{s} ({bytes} bytes); more follow (--max {n}).\n")
    } else {
        format!("Images differ: {n} range{s}, {bytes} bytes.\n")
    };
    out
}
