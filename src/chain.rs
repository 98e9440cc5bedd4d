//! Opening images and their backing chains, and reading guest data through a chain.
//!
//! Safety rules (DESIGN.md): backing names resolve against the directory of the image that
//! names them; a recorded backing format is obeyed (a raw image is never re-read as another
//! format); a missing format is probed by magic, and the layer says so; loops and chains
//! with more than [`MAX_DEPTH`] images are refused; every file is locked as QEMU locks it.

use std::collections::HashSet;
use std::fs;
use std::io::Seek;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cowimg_formats::probe::{probe, Probed};
use cowimg_formats::qcow2;
use cowimg_formats::{Alloc, FileStorage, Format, Image, ReadBelow, Storage};

use crate::error::{BackingProblem, Error, Result};
use crate::lock::{self, Access};
use crate::remote::http::{is_http_url, HttpStorage};
use crate::remote::NbdStorage;

/// The most images a chain may have (the top included). qemu has no fixed limit: it opens
/// layers until the process runs out of file descriptors (under the default soft limit of
/// 1024, `qemu-img convert` of a 2000-deep chain fails "Too many open files" near layer 985;
/// `info --backing-chain`, one image at a time, reads 10,001). cowimg bounds what a mistaken
/// or hostile chain can cost (a descriptor, tables and a cache per layer, and a walk through
/// every layer for each unallocated range) at a depth far beyond real chains, and says so.
pub const MAX_DEPTH: usize = 4096;

/// Raises the soft limit on open files towards the hard one so that a chain of
/// [`MAX_DEPTH`] images (each with a possible external data file) can be opened: the default
/// soft limit (1024) would otherwise fail such chains with "Too many open files". Best
/// effort: without a higher hard limit the open fails later, naming the layer.
pub fn raise_descriptor_limit() {
    let want = (2 * MAX_DEPTH + 64) as libc::rlim_t;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// One image of a chain.
#[derive(Clone)]
pub struct Layer {
    /// The open image.
    pub image: Arc<dyn Image>,
    /// The name qemu shows: as given for the top, the combined path for backing files.
    pub filename: String,
    /// Its format.
    pub format: Format,
    /// The format was detected from the file's magic, not given or recorded.
    pub probed: bool,
}

impl Layer {
    /// Its virtual size.
    pub fn size(&self) -> u64 {
        self.image.virtual_size()
    }
}

/// How to open a chain.
#[derive(Clone, Copy, Debug)]
pub struct OpenOptions {
    /// Format of the top image (`-f`); probed when absent.
    pub format: Option<Format>,
    /// Access to the top image.
    pub access: Access,
    /// Open the backing files too.
    pub backing: bool,
    /// Share everything on the backing files as well (`-U`).
    pub force_share: bool,
    /// Copy-on-read, as asked explicitly (`--copy-on-read`, or a consumer using the image as
    /// its disk): reads of guest data copy what comes from the backing chain into the top,
    /// which is then opened read-write. The image's own flag does not turn this on: commands
    /// that inspect or copy out never modify their inputs.
    pub copy_on_read: bool,
}

impl OpenOptions {
    /// For reading, with the backing files; `force_share`: `-U`.
    pub fn read(format: Option<Format>, force_share: bool) -> Self {
        OpenOptions {
            format,
            access: if force_share {
                Access::ReadShared
            } else {
                Access::Read
            },
            backing: true,
            force_share,
            copy_on_read: false,
        }
    }

    /// For writing the top image, with the backing files read.
    pub fn write(format: Option<Format>) -> Self {
        OpenOptions {
            format,
            access: Access::Write,
            backing: true,
            force_share: false,
            copy_on_read: false,
        }
    }
}

/// An image and its backing files, top first.
pub struct Chain {
    /// The images, top first: `layers[0]` is the one named, each next one the backing file
    /// of the one before.
    pub layers: Vec<Layer>,
    /// Set when reads copy backing data into the top (copy-on-read asked for at open).
    cor: Option<CopyOnRead>,
    /// The network counter's value up to which [`Chain::network_since`] has answered.
    network_seen: AtomicU64,
}

/// Copy-on-read state: fills are serialised (two readers must never allocate the same
/// cluster twice), and committed in batches and when the chain is finished.
struct CopyOnRead {
    lock: Mutex<u64>,
}

/// Staged copy-on-read bytes after which a commit makes them durable.
const COR_COMMIT_BYTES: u64 = 256 << 20;

/// qemu's `path_has_protocol`: a colon before any slash ("nbd:", "http://", "json:").
fn has_protocol(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name.as_bytes()[i] == b':')
}

