//! `cowimg compare`: qemu-img compare's messages and exit codes (0 identical, 1 different,
//! 2 error). Ranges that read as zero in both images are not read at all.

use cowimg_formats::{is_zero, Format};

use crate::chain::{Chain, OpenOptions};
use crate::commands::map::{entries, Entry};
use crate::error::Result;

pub struct Args {
    pub a: String,
    pub b: String,
    pub format_a: Option<Format>,
    pub format_b: Option<Format>,
    pub strict: bool,
    pub quiet: bool,
    pub force_share: bool,
}

const WINDOW: u64 = 1 << 30;
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
    let c1 = Chain::open(&a.a, OpenOptions::read(a.format_a, a.force_share))?;
    let c2 = Chain::open(&a.b, OpenOptions::read(a.format_b, a.force_share))?;
    let outcome = compare(&c1, &c2, a.strict)?;
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
        Outcome::Mismatch { offset, size_mismatch } => {
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

fn same_status(x: &Entry, y: &Entry) -> bool {
    (x.present, x.zero, x.data, x.offset.is_some()) == (y.present, y.zero, y.data, y.offset.is_some())
}

pub fn compare(c1: &Chain, c2: &Chain, strict: bool) -> Result<Outcome> {
    let (s1, s2) = (c1.size(), c2.size());
    if strict && s1 != s2 {
        return Ok(Outcome::StrictSize);
    }
    let min = s1.min(s2);
    let mut buf1 = vec![0u8; IO as usize];
    let mut buf2 = vec![0u8; IO as usize];
    let mut win = 0;
    while win < min {
        let wend = min.min(win + WINDOW);
        let e1 = entries(c1, win, wend)?;
        let e2 = entries(c2, win, wend)?;
        let (mut i, mut j) = (0, 0);
        let mut off = win;
        while off < wend {
            while e1[i].start + e1[i].length <= off {
                i += 1;
            }
            while e2[j].start + e2[j].length <= off {
                j += 1;
            }
            let (x, y) = (&e1[i], &e2[j]);
            let end = (x.start + x.length).min(y.start + y.length);
            if strict && !same_status(x, y) {
                return Ok(Outcome::StrictStatus(off));
            }
            if !(x.zero && y.zero) {
                let mut pos = off;
                while pos < end {
                    let n = (end - pos).min(IO) as usize;
                    let diff = if x.present == y.present {
                        c1.read(pos, &mut buf1[..n])?;
                        c2.read(pos, &mut buf2[..n])?;
                        first_diff_sector(&buf1[..n], &buf2[..n])
                    } else {
                        let (c, buf) = if x.present { (c1, &mut buf1) } else { (c2, &mut buf2) };
                        c.read(pos, &mut buf[..n])?;
                        first_nonzero_sector(&buf[..n])
                    };
                    if let Some(d) = diff {
                        return Ok(Outcome::Mismatch { offset: pos + d, size_mismatch: false });
                    }
                    pos += n as u64;
                }
            }
            off = end;
        }
        win = wend;
    }
    if s1 != s2 {
        let longer = if s1 > s2 { c1 } else { c2 };
        let max = s1.max(s2);
        let mut win = min;
        while win < max {
            let wend = max.min(win + WINDOW);
            for e in entries(longer, win, wend)?.iter().filter(|e| e.present && !e.zero) {
                let mut pos = e.start;
                while pos < e.start + e.length {
                    let n = (e.start + e.length - pos).min(IO) as usize;
                    longer.read(pos, &mut buf1[..n])?;
                    if let Some(d) = first_nonzero_sector(&buf1[..n]) {
                        return Ok(Outcome::Mismatch { offset: pos + d, size_mismatch: true });
                    }
                    pos += n as u64;
                }
            }
            win = wend;
        }
        return Ok(Outcome::Identical { size_mismatch: true });
    }
    Ok(Outcome::Identical { size_mismatch: false })
}

/// Offset of the first 512-byte sector that differs (qemu reports sector offsets).
fn first_diff_sector(a: &[u8], b: &[u8]) -> Option<u64> {
    a.chunks(512).zip(b.chunks(512)).position(|(x, y)| x != y).map(|i| i as u64 * 512)
}

fn first_nonzero_sector(a: &[u8]) -> Option<u64> {
    a.chunks(512).position(|x| !is_zero(x)).map(|i| i as u64 * 512)
}
