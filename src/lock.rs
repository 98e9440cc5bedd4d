//! Image locking with QEMU's protocol, so that cowimg and a running QEMU (or qemu-img, qemu-io,
//! qemu-nbd) never modify the same image at once.
//!
//! QEMU takes open-file-description (OFD) read locks of one byte: byte 100+i while it holds
//! permission i, byte 200+i while it does not share permission i with others (i = 0 consistent
//! read, 1 write, 2 write unchanged, 3 resize). It locks first and tests after, with
//! F_OFD_GETLK, that nobody holds what conflicts. cowimg does the same on the descriptor it
//! does I/O on, so the locks live exactly as long as the open image.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::Once;

use crate::error::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const CONSISTENT_READ: u32 = 0;
const WRITE: u32 = 1;
const RESIZE: u32 = 3;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// How an image is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read-only, sharing everything (`-U`/`--force-share`).
    ReadShared,
    /// Read-only; others may read but not write or resize (what qemu-img info does).
    Read,
    /// Read-write; others may read but not write or resize.
    Write,
}

impl Access {
    fn held(self) -> &'static [u32] {
        match self {
            Access::ReadShared | Access::Read => &[CONSISTENT_READ],
            Access::Write => &[CONSISTENT_READ, WRITE, RESIZE],
        }
    }

    fn unshared(self) -> &'static [u32] {
        match self {
            Access::ReadShared => &[],
            Access::Read | Access::Write => &[WRITE, RESIZE],
        }
    }

    /// The access writes.
    pub fn writable(self) -> bool {
        self == Access::Write
    }
}

fn flock(kind: libc::c_short, start: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = 1;
    fl
}

fn set(file: &File, kind: libc::c_short, byte: i64) -> std::io::Result<()> {
    let mut fl = flock(kind, byte);
    loop {
        // SAFETY: fcntl with a valid descriptor and a pointer to a live flock.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether another open file description holds a lock on `byte`.
fn taken(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes the locks for `access` on `file`, or fails naming the conflicting permission.
pub fn lock(file: &File, path: &str, access: Access) -> Result<()> {
    let bytes: Vec<i64> = access
        .held()
        .iter()
        .map(|&i| PERM_BASE + i64::from(i))
        .chain(
            access
                .unshared()
                .iter()
                .map(|&i| SHARED_BASE + i64::from(i)),
        )
        .collect();
    for &b in &bytes {
        if let Err(e) = set(file, libc::F_RDLCK as libc::c_short, b) {
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(libc::ENOLCK)
            ) {
                // No OFD locks here (some network file systems): qemu's default then runs
                // without locking, and so does cowimg, saying so once.
                static WARN: Once = Once::new();
                WARN.call_once(|| eprintln!("cowimg: warning: file locking is not supported for '{path}'; going on without it"));
                return Ok(());
            }
            return Err(Error::io(format!("locking '{path}'"), e));
        }
    }
    let conflict = |base: i64, perms: &[u32]| -> Result<Option<u32>> {
        for &i in perms {
            if taken(file, base + i64::from(i))
                .map_err(|e| Error::io(format!("testing the locks of '{path}'"), e))?
            {
                return Ok(Some(i));
            }
        }
        Ok(None)
    };
    // To hold permission i nobody may refuse to share it; to refuse sharing i nobody may hold it.
    let found = match conflict(SHARED_BASE, access.held())? {
        Some(i) => Some((i, false)),
        None => conflict(PERM_BASE, access.unshared())?.map(|i| (i, true)),
    };
    if let Some((i, shared)) = found {
        for &b in &bytes {
            let _ = set(file, libc::F_UNLCK as libc::c_short, b);
        }
        return Err(Error::Locked {
            path: path.to_string(),
            perm: PERM_NAMES[i as usize],
            shared,
        });
    }
    Ok(())
}
