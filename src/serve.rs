//! The image behind `cowimg serve`: an NBD [`Backend`] over a local backing chain, with
//! copy-on-read when the image (or the command line) asks for it.
//!
//! Every connection shares the one [`Chain`]: client writes go to the top image at once
//! (visible to all connections), FLUSH and FUA commit the top's staged metadata and sync it,
//! and copy-on-read fills use [`cowimg_formats::Image::fill_unallocated`], so a fill racing a
//! client write of the same clusters never replaces the client's data with older backing
//! data.
//!
//! `serve --stream` ([`ImageBackend::stream`]) copies the rest of the backing chain into the
//! top while clients are served, with the same conditional fills, then switches the top's
//! backing file and the chain requests read through, in one step that waits for requests in
//! flight: the dropped layers are closed at once.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Instant;

use cowimg_formats::{BackingRef, Details};
use cowimg_nbd::codec::{state, Extent};
use cowimg_nbd::server::{Backend, BackendError, BackendResult, ALLOCATION_DEPTH, BASE_ALLOCATION};

use crate::blockstatus as map;
use crate::chain::Chain;
use crate::copy::Counters;
use crate::error::{Error, Result};
use crate::job::{ControlOptions, JobHandle, JobSpec, Session};
use crate::stream::{self, Settings};

/// An image chain served over NBD.
pub struct ImageBackend {
    /// The chain requests read through. Each request holds it (shared) while it runs, so
    /// that the stream's switch, which takes it exclusively, happens between requests.
    chain: RwLock<Chain>,
    writable: bool,
}

/// What a completed [`ImageBackend::stream`] did.
pub struct Streamed {
    /// Bytes of data copied into the image.
    pub copied: u64,
    /// Seconds the copy and the switch took.
    pub elapsed: f64,
    /// The image's backing file now (none: it is standalone).
    pub backing: Option<BackingRef>,
    /// There was nothing to stream: the image's backing file was already `base`.
    pub nothing_to_do: bool,
}

impl ImageBackend {
    /// Serves `chain`; clients may write when `writable` (the top must then be open for
    /// writing).
    pub fn new(chain: Chain, writable: bool) -> ImageBackend {
        ImageBackend {
            chain: RwLock::new(chain),
            writable,
        }
    }

