//! Errors of the cowimg commands. Each says which image and what went wrong; `main` prints it
//! after "cowimg: ", then what to do about it ([`Error::hints`]) on lines of their own, and
//! maps it to the command's exit status. The first line stays qemu-img's wording where qemu-img
//! has one, so that scripts matching qemu's messages still match.

use std::io;

use crate::size::SizeError;

/// cowimg's results.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong, with the image it happened to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command-line input (values, combinations).
    #[error("{0}")]
    Usage(String),
    /// An image (or one of its backing files) could not be opened.
    #[error("Could not open '{path}': {reason}")]
    Open {
        /// The image's name.
        path: String,
        /// Why.
        reason: Box<Error>,
    },
    /// The format layer failed on an image.
    #[error("{path}: {source}")]
    Image {
        /// The image's name.
        path: String,
        /// The format layer's error.
        #[source]
        source: cowimg_formats::Error,
    },
    /// A backing file of `image` cannot be used. The text is qemu's; `problem` says which
    /// failures a new backing pointer cures.
    #[error("Could not open '{image}': Could not open backing file: {reason}")]
    Backing {
        /// The image whose backing file it is.
        image: String,
        /// Which kind of failure.
        problem: BackingProblem,
        /// The backing file's own error.
        reason: Box<Error>,
    },
    /// A size or offset that is not one, or is out of range: `message` in qemu-img's words,
    /// `option` as given on the command line ("SIZE", "--speed", "-o cluster_size=").
    #[error("{message}")]
    Size {
        /// The message.
        message: String,
        /// The option it was given to.
        option: String,
        /// Which kind of mistake.
        problem: SizeError,
    },
    /// An error about `file`, named first as qemu-img names it ("x.qcow2: ...").
    #[error("{file}: {source}")]
    In {
        /// The file.
        file: String,
        /// The error.
        source: Box<Error>,
    },
    /// A file was to be created where a directory is.
    #[error("Could not create '{0}': Is a directory")]
    IsDirectory(String),
    /// A bare format error (wrapped by `Open` with the image's name).
    #[error("{0}")]
    Format(#[from] cowimg_formats::Error),
    /// Another process holds the image (qemu's wording and hint).
    #[error("Failed to get {} lock\nIs another process using the image [{path}]?", if *.shared { format!("shared \"{}\"", .perm) } else { format!("\"{}\"", .perm) })]
    Locked {
        /// The image's file.
        path: String,
        /// The permission qemu names ("write", "consistent read").
        perm: &'static str,
        /// A shared lock was wanted (another process holds an exclusive one).
        shared: bool,
    },
    /// An I/O call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
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

/// Why a backing file cannot be used, as far as the fix differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingProblem {
    /// The file named is not there (nor is a directory on its path).
    Missing,
    /// The file is already in the chain above it.
    Loop,
    /// Anything else (unreadable, damaged, unsupported): a new pointer is not the fix.
    Other,
}

impl Error {
    /// What the user can do about this error, one line per way (printed after the error as
    /// "hint: ..."); empty when there is nothing better to say than the error itself.
    pub fn hints(&self) -> Vec<String> {
        match self {
            Error::Backing {
                image,
                problem: BackingProblem::Missing | BackingProblem::Loop,
                ..
            } => {
                // Only the pointer can change: the old backing file cannot be read, so the
                // safe rebase (which copies what it provided) cannot run; hence -u.
                let image = shell_word(image);
                vec![
                    format!("to drop the backing file (what it provided is lost): cowimg rebase -u -b \"\" {image}"),
                    format!("to point it at another file: cowimg rebase -u -b NEW -F FMT {image}"),
                ]
            }
            Error::Size {
                option,
                problem: SizeError::Invalid,
                ..
            } => vec![format!(
                "{option} takes a number with an optional suffix K, M, G, T, P or E (powers \
                 of 1024, any case), e.g. 10G or 1.5T, or a hexadecimal number, e.g. 0x100000"
            )],
            Error::IsDirectory(path) => vec![format!(
                "'{path}' is a directory; name the image file inside it, e.g. {}",
                shell_word(&format!("{}/new.img", path.trim_end_matches('/')))
            )],
            // Only the errors a repair really cures are typed so (see PastEnd's docs).
            Error::Image {
                path,
                source: cowimg_formats::Error::PastEnd { .. },
            } => vec![format!(
                "to repair it: cowimg check -r all {} (what the missing metadata mapped is lost; the image then reads as qemu reads it)",
                shell_word(path)
            )],
            Error::Image {
                path,
                source: cowimg_formats::Error::NeedsRepair(_),
            } => vec![repair_hint(path)],
            Error::Open { path, reason } => match &**reason {
                Error::Format(cowimg_formats::Error::NeedsRepair(_)) => vec![repair_hint(path)],
                reason => reason.hints(),
            },
            Error::In { source, .. } => source.hints(),
            _ => Vec::new(),
        }
    }

    /// Whether this is a usage error (a bad value or combination on the command line), which
    /// exits 1 for every command, as with qemu-img.
    pub fn is_usage(&self) -> bool {
        match self {
            Error::Usage(_) | Error::Size { .. } => true,
            Error::In { source, .. } => source.is_usage(),
            _ => false,
        }
    }

    /// An [`Error::Io`] while doing `context`.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The format layer's `source` about image `path` (an interruption stays one).
    pub fn image(path: &str, source: cowimg_formats::Error) -> Self {
        match source {
            cowimg_formats::Error::Interrupted => Error::Interrupted(0),
            source => Error::Image {
                path: path.to_string(),
                source,
            },
        }
    }

    /// Image `path` could not be opened because of `reason`.
    pub fn open(path: &str, reason: Error) -> Self {
        Error::Open {
            path: path.to_string(),
            reason: Box::new(reason),
        }
    }
}

/// How to repair an image whose metadata a write found inconsistent (or marked corrupt).
fn repair_hint(path: &str) -> String {
    format!("to repair it: cowimg check -r all {}", shell_word(path))
}

/// `s` as one word of a shell command line: as it is when it is made of safe characters,
/// otherwise in single quotes; a leading `-` gets `./` so that it is not read as an option.
fn shell_word(s: &str) -> String {
    if s.starts_with('-') {
        return shell_word(&format!("./{s}"));
    }
    let safe = |c: char| c.is_ascii_alphanumeric() || "._/-+,:=@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(shell_word("dir/a-1.qcow2"), "dir/a-1.qcow2");
        assert_eq!(shell_word("my disk.qcow2"), "'my disk.qcow2'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("-x.qcow2"), "./-x.qcow2");
    }
}
