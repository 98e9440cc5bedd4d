//! Format detection by magic, as qemu probes: qcow2 and QED by their magic, formats cowimg
//! does not handle named so that they are refused by name, and raw for everything else.

use crate::io::Storage;
use crate::util::be32;
use crate::{Error, Format, Result};

/// What the first bytes of a file say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probed {
    /// A format cowimg reads (raw when nothing else matches).
    Known(Format),
    /// A format qemu knows and cowimg does not read (named as qemu names it).
    Other(&'static str),
}

/// Probes the first sector of `s`.
pub fn probe(s: &dyn Storage) -> Result<Probed> {
    let mut b = [0u8; 512];
    s.read_at(&mut b, 0)
        .map_err(|e| Error::io("reading the first sector", e))?;
    Ok(probe_bytes(&b))
}

/// Probes a file's first sector.
///
/// ```
/// use cowimg_formats::probe::{probe_bytes, Probed};
/// use cowimg_formats::Format;
///
/// let mut sector = [0u8; 512];
/// assert_eq!(probe_bytes(&sector), Probed::Known(Format::Raw));
/// sector[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
/// assert_eq!(probe_bytes(&sector), Probed::Known(Format::Qcow2));
/// ```
pub fn probe_bytes(b: &[u8; 512]) -> Probed {
    let starts = |m: &[u8]| b.starts_with(m);
    if starts(b"QFI\xfb") {
        return match be32(b, 4) {
            1 => Probed::Other("qcow"),
            _ => Probed::Known(Format::Qcow2),
        };
    }
    if starts(b"QED\0") {
        return Probed::Known(Format::Qed);
    }
    let others: [(&[u8], &'static str); 9] = [
        (b"KDMV", "vmdk"),
        (b"COWD", "vmdk"),
        (b"# Disk DescriptorFile", "vmdk"),
        (b"vhdxfile", "vhdx"),
        (b"conectix", "vpc"),
        (b"LUKS\xba\xbe", "luks"),
        (b"WithoutFreeSpace", "parallels"),
        (b"WithouFreSpacExt", "parallels"),
        (b"Bochs Virtual HD Image", "bochs"),
    ];
    for (magic, name) in others {
        if starts(magic) {
            return Probed::Other(name);
        }
    }
    if u32::from_le_bytes([b[0x40], b[0x41], b[0x42], b[0x43]]) == 0xbeda_107f {
        return Probed::Other("vdi");
    }
    if starts(b"#!/bin/sh\n#V2.0 Format\n") {
        return Probed::Other("cloop");
    }
    Probed::Known(Format::Raw)
}
