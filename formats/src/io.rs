//! Positional I/O on the file that holds an image.
//!
//! Every format reads and writes through [`Storage`], so that tests can put a recording or
//! failing layer under the formats (crash simulation, injected I/O errors) and so that all
//! I/O is positional and therefore safe from many threads at once.

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Byte-addressed storage under an image (a file, or a test double).
// `len` is a size in bytes, as a file's; "empty" would mean nothing more to a caller.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync + Debug {
    /// Fills `buf` from `offset`. Bytes past the end of the storage read as zeros, as QEMU's
    /// file driver returns them; callers validate metadata offsets against [`Storage::len`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeros. Storage that has a cheaper way than
    /// writing them (an NBD export's WRITE_ZEROES) says so by overriding this; the default
    /// writes zeros, a piece at a time.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_PIECE.min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
    /// Makes `[offset, offset + len)` read as zeros, giving the space back where the storage
    /// can (a hole in a file), as qemu's write-zeroes with `BDRV_REQ_MAY_UNMAP` does; the
    /// range may extend the storage. The default writes zeros.
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Bytes the storage occupies on disk (for `info`'s disk size).
    fn allocated_bytes(&self) -> io::Result<u64>;
    /// The path the storage was opened from, for messages.
    fn path(&self) -> &Path;
    /// Bytes of image data this storage has read over the network since it was opened
    /// (remote storage: an NBD export, an HTTP file); local storage reads none. A rate cap
    /// charges them, so that `--speed` bounds what crosses the network.
    fn transferred(&self) -> u64 {
        0
    }
    /// The qemu protocol driver this storage stands for (`info`'s "protocol type").
    fn protocol(&self) -> &'static str {
        "file"
    }
    /// The ranges of `[start, end)` that hold data; the rest are holes that read as zeros.
    /// Storage that cannot tell reports everything as data.
    fn data_extents(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        Ok(if start < end {
            vec![(start, end)]
        } else {
            vec![]
        })
    }
}

/// The zeros [`Storage::write_zeroes`] writes at a time by default.
const ZERO_PIECE: u64 = 1 << 20;

/// Test hook for the crash tests (`tests/reliability_kill.rs`): with `COWIMG_TEST_KILL_AT_IO=N`
/// the process kills itself (SIGKILL, as `kill -9` would) just before its Nth change to a file:
/// a write, sync or resize of [`FileStorage`], or a step of renaming a new output into place.
/// Running with N = 1, 2, ... until a run completes visits every write/sync boundary.
/// Without the variable this is one load of a cached `None`; without the `fault-injection`
/// feature (a normal build), nothing at all.
#[cfg(feature = "fault-injection")]
pub fn fault_point() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let limit = *LIMIT.get_or_init(|| {
        std::env::var("COWIMG_TEST_KILL_AT_IO")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(n) = limit {
        if COUNT.fetch_add(1, Ordering::SeqCst) + 1 >= n {
            // SAFETY: signalling our own process; nothing is touched.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

/// A normal build has no fault points (see the `fault-injection` feature).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fault_point() {}

/// Writes at least this large get an early writeback hint.
const WRITEBACK_HINT_MIN: usize = 256 << 10;

/// A regular file (or block device) accessed with pread/pwrite.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
}

impl FileStorage {
    /// Wraps an already opened (and, by the caller, locked) file.
    pub fn new(file: File, path: impl Into<PathBuf>) -> Self {
        FileStorage {
            file,
            path: path.into(),
        }
    }

    /// The underlying file, e.g. for locking.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        fault_point();
        self.file.write_all_at(buf, offset)?;
        if buf.len() >= WRITEBACK_HINT_MIN {
            use std::os::unix::io::AsRawFd;
            // Start writing large writes back now, without waiting: the disk works while the
            // copy goes on, and the commit's sync finds little left to do.
            // SAFETY: a hint on a descriptor we own; no memory is touched.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    offset as libc::off64_t,
                    buf.len() as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        Ok(())
    }

    /// A hole punched in a regular file (the length kept), the file extended for what lies
    /// past its end; zeros written where the file system cannot punch, or into a device.
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        let meta = self.file.metadata()?;
        if !meta.is_file() {
            return self.write_zeroes(offset, len);
        }
        fault_point();
        let end = offset.saturating_add(len);
        let file_len = meta.len();
        let inside = end.min(file_len).saturating_sub(offset);
        if inside > 0 {
            use std::os::unix::io::AsRawFd;
            // SAFETY: fallocate on a descriptor we own; no memory is touched.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    inside as libc::off_t,
                )
            };
            if r != 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                        self.write_zeroes(offset, inside)?
                    }
                    _ => return Err(e),
                }
            }
        }
        if end > file_len {
            self.file.set_len(end)?;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        fault_point();
        match self.file.sync_data() {
            // fdatasync(2): "fd is bound to a special file (e.g., a pipe, FIFO, or socket)
            // which does not support synchronization" - a character device such as
            // /dev/null, whose writes have nothing to make durable.
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL) && !self.file.metadata()?.is_file() =>
            {
                Ok(())
            }
            r => r,
        }
    }

    fn len(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        // Block devices report length 0 in metadata; seek to the end instead.
        use std::io::Seek;
        let mut f = &self.file;
        f.seek(io::SeekFrom::End(0))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        fault_point();
        self.file.set_len(len)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn data_extents(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        use std::os::unix::io::AsRawFd;
        let fd = self.file.as_raw_fd();
        let seek = |off: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
            // SAFETY: lseek on a file descriptor we own; no memory is touched.
            let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::ENXIO) => Ok(None),
                    _ => Err(e),
                };
            }
            Ok(Some(r as u64))
        };
        let mut out = Vec::new();
        let mut pos = start;
        while pos < end {
            let data = match seek(pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d,
                Ok(None) => break,
                // Not supported here (some file systems, devices): everything is data.
                Err(_) => return Ok(vec![(pos, end)]),
            };
            if data >= end {
                break;
            }
            let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            out.push((data, hole));
            pos = hole;
        }
        Ok(out)
    }
}

