//! `check` for qcow2 (to come with the check work).

use super::Qcow2;
use crate::{CheckMode, CheckReport, Error, Result};

pub fn check(_img: &Qcow2, _mode: CheckMode) -> Result<CheckReport> {
    Err(Error::Unsupported("checking qcow2 images (not yet implemented)".into()))
}
