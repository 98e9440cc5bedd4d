//! `check` for QED (to come with the check work).

use super::Qed;
use crate::{CheckMode, CheckReport, Error, Result};

pub fn check(_img: &Qed, _mode: CheckMode) -> Result<CheckReport> {
    Err(Error::Unsupported("checking QED images (not yet implemented)".into()))
}