/// qemu's backing name resolution: relative to the directory of the image naming it.
pub fn combine(backed: &str, backing: &str) -> String {
    // Absolute names and protocol names ("nbd://host/x") stand as they are, as in qemu's
    // bdrv_get_full_backing_filename_from_filename.
    if backing.starts_with('/') || has_protocol(backing) {
        return backing.to_string();
    }
    match backed.rfind('/') {
        Some(i) => format!("{}{}", &backed[..=i], backing),
        None => backing.to_string(),
    }
}

/// Opens one image file with the given (or probed) format and locks it.
pub fn open_image(filename: &str, format: Option<Format>, access: Access) -> Result<Layer> {
    open_image_for(filename, format, access, false)
}

/// As [`open_image`]; with `repair`, the image is opened to be checked and repaired, which a
/// qcow2 image with the corrupt bit allows (as qemu-img check -r does).
pub fn open_image_for(
    filename: &str,
    format: Option<Format>,
    access: Access,
    repair: bool,
) -> Result<Layer> {
    if let Some(target) = cowimg_nbd::Target::parse(filename) {
        let target = target.map_err(|e| Error::open(filename, Error::Msg(e)))?;
        // Not locked: NBD has no locks; the server decides who may write.
        let storage = NbdStorage::open(&target, access.writable())
            .map_err(|e| Error::open(filename, Error::Msg(e.to_string())))?;
        // qemu shows an export by its canonical name.
        let name = target.to_string();
        let layer = open_layer(Arc::new(storage), &name, format, access.writable(), repair)
            .map_err(|e| rename_open_error(e, &name, filename))?;
        if access.writable() && layer.format != Format::Raw {
            // A write that allocates would fail halfway (qemu's fails the same way, later).
            return Err(Error::open(
                filename,
                Error::Msg(format!(
                    "cowimg writes {fmt} images only in files: they grow at their end as \
                     clusters are allocated, and an NBD export has a fixed size. Serve the file \
                     as {fmt} (`qemu-nbd -f {fmt} FILE`) and name the export as raw, or work on \
                     the file itself",
                    fmt = layer.format
                )),
            ));
        }
        return Ok(layer);
    }
    if is_http_url(filename) {
        // Not locked: a web server has no locks, and the layer is only ever read.
        let storage = HttpStorage::open(filename, access.writable())
            .map_err(|e| Error::open(filename, Error::Msg(e.brief())))?;
        return open_layer(Arc::new(storage), filename, format, false, repair);
    }
    if has_protocol(filename) {
        return Err(Error::open(
            filename,
            Error::Msg(
                "protocols other than NBD and HTTP(S) (json:, ftp:...) are not supported; name a local file, an nbd:// export or an http(s):// URL".into(),
            ),
        ));
    }
    let meta =
        fs::metadata(filename).map_err(|e| Error::open(filename, Error::Msg(os_text(&e))))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(Error::open(filename, Error::Msg("Is a directory".into())));
    }
    if !ft.is_file() && !ft.is_block_device() {
        return Err(Error::open(
            filename,
            Error::Msg("not a regular file or block device".into()),
        ));
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .write(access.writable())
        .open(filename)
        .map_err(|e| Error::open(filename, Error::Msg(os_text(&e))))?;
    // qemu sizes a file by seeking to its end. A pseudo-file that cannot say how long it is
    // (procfs: /proc/self/mem) is refused as qemu refuses it, never read as an empty image,
    // just as character devices are refused above.
    if let Err(e) = (&file).seek(std::io::SeekFrom::End(0)) {
        return Err(Error::open(
            filename,
            Error::Msg(format!(
                "Could not refresh total sector count: {}",
                os_text(&e)
            )),
        ));
    }
    lock::lock(&file, filename, access).map_err(|e| Error::open(filename, e))?;
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file, filename));
    open_layer(storage, filename, format, access.writable(), repair)
}

