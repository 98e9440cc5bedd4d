//! New output files (`create`, `convert`): written under a temporary name beside the
//! destination, synced, then renamed into place, so an interrupted run never leaves a
//! half-written destination. A temporary file left by a killed run is removed by the next run.

use std::fs;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use cowimg_formats::io::Unsynced;
use cowimg_formats::qcow2::Qcow2;
use cowimg_formats::qed::Qed;
use cowimg_formats::raw::Raw;
use cowimg_formats::{qcow2, qed, FileStorage, Format, Image, Storage};

use crate::chain::{os_text, Layer};
use crate::error::{Error, Result};
use crate::lock::{self, Access};

/// What to create.
#[derive(Clone, Debug)]
pub enum Spec {
    Qcow2(qcow2::create::Options),
    Qed(qed::create::Options),
    Raw { size: u64 },
}

impl Spec {
    pub fn format(&self) -> Format {
        match self {
            Spec::Qcow2(_) => Format::Qcow2,
            Spec::Qed(_) => Format::Qed,
            Spec::Raw { .. } => Format::Raw,
        }
    }

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
    pub dst: PathBuf,
    pub tmp: PathBuf,
    persisted: bool,
}

impl Output {
    /// Prepares to write `dst`: refuses a destination another process holds, clears a
    /// temporary file an earlier, killed run left.
    pub fn begin(dst: &str, overwrite: bool) -> Result<Output> {
        let dst_path = PathBuf::from(dst);
        let name = dst_path
            .file_name()
            .ok_or_else(|| Error::Usage(format!("'{dst}' is not a file name")))?
            .to_string_lossy()
            .into_owned();
        let dir = dst_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(Error::Msg(format!(
                "Could not create '{dst}': No such file or directory"
            )));
        }
        let tmp = dir.join(format!(".{name}.cowimg-partial"));
        if let Ok(meta) = fs::symlink_metadata(&dst_path) {
            if !overwrite {
                return Err(Error::Usage(format!(
                    "'{dst}' already exists; pass --force to replace it (qemu-img would silently truncate it)"
                )));
            }
            if meta.is_dir() {
                return Err(Error::Msg(format!(
                    "Could not create '{dst}': Is a directory"
                )));
            }
            // Never replace an image that a running QEMU or another tool holds.
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dst_path)
                .map_err(|e| Error::Msg(format!("Could not create '{dst}': {}", os_text(&e))))?;
            lock::lock(&f, dst, Access::Write)?;
        }
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
            dst: dst_path,
            tmp,
            persisted: false,
        })
    }

    pub fn tmp_name(&self) -> String {
        self.tmp.to_string_lossy().into_owned()
    }

    /// Creates the empty image in the temporary file (synced).
    pub fn create(&self, spec: &Spec) -> Result<()> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&self.tmp)
            .map_err(|e| {
                Error::Msg(format!(
                    "Could not create '{}': {}",
                    self.dst.display(),
                    os_text(&e)
                ))
            })?;
        lock::lock(&file, &self.tmp_name(), Access::Write)?;
        let s = FileStorage::new(file, &self.tmp);
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
                s.sync()
                    .map_err(|e| Error::io("syncing the new image", e))?;
            }
        }
        Ok(())
    }

    /// Opens the temporary file for filling. Its syncs are skipped: ordering inside a file
    /// nobody sees yet does not matter, and [`Output::persist`] syncs it once, whole.
    pub fn open(&self, format: Format) -> Result<Layer> {
        let name = self.tmp_name();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.tmp)
            .map_err(|e| Error::io(format!("opening '{name}'"), e))?;
        lock::lock(&file, &name, Access::Write)?;
        let storage: Arc<dyn Storage> = Arc::new(Unsynced(FileStorage::new(file, &self.tmp)));
        let err = |e: cowimg_formats::Error| Error::open(&name, e.into());
        let image: Arc<dyn Image> = match format {
            Format::Qcow2 => Arc::new(
                Qcow2::open(
                    storage,
                    qcow2::OpenOptions {
                        writable: true,
                        ..Default::default()
                    },
                )
                .map_err(err)?,
            ),
            Format::Qed => Arc::new(Qed::open(storage, true).map_err(err)?),
            Format::Raw => Arc::new(Raw::open(storage, true).map_err(err)?),
        };
        Ok(Layer {
            image,
            filename: name,
            format,
            probed: false,
        })
    }

    /// Syncs the finished temporary file, renames it into place and syncs the directory.
    pub fn persist(mut self) -> Result<()> {
        let f = fs::File::open(&self.tmp)
            .map_err(|e| Error::io(format!("opening '{}'", self.tmp.display()), e))?;
        cowimg_formats::io::fault_point();
        f.sync_all()
            .map_err(|e| Error::io(format!("syncing '{}'", self.tmp.display()), e))?;
        drop(f);
        cowimg_formats::io::fault_point();
        fs::rename(&self.tmp, &self.dst).map_err(|e| {
            Error::io(
                format!("renaming the new image into '{}'", self.dst.display()),
                e,
            )
        })?;
        self.persisted = true;
        cowimg_formats::io::fault_point();
        let dir = self
            .dst
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
