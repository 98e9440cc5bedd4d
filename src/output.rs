//! Outputs of `create` and `convert`. A file is written under a temporary name beside the
//! file the destination names (through symlinks), synced, then renamed into place with the
//! replaced file's owner and mode, so an interrupted run never leaves a half-written
//! destination; a temporary file left by a killed run is removed by the next run. A file with
//! other hard links is refused (they would keep the old bytes). A device cannot be replaced:
//! it is written in place, as qemu-img writes it.

use std::fs;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use cowimg_formats::io::Unsynced;
use cowimg_formats::{qcow2, qed, FileStorage, Format, Storage};

use crate::chain::{os_text, Layer};
use crate::error::{Error, Result};
use crate::lock::{self, Access};

/// Whether `dst` names an NBD export (in any of qemu's four forms). An export exists and has
/// a fixed size: it is written in place, never created or replaced.
pub fn is_nbd(dst: &str) -> bool {
    cowimg_nbd::Target::parse(dst).is_some()
}

/// Refuses a format cowimg cannot write into an NBD export. qcow2 and QED images grow at their
/// end as clusters are allocated, and an export cannot grow: they are written only into files
/// (as into devices). The export takes the disk's bytes (-O raw); the server on the other end
/// may store them in any format (`qemu-nbd -f qcow2`).
pub fn check_nbd_format(dst: &str, format: Format) -> Result<()> {
    if format == Format::Raw {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "'{dst}' is an NBD export: cowimg writes {format} images only into regular files (they \
         grow at their end, an export has a fixed size). Write the disk's bytes into the export \
         with -O raw (a server such as `qemu-nbd -f qcow2 FILE` stores them as qcow2), or name \
         a file."
    )))
}

/// What to create.
#[derive(Clone, Debug)]
pub enum Spec {
    /// A qcow2 image.
    Qcow2(qcow2::create::Options),
    /// A QED image.
    Qed(qed::create::Options),
    /// A raw image.
    Raw {
        /// Its size in bytes.
        size: u64,
    },
}

impl Spec {
    /// The format it creates.
    pub fn format(&self) -> Format {
        match self {
            Spec::Qcow2(_) => Format::Qcow2,
            Spec::Qed(_) => Format::Qed,
            Spec::Raw { .. } => Format::Raw,
        }
    }

    /// Refuses what qemu-img refuses, before anything is written.
    pub fn validate(&self) -> Result<()> {
        match self {
            Spec::Qcow2(o) => qcow2::create::validate(o)?,
            Spec::Qed(o) => qed::create::validate(o)?,
            Spec::Raw { size } => cowimg_formats::check_size(*size)?,
        }
        Ok(())
    }
}

/// A destination being written.
pub struct Output {
    /// The destination as named, for messages.
    pub dst: PathBuf,
    kind: Kind,
}

/// How the destination is written.
enum Kind {
    /// A new file under a temporary name beside `target`, renamed over it once complete.
    Replace {
        /// The file the destination names, symlinks followed (the link itself stays).
        target: PathBuf,
        tmp: PathBuf,
        /// Owner and mode of the file being replaced, given to the new one.
        keep: Option<Box<fs::Metadata>>,
        persisted: bool,
    },
    /// A block or character device: written in place, never replaced or truncated.
    Device { file: fs::File },
}

/// What to do when the destination exists (and is a file, not a device).
pub enum Existing<'a> {
    /// Replace it once the new image is complete (`convert`, `create --force`).
    Replace,
    /// Refuse; the message suggests `retry`, the same command with `--force`.
    Refuse {
        /// The command line to suggest.
        retry: &'a str,
    },
}

/// Creates `spec` at `dst` as `cowimg create` does: checked first, then written beside `dst`
/// and renamed over it once complete (a device is written in place; see [`Output::begin`]).
pub fn create(dst: &str, spec: &Spec, existing: Existing) -> Result<()> {
    spec.validate()?;
    let out = Output::begin(dst, existing)?;
    out.create(spec)?;
    out.persist()
}