    /// The chain, shared with other requests (a poisoned lock only means a request
    /// panicked: the chain itself is consistent, every change to it being one assignment).
    fn chain(&self) -> RwLockReadGuard<'_, Chain> {
        self.chain.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The backing files the served chain reads through (their names, top's first).
    pub fn backing_layers(&self) -> Vec<String> {
        let chain = self.chain();
        chain.layers[1..]
            .iter()
            .map(|l| l.filename.clone())
            .collect()
    }

    /// Commits what the top image has staged (at shutdown); nothing staged is nothing to do.
    pub fn finish(&self) -> Result<()> {
        let chain = self.chain();
        commit(&chain).map_err(|e| Error::Msg(e.message))?;
        chain.finish()
    }

    /// Streams into the top image what the layers above `base` (a layer index; the chain's
    /// length for all) provide, at most `speed` bytes per second (0: unlimited), while
    /// clients are served; then points the top at `base` (or nothing) and makes the served
    /// chain stop using the layers in between. The stream is a job (`control`: its id,
    /// control socket and events): `cowimg job` watches it, changes its cap, pauses,
    /// resumes or cancels it while clients are served. `cancel` (or `job cancel`) stops the
    /// copy: what is copied is committed and [`Error::Interrupted`] returned; streaming again
    /// copies only the rest. The top must be open for writing.
    pub fn stream(
        &self,
        base: usize,
        speed: u64,
        jobs: usize,
        cancel: &AtomicBool,
        control: &ControlOptions,
    ) -> Result<Streamed> {
        let started = Instant::now();
        let counters = Arc::new(Counters::default());
        let (plan, backing, device) = {
            let chain = self.chain();
            if base <= 1 || chain.layers.len() == 1 {
                return Ok(Streamed {
                    copied: 0,
                    elapsed: 0.0,
                    backing: chain.top().image.backing(),
                    nothing_to_do: true,
                });
            }
            let size = chain.size();
            // Planned once: the removed layers never change (they are open read-only), and
            // the top only gains allocations, so what the plan leaves out stays done.
            let plan = stream::plan(&chain, base, 0, size)?;
            let keep_base = base < chain.layers.len();
            let backing = keep_base.then(|| BackingRef {
                name: stream::backing_name(&chain, base),
                format: Some(chain.layers[base].format.name().to_string()),
            });
            (plan, backing, chain.top().filename.clone())
        };
        // Ranges needing nothing count as done from the start, as QEMU's progress counts them.
        counters.done.store(
            plan.range_len - plan.work(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let session = Session::start(
            JobSpec {
                id: crate::job::default_id(&device),
                kind: "stream",
                device,
                end: plan.range_len,
                speed,
            },
            counters.clone(),
            control,
        )?;
        let job = &session.handle;
        job.start();
        let result = self.copy_and_switch(base, &plan, backing.as_ref(), jobs, cancel, job);
        session.finish(result.as_ref().map(|_| ()));
        result?;
        Ok(Streamed {
            copied: counters.copied.load(std::sync::atomic::Ordering::Relaxed),
            elapsed: started.elapsed().as_secs_f64(),
            backing,
            nothing_to_do: false,
        })
    }

    /// The stream job's body: the copy under the job's cap and requests, then the switch to
    /// `backing` (the layer `base`, kept; none: the image becomes standalone).
    fn copy_and_switch(
        &self,
        base: usize,
        plan: &stream::Plan,
        backing: Option<&BackingRef>,
        jobs: usize,
        cancel: &AtomicBool,
        job: &JobHandle,
    ) -> Result<()> {
        let keep_base = backing.is_some();
        {
            let chain = self.chain();
            let settings = Settings {
                jobs,
                limiter: job.limiter(),
                cancel,
                counters: job.counters(),
                compress: false,
                job: Some(job),
            };
            stream::copy_live(&chain, plan, keep_base, &settings)?;
        }
        // The switch: no request in flight, none starting. Whatever clients wrote since the
        // copy's last commit is committed first, then the header (the pointer) changes last,
        // then requests read through the shorter chain and the dropped layers are closed.
        let mut chain = self.chain.write().unwrap_or_else(|e| e.into_inner());
        chain.commit()?;
        stream::switch(&chain, backing)?;
        let kept = if keep_base { base } else { chain.layers.len() };
        *chain = chain.rebased(kept);
        Ok(())
    }
}

fn commit(chain: &Chain) -> BackendResult<()> {
    chain.top().image.commit().map_err(|e| image_error(&e))
}

impl ImageBackend {
    /// Whether zeroing `[offset, offset + len)` only changes metadata: whole allocation
    /// units of a format with zero clusters (qcow2 v3, QED).
    fn zeroing_is_fast(chain: &Chain, offset: u64, len: u64) -> bool {
        let top = &*chain.top().image;
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
        self.chain().size()
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn preferred_block_size(&self) -> u32 {
        // The cluster (qemu-nbd says 4096): a client writing whole clusters never makes the
        // image complete a partial one from the backing file.
        let unit = self.chain().top().image.allocation_unit();
        u32::try_from(unit).unwrap_or(4096).clamp(512, 2 << 20)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<()> {
        self.chain().read(offset, buf).map_err(|e| image_error(&e))
    }

    fn write(&self, offset: u64, data: &[u8]) -> BackendResult<()> {
        let chain = self.chain();
        chain
            .top()
            .image
            .write(offset, data, &chain.below(0))
            .map_err(|e| image_error(&e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fast: bool) -> BackendResult<()> {
        let chain = self.chain();
        if fast && !Self::zeroing_is_fast(&chain, offset, len) {
            return Err(BackendError::new(
                cowimg_nbd::codec::errno::ENOTSUP,
                "zeroing this range would write data (partial clusters, or no zero clusters in the format)",
            ));
        }
        chain
            .top()
            .image
            .write_zeroes(offset, len, &chain.below(0))
            .map_err(|e| image_error(&e))
    }

    fn trim(&self, _offset: u64, _len: u64) -> BackendResult<()> {
        // Deallocating in an overlay would expose the backing file's older data again;
        // a trim may do nothing, so it does nothing.
        Ok(())
    }

    fn flush(&self) -> BackendResult<()> {
        // Commits whatever is staged: client writes, copy-on-read fills, the stream's copies.
        commit(&self.chain())
    }

    fn cache(&self, offset: u64, len: u64) -> BackendResult<()> {
        self.chain()
            .prefetch(offset, len)
            .map_err(|e| image_error(&e))
    }

    fn contexts(&self) -> &[&'static str] {
        &[BASE_ALLOCATION, ALLOCATION_DEPTH]
    }

    fn block_status(&self, context: &str, offset: u64, len: u32) -> BackendResult<Vec<Extent>> {
        let entries = map::entries(&self.chain(), offset, offset + len as u64)
            .map_err(|e| image_error(&e))?;
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
