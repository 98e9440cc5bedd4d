//! Opening an image whose format is known: the one place that matches a [`Format`] to its
//! driver, for the chain, convert's output and tests that put their own [`Storage`] under an
//! image.

use std::sync::Arc;

use crate::qcow2::{OpenOptions, Qcow2};
use crate::qed::Qed;
use crate::raw::Raw;
use crate::{Format, Image, Result, Storage};

/// Opens the image `storage` holds as `format`. `options.writable` applies to every format;
/// `data_file` and `repair` only to qcow2 (QED and raw images have neither).
pub fn open(
    storage: Arc<dyn Storage>,
    format: Format,
    options: OpenOptions<'_>,
) -> Result<Arc<dyn Image>> {
    Ok(match format {
        Format::Qcow2 => Arc::new(Qcow2::open(storage, options)?),
        Format::Qed => Arc::new(Qed::open(storage, options.writable)?),
        Format::Raw => Arc::new(Raw::open(storage, options.writable)?),
    })
}
