//! `cowimg info`: qemu-img info's fields, JSON keys and human layout, plus cowimg's own
//! (`copy-on-read`, and the format of a backing file that had to be probed).

use serde_json::{json, Map, Value};

use cowimg_formats::probe::{probe, Probed};
use cowimg_formats::qcow2::Qcow2Details;
use cowimg_formats::{Details, FileStorage, Format};

use cowimg::chain::{combine, is_protocol_format, Chain, Layer, OpenOptions};
use cowimg::error::{Error, Result};
use cowimg::size::size_to_str;

/// The arguments of `cowimg info` (`cowimg info --help` says what each flag does).
pub struct Args {
    /// The image.
    pub file: String,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// `--backing-chain`: every image of the chain.
    pub backing_chain: bool,
    /// JSON output (`--output json`).
    pub json: bool,
    /// `-U`: read an image another process may be writing.
    pub force_share: bool,
}

/// Everything `info` says of one image.
struct Facts<'a> {
    layer: &'a Layer,
    /// The format of the backing file when it had to be probed (only known with the chain).
    probed_backing: Option<Format>,
    file_length: u64,
    /// Space the file takes; `None` where the protocol cannot tell (NBD).
    actual_size: Option<u64>,
    /// The protocol driver under the format (`file`, `nbd`).
    storage_protocol: &'static str,
    /// The layer was opened as the protocol driver its overlay names as its format (`file`,
    /// `host_device`): qemu shows it as that protocol node, without a child.
    protocol: Option<String>,
}

/// Runs `cowimg info`; returns the exit status.
pub fn run(a: &Args) -> Result<i32> {
    let mut opts = OpenOptions::read(a.format, a.force_share);
    opts.backing = a.backing_chain;
    let chain = Chain::open(&a.file, opts)?;
    let mut facts = Vec::new();
    for (i, layer) in chain.layers.iter().enumerate() {
        let storage = layer.image.storage();
        let err = |e| Error::io(format!("reading the size of '{}'", layer.filename), e);
        facts.push(Facts {
            layer,
            probed_backing: match chain.layers.get(i + 1) {
                Some(b) => b.probed.then_some(b.format),
                None => probe_backing(layer),
            },
            file_length: storage.len().map_err(err)?,
            actual_size: match storage.allocated_bytes() {
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => None,
                r => Some(r.map_err(err)?),
            },
            storage_protocol: storage.protocol(),
            protocol: i
                .checked_sub(1)
                .and_then(|up| chain.layers[up].image.backing())
                .and_then(|b| b.format)
                .filter(|f| is_protocol_format(f)),
        });
    }
    if a.json {
        let values: Vec<Value> = facts.iter().map(to_json).collect();
        let out = if a.backing_chain {
            Value::Array(values)
        } else {
            values.into_iter().next().expect("top")
        };
        println!("{}", super::pretty_json(&out));
    } else {
        let blocks: Vec<String> = facts.iter().map(to_human).collect();
        print!("{}", blocks.join("\n"));
    }
    Ok(0)
}

/// The format a backing file that the image does not record a format for is detected as,
/// when `info` does not open the chain: its first sector is probed (as opening the chain
/// would), so the plain view also says that the format was guessed. A backing file that
/// cannot be read is left out, as qemu-img info leaves it.
fn probe_backing(layer: &Layer) -> Option<Format> {
    let backing = layer.image.backing().filter(|b| b.format.is_none())?;
    let full = combine(&layer.filename, &backing.name);
    let file = std::fs::File::open(&full).ok()?;
    let kind = file.metadata().ok()?.file_type();
    if !kind.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&kind) {
        return None;
    }
    match probe(&FileStorage::new(file, &full)).ok()? {
        Probed::Known(f) => Some(f),
        Probed::Other(_) => None,
    }
}

/// What qemu shows of a protocol node: the file itself.
fn protocol_json(f: &Facts, driver: &str) -> Value {
    json!({
        "children": [],
        "virtual-size": f.file_length.div_ceil(512) * 512,
        "filename": f.layer.filename,
        "format": driver,
        "actual-size": f.actual_size,
        "format-specific": {"type": driver, "data": {}},
        "dirty-flag": false
    })
}

