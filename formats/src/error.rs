//! Errors of the formats crate: what went wrong, in the terms of the on-disk format.

use std::io;

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// An error reading, writing or checking an image.
///
/// Messages say what is wrong in the format's own terms; the caller adds the image's name.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed; `context` says what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done ("reading the L1 table", ...).
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The image's metadata is malformed or hostile (bad offsets, absurd sizes, ...).
    #[error("{0}")]
    Invalid(String),
    /// A feature the image uses that cowimg does not support (named).
    #[error("unsupported {0}")]
    Unsupported(String),
    /// The image is marked corrupt or is found corrupt at run time.
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// Metadata the image needs lies past the end of the file (a file cut short): `what`
    /// at host offset `offset`, the file being `file_len` bytes. A check with
    /// [`crate::CheckMode::RepairAll`] makes the image readable again.
    #[error(
        "image is corrupt: {what} at {offset:#x} lies past the end of the file ({file_len} bytes)"
    )]
    PastEnd {
        /// The structure ("an L2 table", ...).
        what: &'static str,
        /// Its host offset.
        offset: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The image is marked corrupt, or its metadata was found inconsistent, in a way that a
    /// check with [`crate::CheckMode::RepairAll`] repairs; nothing was written. The text says
    /// what is wrong; a program using the library decides how to offer the repair (the
    /// cowimg CLI names its command).
    #[error("{0}")]
    NeedsRepair(String),
    /// An operation was refused (read-only image, option conflict...).
    #[error("{0}")]
    Refused(String),
    /// The operation was stopped on request (signal) before it finished.
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    /// Wraps an I/O error with the action that failed.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Malformed metadata.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// The raw OS error number, when the failure came from the OS.
    pub fn os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Shorthand for returning [`Error::Invalid`] with a formatted message.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { return Err($crate::Error::Invalid(format!($($arg)*))) };
}