/// An open error names the image as the user gave it, not by its canonical name.
fn rename_open_error(e: Error, canonical: &str, given: &str) -> Error {
    match e {
        Error::Open { path, reason } if path == canonical => Error::Open {
            path: given.to_string(),
            reason,
        },
        e => e,
    }
}

/// Opens an image held by any [`Storage`] (tests put recording or failing storage under the
/// formats this way); the format is probed when not given.
pub fn open_layer(
    storage: Arc<dyn Storage>,
    filename: &str,
    format: Option<Format>,
    writable: bool,
    repair: bool,
) -> Result<Layer> {
    let (format, probed) = match format {
        Some(f) => (f, false),
        None => match probe(&*storage).map_err(|e| Error::open(filename, e.into()))? {
            Probed::Known(f) => (f, true),
            Probed::Other(name) => {
                return Err(Error::open(
                    filename,
                    Error::Msg(format!(
                        "image format '{name}' is not supported by cowimg (qcow2, qed and raw are)"
                    )),
                ))
            }
        },
    };
    // qemu opens the data file by the name as recorded: a relative name is relative
    // to the working directory, not to the image (as `qemu-img create -o data_file=`
    // creates it). Resolving it against the image would read another file than qemu.
    // (Only qcow2 images have one.)
    let opener = |name: &str| -> cowimg_formats::Result<Arc<dyn Storage>> {
        let path = name.to_string();
        let io = |e: std::io::Error| {
            cowimg_formats::Error::Invalid(format!(
                "Could not open data file '{path}': {}",
                os_text(&e)
            ))
        };
        let file = fs::OpenOptions::new().read(true).open(&path).map_err(io)?;
        let kind = file.metadata().map_err(io)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(cowimg_formats::Error::invalid(format!(
                "the external data file '{path}' is not a regular file or block device"
            )));
        }
        Ok(Arc::new(FileStorage::new(file, path)))
    };
    let opts = qcow2::OpenOptions {
        writable,
        data_file: Some(&opener),
        repair,
    };
    let image =
        cowimg_formats::open(storage, format, opts).map_err(|e| Error::open(filename, e.into()))?;
    Ok(Layer {
        image,
        filename: filename.to_string(),
        format,
        probed,
    })
}

/// The text of an OS error without Rust's "(os error N)" suffix, as qemu words it.
pub fn os_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// qemu's protocol drivers that qemu also accepts as a backing format (`-F file`): the file's
/// bytes are the disk, exactly as with raw; only `info` names them differently.
pub fn is_protocol_format(name: &str) -> bool {
    matches!(name, "file" | "host_device" | "host_cdrom")
}

/// Parses a format name given on the command line or recorded in an image.
pub fn parse_format(name: &str) -> Result<Format> {
    Format::from_name(name).ok_or_else(|| {
        Error::Usage(format!(
            "Unknown file format '{name}' (cowimg handles qcow2, qed and raw)"
        ))
    })
}

impl Chain {
    /// A chain of layers opened by the caller (top first), e.g. over test storage.
    pub fn from_layers(layers: Vec<Layer>) -> Chain {
        Chain {
            layers,
            cor: None,
            network_seen: AtomicU64::new(0),
        }
    }

    /// As [`Chain::from_layers`], with reads copying what the backing chain provides into the
    /// top, as its copy-on-read flag asks (tests run copy-on-read over recording storage so).
    pub fn from_layers_copy_on_read(layers: Vec<Layer>) -> Chain {
        Chain {
            layers,
            cor: Some(CopyOnRead {
                lock: Mutex::new(0),
            }),
            network_seen: AtomicU64::new(0),
        }
    }

    /// The chain as it reads once the top's backing file is layer `base` (the chain's
    /// length for none): the layers in between are left out, so that dropping the old chain
    /// closes their files and connections. Copy-on-read stays on while a backing file is left.
    /// The top (and every kept layer) is the same open image, shared.
    pub fn rebased(&self, base: usize) -> Chain {
        let mut layers = vec![self.layers[0].clone()];
        layers.extend(self.layers.iter().skip(base.max(1)).cloned());
        let cor = (self.cor.is_some() && layers.len() > 1).then(|| CopyOnRead {
            lock: Mutex::new(0),
        });
        let chain = Chain {
            layers,
            cor,
            network_seen: AtomicU64::new(0),
        };
        // What the layers read before is not this chain's to charge.
        chain
            .network_seen
            .store(chain.transferred(), Ordering::Relaxed);
        chain
    }

