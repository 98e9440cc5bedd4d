//! The image behind `cowimg serve`: an NBD [`Backend`] over a local backing chain, with
//! copy-on-read when the image (or the command line) asks for it.
//!
//! Every connection shares the one [`Chain`]: client writes go to the top image at once
//! (visible to all connections), FLUSH and FUA commit the top's staged metadata and sync it,
//! and copy-on-read fills use [`cowimg_formats::Image::fill_unallocated`], so a fill racing a
//! client write of the same clusters never replaces the client's data with older backing
//! data.

use cowimg_formats::Details;
use cowimg_nbd::codec::{state, Extent};
use cowimg_nbd::server::{Backend, BackendError, BackendResult, ALLOCATION_DEPTH, BASE_ALLOCATION};

use crate::chain::Chain;
use crate::commands::map;

/// An image chain served over NBD.
pub struct ImageBackend {
    chain: Chain,
    writable: bool,
}

impl ImageBackend {
    /// Serves `chain`; clients may write when `writable` (the top must then be open for
    /// writing).
    pub fn new(chain: Chain, writable: bool) -> ImageBackend {
        ImageBackend { chain, writable }
    }

    /// Commits what the top image has staged (at shutdown).
    pub fn finish(&self) -> crate::Result<()> {
        if self.writable {
            self.commit().map_err(|e| crate::Error::Msg(e.message))?;
        }
        self.chain.finish()
    }

    fn commit(&self) -> BackendResult<()> {
        self.chain.top().image.commit().map_err(|e| image_error(&e))
    }

    /// Whether zeroing `[offset, offset + len)` only changes metadata: whole allocation
    /// units of a format with zero clusters (qcow2 v3, QED).
    fn zeroing_is_fast(&self, offset: u64, len: u64) -> bool {
        let top = &*self.chain.top().image;
        let zero_clusters = match top.details() {
            Details::Qcow2(d) => d.version >= 3,
            Details::Qed(_) => true,
            Details::Raw => false,
        };
        let unit = top.allocation_unit();
        let end = offset + len;
        zero_clusters && offset % unit == 0 && (end % unit == 0 || end == top.virtual_size())
    }
}

fn image_error(e: &dyn std::fmt::Display) -> BackendError {
    BackendError::io(e.to_string())
}

impl Backend for ImageBackend {
    fn size(&self) -> u64 {
        self.chain.size()
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn preferred_block_size(&self) -> u32 {
        // The cluster (qemu-nbd says 4096): a client writing whole clusters never makes the
        // image complete a partial one from the backing file.
        let unit = self.chain.top().image.allocation_unit();
        u32::try_from(unit).unwrap_or(4096).clamp(512, 2 << 20)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<()> {
        self.chain.read(offset, buf).map_err(|e| image_error(&e))
    }

    fn write(&self, offset: u64, data: &[u8]) -> BackendResult<()> {
        let top = self.chain.top();
        top.image
            .write(offset, data, &self.chain.below(0))
            .map_err(|e| image_error(&e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fast: bool) -> BackendResult<()> {
        if fast && !self.zeroing_is_fast(offset, len) {
            return Err(BackendError::new(
                cowimg_nbd::codec::errno::ENOTSUP,
                "zeroing this range would write data (partial clusters, or no zero clusters in the format)",
            ));
        }
        let top = self.chain.top();
        top.image
            .write_zeroes(offset, len, &self.chain.below(0))
            .map_err(|e| image_error(&e))
    }

    fn trim(&self, _offset: u64, _len: u64) -> BackendResult<()> {
        // Deallocating in an overlay would expose the backing file's older data again;
        // a trim may do nothing, so it does nothing.
        Ok(())
    }

    fn flush(&self) -> BackendResult<()> {
        if self.writable || self.chain.copies_on_read() {
            self.commit()?;
        }
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> BackendResult<()> {
        self.chain
            .prefetch(offset, len)
            .map_err(|e| image_error(&e))
    }

    fn contexts(&self) -> &[&'static str] {
        &[BASE_ALLOCATION, ALLOCATION_DEPTH]
    }

    fn block_status(&self, context: &str, offset: u64, len: u32) -> BackendResult<Vec<Extent>> {
        let entries =
            map::entries(&self.chain, offset, offset + len as u64).map_err(|e| image_error(&e))?;
        Ok(entries
            .iter()
            .map(|e| {
                let flags = if context == ALLOCATION_DEPTH {
                    // 1 for the top image, 2 for its backing file..., 0 for nowhere.
                    if e.present {
                        e.depth as u32 + 1
                    } else {
                        0
                    }
                } else {
                    let mut f = 0;
                    if !e.data {
                        f |= state::HOLE;
                    }
                    if e.zero {
                        f |= state::ZERO;
                    }
                    f
                };
                // Entries lie inside the request, whose length fits in 32 bits.
                Extent {
                    len: e.length as u32,
                    flags,
                }
            })
            .collect())
    }
}
