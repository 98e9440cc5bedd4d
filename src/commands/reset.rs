//! `cowimg reset`: empty an overlay, so that it reads as its backing file again, keeping its
//! backing file, backing format, options and copy-on-read flag. qemu calls this operation
//! "make empty" (what `qemu-img commit` does to the top image after committing it).
//!
//! The empty image is built in a temporary file beside the overlay, given the overlay's
//! mode and owner, synced, and renamed over it (see [`cowimg::output`]): at every instant the
//! path holds the old overlay or the new, empty one. The overlay is held open with qemu's
//! write locks from reading its options until the rename, so nobody can be writing it while
//! it is replaced. Nothing below the overlay is opened: that is what makes a reset cheaper than
//! re-creating the overlay with `qemu-img create -b`, which opens the backing chain.

use std::fs;
use std::os::unix::fs::MetadataExt;

use cowimg_formats::qcow2::compress::CompressionType;
use cowimg_formats::{qcow2, qed, Details, Format};

use cowimg::chain::{open_image, Layer};
use cowimg::error::{Error, Result};
use cowimg::lock::Access;
use cowimg::output::{Output, Spec};

/// The arguments of `cowimg reset` (`cowimg reset --help` says what each flag does).
pub struct Args {
    /// The image.
    pub file: String,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
}

/// Runs `cowimg reset`; returns the exit status.
pub fn run(a: &Args) -> Result<i32> {
    reset(&a.file, a.format)?;
    Ok(0)
}

/// Empties the overlay `file` (see the module documentation); refused for an image without
/// a backing file, and for one holding what an empty copy would drop (internal snapshots,
/// persistent bitmaps, an external data file).
pub fn reset(file: &str, format: Option<Format>) -> Result<()> {
    // Held until the new image is in place: its locks keep QEMU and other tools out.
    let layer = open_image(file, format, Access::Write)?;
    let spec = empty_like(file, &layer)?;
    let meta = fs::metadata(file).map_err(|e| Error::io(format!("reading '{file}'"), e))?;
    if !meta.is_file() {
        return Err(Error::Usage(format!(
            "'{file}' is not a regular file: a reset replaces the file, which a device cannot be"
        )));
    }
    if meta.nlink() > 1 {
        return Err(Error::Msg(format!(
            "'{file}' has {} hard links: a reset replaces the file, and the other names would \
             keep the old contents; reset a file with one name",
            meta.nlink()
        )));
    }
    // Replace the file a symbolic link points at, not the link.
    let real = fs::canonicalize(file).map_err(|e| Error::io(format!("resolving '{file}'"), e))?;
    let out = Output::replacing(&real)?;
    out.create(&spec)?;
    out.persist()?;
    drop(layer);
    Ok(())
}

/// The creation spec of an empty image like `layer`: same format, size, options, backing
/// reference (as stored) and copy-on-read flag.
fn empty_like(file: &str, layer: &Layer) -> Result<Spec> {
    let image = &layer.image;
    let backing = || {
        image.backing().ok_or_else(|| {
            Error::Msg(format!(
                "'{file}' has no backing file: resetting it would leave an empty disk; \
                 use `cowimg create --force` if that is what you want"
            ))
        })
    };
    let refuse = |what: String, how: &str| {
        Error::Msg(format!(
            "'{file}' has {what}, which a reset would drop; {how} first, or re-create the overlay"
        ))
    };
    let size = image.virtual_size();
    let copy_on_read = image.copy_on_read();
    let cluster_size = image.cluster_size().unwrap_or(65536);
    Ok(match image.details() {
        Details::Qcow2(d) => {
            if !d.snapshots.is_empty() {
                return Err(refuse(
                    format!("{} internal snapshot(s)", d.snapshots.len()),
                    "delete them (qemu-img snapshot -d NAME)",
                ));
            }
            if !d.bitmaps.is_empty() {
                return Err(refuse(
                    format!("{} persistent dirty bitmap(s)", d.bitmaps.len()),
                    "remove them (qemu-img bitmap --remove)",
                ));
            }
            if let Some(f) = d.data_file {
                return Err(Error::Msg(format!(
                    "'{file}' has an external data file ('{f}'), which cowimg does not create; \
                     re-create the overlay with qemu-img create"
                )));
            }
            let compression = CompressionType::from_name(d.compression_type).ok_or_else(|| {
                Error::Msg(format!(
                    "'{file}' has compression type '{}', which cowimg does not create",
                    d.compression_type
                ))
            })?;
            Spec::Qcow2(qcow2::create::Options {
                size,
                cluster_size,
                v2: d.version < 3,
                lazy_refcounts: d.lazy_refcounts,
                refcount_bits: d.refcount_bits,
                extended_l2: d.extended_l2,
                compression,
                backing: Some(backing()?),
                copy_on_read,
            })
        }
        Details::Qed(d) => Spec::Qed(qed::create::Options {
            size,
            cluster_size,
            table_size: d.table_size,
            backing: Some(backing()?),
            copy_on_read,
        }),
        Details::Raw => {
            return Err(Error::Usage(format!(
                "'{file}' is a raw image: it has no backing file to fall back on (reset \
                 empties qcow2 and QED overlays)"
            )))
        }
    })
}