fn to_json(f: &Facts) -> Value {
    if let Some(driver) = &f.protocol {
        return protocol_json(f, driver);
    }
    let img = &f.layer.image;
    let mut m = Map::new();
    let child = if f.storage_protocol == "file" {
        json!({
            "children": [],
            "virtual-size": f.file_length.div_ceil(512) * 512,
            "filename": f.layer.filename,
            "format": "file",
            "actual-size": f.actual_size,
            "format-specific": {"type": "file", "data": {}},
            "dirty-flag": false
        })
    } else {
        // qemu's network protocols report neither space used nor format-specific facts.
        json!({
            "children": [],
            "virtual-size": f.file_length,
            "filename": f.layer.filename,
            "format": f.storage_protocol
        })
    };
    m.insert("children".into(), json!([{"name": "file", "info": child}]));
    if let Details::Qcow2(d) = img.details() {
        if !d.snapshots.is_empty() {
            let snaps: Vec<Value> = d
                .snapshots
                .iter()
                .map(|s| {
                    let mut o = Map::new();
                    if let Some(ic) = s.icount {
                        o.insert("icount".into(), json!(ic));
                    }
                    o.insert(
                        "vm-clock-nsec".into(),
                        json!(s.vm_clock_nsec % 1_000_000_000),
                    );
                    o.insert("name".into(), json!(s.name));
                    o.insert("date-sec".into(), json!(s.date_sec));
                    o.insert("date-nsec".into(), json!(s.date_nsec));
                    o.insert(
                        "vm-clock-sec".into(),
                        json!(s.vm_clock_nsec / 1_000_000_000),
                    );
                    o.insert("id".into(), json!(s.id));
                    o.insert("vm-state-size".into(), json!(s.vm_state_size));
                    Value::Object(o)
                })
                .collect();
            m.insert("snapshots".into(), Value::Array(snaps));
        }
    }
    let backing = img.backing();
    if let Some(fmt) = backing.as_ref().and_then(|b| b.format.clone()) {
        m.insert("backing-filename-format".into(), json!(fmt));
    }
    m.insert("virtual-size".into(), json!(img.virtual_size()));
    m.insert("filename".into(), json!(f.layer.filename));
    if let Some(cs) = img.cluster_size() {
        m.insert("cluster-size".into(), json!(cs));
    }
    m.insert("format".into(), json!(f.layer.format.name()));
    if let Some(a) = f.actual_size {
        m.insert("actual-size".into(), json!(a));
    }
    if let Details::Qcow2(d) = img.details() {
        m.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": qcow2_json(&d)}),
        );
    }
    if let Some(b) = &backing {
        m.insert(
            "full-backing-filename".into(),
            json!(combine(&f.layer.filename, &b.name)),
        );
        m.insert("backing-filename".into(), json!(b.name));
        if let Some(p) = f.probed_backing {
            m.insert("probed-backing-filename-format".into(), json!(p.name()));
        }
    }
    // qemu learns the dirty flag from the format's own information, which raw has only
    // through a local file.
    if f.storage_protocol == "file" || f.layer.format != Format::Raw {
        m.insert("dirty-flag".into(), json!(img.is_dirty()));
    }
    m.insert("copy-on-read".into(), json!(img.copy_on_read()));
    Value::Object(m)
}

fn qcow2_json(d: &Qcow2Details) -> Value {
    let mut m = Map::new();
    m.insert(
        "compat".into(),
        json!(if d.version >= 3 { "1.1" } else { "0.10" }),
    );
    m.insert("compression-type".into(), json!(d.compression_type));
    if d.version >= 3 {
        m.insert("lazy-refcounts".into(), json!(d.lazy_refcounts));
        if !d.bitmaps.is_empty() {
            let b: Vec<Value> = d
                .bitmaps
                .iter()
                .map(|b| json!({"flags": bitmap_flags(b), "name": b.name, "granularity": b.granularity}))
                .collect();
            m.insert("bitmaps".into(), Value::Array(b));
        }
    }
    m.insert("refcount-bits".into(), json!(d.refcount_bits));
    if d.version >= 3 {
        if let Some(df) = &d.data_file {
            m.insert("data-file".into(), json!(df));
            m.insert("data-file-raw".into(), json!(d.data_file_raw));
        }
        m.insert("corrupt".into(), json!(d.corrupt));
        m.insert("extended-l2".into(), json!(d.extended_l2));
    }
    Value::Object(m)
}

fn bitmap_flags(b: &cowimg_formats::qcow2::Bitmap) -> Vec<&'static str> {
    let mut f = Vec::new();
    if b.in_use {
        f.push("in-use");
    }
    if b.auto {
        f.push("auto");
    }
    f
}