    /// Opens `filename` (a path, or an `nbd://` / `http(s)://` name) and, with
    /// `opts.backing`, its backing files, each locked as `opts` says.
    pub fn open(filename: &str, opts: OpenOptions) -> Result<Chain> {
        let mut top = open_image(filename, opts.format, opts.access)?;
        let mut cor = None;
        if opts.copy_on_read && opts.access == Access::ReadShared {
            return Err(Error::Usage(
                "--copy-on-read writes into the image, which -U (force-share) forbids: drop one of them"
                    .into(),
            ));
        }
        if opts.copy_on_read && top.image.backing().is_some() {
            if opts.access != Access::Write {
                // Reopen for writing; the read-only descriptor goes first, or its own locks
                // would look like another process's.
                let format = Some(top.format);
                drop(top);
                top = open_image(filename, format, Access::Write)?;
            }
            cor = Some(CopyOnRead {
                lock: Mutex::new(0),
            });
        }
        let mut chain = Chain {
            layers: vec![top],
            cor,
            network_seen: AtomicU64::new(0),
        };
        if opts.backing {
            chain.open_backing(if opts.force_share {
                Access::ReadShared
            } else {
                Access::Read
            })?;
        }
        Ok(chain)
    }

    /// Opens the backing files below the current bottom layer, with `access`, as
    /// [`Chain::open`] does (safety rules, locks); a backing file that cannot be opened is
    /// an error naming the image above it.
    pub fn open_backing(&mut self, access: Access) -> Result<()> {
        let mut seen: HashSet<PathBuf> = self
            .layers
            .iter()
            .filter_map(|l| canonical(&l.filename))
            .collect();
        loop {
            let cur = self.layers.last().expect("a chain has a top");
            let Some(backing) = cur.image.backing() else {
                return Ok(());
            };
            let full = combine(&cur.filename, &backing.name);
            let wrap = |problem, e: Error| Error::Backing {
                image: cur.filename.clone(),
                problem,
                reason: Box::new(e),
            };
            if self.layers.len() >= MAX_DEPTH {
                return Err(wrap(BackingProblem::Other, Error::Msg(format!(
                    "the backing chain has more than {MAX_DEPTH} images (cowimg's limit; qemu has none but its open-file limit)"
                ))));
            }
            if let Some(c) = canonical(&full) {
                if !seen.insert(c) {
                    return Err(wrap(
                        BackingProblem::Loop,
                        Error::Msg(format!(
                            "'{full}' is already in the chain above: the backing files form a loop"
                        )),
                    ));
                }
            }
            let format = match backing.format.as_deref() {
                Some(f) if is_protocol_format(f) => Some(Format::Raw),
                Some(f) => Some(Format::from_name(f).ok_or_else(|| {
                    wrap(
                        BackingProblem::Other,
                        Error::Msg(format!(
                            "the recorded backing format '{f}' is not supported by cowimg"
                        )),
                    )
                })?),
                None => None,
            };
            let layer = open_image(&full, format, access).map_err(|e| {
                // Not there at all (rather than there but unusable): a new pointer is the fix.
                let gone = !has_protocol(&full)
                    && fs::metadata(&full).is_err_and(|m| {
                        matches!(m.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
                    });
                let problem = if gone {
                    BackingProblem::Missing
                } else {
                    BackingProblem::Other
                };
                wrap(problem, e)
            })?;
            self.layers.push(layer);
        }
    }

    /// Bytes the chain's remote layers have read over the network so far
    /// ([`cowimg_formats::Storage::transferred`]).
    pub fn transferred(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.image.storage().transferred())
            .sum()
    }

    /// The network bytes read since the last call (by anyone reading these layers: the
    /// copy's workers, a server's clients), each counted once however many threads ask: what
    /// a rate cap on the network is charged.
    pub fn network_since(&self) -> u64 {
        let now = self.transferred();
        now.saturating_sub(self.network_seen.fetch_max(now, Ordering::Relaxed))
    }

