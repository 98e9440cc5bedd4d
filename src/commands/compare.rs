//! `cowimg compare`: qemu-img compare's messages and exit codes (0 identical, 1 different,
//! 2 error). The comparison is [`cowimg::compare`], the `--diff` ranges [`cowimg::diff`].

use cowimg_formats::Format;

use super::pretty_json;
use cowimg::chain::{Chain, OpenOptions};
use cowimg::compare::{compare, Outcome};
use cowimg::diff::{diff, Diff};
use cowimg::error::Result;

/// The arguments of `cowimg compare` (`cowimg compare --help` says what each flag does).
pub struct Args {
    /// The first image.
    pub a: String,
    /// The second image.
    pub b: String,
    /// `-f`: the first image's format.
    pub format_a: Option<Format>,
    /// `-F`: the second image's format.
    pub format_b: Option<Format>,
    /// `-s`: sizes and allocation must match too.
    pub strict: bool,
    /// `-q`: print nothing on success.
    pub quiet: bool,
    /// `-U`: read an image another process may be writing.
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
    /// JSON output (`--output json`).
    pub json: bool,
}

/// Runs `cowimg compare`; returns the exit status.
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
