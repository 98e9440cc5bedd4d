//! Remote layers: an NBD export as the [`Storage`] under a format, so that a chain's layer
//! (raw bytes, or a qcow2/QED image) may live on an NBD server.
//!
//! * The export is pinned when opened: its size and flags are read once, and every further
//!   connection must report the same (NBD cannot resize an export under a connection).
//! * Holes are found with NBD block status (`base:allocation`): ranges the server reports as
//!   zero are never read. A server without block status reads as all data.
//! * Reads are cut into [`PIECE`]-sized requests pipelined on the connection; when the
//!   server advertises multi-conn, up to [`CONNECTIONS`] connections (opened in the
//!   background) share them, so the copy workers keep many requests in flight.
//! * Writes (a writable export: a convert destination, a raw layer written in place) are cut
//!   into [`PIECE`]-sized WRITEs pipelined across the connections; zeros go as WRITE_ZEROES,
//!   with FAST_ZERO when offered, falling back to a plain WRITE_ZEROES and then to writing
//!   zeros when the server refuses (see `ZeroMode`).
//! * Remote layers are not locked: NBD has no locks, the server decides who may write. A
//!   layer opened read-only never sends a write.
//!
//! HTTP(S) layers are in [`http`].

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use cowimg_formats::Storage;
use std::sync::atomic::AtomicU8;

use cowimg_nbd::client::{self, read_across, write_across, Client};
use cowimg_nbd::codec::{errno, state, tflags};
use cowimg_nbd::Target;

pub mod http;

/// Connections opened to an export that allows several (CAN_MULTI_CONN).
pub const CONNECTIONS: usize = 4;
/// The size of one read request: large enough to amortise a round trip, small enough that
/// one copy chunk (2 MiB) is several requests in flight.
pub const PIECE: u32 = 512 << 10;
/// Block status runs kept per export at most.
const MAX_CACHED_RUNS: usize = 1 << 20;
/// The largest block status request (the 32-bit length, aligned down to 64 KiB).
const STATUS_REQUEST: u64 = 0xffff_0000;

/// Attempts at a read whose connection breaks: the first and three after reconnecting.
const ATTEMPTS: u32 = 4;

/// The wait before reconnecting for attempt `attempt` (2, 3, 4): 0.25, 0.5, 1 s, as the
/// HTTP client's retries.
fn backoff(attempt: u32) -> std::time::Duration {
    std::time::Duration::from_millis(250 << (attempt.saturating_sub(2)).min(4))
}

/// Whether `e` is the connection's fault (dropped, reset, timed out, refused on reconnecting)
/// rather than the server's answer to the request. ESHUTDOWN is an answer, but one that says
/// the server is going away (it answers the requests in flight so while it stops): asking
/// again is what the NBD protocol tells the client to do.
fn connection_lost(e: &client::Error) -> bool {
    matches!(
        e,
        client::Error::Broken(_) | client::Error::Io { .. } | client::Error::Connect { .. }
    ) || matches!(e, client::Error::Command { code, .. } if *code == errno::ESHUTDOWN)
}

/// An NBD export.
#[derive(Debug)]
pub struct NbdStorage {
    /// The canonical name (qemu's), shown as the layer's file name.
    name: PathBuf,
    /// Where the export is, to reconnect.
    target: Target,
    /// What the first connection established: the pin every later connection must match.
    info: client::ExportInfo,
    pool: Arc<Pool>,
    next: AtomicUsize,
    writable: bool,
    size: u64,
    /// How zeros are written ([`ZeroMode`] as a number): learnt from the server's refusals.
    zero_mode: AtomicU8,
    /// Block status answers of a read-only export (start -> end, data), disjoint.
    status: Mutex<BTreeMap<u64, (u64, bool)>>,
    /// Bytes read from the export ([`Storage::transferred`]).
    transferred: AtomicU64,
}

/// The connections to the export; more join in the background.
#[derive(Debug)]
struct Pool {
    conns: RwLock<Vec<Client>>,
    /// Set when the storage is dropped: connections still being opened are not added.
    closed: AtomicBool,
}

/// How a writable export is asked for zeros, from the best way down. A server that refuses
/// one way (ENOTSUP, or EINVAL from a server that does not know the flag or command) moves
/// every later request to the next: asking again would be refused again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum ZeroMode {
    /// WRITE_ZEROES with FAST_ZERO: the server zeroes only when that is quicker than writing
    /// (punching a hole, a zero cluster), and refuses otherwise.
    Fast = 0,
    /// A plain WRITE_ZEROES: the server zeroes however it can, but no zeros cross the wire.
    Plain = 1,
    /// WRITEs of zeros: the export offers no WRITE_ZEROES, or refused it.
    Data = 2,
}

impl ZeroMode {
    fn initial(info: &client::ExportInfo) -> ZeroMode {
        if !info.has(tflags::SEND_WRITE_ZEROES) {
            ZeroMode::Data
        } else if info.has(tflags::SEND_FAST_ZERO) {
            ZeroMode::Fast
        } else {
            ZeroMode::Plain
        }
    }