    /// The image named.
    pub fn top(&self) -> &Layer {
        &self.layers[0]
    }

    /// The guest disk's size: the top image's.
    pub fn size(&self) -> u64 {
        self.top().size()
    }

    /// Guest data of the top image. With copy-on-read, whatever the top does not hold is
    /// first copied into it, whole allocation units at a time.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.cor.is_some() {
            self.copy_on_read(offset, offset + buf.len() as u64)?;
        }
        self.read_from(0, offset, buf)
    }

    /// Copies what the backing chain provides for `[offset, offset + len)` into the top
    /// without reading it out (NBD_CMD_CACHE), when reads copy on read; else nothing to do.
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        // In pieces: a fill holds one piece of backing data in memory at a time.
        const PIECE: u64 = 4 << 20;
        let end = offset.saturating_add(len).min(self.size());
        let mut pos = offset;
        while pos < end {
            let next = end.min(pos + PIECE);
            self.copy_on_read(pos, next)?;
            pos = next;
        }
        Ok(())
    }

    /// Whether reads copy backing data into the top.
    pub fn copies_on_read(&self) -> bool {
        self.cor.is_some()
    }

    fn copy_on_read(&self, start: u64, end: u64) -> Result<()> {
        let Some(cor) = &self.cor else { return Ok(()) };
        let top = self.top();
        let unit = top.image.allocation_unit().max(512);
        let size = top.size();
        let (a, b) = (
            start / unit * unit,
            end.div_ceil(unit).saturating_mul(unit).min(size),
        );
        if a >= b {
            return Ok(());
        }
        let err = |e| Error::image(&top.filename, e);
        let mut staged = cor.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock: what another reader filled meanwhile is allocated now.
        let runs = top.image.map(a, b - a).map_err(err)?;
        let below = self.below(0);
        for r in runs.iter().filter(|r| r.alloc == Alloc::Unallocated) {
            // Only what the backing chain provides; ranges nothing below holds read zeros
            // either way and are not worth metadata.
            let mut from_below = Vec::new();
            crate::blockstatus::status(
                self,
                1,
                r.start,
                r.end().min(self.layers[1].size()).max(r.start),
                &mut from_below,
            )?;
            for e in from_below.iter().filter(|e| e.present) {
                // Entries follow the backing layer's clusters: widen to the top's units.
                let (s0, e0) =
                    crate::extent::widen_range(e.start, e.start + e.length, unit, r.end());
                if top
                    .image
                    .map(s0, e0 - s0)
                    .map_err(err)?
                    .iter()
                    .all(|x| x.alloc != Alloc::Unallocated)
                {
                    continue;
                }
                let mut data = vec![0u8; (e0 - s0) as usize];
                self.read_from(1, s0, &mut data)?;
                // Conditional: a client write (serve) may have allocated part of the range
                // since the map above; the fill must never replace its data.
                *staged += top.image.fill_unallocated(s0, &data, &below).map_err(err)?;
            }
        }
        if *staged >= COR_COMMIT_BYTES {
            top.image.commit().map_err(err)?;
            *staged = 0;
        }
        Ok(())
    }

    /// Writes guest data into the top image (opened with [`OpenOptions::write`]); a partial
    /// cluster is completed from the layers below. Staged until [`Chain::commit`].
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let top = self.top();
        top.image
            .write(offset, data, &self.below(0))
            .map_err(|e| Error::image(&top.filename, e))
    }

    /// Makes what was written into the top image durable, in crash-safe order.
    pub fn commit(&self) -> Result<()> {
        let top = self.top();
        top.image
            .commit()
            .map_err(|e| Error::image(&top.filename, e))
    }

    /// Makes copy-on-read fills durable; call when done reading.
    pub fn finish(&self) -> Result<()> {
        if self.cor.is_some() {
            let top = self.top();
            top.image
                .commit()
                .map_err(|e| Error::image(&top.filename, e))?;
        }
        Ok(())
    }

    /// Guest data as layer `i` and those below it read it; zeros past a layer's end.
    pub fn read_from(&self, i: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        // A work list, not recursion: what one layer leaves unallocated is read from the next,
        // and a chain thousands of layers deep must not grow a worker thread's stack.
        let mut todo: Vec<(usize, u64, &mut [u8])> = vec![(i, offset, buf)];
        while let Some((i, offset, buf)) = todo.pop() {
            let Some(layer) = self.layers.get(i) else {
                buf.fill(0);
                continue;
            };
            let img = &*layer.image;
            let size = img.virtual_size();
            let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
            let (mut rest, past) = buf.split_at_mut(inside);
            past.fill(0);
            if inside == 0 {
                continue;
            }
            let err = |e| Error::image(&layer.filename, e);
            let mut pos = offset;
            for run in img.map(offset, inside as u64).map_err(err)? {
                // Runs are sorted and within the range asked for; split off each one's bytes.
                let skip = (run.start - pos) as usize;
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
                let (out, tail) = tail.split_at_mut(run.len as usize);
                rest = tail;
                pos = run.start + run.len;
                match run.alloc {
                    Alloc::Data { host } => img.read_host(host, out).map_err(err)?,
                    Alloc::Zero { .. } => out.fill(0),
                    Alloc::Compressed { host, len } => {
                        let cs = img.cluster_size().unwrap_or(512);
                        let mut cluster = vec![0u8; cs as usize];
                        img.read_compressed(host, len, &mut cluster).map_err(err)?;
                        let intra = (run.start % cs) as usize;
                        out.copy_from_slice(&cluster[intra..intra + run.len as usize]);
                    }
                    Alloc::Unallocated => todo.push((i + 1, run.start, out)),
                }
            }
        }
        Ok(())
    }

    /// A reader of the whole chain: what an overlay of its top reads where it holds nothing.
    pub fn whole(&self) -> Below<'_> {
        Below {
            chain: self,
            from: 0,
        }
    }

    /// A reader of what lies below layer `i`.
    pub fn below(&self, i: usize) -> Below<'_> {
        Below {
            chain: self,
            from: i + 1,
        }
    }

    /// The layer whose image file is `path` (compared by resolved path; an NBD name by the
    /// export it designates, whichever form names it).
    pub fn find(&self, path: &str) -> Option<usize> {
        if let Some(target) = cowimg_nbd::Target::parse(path) {
            let name = target.ok()?.to_string();
            return self.layers.iter().position(|l| l.filename == name);
        }
        let want = canonical(path)?;
        self.layers
            .iter()
            .position(|l| canonical(&l.filename).as_ref() == Some(&want))
    }
}

