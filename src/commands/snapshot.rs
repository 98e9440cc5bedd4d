//! `cowimg snapshot -l`: list a qcow2 image's internal snapshots, as `qemu-img snapshot -l`
//! prints them (the same table `info` shows). Creating, applying and deleting snapshots
//! (`-c`, `-a`, `-d`) are not written yet; until then use `qemu-img snapshot` for them.

use cowimg_formats::Details;

use crate::chain::{Chain, OpenOptions};
use crate::error::Result;

pub struct Args {
    pub file: String,
    pub format: Option<cowimg_formats::Format>,
    pub force_share: bool,
}

/// Prints the table; an image without snapshots (or of a format without them: QED, raw)
/// prints nothing and succeeds, as qemu-img does.
pub fn run(a: &Args) -> Result<i32> {
    let mut opts = OpenOptions::read(a.format, a.force_share);
    // Only the named image is listed: its backing files need not be present.
    opts.backing = false;
    let chain = Chain::open(&a.file, opts)?;
    if let Some(top) = chain.layers.first() {
        if let Details::Qcow2(d) = top.image.details() {
            print!("{}", super::info::snapshot_table(&d.snapshots));
        }
    }
    Ok(0)
}
