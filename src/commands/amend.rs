//! `cowimg amend`: change an existing image's options in place: qemu-img's `-o
//! lazy_refcounts=on|off` (and `compat=1.1` where there is nothing to do), and cowimg's
//! copy-on-read flag. The command takes its changes as options and refuses to run without
//! one, as qemu-img amend does.

use cowimg_formats::Format;

use crate::chain::open_image;
use crate::error::{Error, Result};
use crate::lock::Access;

/// The `-o` changes asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub lazy_refcounts: Option<bool>,
    /// `compat=1.1` (true) or `compat=0.10` (false).
    pub compat_v3: Option<bool>,
}

impl Options {
    fn is_empty(&self) -> bool {
        *self == Options::default()
    }
}

pub struct Args {
    pub file: String,
    pub format: Option<Format>,
    /// `--copy-on-read=on|off`: set or clear cowimg's copy-on-read flag.
    pub copy_on_read: Option<bool>,
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
                    _ => {
                        return Err(Error::Usage(format!(
                            "Invalid compatibility level: '{value}'"
                        )))
                    }
                })
            }
            "refcount_bits" | "size" | "backing_file" | "backing_fmt" | "encryption"
            | "cluster_size" | "preallocation" | "data_file" | "data_file_raw" | "extended_l2"
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

pub fn run(a: &Args) -> Result<i32> {
    if a.copy_on_read.is_none() && a.options.is_empty() {
        return Err(Error::Usage(
            "Nothing to change: give -o lazy_refcounts=on|off or --copy-on-read=on|off\nTry 'cowimg amend --help' for more info"
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
    if let Some(v3) = a.options.compat_v3 {
        let version = match layer.image.details() {
            cowimg_formats::Details::Qcow2(d) => d.version,
            _ => 3,
        };
        if v3 != (version >= 3) {
            return Err(Error::Usage(format!(
                "cowimg amend does not change the compatibility level yet; use qemu-img amend -o compat={}",
                if v3 { "1.1" } else { "0.10" }
            )));
        }
    }
    // Each header change is crash-safe in the formats crate: the image reads as before or
    // as after, whatever the moment of an interruption.
    if let Some(on) = a.options.lazy_refcounts {
        layer.image.set_lazy_refcounts(on).map_err(|e| match e {
            // qemu-img's refusal, worded without the file name as qemu-img words it.
            cowimg_formats::Error::Refused(m) => Error::Msg(m),
            e => Error::image(&a.file, e),
        })?;
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
    Ok(0)
}