    fn from_u8(v: u8) -> ZeroMode {
        match v {
            0 => ZeroMode::Fast,
            1 => ZeroMode::Plain,
            _ => ZeroMode::Data,
        }
    }
}

/// Whether the server refused a zeroing as a way of zeroing (not for a fault of the disk).
fn refused(e: &client::Error) -> bool {
    matches!(e, client::Error::Command { code, .. } if *code == errno::ENOTSUP || *code == errno::EINVAL)
}

/// Zeros written as data at a time (when the export will not zero by itself).
const ZERO_DATA: usize = 4 << 20;

fn io_error(e: client::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl NbdStorage {
    /// Connects to `target`; with `writable`, a read-only export is refused. When the export
    /// allows multi-conn, more connections are opened in the background: a server that takes
    /// one client at a time (qemu-nbd's default `--shared=1`) must not delay the open, and
    /// serves this one connection.
    pub fn open(target: &Target, writable: bool) -> Result<NbdStorage, client::Error> {
        let first = Client::connect(target)?;
        let info = first.info().clone();
        if writable && info.read_only() {
            return Err(client::Error::Invalid(
                "the export is read-only, and this command writes into the image".into(),
            ));
        }
        let pool = Arc::new(Pool {
            conns: RwLock::new(vec![first]),
            closed: AtomicBool::new(false),
        });
        if info.has(tflags::CAN_MULTI_CONN) {
            let (pool, target, info) = (Arc::clone(&pool), target.clone(), info.clone());
            // Best effort: a connection that fails or differs is simply not used.
            let _ = std::thread::Builder::new()
                .name("nbd-connect".into())
                .spawn(move || {
                    for _ in 1..CONNECTIONS {
                        let Ok(c) = Client::connect(&target) else {
                            return;
                        };
                        // The export is pinned: a connection seeing another one is not used.
                        if pool.closed.load(Ordering::SeqCst) || *c.info() != info {
                            return;
                        }
                        pool.conns
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(c);
                    }
                });
        }
        Ok(NbdStorage {
            name: PathBuf::from(target.to_string()),
            target: target.clone(),
            info: info.clone(),
            pool,
            next: AtomicUsize::new(0),
            writable,
            size: info.size,
            zero_mode: AtomicU8::new(ZeroMode::initial(&info) as u8),
            status: Mutex::new(BTreeMap::new()),
            transferred: AtomicU64::new(0),
        })
    }

    fn conns(&self) -> RwLockReadGuard<'_, Vec<Client>> {
        self.pool.conns.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `read(connections, first)` (a read or block status: requests that may be sent
    /// again), reconnecting when a connection breaks under it: a read-only export is asked
    /// again over a new connection after 0.25, 0.5 and 1 s, [`ATTEMPTS`] in all. A writable
    /// export is not: writes it acknowledged but had not flushed may have been lost with the
    /// connection, and only the command run again can write them again.
    fn reading<T>(
        &self,
        mut read: impl FnMut(&[&Client], usize) -> client::Result<T>,
    ) -> io::Result<T> {
        let mut attempt = 1;
        loop {
            let r = {
                let conns = self.conns();
                let refs: Vec<&Client> = conns.iter().collect();
                read(&refs, self.next.fetch_add(1, Ordering::Relaxed))
            };
            let mut err = match r {
                Ok(v) => return Ok(v),
                Err(e) if self.writable || !connection_lost(&e) => return Err(io_error(e)),
                Err(e) => e,
            };
            // Reconnect (the server may be restarting), then ask again.
            loop {
                if attempt >= ATTEMPTS {
                    return Err(io::Error::other(format!(
                        "{err} (after {attempt} attempts)"
                    )));
                }
                attempt += 1;
                std::thread::sleep(backoff(attempt));
                match self.reconnect() {
                    Ok(()) => break,
                    Err(e) if connection_lost(&e) => err = e,
                    Err(e) => return Err(io_error(e)),
                }
            }
        }
    }

    /// Replaces the broken connections with new ones to the same export, which must be the
    /// one pinned (same size and flags). Nothing is replaced until a new connection works,
    /// so the pool is never empty; another thread's reconnection makes this one a no-op.
    fn reconnect(&self) -> client::Result<()> {
        let mut conns = self.pool.conns.write().unwrap_or_else(|e| e.into_inner());
        let broken = conns.iter().filter(|c| c.is_broken()).count();
        if broken == 0 {
            return Ok(());
        }
        let mut fresh = Vec::with_capacity(broken);
        for i in 0..broken {
            match Client::connect(&self.target) {
                Ok(c) if *c.info() == self.info => fresh.push(c),
                Ok(c) => {
                    return Err(client::Error::Invalid(format!(
                        "the export changed while the connection was re-established: it was \
                         {} bytes with flags {:#x}, and is now {} bytes with flags {:#x}",
                        self.info.size,
                        self.info.flags,
                        c.info().size,
                        c.info().flags
                    )))
                }
                // One connection is enough to go on with; the rest were extra (multi-conn).
                Err(_) if i > 0 => break,
                Err(e) => return Err(e),
            }
        }
        conns.retain(|c| !c.is_broken());
        conns.extend(fresh);
        Ok(())
    }

    /// Runs `f` on the next connection, round-robin, keeping the client's error (to tell refusals
    /// apart).
    fn with_conn<T>(&self, f: impl FnOnce(&Client) -> client::Result<T>) -> client::Result<T> {
        let conns = self.conns();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % conns.len();
        f(&conns[i])
    }
}

impl NbdStorage {
    /// The cached run holding `pos` (start, end, data).
    fn cached(&self, pos: u64) -> Option<(u64, u64, bool)> {
        let cache = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let (&s, &(e, data)) = cache.range(..=pos).next_back()?;
        (e > pos).then_some((s, e, data))
    }

    /// Asks the server for the status from `pos`: runs of (start, end, data) back to back.
    /// A read-only export cannot change under this client, so its answers are kept, and the
    /// server is asked about everything up to the export's end (it answers as much as it
    /// likes): the reads that follow a map then cost no round trip of their own.
    fn fetch_status(&self, pos: u64, end: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        let until = if self.writable { end } else { self.size };
        let len = (until - pos).min(STATUS_REQUEST) as u32;
        let status = self.reading(|conns, i| conns[i % conns.len()].block_status(pos, len))?;
        let runs: Vec<(u64, u64, bool)> = match status {
            // No block status: all data.
            None => vec![(pos, until, true)],
            Some(extents) => {
                let mut at = pos;
                extents
                    .iter()
                    .map(|e| {
                        let s = at;
                        at += u64::from(e.len);
                        // Ranges that read as zeros are holes; "hole" without "zero" has
                        // undefined contents, which must be read like data.
                        (s, at, e.flags & state::ZERO == 0)
                    })
                    .collect()
            }
        };
        if !self.writable {
            let mut cache = self.status.lock().unwrap_or_else(|e| e.into_inner());
            // A server answering in tiny extents must not grow the cache without bound.
            if cache.len() + runs.len() > MAX_CACHED_RUNS {
                cache.clear();
            }
            for &(s, e, data) in &runs {
                cache.insert(s, (e, data));
            }
        }
        Ok(runs)
    }
}

impl Drop for NbdStorage {
    fn drop(&mut self) {
        self.pool.closed.store(true, Ordering::SeqCst);
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
        self.reading(|conns, first| read_across(conns, first, offset, head, PIECE))?;
        self.transferred
            .fetch_add(head.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn transferred(&self) -> u64 {
        self.transferred.load(Ordering::Relaxed)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if offset.saturating_add(buf.len() as u64) > self.size {
            return Err(io::Error::other(format!(
                "an NBD export cannot grow past its size ({} bytes)",
                self.size
            )));
        }
        let conns = self.conns();
        let refs: Vec<&Client> = conns.iter().collect();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        write_across(&refs, first, offset, buf, PIECE, false).map_err(io_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if offset.saturating_add(len) > self.size {
            return Err(io::Error::other(format!(
                "an NBD export cannot grow past its size ({} bytes)",
                self.size
            )));
        }
        loop {
            let mode = ZeroMode::from_u8(self.zero_mode.load(Ordering::Relaxed));
            let r = match mode {
                ZeroMode::Fast => self.with_conn(|c| c.write_zeroes(offset, len, true, true)),
                ZeroMode::Plain => self.with_conn(|c| c.write_zeroes(offset, len, false, true)),
                ZeroMode::Data => {
                    let zeros = vec![0u8; ZERO_DATA.min(len as usize)];
                    let mut pos = offset;
                    while pos < offset + len {
                        let n = (offset + len - pos).min(zeros.len() as u64) as usize;
                        self.write_at(&zeros[..n], pos)?;
                        pos += n as u64;
                    }
                    return Ok(());
                }
            };
            match r {
                Err(e) if refused(&e) => {
                    // The next way down, for this request and every later one.
                    let next = if mode == ZeroMode::Fast {
                        ZeroMode::Plain
                    } else {
                        ZeroMode::Data
                    };
                    self.zero_mode.fetch_max(next as u8, Ordering::Relaxed);
                }
                r => return r.map_err(io_error),
            }
        }
    }

    fn sync(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        // Without multi-conn a flush covers only its own connection's writes; there is only
        // one connection then. With it, one flush covers all, but each is cheap and certain.
        self.conns()
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
            let runs = match self.cached(pos) {
                Some(run) => vec![run],
                None => self.fetch_status(pos, end)?,
            };
            for (s, e, data) in runs {
                let (s, e) = (s.max(pos), e.min(end));
                if s >= e {
                    continue;
                }
                if data {
                    match out.last_mut() {
                        Some(last) if last.1 == s => last.1 = e,
                        _ => out.push((s, e)),
                    }
                }
                pos = e;
            }
        }
        Ok(out)
    }
}
