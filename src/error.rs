//! Errors of the cowimg commands. Each says which image and what went wrong; `main` prints it
//! after "cowimg: " and maps it to the command's exit status.

use std::io;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command-line input (values, combinations).
    #[error("{0}")]
    Usage(String),
    /// An image (or one of its backing files) could not be opened.
    #[error("Could not open '{path}': {reason}")]
    Open { path: String, reason: Box<Error> },
    /// The format layer failed on an image.
    #[error("{path}: {source}")]
    Image {
        path: String,
        #[source]
        source: cowimg_formats::Error,
    },
    /// A bare format error (wrapped by `Open` with the image's name).
    #[error("{0}")]
    Format(#[from] cowimg_formats::Error),
    /// Another process holds the image (qemu's wording and hint).
    #[error("Failed to get {} lock\nIs another process using the image [{path}]?", if *.shared { format!("shared \"{}\"", .perm) } else { format!("\"{}\"", .perm) })]
    Locked {
        path: String,
        perm: &'static str,
        shared: bool,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Anything else, already worded for the user.
    #[error("{0}")]
    Msg(String),
    /// Stopped by a signal before finishing; the number is the signal.
    #[error("interrupted")]
    Interrupted(i32),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn image(path: &str, source: cowimg_formats::Error) -> Self {
        match source {
            cowimg_formats::Error::Interrupted => Error::Interrupted(0),
            source => Error::Image {
                path: path.to_string(),
                source,
            },
        }
    }

    pub fn open(path: &str, reason: Error) -> Self {
        Error::Open {
            path: path.to_string(),
            reason: Box::new(reason),
        }
    }
}
