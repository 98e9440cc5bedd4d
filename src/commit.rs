//! Committing: writing what an image of a chain holds into an image further down (qemu-img
//! commit), with the copy engine shared with `stream`, in parallel and crash-safe.
//!
//! The order keeps the chain above reading the same at every instant: the data goes into
//! the base, which lies below the committed layers, so they still mask it while it is
//! written; the base is committed (synced) batch by batch; only after the whole copy is the
//! top emptied (qcow2; QED and raw keep their data, as in qemu), entries before refcounts. A
//! run interrupted at any point leaves the chain reading as before; running it again copies
//! the same data again (what was copied reads the same) and finishes.

use cowimg_formats::Prealloc;

use crate::chain::{open_image, Chain};
use crate::error::{Error, Result};
use crate::lock::Access;
use crate::stream::{Plan, Settings};

/// Reopens layer `base` of the chain for writing (and the layers below it again, read-only).
/// The read-only descriptors go first: their own locks would look like another process's.
pub fn open_base_for_writing(chain: &mut Chain, base: usize) -> Result<()> {
    let name = chain.layers[base].filename.clone();
    let format = chain.layers[base].format;
    chain.layers.truncate(base);
    let layer = open_image(&name, Some(format), Access::Write)?;
    chain.layers.push(layer);
    chain.open_backing(Access::Read)
}

/// Grows `base` to the top's size when it is smaller, as qemu does before committing; a
/// larger base keeps its size.
pub fn grow_base(chain: &Chain, base: usize) -> Result<bool> {
    let size = chain.top().size();
    if chain.layers[base].size() >= size {
        return Ok(false);
    }
    crate::resize::resize(chain, base, size, Prealloc::Off)?;
    Ok(true)
}

/// Copies what the plan asks from the chain's top (read through the chain) into layer
/// `base`; every batch is committed into the base as it completes.
pub fn copy(chain: &Chain, base: usize, plan: &Plan, s: &Settings) -> Result<()> {
    let target = &chain.layers[base];
    let copier = crate::copy::Copier {
        source: chain,
        source_layer: 0,
        target: &*target.image,
        target_name: &target.filename,
        below: &chain.below(base),
        // The base holds data of its own under the committed zeros: they must be recorded.
        zero_data: crate::copy::ZeroData::Mark,
        limiter: s.limiter,
        cancel: s.cancel,
        counters: s.counters,
        jobs: s.jobs,
        compare: None,
        compress: false,
        shift: 0,
        sparse: Some(0),
        fill: false,
        job: s.job,
    };
    copier.run(&plan.extents)
}

/// Empties the chain's top after a complete [`copy`] into its backing file; returns whether
/// the format could be emptied (qcow2 can; QED and raw cannot, and qemu leaves them too).
pub fn empty_top(chain: &Chain) -> Result<bool> {
    let top = chain.top();
    match top.image.make_empty() {
        Ok(()) => Ok(true),
        Err(cowimg_formats::Error::Unsupported(_)) => Ok(false),
        Err(e) => Err(Error::image(&top.filename, e)),
    }
}