/// Creates a qcow2 overlay at `path` over `backing` (`cowimg create -f qcow2 -b BACKING -F
/// FORMAT PATH`), replacing what is there: the overlay records `backing` as given (a
/// relative name is relative to the overlay's directory, as qemu resolves it) and takes its
/// size. The golden-fixture pattern: a throw-away overlay that a test writes through.
pub fn create_overlay(path: &str, backing: &str, backing_format: Format) -> Result<()> {
    let full = crate::chain::combine(path, backing);
    let base = crate::chain::open_image(&full, Some(backing_format), Access::ReadShared)?;
    let spec = Spec::Qcow2(qcow2::create::Options {
        size: base.size(),
        backing: Some(cowimg_formats::BackingRef {
            name: backing.to_string(),
            format: Some(backing_format.name().to_string()),
        }),
        ..Default::default()
    });
    drop(base);
    create(path, &spec, Existing::Replace)
}

/// Most symlinks followed, as the kernel's limit (ELOOP).
const MAX_LINKS: usize = 40;

/// The file that writing through `path` reaches: symlinks followed one by one, as open(2)
/// follows them, so that a dangling link names the file to create. Relative link targets
/// are joined to the link's directory unnormalised, so that the kernel resolves `..` in them.
fn follow_links(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = fs::read_link(&p)
                    .map_err(|e| Error::io(format!("reading the link '{}'", p.display()), e))?;
                p = match p.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(Error::Msg(format!(
        "Could not create '{}': Too many levels of symbolic links",
        path.display()
    )))
}

