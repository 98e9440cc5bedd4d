//! `cowimg amend`: change an existing image's options in place. For now that is cowimg's
//! copy-on-read flag; qemu-img's `-o` options are to come beside it, so the command takes
//! its changes as options and refuses to run without one, as qemu-img amend does.

use cowimg_formats::Format;

use crate::chain::open_image;
use crate::error::{Error, Result};
use crate::lock::Access;

pub struct Args {
    pub file: String,
    pub format: Option<Format>,
    /// `--copy-on-read=on|off`: set or clear cowimg's copy-on-read flag.
    pub copy_on_read: Option<bool>,
}

pub fn run(a: &Args) -> Result<i32> {
    let Some(on) = a.copy_on_read else {
        return Err(Error::Usage(
            "Nothing to change: give --copy-on-read=on|off\nTry 'cowimg amend --help' for more info"
                .into(),
        ));
    };
    let layer = open_image(&a.file, a.format, Access::Write)?;
    if layer.format == Format::Raw {
        return Err(Error::Usage(format!(
            "{}: raw images cannot carry the copy-on-read flag (use qcow2 or qed)",
            a.file
        )));
    }
    // The header change is crash-safe in the formats crate: the image reads as before or
    // as after, whatever the moment of an interruption.
    layer
        .image
        .set_copy_on_read(on)
        .map_err(|e| Error::image(&a.file, e))?;
    Ok(0)
}
