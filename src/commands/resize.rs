//! `cowimg resize`: change an image's virtual size, as `qemu-img resize` does (same size
//! forms, `--shrink`, `--preallocation`, messages and exit codes).

use cowimg_formats::{Format, Prealloc};

use cowimg::chain::{Chain, OpenOptions};
use cowimg::error::{Error, Result};
use cowimg::size::size_arg;

/// The arguments of `cowimg resize` (`cowimg resize --help` says what each flag does).
pub struct Args {
    /// The image.
    pub file: String,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// `[+|-]SIZE`: absolute, or relative to the current size.
    pub size: String,
    /// `--shrink`: allow making the image smaller.
    pub shrink: bool,
    /// `--preallocation`: how new space is allocated.
    pub prealloc: Prealloc,
    /// `-q`: print nothing on success.
    pub quiet: bool,
}

/// What `[+|-]SIZE` asks for, given the current size.
pub fn new_size(current: u64, arg: &str) -> Result<u64> {
    let (sign, digits) = match arg.as_bytes().first() {
        Some(b'+') => (1, &arg[1..]),
        Some(b'-') => (-1, &arg[1..]),
        _ => (0, arg),
    };
    let n = size_arg("image size", "SIZE", digits)?;
    let size = match sign {
        1 => current.checked_add(n),
        -1 => current.checked_sub(n).filter(|&s| s > 0),
        _ => Some(n),
    };
    match size {
        Some(s) if s > 0 => {
            cowimg_formats::check_size(s)?;
            Ok(s)
        }
        _ => Err(Error::Usage("New image size must be positive".into())),
    }
}

/// Runs `cowimg resize`; returns the exit status.
pub fn run(a: &Args) -> Result<i32> {
    let chain = Chain::open(&a.file, OpenOptions::write(a.format))?;
    let top = chain.top();
    let current = top.size();
    let size = new_size(current, &a.size)?;
    if size < current && !a.shrink {
        return Err(Error::Usage(
            "Use the --shrink option to perform a shrink operation.\n\
             cowimg: warning: Shrinking an image will delete all data beyond the shrunken image's end. \
             Before performing such an operation, make sure there is no important data there."
                .into(),
        ));
    }
    if a.prealloc != Prealloc::Off && size <= current {
        return Err(Error::Usage(
            "Preallocation can only be used for growing images".into(),
        ));
    }
    cowimg::resize::resize(&chain, 0, size, a.prealloc)?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}