fn parent_dir(p: &Path) -> &Path {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

impl Output {
    /// Prepares to write `dst`: refuses a destination another process holds, clears a
    /// temporary file an earlier, killed run left. A device is written in place; a file is
    /// replaced (through its symlinks) unless `existing` refuses, or it has other hard links,
    /// which would keep the old contents.
    pub fn begin(dst: &str, existing: Existing) -> Result<Output> {
        let dst_path = PathBuf::from(dst);
        // A directory (or a link to one) is never replaced, --force or not: the user meant
        // a file inside it.
        if fs::metadata(&dst_path).is_ok_and(|m| m.is_dir()) {
            return Err(Error::IsDirectory(dst.to_string()));
        }
        if fs::symlink_metadata(&dst_path).is_ok() {
            if let Existing::Refuse { retry } = existing {
                return Err(Error::Usage(format!(
                    "'{dst}' already exists; cowimg never replaces a file unless told to \
                     (qemu-img would silently truncate it). To replace it:\n  {retry}"
                )));
            }
        }
        let target = follow_links(&dst_path)?;
        let cannot = |why: String| Error::Msg(format!("Could not create '{dst}': {why}"));
        let mut keep = None;
        if let Ok(meta) = fs::metadata(&target) {
            let ft = meta.file_type();
            if ft.is_dir() {
                return Err(Error::IsDirectory(dst.to_string()));
            }
            if !ft.is_file() && !ft.is_block_device() && !ft.is_char_device() {
                return Err(cannot(
                    "not a regular file or device (a FIFO or socket cannot hold an image)".into(),
                ));
            }
            // Never write to an image that a running QEMU or another tool holds.
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&target)
                .map_err(|e| cannot(os_text(&e)))?;
            lock::lock(&f, dst, Access::Write)?;
            if !ft.is_file() {
                return Ok(Output {
                    dst: dst_path,
                    kind: Kind::Device { file: f },
                });
            }
            if meta.nlink() > 1 {
                return Err(Error::Usage(format!(
                    "'{dst}' has {} names (hard links): replacing it would leave the others \
                     with the old contents. To write into the file itself, in place, use \
                     `cowimg convert -n` (the file must be an image of the output format and \
                     large enough); or remove its other names first.",
                    meta.nlink()
                )));
            }
            keep = Some(meta);
        }
        Output::replace(dst_path, target, keep)
    }

    /// Prepares to replace the regular file `target` without the checks of
    /// [`Output::begin`], for a caller (`reset`) that holds `target` open with
    /// [`Access::Write`], whose locks keep everyone else out until the rename. The new file
    /// gets `target`'s owner and mode.
    pub fn replacing(target: &Path) -> Result<Output> {
        let keep = fs::metadata(target)
            .map_err(|e| Error::io(format!("reading '{}'", target.display()), e))?;
        Output::replace(target.to_path_buf(), target.to_path_buf(), Some(keep))
    }

    /// A temporary file beside `target` to be renamed over it, once a temporary file an
    /// earlier, killed run left there is cleared.
    fn replace(dst_path: PathBuf, target: PathBuf, keep: Option<fs::Metadata>) -> Result<Output> {
        let dst = dst_path.display();
        let name = target
            .file_name()
            .ok_or_else(|| Error::Usage(format!("'{dst}' is not a file name")))?
            .to_string_lossy()
            .into_owned();
        let dir = parent_dir(&target);
        if !dir.is_dir() {
            return Err(Error::Msg(format!(
                "Could not create '{dst}': No such file or directory"
            )));
        }
        let tmp = dir.join(format!(".{name}.cowimg-partial"));
        if tmp.exists() {
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&tmp)
                .map_err(|e| Error::io(format!("opening '{}'", tmp.display()), e))?;
            lock::lock(&f, &tmp.to_string_lossy(), Access::Write).map_err(|_| {
                Error::Msg(format!(
                    "another cowimg is writing '{dst}' (its temporary file '{}' is in use)",
                    tmp.display()
                ))
            })?;
            drop(f);
            fs::remove_file(&tmp)
                .map_err(|e| Error::io(format!("removing the leftover '{}'", tmp.display()), e))?;
        }
        Ok(Output {
            dst: dst_path.clone(),
            kind: Kind::Replace {
                target,
                tmp,
                keep: keep.map(Box::new),
                persisted: false,
            },
        })
    }

    /// Whether the destination is written in place (a device), so that what it held must be
    /// overwritten with zeros where the image reads zeros.
    pub fn in_place(&self) -> bool {
        matches!(self.kind, Kind::Device { .. })
    }

    /// Creates the empty image: in the temporary file (synced), with the owner and mode of
    /// the file it replaces; on a device, only checks that the device is large enough.
    pub fn create(&self, spec: &Spec) -> Result<()> {
        let (tmp, keep) = match &self.kind {
            Kind::Device { file } => return self.check_device(file, spec),
            Kind::Replace { tmp, keep, .. } => (tmp, keep),
        };
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| {
                Error::Msg(format!(
                    "Could not create '{}': {}",
                    self.dst.display(),
                    os_text(&e)
                ))
            })?;
        lock::lock(&file, &tmp.to_string_lossy(), Access::Write)?;
        if let Some(meta) = keep {
            // Before any data is written: a private image (0600) must not be readable by
            // others while it is copied. The owner first, as chown may clear setuid bits.
            match std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid())) {
                // Only root may give a file away: a user's copy stays theirs, with the mode.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                r => r.map_err(|e| {
                    Error::io(format!("setting the owner of '{}'", tmp.display()), e)
                })?,
            }
            file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(|e| Error::io(format!("setting the mode of '{}'", tmp.display()), e))?;
        }
        // Unsynced as in [`Output::open`]: [`Output::persist`] syncs the file once, whole.
        let s = Unsynced(FileStorage::new(file, tmp));
        let err = |e| Error::image(&self.dst.to_string_lossy(), e);
        match spec {
            Spec::Qcow2(o) => qcow2::create::create(&s, o).map_err(err)?,
            Spec::Qed(o) => qed::create::create(&s, o).map_err(err)?,
            Spec::Raw { size } => {
                s.set_len(*size).map_err(|e| {
                    // What qemu-img says when the file system cannot hold the size.
                    if e.raw_os_error() == Some(libc::EFBIG) {
                        Error::Msg(format!(
                            "{}: The image size is too large for file format 'raw'",
                            self.dst.display()
                        ))
                    } else {
                        Error::io("sizing the new image", e)
                    }
                })?;
            }
        }
        Ok(())
    }

    /// A device holds a raw image of at least its own size; qcow2 and QED images grow at
    /// their end, which a device does not have, so cowimg writes those only into files.
    fn check_device(&self, file: &fs::File, spec: &Spec) -> Result<()> {
        let dst = self.dst.display();
        let Spec::Raw { size } = spec else {
            return Err(Error::Usage(format!(
                "'{dst}' is a device: cowimg writes {} images only into regular files. Write \
                 the disk's bytes into the device with -O raw, or name a file.",
                spec.format()
            )));
        };
        let len = (&*file)
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("finding the size of '{dst}'"), e))?;
        if len < *size {
            // qemu-img's words, and the sizes that make them true.
            return Err(Error::Msg(format!(
                "{dst}: Cannot grow device files: the device holds {len} bytes, the image needs {size}"
            )));
        }
        Ok(())
    }

    /// Opens the image for filling. The temporary file's syncs are skipped: ordering inside
    /// a file nobody sees yet does not matter, and [`Output::persist`] syncs it once, whole.
    /// A device is opened as raw, its writes synced by each commit.
    pub fn open(&self, format: Format) -> Result<Layer> {
        let (storage, name): (Arc<dyn Storage>, String) = match &self.kind {
            Kind::Device { file } => {
                let file = file
                    .try_clone()
                    .map_err(|e| Error::io(format!("opening '{}'", self.dst.display()), e))?;
                let name = self.dst.to_string_lossy().into_owned();
                (Arc::new(FileStorage::new(file, &self.dst)), name)
            }
            Kind::Replace { tmp, .. } => {
                let name = tmp.to_string_lossy().into_owned();
                let file = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(tmp)
                    .map_err(|e| Error::io(format!("opening '{name}'"), e))?;
                lock::lock(&file, &name, Access::Write)?;
                (Arc::new(Unsynced(FileStorage::new(file, tmp))), name)
            }
        };
        let err = |e: cowimg_formats::Error| Error::open(&name, e.into());
        let image = cowimg_formats::open(
            storage,
            format,
            qcow2::OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .map_err(err)?;
        Ok(Layer {
            image,
            filename: name,
            format,
            probed: false,
        })
    }

    /// Syncs the finished temporary file, renames it into place and syncs the directory; a
    /// device is flushed.
    pub fn persist(mut self) -> Result<()> {
        let (target, tmp, persisted) = match &mut self.kind {
            Kind::Device { file } => {
                let file = file
                    .try_clone()
                    .map_err(|e| Error::io(format!("opening '{}'", self.dst.display()), e))?;
                return FileStorage::new(file, &self.dst)
                    .sync()
                    .map_err(|e| Error::io(format!("flushing '{}'", self.dst.display()), e));
            }
            Kind::Replace {
                target,
                tmp,
                persisted,
                ..
            } => (target, tmp, persisted),
        };
        let f = fs::File::open(&*tmp)
            .map_err(|e| Error::io(format!("opening '{}'", tmp.display()), e))?;
        cowimg_formats::io::fault_point();
        f.sync_all()
            .map_err(|e| Error::io(format!("syncing '{}'", tmp.display()), e))?;
        drop(f);
        cowimg_formats::io::fault_point();
        fs::rename(&*tmp, &*target).map_err(|e| {
            Error::io(
                format!("renaming the new image into '{}'", target.display()),
                e,
            )
        })?;
        *persisted = true;
        cowimg_formats::io::fault_point();
        if let Ok(d) = fs::File::open(parent_dir(target)) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Kind::Replace {
            tmp,
            persisted: false,
            ..
        } = &self.kind
        {
            let _ = fs::remove_file(tmp);
        }
    }
}