fn to_human(f: &Facts) -> String {
    let img = &f.layer.image;
    let mut o = String::new();
    let size = img.virtual_size();
    o += &format!("image: {}\n", f.layer.filename);
    if let Some(driver) = &f.protocol {
        o += &format!("file format: {driver}\n");
        o += &format!("virtual size: {} ({size} bytes)\n", size_to_str(size));
        o += &format!("disk size: {}\n", disk_size(f.actual_size));
        return o;
    }
    o += &format!("file format: {}\n", f.layer.format);
    o += &format!("virtual size: {} ({size} bytes)\n", size_to_str(size));
    o += &format!("disk size: {}\n", disk_size(f.actual_size));
    if let Some(cs) = img.cluster_size() {
        o += &format!("cluster_size: {cs}\n");
    }
    if img.is_dirty() {
        o += "cleanly shut down: no\n";
    }
    if let Some(b) = img.backing() {
        let full = combine(&f.layer.filename, &b.name);
        o += &format!("backing file: {}", b.name);
        if full != b.name {
            o += &format!(" (actual path: {full})");
        }
        o += "\n";
        match (&b.format, f.probed_backing) {
            (Some(fmt), _) => o += &format!("backing file format: {fmt}\n"),
            (None, Some(p)) => {
                o += &format!("backing file format: {p} (probed: the image does not record it)\n")
            }
            (None, None) => {}
        }
    }
    if img.copy_on_read() {
        o += "copy-on-read: on\n";
    }
    if let Details::Qcow2(d) = img.details() {
        o += &snapshot_table(&d.snapshots);
        o += "Format specific information:\n";
        o += &qcow2_human(&d);
    }
    o += "Child node '/file':\n";
    o += &format!("    filename: {}\n", f.layer.filename);
    o += &format!("    protocol type: {}\n", f.storage_protocol);
    let len = if f.storage_protocol == "file" {
        f.file_length.div_ceil(512) * 512
    } else {
        f.file_length
    };
    o += &format!("    file length: {} ({len} bytes)\n", size_to_str(len));
    o += &format!("    disk size: {}\n", disk_size(f.actual_size));
    o
}

/// The disk size as qemu shows it: "unavailable" where the protocol cannot tell.
fn disk_size(actual: Option<u64>) -> String {
    actual.map_or_else(|| "unavailable".into(), size_to_str)
}

fn qcow2_human(d: &Qcow2Details) -> String {
    let mut o = String::new();
    o += &format!(
        "    compat: {}\n",
        if d.version >= 3 { "1.1" } else { "0.10" }
    );
    o += &format!("    compression type: {}\n", d.compression_type);
    if d.version >= 3 {
        o += &format!("    lazy refcounts: {}\n", d.lazy_refcounts);
        if !d.bitmaps.is_empty() {
            o += "    bitmaps:\n";
            for (i, b) in d.bitmaps.iter().enumerate() {
                o += &format!("        [{i}]:\n            flags:\n");
                for (j, flag) in bitmap_flags(b).iter().enumerate() {
                    o += &format!("                [{j}]: {flag}\n");
                }
                o += &format!(
                    "            name: {}\n            granularity: {}\n",
                    b.name, b.granularity
                );
            }
        }
    }
    o += &format!("    refcount bits: {}\n", d.refcount_bits);
    if d.version >= 3 {
        if let Some(df) = &d.data_file {
            o += &format!(
                "    data file: {df}\n    data file raw: {}\n",
                d.data_file_raw
            );
        }
        o += &format!(
            "    corrupt: {}\n    extended l2: {}\n",
            d.corrupt, d.extended_l2
        );
    }
    o
}

/// qcow2's internal snapshots as `qemu-img info` and `qemu-img snapshot -l` list them, column
/// for column; empty when there are none (qemu prints nothing then).
pub(crate) fn snapshot_table(snapshots: &[cowimg_formats::qcow2::snapshot::Snapshot]) -> String {
    if snapshots.is_empty() {
        return String::new();
    }
    let mut o = String::from("Snapshot list:\n");
    o += &format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for s in snapshots {
        let secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (s.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
        o += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            s.id,
            s.name,
            size_to_str(s.vm_state_size),
            local_time(s.date_sec),
            clock,
            icount
        );
    }
    o
}

/// "%Y-%m-%d %H:%M:%S" in local time, as qemu prints snapshot dates.
fn local_time(secs: u32) -> String {
    let t = secs as libc::time_t;
    // SAFETY: localtime_r fills the tm we pass; both pointers are valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&t, &mut tm) };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}
