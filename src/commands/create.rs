//! `cowimg create`: new qcow2, QED and raw images, as qemu-img create makes them, with a
//! backing file and cowimg's copy-on-read flag.

use cowimg_formats::qcow2::compress::CompressionType;
use cowimg_formats::{qcow2, qed, BackingRef, Format};

use cowimg::chain::{combine, open_image, parse_format};
use cowimg::error::{Error, Result};
use cowimg::lock::Access;
use cowimg::output::{Existing, Spec};
use cowimg::size::{parse_size, size_arg, SizeError, MAX_SIZE};

/// The arguments of `cowimg create` (`cowimg create --help` says what each flag does).
pub struct Args {
    /// The image.
    pub file: String,
    /// SIZE as given (suffixes allowed); `None` takes the backing file's.
    pub size: Option<String>,
    /// `-f`: the new image's format.
    pub format: Format,
    /// `-b`: the backing file.
    pub backing: Option<String>,
    /// `-F`: its format.
    pub backing_format: Option<String>,
    /// `-o` lists, in order.
    pub options: Vec<String>,
    /// `--cluster-size` as given.
    pub cluster_size: Option<String>,
    /// `--copy-on-read`: record the copy-on-read flag.
    pub copy_on_read: bool,
    /// `-u`: do not open the backing file.
    pub unsafe_backing: bool,
    /// `--force`: replace an existing file.
    pub force: bool,
    /// `-q`: print nothing on success.
    pub quiet: bool,
    /// The command to suggest when FILE exists: this one with `--force`.
    pub retry: String,
}