/// Reads the chain from a given layer down (for completing partial clusters).
pub struct Below<'a> {
    chain: &'a Chain,
    from: usize,
}

impl ReadBelow for Below<'_> {
    fn read_below(&self, offset: u64, buf: &mut [u8]) -> cowimg_formats::Result<()> {
        self.chain
            .read_from(self.from, offset, buf)
            .map_err(|e| match e {
                Error::Image { source, .. } => source,
                other => cowimg_formats::Error::Invalid(other.to_string()),
            })
    }
}

/// The identity of a layer's name: the resolved path of a file, the URL itself for an
/// http(s) layer (so that a loop of URLs is caught and `--base URL` finds its layer).
fn canonical(path: &str) -> Option<PathBuf> {
    if is_http_url(path) {
        return Some(PathBuf::from(path));
    }
    fs::canonicalize(Path::new(path)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_against_the_naming_image() {
        assert_eq!(combine("sub/ov.qcow2", "../base.raw"), "sub/../base.raw");
        assert_eq!(combine("ov.qcow2", "base.raw"), "base.raw");
        assert_eq!(combine("/a/b/c.qcow2", "/abs/base"), "/abs/base");
        assert_eq!(combine("/a/b/c.qcow2", "d/e"), "/a/b/d/e");
        assert_eq!(combine("a/b.qcow2", "nbd://host/x"), "nbd://host/x");
    }

    #[test]
    fn protocols_are_recognised_like_qemu() {
        assert!(has_protocol("nbd://host/x"));
        assert!(has_protocol("json:{}"));
        assert!(!has_protocol("dir/with:colon"));
        assert!(!has_protocol("plain.qcow2"));
    }
}
