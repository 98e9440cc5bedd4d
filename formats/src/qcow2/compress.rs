//! Compressed clusters: raw deflate ("zlib" in qemu's terms) and zstd.
//!
//! A compressed cluster occupies whole 512-byte sectors on disk, so the bytes read may carry
//! padding after the end of the stream: decoding stops once a full cluster is produced.
//!
//! Every (de)compressor keeps one context per thread: making a fresh one for each cluster
//! costs an allocation and a table wipe of several hundred KiB, which profiling showed to be
//! a sixth of `convert -c` with zstd.

use std::cell::RefCell;

use crate::{Error, Result};

thread_local! {
    static INFLATE: RefCell<Option<flate2::Decompress>> = const { RefCell::new(None) };
    static DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
    static UNZSTD: RefCell<Option<zstd::stream::raw::Decoder<'static>>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// The compression of a qcow2 image's compressed clusters (its header's compression type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (the default, and the only type of v2 images).
    Zlib,
    /// Zstandard (qcow2 v3 with the compression type incompatible feature).
    Zstd,
}

impl CompressionType {
    /// The name qemu gives it (`compression_type=`, info's `compression type`).
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }

    /// The type qemu names `name` (`compression_type=`); `None` for names it does not know.
    pub fn from_name(name: &str) -> Option<CompressionType> {
        match name {
            "zlib" => Some(CompressionType::Zlib),
            "zstd" => Some(CompressionType::Zstd),
            _ => None,
        }
    }

    /// The type a header's compression type byte names (0 zlib, 1 zstd; the header is
    /// validated when the image opens).
    pub fn from_header(t: u8) -> CompressionType {
        if t == 1 {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        }
    }
}

/// Decompresses `input` into all of `out`.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    INFLATE.with_borrow_mut(|slot| {
        let d = slot.get_or_insert_with(|| flate2::Decompress::new(false));
        d.reset(false);
        inflate_with(d, input, out)
    })
}

fn inflate_with(d: &mut flate2::Decompress, input: &[u8], out: &mut [u8]) -> Result<()> {
    let status = d.decompress(input, out, flate2::FlushDecompress::Finish);
    match status {
        Ok(_) if d.total_out() as usize == out.len() => Ok(()),
        Ok(_) => Err(Error::Corrupt(format!(
            "compressed cluster inflates to {} bytes, expected {}",
            d.total_out(),
            out.len()
        ))),
        Err(e) => Err(Error::Corrupt(format!(
            "compressed cluster does not inflate: {e}"
        ))),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{Decoder, Operation};
    UNZSTD.with_borrow_mut(|slot| {
        let dec = match slot {
            Some(d) => {
                d.reinit().map_err(|e| Error::io("restarting zstd", e))?;
                d
            }
            None => slot.insert(Decoder::new().map_err(|e| Error::io("starting zstd", e))?),
        };
        unzstd_with(dec, input, out)
    })
}

fn unzstd_with(
    dec: &mut zstd::stream::raw::Decoder<'static>,
    input: &[u8],
    out: &mut [u8],
) -> Result<()> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    while outb.pos() < outb.capacity() {
        let before = (inb.pos(), outb.pos());
        let hint = dec.run(&mut inb, &mut outb).map_err(|e| {
            Error::Corrupt(format!("compressed cluster does not decode (zstd): {e}"))
        })?;
        if hint == 0 || (inb.pos(), outb.pos()) == before {
            break;
        }
    }
    if outb.pos() != outb.capacity() {
        return Err(Error::Corrupt(format!(
            "compressed cluster decodes to {} bytes, expected {}",
            outb.pos(),
            outb.capacity()
        )));
    }
    Ok(())
}

/// Compresses one cluster. Returns `None` when the result would not be smaller than the
/// cluster (it is then stored uncompressed, as qemu does).
pub fn compress(kind: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let limit = input.len() - 1;
    let out = match kind {
        CompressionType::Zlib => DEFLATE.with_borrow_mut(|slot| {
            // Raw deflate with a 4 KiB window, as qemu writes (window bits -12).
            let c = slot.get_or_insert_with(|| {
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12)
            });
            c.reset();
            let mut out = Vec::with_capacity(input.len());
            let r = match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => return Ok(Some(out)),
                Ok(_) => Ok(None),
                Err(e) => Err(Error::io("deflate", std::io::Error::other(e))),
            };
            // A stream cut short (the cluster does not shrink) is not reused: zlib-rs 0.6
            // panics when a reset context had pending output left.
            *slot = None;
            r
        })?,
        CompressionType::Zstd => ZSTD.with_borrow_mut(|slot| {
            let c = match slot {
                Some(c) => c,
                // Level 0: zstd's default (3), as qemu uses.
                None => slot.insert(
                    zstd::bulk::Compressor::new(0).map_err(|e| Error::io("starting zstd", e))?,
                ),
            };
            c.compress(input)
                .map(Some)
                .map_err(|e| Error::io("zstd compression", e))
        })?,
    };
    let Some(out) = out else { return Ok(None) };
    Ok((out.len() <= limit).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_sector_padding() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(kind, &data).unwrap().expect("compressible");
            c.resize(c.len().div_ceil(512) * 512, 0xee);
            let mut out = vec![0u8; 65536];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    /// The per-thread contexts must come back clean after every outcome: a cluster that
    /// does not shrink, a corrupt input, then good data again.
    #[test]
    fn contexts_are_reused_after_every_outcome() {
        let mut x = 0x1234_5678u32;
        let mut noise = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect()
        };
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            for len in [4096, 65536, 4096] {
                let text: Vec<u8> = (0..len).map(|i| b"cowimg "[i % 7]).collect();
                for _ in 0..3 {
                    assert!(compress(kind, &noise(len)).unwrap().is_none());
                    // Nearly incompressible: the stream may run out of room mid-block.
                    for mask in [0x7f, 0x3f, 0xfe, 0xff] {
                        let mut mixed: Vec<u8> = noise(len).iter().map(|b| b & mask).collect();
                        mixed[len / 2..].copy_from_slice(&text[len / 2..]);
                        if let Some(c) = compress(kind, &mixed).unwrap() {
                            let mut out = vec![0u8; len];
                            decompress(kind, &c, &mut out).unwrap();
                            assert_eq!(out, mixed);
                        }
                    }
                    let mut out = vec![0u8; len];
                    assert!(decompress(kind, &[0xff; 64], &mut out).is_err());
                    let c = compress(kind, &text).unwrap().expect("compressible");
                    decompress(kind, &c, &mut out).unwrap();
                    assert_eq!(out, text);
                }
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[], &mut out).is_err());
    }
}