/// Options of a new image, from `-o` and the friendly flags.
#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    /// The virtual size in bytes.
    pub size: Option<u64>,
    /// `cluster_size=` in bytes.
    pub cluster_size: Option<u64>,
    /// `compat=0.10|1.1` (qcow2 version 2 or 3).
    pub compat: Option<String>,
    /// `lazy_refcounts=on|off`.
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits=`.
    pub refcount_bits: Option<u32>,
    /// `extended_l2=on|off`.
    pub extended_l2: Option<bool>,
    /// `compression_type=zlib|zstd`.
    pub compression_type: Option<CompressionType>,
    /// `table_size=` (QED).
    pub table_size: Option<u32>,
    /// `backing_file=`.
    pub backing_file: Option<String>,
    /// `backing_fmt=`.
    pub backing_fmt: Option<String>,
}

fn on_off(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Error::Usage(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

/// A numeric `-o` value, worded as qemu-img words its option errors; `bytes` when it is a
/// size in bytes (the hint then shows the size forms).
fn number<T: TryFrom<u64>>(key: &str, v: &str, bytes: bool) -> Result<T> {
    let out_of_range =
        || Error::Usage(format!("Value '{v}' is out of range for parameter '{key}'"));
    match parse_size(v) {
        Ok(n) if n <= MAX_SIZE => T::try_from(n).map_err(|_| out_of_range()),
        Ok(_) | Err(SizeError::OutOfRange) => Err(out_of_range()),
        Err(SizeError::Invalid) => {
            let message = format!("Parameter '{key}' expects a size, not '{v}'");
            Err(if bytes {
                Error::Size {
                    message,
                    option: format!("-o {key}="),
                    problem: SizeError::Invalid,
                }
            } else {
                Error::Usage(message)
            })
        }
    }
}

impl ImageOptions {
    /// Applies one `-o` list (`key=value,key=value`) for `format`.
    pub fn apply(&mut self, format: Format, list: &str) -> Result<()> {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, "on"));
            let allowed: &[&str] = match format {
                Format::Qcow2 => &[
                    "size",
                    "cluster_size",
                    "compat",
                    "lazy_refcounts",
                    "refcount_bits",
                    "extended_l2",
                    "compression_type",
                    "backing_file",
                    "backing_fmt",
                    "preallocation",
                    "data_file",
                    "data_file_raw",
                    "encryption",
                    "encrypt.format",
                ],
                Format::Qed => &[
                    "size",
                    "cluster_size",
                    "table_size",
                    "backing_file",
                    "backing_fmt",
                ],
                Format::Raw => &["size", "preallocation"],
            };
            if !allowed.contains(&key) {
                return Err(Error::Usage(format!("Invalid parameter '{key}'")));
            }
            match key {
                "size" => self.size = Some(number(key, value, true)?),
                "cluster_size" => self.cluster_size = Some(number(key, value, true)?),
                "compat" => self.compat = Some(value.to_string()),
                "lazy_refcounts" => self.lazy_refcounts = Some(on_off(key, value)?),
                "refcount_bits" => self.refcount_bits = Some(number(key, value, false)?),
                "extended_l2" => self.extended_l2 = Some(on_off(key, value)?),
                "table_size" => self.table_size = Some(number(key, value, false)?),
                "backing_file" => self.backing_file = Some(value.to_string()),
                "backing_fmt" => self.backing_fmt = Some(value.to_string()),
                "compression_type" => {
                    self.compression_type = Some(CompressionType::from_name(value).ok_or_else(|| {
                        Error::Usage(format!("Parameter 'compression_type' does not accept value '{value}'"))
                    })?)
                }
                "preallocation" if value == "off" => {}
                "data_file_raw" if value == "off" => {}
                "preallocation" | "data_file" | "data_file_raw" | "encryption" | "encrypt.format" => {
                    return Err(Error::Usage(format!(
                        "cowimg does not create images with '{key}={value}' (use qemu-img create for that)"
                    )))
                }
                _ => unreachable!("filtered by the allowed list"),
            }
        }
        Ok(())
    }

    /// The creation spec for `format` with virtual size `size`.
    pub fn spec(
        &self,
        format: Format,
        size: u64,
        backing: Option<BackingRef>,
        copy_on_read: bool,
    ) -> Result<Spec> {
        Ok(match format {
            Format::Qcow2 => {
                let v2 = match self.compat.as_deref() {
                    None | Some("1.1") | Some("v3") => false,
                    Some("0.10") | Some("v2") => true,
                    Some(c) => {
                        return Err(Error::Usage(format!("Invalid compatibility level: '{c}'")))
                    }
                };
                let d = qcow2::create::Options::default();
                Spec::Qcow2(qcow2::create::Options {
                    size,
                    cluster_size: self.cluster_size.unwrap_or(d.cluster_size),
                    v2,
                    lazy_refcounts: self.lazy_refcounts.unwrap_or(false),
                    refcount_bits: self.refcount_bits.unwrap_or(16),
                    extended_l2: self.extended_l2.unwrap_or(false),
                    compression: self.compression_type.unwrap_or(CompressionType::Zlib),
                    backing,
                    copy_on_read,
                })
            }
            Format::Qed => {
                let d = qed::create::Options::default();
                Spec::Qed(qed::create::Options {
                    size,
                    cluster_size: self.cluster_size.unwrap_or(d.cluster_size),
                    table_size: self.table_size.unwrap_or(d.table_size),
                    backing,
                    copy_on_read,
                })
            }
            Format::Raw => {
                if backing.is_some() {
                    return Err(Error::Usage("raw images cannot have a backing file".into()));
                }
                if copy_on_read {
                    return Err(Error::Usage(
                        "raw images cannot carry the copy-on-read flag".into(),
                    ));
                }
                Spec::Raw { size }
            }
        })
    }
}

/// The line qemu-img create prints.
fn formatting_line(file: &str, spec: &Spec, o: &ImageOptions) -> String {
    match spec {
        Spec::Qcow2(q) => {
            let mut s = format!(
                "Formatting '{file}', fmt=qcow2 cluster_size={} extended_l2={} compression_type={} size={}",
                q.cluster_size,
                if q.extended_l2 { "on" } else { "off" },
                q.compression.name(),
                q.size
            );
            if let Some(c) = &o.compat {
                s += &format!(" compat={c}");
            }
            if let Some(b) = &q.backing {
                s += &format!(" backing_file={}", b.name);
                if let Some(f) = &b.format {
                    s += &format!(" backing_fmt={f}");
                }
            }
            s += &format!(
                " lazy_refcounts={} refcount_bits={}",
                if q.lazy_refcounts { "on" } else { "off" },
                q.refcount_bits
            );
            if q.copy_on_read {
                s += " copy_on_read=on";
            }
            s
        }
        Spec::Qed(q) => {
            let mut s = format!("Formatting '{file}', fmt=qed size={}", q.size);
            if let Some(b) = &q.backing {
                s += &format!(" backing_file={}", b.name);
                if let Some(f) = &b.format {
                    s += &format!(" backing_fmt={f}");
                }
            }
            s += &format!(" cluster_size={}", q.cluster_size);
            if o.table_size.is_some() {
                s += &format!(" table_size={}", q.table_size);
            }
            if q.copy_on_read {
                s += " copy_on_read=on";
            }
            s
        }
        Spec::Raw { size } => format!("Formatting '{file}', fmt=raw size={size}"),
    }
}

/// Runs `cowimg create`; returns the exit status.
pub fn run(a: &Args) -> Result<i32> {
    let ctx = |e: Error| Error::In {
        file: a.file.clone(),
        source: Box::new(e),
    };
    let mut o = ImageOptions::default();
    for list in &a.options {
        o.apply(a.format, list).map_err(ctx)?;
    }
    if let Some(cs) = &a.cluster_size {
        o.cluster_size =
            Some(size_arg("cluster size (--cluster-size)", "--cluster-size", cs).map_err(ctx)?);
    }
    let backing_name = a.backing.clone().or(o.backing_file.clone());
    let backing_format = a.backing_format.clone().or(o.backing_fmt.clone());
    let mut size = match &a.size {
        Some(s) => Some(size_arg("image size", "SIZE", s)?),
        None => o.size,
    };
    let backing = match backing_name {
        None => None,
        Some(name) => {
            let full = combine(&a.file, &name);
            if std::fs::canonicalize(&full)
                .ok()
                .is_some_and(|p| std::fs::canonicalize(&a.file).ok() == Some(p))
                || full == a.file
            {
                return Err(ctx(Error::Msg(
                    "Error: Trying to create an image with the same filename as the backing file"
                        .into(),
                )));
            }
            if !a.unsafe_backing || size.is_none() {
                let fmt = backing_format
                    .as_deref()
                    .map(parse_format)
                    .transpose()
                    .map_err(ctx)?;
                let layer = open_image(&full, fmt, Access::ReadShared)
                    .map_err(|e| ctx(Error::Msg(format!("{e}\nCould not open backing image."))))?;
                if backing_format.is_none() {
                    return Err(ctx(Error::Msg(format!(
                        "Backing file specified without backing format\nDetected format of {}; pass -F {} if that is right.",
                        layer.format, layer.format
                    ))));
                }
                size = size.or(Some(layer.size()));
            } else if backing_format.is_none() {
                return Err(ctx(Error::Msg(
                    "Backing file specified without backing format".into(),
                )));
            }
            Some(BackingRef {
                name,
                format: backing_format.clone(),
            })
        }
    };
    let size =
        size.ok_or_else(|| ctx(Error::Usage("Image creation needs a size parameter".into())))?;
    let spec = o
        .spec(a.format, size, backing, a.copy_on_read)
        .map_err(ctx)?;
    spec.validate().map_err(ctx)?;
    let existing = if a.force {
        Existing::Replace
    } else {
        Existing::Refuse { retry: &a.retry }
    };
    cowimg::output::create(&a.file, &spec, existing)?;
    // qemu-img prints this line before creating; after success it never precedes an error.
    if !a.quiet {
        println!("{}", formatting_line(&a.file, &spec, &o));
    }
    Ok(0)
}
