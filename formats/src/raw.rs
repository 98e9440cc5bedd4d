//! raw: the guest bytes themselves. Every byte is data at the same offset; holes read zeros.

use std::os::unix::fs::FileTypeExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::io::{read_exact, write_all, Storage};
use crate::{
    push_run, Alloc, BackingRef, CheckMode, CheckReport, Details, Error, Format, Image, ReadBelow,
    Result, Run,
};

/// A raw image: the guest's bytes are the file's.
pub struct Raw {
    storage: Arc<dyn Storage>,
    /// The virtual size (changed only by `resize`).
    size: AtomicU64,
    writable: bool,
}

impl Raw {
    /// Opens `storage` as a raw image, for writing too when `writable`.
    pub fn open(storage: Arc<dyn Storage>, writable: bool) -> Result<Raw> {
        let len = storage
            .len()
            .map_err(|e| Error::io("reading the file size", e))?;
        // qemu counts a raw image in whole 512-byte sectors: a file of 1000 bytes is a disk of
        // 1024, whose last 24 bytes read as zeros (past the end of the file).
        let size = len.div_ceil(512) * 512;
        Ok(Raw {
            storage,
            size: AtomicU64::new(size),
            writable,
        })
    }
}

impl Image for Raw {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn cluster_size(&self) -> Option<u64> {
        None
    }

    fn backing(&self) -> Option<BackingRef> {
        None
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn map(&self, start: u64, len: u64) -> Result<Vec<Run>> {
        // Holes of the file read as zeros; report them so that copies skip them, and so that
        // `map` says what qemu-img map says of a sparse raw file.
        let end = start.saturating_add(len).min(self.virtual_size());
        let extents = self
            .storage
            .data_extents(start, end)
            .map_err(|e| Error::io("finding holes", e))?;
        let mut runs = Vec::new();
        let mut pos = start;
        for (a, b) in extents {
            push_run(
                &mut runs,
                Run {
                    start: pos,
                    len: a - pos,
                    alloc: Alloc::Zero { host: Some(pos) },
                },
            );
            push_run(
                &mut runs,
                Run {
                    start: a,
                    len: b - a,
                    alloc: Alloc::Data { host: a },
                },
            );
            pos = b;
        }
        push_run(
            &mut runs,
            Run {
                start: pos,
                len: end.saturating_sub(pos),
                alloc: Alloc::Zero { host: Some(pos) },
            },
        );
        Ok(runs)
    }

    fn read_host(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        read_exact(&*self.storage, buf, host, "data")
    }

    fn details(&self) -> Details {
        Details::Raw
    }

    fn write(&self, offset: u64, data: &[u8], _below: &dyn ReadBelow) -> Result<()> {
        if !self.writable {
            return Err(Error::Refused("the image is open read-only".into()));
        }
        write_all(&*self.storage, data, offset, "guest data")
    }

    fn write_zeroes(&self, offset: u64, len: u64, _below: &dyn ReadBelow) -> Result<()> {
        if !self.writable {
            return Err(Error::Refused("the image is open read-only".into()));
        }
        // The storage's own way: zeros written into a file, WRITE_ZEROES on an NBD export.
        self.storage
            .write_zeroes(offset, len)
            .map_err(|e| Error::io(format!("writing zeros at offset {offset:#x}"), e))
    }

    fn fill_unallocated(&self, offset: u64, data: &[u8], _below: &dyn ReadBelow) -> Result<u64> {
        // Every byte of a raw image is its own: there is nothing unallocated to fill.
        let _ = (offset, data);
        Ok(0)
    }

    fn commit(&self) -> Result<()> {
        crate::io::sync(&*self.storage)
    }

    /// The file takes the new length (qemu lets a raw image have any length; its disk is
    /// the length rounded up to whole sectors). A block device cannot grow.
    fn resize(&self, size: u64, prealloc: crate::Prealloc) -> Result<()> {
        if !self.writable {
            return Err(Error::Refused("the image is open read-only".into()));
        }
        crate::check_size(size)?;
        let io = |e| Error::io("resizing the file", e);
        let old = self.storage.len().map_err(io)?;
        let device =
            std::fs::metadata(self.storage.path()).is_ok_and(|m| m.file_type().is_block_device());
        match prealloc {
            crate::Prealloc::Metadata => {
                return Err(Error::Unsupported(
                    "Unsupported preallocation mode: metadata".into(),
                ))
            }
            _ if prealloc != crate::Prealloc::Off && size < old => {
                return Err(Error::invalid(
                    "Preallocation can only be used for growing images",
                ))
            }
            _ => {}
        }
        if device {
            if size > old {
                return Err(Error::Refused(format!(
                    "Cannot grow device files (the device holds {old} bytes)"
                )));
            }
            // A device keeps its size; what qemu shows of it is the device.
            return Ok(());
        }
        self.storage.set_len(size).map_err(io)?;
        if prealloc != crate::Prealloc::Off && size > old {
            // falloc and full both write zeros: the space is then reserved either way.
            self.write_zeroes(old, size - old, &crate::ZerosBelow)?;
        }
        crate::io::sync(&*self.storage)?;
        self.size.store(size.div_ceil(512) * 512, Ordering::Relaxed);
        Ok(())
    }

    fn set_backing(&self, _backing: Option<&BackingRef>) -> Result<()> {
        Err(Error::Unsupported("backing files for raw images".into()))
    }

    fn check_logged(&self, _: CheckMode, _: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        Err(Error::Unsupported(
            "This image format does not support checks".into(),
        ))
    }
}