/// Storage whose syncs do nothing: for a new file that is synced once, as a whole, before it
/// is renamed into place (an interrupted run leaves only a temporary file, so ordering
/// inside it does not matter and per-batch syncs would only cost time).
#[derive(Debug)]
pub struct Unsynced<S: Storage>(pub S);

impl<S: Storage> Storage for Unsynced<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, len)
    }
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes_unmap(offset, len)
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.0.allocated_bytes()
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn data_extents(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        self.0.data_extents(start, end)
    }
}

/// An image file held in memory: for tests, fuzzing and tools that build images before
/// writing them out. Reads past the end are zeros, as from a file; writes may not grow it
/// past `max_len` (EFBIG), so that a hostile image cannot make it allocate without bound.
#[derive(Debug)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
    path: PathBuf,
    max_len: u64,
}

impl MemStorage {
    /// `data` under the name `path`, growing to at most 1 GiB.
    pub fn new(data: Vec<u8>, path: &str) -> MemStorage {
        MemStorage {
            data: Mutex::new(data),
            path: PathBuf::from(path),
            max_len: 1 << 30,
        }
    }

    /// The same storage, refusing to grow past `max_len` bytes (a full disk, in tests).
    pub fn with_max_len(mut self, max_len: u64) -> MemStorage {
        self.max_len = max_len;
        self
    }

    /// A copy of the bytes stored.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes().clone()
    }

    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.bytes();
        buf.fill(0);
        if offset < d.len() as u64 {
            let n = (d.len() as u64 - offset).min(buf.len() as u64) as usize;
            buf[..n].copy_from_slice(&d[offset as usize..offset as usize + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.max_len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut d = self.bytes();
        if (d.len() as u64) < end {
            d.resize(end as usize, 0);
        }
        d[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.max_len {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        self.bytes().resize(len as usize, 0);
        Ok(())
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.len()
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads exactly `buf.len()` bytes at `offset`, with a message naming what was read.
pub(crate) fn read_exact(
    s: &dyn Storage,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> crate::Result<()> {
    s.read_at(buf, offset)
        .map_err(|e| crate::Error::io(format!("reading {what} at offset {offset:#x}"), e))
}

/// Writes `buf` at `offset`, with a message naming what was written.
pub(crate) fn write_all(s: &dyn Storage, buf: &[u8], offset: u64, what: &str) -> crate::Result<()> {
    s.write_at(buf, offset)
        .map_err(|e| crate::Error::io(format!("writing {what} at offset {offset:#x}"), e))
}

/// Syncs, with a message.
pub(crate) fn sync(s: &dyn Storage) -> crate::Result<()> {
    s.sync().map_err(|e| crate::Error::io("syncing", e))
}
