//! `cowimg amend`: change an existing image's options in place: qemu-img's `-o
//! compat=0.10|1.1`, `refcount_bits=N` and `lazy_refcounts=on|off` (in qemu's order: upgrade,
//! refcount width, lazy refcounts, downgrade last), and cowimg's copy-on-read flag. The command takes its changes as options and refuses to run without
//! one, as qemu-img amend does.

use cowimg_formats::Format;

use cowimg::chain::open_image;
use cowimg::error::{Error, Result};
use cowimg::lock::Access;

/// The `-o` changes asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `-o lazy_refcounts=on|off`.
    pub lazy_refcounts: Option<bool>,
    /// `compat=1.1` (true) or `compat=0.10` (false).
    pub compat_v3: Option<bool>,
    /// `refcount_bits=N`.
    pub refcount_bits: Option<u32>,
}

impl Options {
    fn is_empty(&self) -> bool {
        *self == Options::default()
    }
}

/// The arguments of `cowimg amend` (`cowimg amend --help` says what each flag does).
pub struct Args {
    /// The image.
    pub file: String,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// `--copy-on-read=on|off`: set or clear cowimg's copy-on-read flag.
    pub copy_on_read: Option<bool>,
    /// `-o` options, as given.
    pub options: Options,
}

/// Parses `-o` lists (`key=value,...`, several `-o` allowed) in qemu-img's words.
pub fn parse_options(lists: &[String]) -> Result<Options> {
    let mut o = Options::default();
    for item in lists
        .iter()
        .flat_map(|l| l.split(','))
        .filter(|i| !i.is_empty())
    {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        match key {
            "lazy_refcounts" => {
                o.lazy_refcounts = Some(match value {
                    "on" => true,
                    "off" => false,
                    _ => {
                        return Err(Error::Usage(
                            "Parameter 'lazy_refcounts' expects 'on' or 'off'".into(),
                        ))
                    }
                })
            }
            "compat" => {
                o.compat_v3 = Some(match value {
                    "1.1" | "v3" => true,
                    "0.10" | "v2" => false,
                    _ => return Err(Error::Usage(format!("Unknown compatibility level {value}"))),
                })
            }
            "refcount_bits" => {
                let bits: u64 = value.parse().map_err(|_| {
                    Error::Usage("Parameter 'refcount_bits' expects a number".into())
                })?;
                if bits == 0 || bits > 64 || !bits.is_power_of_two() {
                    return Err(Error::Usage(
                        "Refcount width must be a power of two and may not exceed 64 bits".into(),
                    ));
                }
                o.refcount_bits = Some(bits as u32);
            }
            "size" | "backing_file" | "backing_fmt" | "encryption" | "cluster_size"
            | "preallocation" | "data_file" | "data_file_raw" | "extended_l2"
            | "compression_type" => {
                return Err(Error::Usage(format!(
                    "cowimg amend does not change '{key}' yet; use qemu-img amend -o {item}"
                )))
            }
            _ => return Err(Error::Usage(format!("Invalid parameter '{key}'"))),
        }
    }
    Ok(o)
}

/// Runs `cowimg amend`; returns the exit status.
pub fn run(a: &Args) -> Result<i32> {
    if a.copy_on_read.is_none() && a.options.is_empty() {
        return Err(Error::Usage(
            "Nothing to change: give -o compat=0.10|1.1, refcount_bits=N, lazy_refcounts=on|off or --copy-on-read=on|off\nTry 'cowimg amend --help' for more info"
                .into(),
        ));
    }
    let layer = open_image(&a.file, a.format, Access::Write)?;
    if !a.options.is_empty() && layer.format != Format::Qcow2 {
        return Err(Error::Usage(format!(
            "Format driver '{}' does not support option amendment",
            layer.format
        )));
    }
    let version = match layer.image.details() {
        cowimg_formats::Details::Qcow2(d) => d.version,
        _ => 3,
    };
    let o = &a.options;
    let target = o.compat_v3.map_or(version, |v3| if v3 { 3 } else { 2 });
    if o.lazy_refcounts == Some(true) && target < 3 {
        return Err(Error::Msg(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
        ));
    }
    // qemu-img's refusals are worded without the file name, as qemu-img words them.
    let refused = |e| match e {
        cowimg_formats::Error::Refused(m) => Error::Msg(m),
        e => Error::image(&a.file, e),
    };
    // qemu's order: the upgrade first (a v3 image may then take the other options), the
    // downgrade last (after the options v2 cannot hold are gone). Each step is crash-safe in
    // the formats crate: the image reads as before or as after, whatever the moment of an
    // interruption.
    if target > version {
        layer.image.set_qcow2_version(target).map_err(refused)?;
    }
    if let Some(bits) = o.refcount_bits {
        if target < 3 && bits != 16 {
            return Err(Error::Msg(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into(),
            ));
        }
        layer.image.set_refcount_bits(bits).map_err(refused)?;
    }
    if let Some(on) = o.lazy_refcounts {
        layer.image.set_lazy_refcounts(on).map_err(refused)?;
    }
    if let Some(on) = a.copy_on_read {
        if layer.format == Format::Raw {
            return Err(Error::Usage(format!(
                "{}: raw images cannot carry the copy-on-read flag (use qcow2 or qed)",
                a.file
            )));
        }
        layer
            .image
            .set_copy_on_read(on)
            .map_err(|e| Error::image(&a.file, e))?;
    }
    if target < version {
        layer.image.set_qcow2_version(target).map_err(refused)?;
    }
    Ok(0)
}
