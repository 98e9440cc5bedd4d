//! An NBD server: the fixed newstyle handshake and the transmission phase, generic over a
//! [`Backend`] that holds the data, so that the protocol is tested without images.
//!
//! One call of [`Server::handle`] serves one connection: one request after the other while
//! requests are quick, several at once on a few workers once one is slow (see
//! `transmission`). Connections run in parallel on the caller's threads and share the
//! backend: its writes are visible to every connection at once and a FLUSH on one makes every
//! completed write durable, which is what `CAN_MULTI_CONN` promises.
//!
//! Every length a client sends is checked before anything is allocated for it: option data is
//! at most [`crate::codec::MAX_OPTION_DATA`], a READ or WRITE at most [`MAX_PAYLOAD`]. A client
//! that breaks the protocol (a bad magic, a write larger than the limit whose data cannot be
//! skipped safely) is disconnected; a request the protocol lets the server refuse gets its
//! error value.

mod handshake;
mod transmission;

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::codec::{errno, Extent, ProtocolError};

/// The largest READ or WRITE payload served (the block size maximum advertised, as qemu-nbd).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// The `base:allocation` context's name.
pub const BASE_ALLOCATION: &str = crate::codec::BASE_ALLOCATION;
/// qemu's allocation depth context: 0 unallocated, 1 the top image, 2 its backing file...
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Why a backend could not do what a request asked: the NBD error value sent back, and a
/// message for structured error chunks and the server's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendError {
    /// The NBD error value ([`errno`]).
    pub errno: u32,
    /// What happened, in words.
    pub message: String,
}

impl BackendError {
    /// An error `errno` saying `message`.
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        BackendError {
            errno,
            message: message.into(),
        }
    }

    /// An I/O or image error (`EIO`).
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(errno::EIO, message)
    }
}

/// What a backend returns.
pub type BackendResult<T> = std::result::Result<T, BackendError>;

/// The storage an export serves. Offsets and lengths are checked against [`Backend::size`]
/// by the server before any method is called. Methods may be called from many connections at
/// once.
pub trait Backend: Send + Sync {
    /// The export's size in bytes.
    fn size(&self) -> u64;
    /// Whether clients may write (WRITE, TRIM, WRITE_ZEROES); else they get `EPERM`.
    fn writable(&self) -> bool;
    /// The block size clients should prefer (a power of two, at least 512).
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    /// Fills `buf` with the data at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<()>;
    /// Writes `data` at `offset` (visible to every reader once this returns).
    fn write(&self, offset: u64, data: &[u8]) -> BackendResult<()>;
    /// Makes `[offset, offset + len)` read as zeros. With `fast`, fails with `ENOTSUP` unless
    /// this is faster than writing zeros (the client then writes them itself).
    fn write_zeroes(&self, offset: u64, len: u64, fast: bool) -> BackendResult<()>;
    /// The client no longer needs the range; doing nothing is correct.
    fn trim(&self, offset: u64, len: u64) -> BackendResult<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> BackendResult<()>;
    /// Prepares the range for reads soon (a copy-on-read prefetch for an image).
    fn cache(&self, offset: u64, len: u64) -> BackendResult<()>;
    /// The metadata contexts the backend can describe ([`BASE_ALLOCATION`],
    /// [`ALLOCATION_DEPTH`]).
    fn contexts(&self) -> &[&'static str];
    /// The status of `[offset, offset + len)` in `context` (one of [`Backend::contexts`]):
    /// extents back to back from `offset`, at least one; the server clips them to the
    /// request.
    fn block_status(&self, context: &str, offset: u64, len: u32) -> BackendResult<Vec<Extent>>;
}

/// One export: a name clients ask for, and the backend behind it.
pub struct Export {
    /// The name clients ask for (`""`: the default export).
    pub name: String,
    /// Shown by `nbdinfo` (`NBD_INFO_DESCRIPTION`, and `NBD_OPT_LIST`).
    pub description: String,
    /// What serves its requests.
    pub backend: Arc<dyn Backend>,
}

/// Why a connection ended other than by the client's disconnect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The client sent something the protocol does not allow.
    #[error("the client broke the NBD protocol: {0}")]
    Protocol(#[from] ProtocolError),
}

/// The exports of a server.
pub struct Server {
    exports: Vec<Export>,
}

impl Server {
    /// A server of `exports`; the first one is also the default export (the empty name).
    pub fn new(exports: Vec<Export>) -> Server {
        Server { exports }
    }

    /// The export a client names: the empty name is the first.
    fn find(&self, name: &str) -> Option<&Export> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.name == name)
    }

    /// Serves one connection until the client disconnects (`Ok`) or breaks the protocol.
    /// `reader` and `writer` are the two directions of one stream.
    pub fn handle(
        &self,
        reader: impl Read,
        writer: impl Write + Send,
    ) -> std::result::Result<(), ConnectionError> {
        self.handle_then(reader, writer, || ())
    }

    /// [`Server::handle`], calling `negotiated` once the handshake is over and before the
    /// first request is read: a caller that bounds the handshake's time (a socket read
    /// timeout) lifts the bound there, as idle clients may wait as long as they like.
    pub fn handle_then(
        &self,
        reader: impl Read,
        writer: impl Write + Send,
        negotiated: impl FnOnce(),
    ) -> std::result::Result<(), ConnectionError> {
        let mut conn = handshake::Conn {
            reader: io::BufReader::new(reader),
            writer: io::BufWriter::new(writer),
        };
        match handshake::negotiate(self, &mut conn)? {
            Some(session) => {
                negotiated();
                transmission::serve(&mut conn, &session)
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
