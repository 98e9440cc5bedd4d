//! `cowimg measure`: the size a new image would need (qemu-img measure's figures).

use cowimg_formats::Format;

use crate::error::{Error, Result};

pub struct Args {
    /// The source image (None: measure an empty image of `size`).
    pub file: Option<String>,
    pub format: Option<Format>,
    pub out_format: Format,
    pub options: Vec<String>,
    pub size: Option<u64>,
    pub compress: bool,
    pub json: bool,
    pub force_share: bool,
}

pub fn run(_a: &Args) -> Result<i32> {
    Err(Error::Msg("measure is not implemented yet".into()))
}
