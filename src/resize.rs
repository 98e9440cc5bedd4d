//! Resizing an image of a chain, as `qemu-img resize` does, and as `commit` grows a base
//! that is smaller than the image committed into it.

use cowimg_formats::Prealloc;

use crate::chain::Chain;
use crate::error::{Error, Result};

/// Resizes layer `i` of `chain` to `size`. Growing an image whose backing file is longer than
/// the image was would let the backing file's data show through the new range; as qemu does,
/// that range is then written as zeros (zero clusters where the format has them), after the
/// size changed. The caller decides whether a shrink is wanted (`--shrink`).
pub fn resize(chain: &Chain, i: usize, size: u64, prealloc: Prealloc) -> Result<()> {
    let layer = &chain.layers[i];
    let err = |e| Error::image(&layer.filename, e);
    let old = layer.size();
    layer.image.resize(size, prealloc).map_err(|e| match e {
        // What the format refuses is said in qemu-img's words, as qemu-img says it.
        cowimg_formats::Error::Invalid(m)
        | cowimg_formats::Error::Unsupported(m)
        | cowimg_formats::Error::Refused(m) => Error::Msg(m),
        e => err(e),
    })?;
    let backing_end = chain.layers.get(i + 1).map_or(0, |b| b.size());
    let new = layer.size();
    if new > old && backing_end > old {
        let end = backing_end.min(new);
        layer
            .image
            .write_zeroes(old, end - old, &chain.below(i))
            .map_err(err)?;
        layer.image.commit().map_err(err)?;
    }
    Ok(())
}
