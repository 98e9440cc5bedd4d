//! Remote layers: an NBD export as the [`Storage`] under a format, so that a chain's layer
//! (raw bytes, or a qcow2/QED image) may live on an NBD server.
//!
//! * The export is pinned when opened: its size and flags are read once, and every further
//!   connection must report the same (NBD cannot resize an export under a connection).
//! * Holes are found with NBD block status (`base:allocation`): ranges the server reports as
//!   zero are never read. A server without block status reads as all data.
//! * Reads are cut into [`PIECE`]-sized requests pipelined on the connection; when the
//!   server advertises multi-conn, up to [`CONNECTIONS`] connections share them, so the copy
//!   workers keep many requests in flight.
//! * Remote layers are not locked: NBD has no locks, the server decides who may write. A
//!   layer opened read-only never sends a write.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use cowimg_formats::Storage;
use cowimg_nbd::client::{self, read_across, Client};
use cowimg_nbd::codec::{state, tflags};
use cowimg_nbd::Target;

/// Connections opened to an export that allows several (CAN_MULTI_CONN).
pub const CONNECTIONS: usize = 4;
/// The size of one read request: large enough to amortise a round trip, small enough that
/// one copy chunk (2 MiB) is several requests in flight.
pub const PIECE: u32 = 512 << 10;
/// The largest block status request (the 32-bit length, aligned down to 64 KiB).
const STATUS_REQUEST: u64 = 0xffff_0000;

/// An NBD export.
#[derive(Debug)]
pub struct NbdStorage {
    /// The canonical name (qemu's), shown as the layer's file name.
    name: PathBuf,
    conns: Vec<Client>,
    next: AtomicUsize,
    writable: bool,
    size: u64,
}

fn io_error(e: client::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl NbdStorage {
    /// Connects to `target`; with `writable`, a read-only export is refused.
    pub fn open(target: &Target, writable: bool) -> Result<NbdStorage, client::Error> {
        let first = Client::connect(target)?;
        let info = first.info().clone();
        if writable && info.read_only() {
            return Err(client::Error::Invalid(
                "the export is read-only, and this command writes into the image".into(),
            ));
        }
        let mut conns = vec![first];
        if info.has(tflags::CAN_MULTI_CONN) {
            while conns.len() < CONNECTIONS {
                let c = Client::connect(target)?;
                if c.info().size != info.size || c.info().flags != info.flags {
                    return Err(client::Error::Invalid(format!(
                        "the export changed between two connections (size {} then {})",
                        info.size,
                        c.info().size
                    )));
                }
                conns.push(c);
            }
        }
        Ok(NbdStorage {
            name: PathBuf::from(target.to_string()),
            conns,
            next: AtomicUsize::new(0),
            writable,
            size: info.size,
        })
    }

    fn conn(&self) -> &Client {
        &self.conns[self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len()]
    }
}

impl Storage for NbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Past the end of the export reads as zeros, as past the end of a file.
        let inside = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        let conns: Vec<&Client> = self.conns.iter().collect();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        read_across(&conns, first, offset, head, PIECE).map_err(io_error)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if offset.saturating_add(buf.len() as u64) > self.size {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "an NBD export cannot grow past its size",
            ));
        }
        self.conn().write(offset, buf, false).map_err(io_error)
    }

    fn sync(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        // Without multi-conn a flush covers only its own connection's writes; there is only
        // one connection then. With it, one flush covers all, but each is cheap and certain.
        self.conns
            .iter()
            .try_for_each(|c| c.flush())
            .map_err(io_error)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.size {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "an NBD export cannot be resized",
        ))
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "an NBD export does not say how much space it uses",
        ))
    }

    fn path(&self) -> &Path {
        &self.name
    }

    fn protocol(&self) -> &'static str {
        "nbd"
    }

    fn data_extents(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        let end = end.min(self.size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = start;
        while pos < end {
            let len = (end - pos).min(STATUS_REQUEST) as u32;
            let Some(extents) = self.conn().block_status(pos, len).map_err(io_error)? else {
                // No block status: all data.
                out.push((pos, end));
                break;
            };
            for e in extents {
                let e_end = pos + u64::from(e.len);
                // Ranges that read as zeros are holes; "hole" without "zero" has undefined
                // contents, which must be read like data.
                if e.flags & state::ZERO == 0 {
                    match out.last_mut() {
                        Some(last) if last.1 == pos => last.1 = e_end,
                        _ => out.push((pos, e_end)),
                    }
                }
                pos = e_end;
            }
        }
        Ok(out)
    }
}
