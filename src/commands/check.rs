//! `cowimg check`: qemu-img check's output and exit codes (0 clean, 1 check could not
//! complete, 2 corruptions, 3 leaks only, 63 no check for this format).

use cowimg_formats::{CheckMode, Format};

use crate::error::{Error, Result};

pub struct Args {
    pub file: String,
    pub format: Option<Format>,
    pub repair: CheckMode,
    pub json: bool,
    pub quiet: bool,
    pub force_share: bool,
}

pub fn run(_a: &Args) -> Result<i32> {
    Err(Error::Msg("check is not implemented yet".into()))
}
