//! Compressed clusters: raw deflate ("zlib" in qemu's terms) and zstd.
//!
//! A compressed cluster occupies whole 512-byte sectors on disk, so the bytes read may carry
//! padding after the end of the stream: decoding stops once a full cluster is produced.

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }

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
    let mut d = flate2::Decompress::new(false);
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
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| Error::io("starting zstd", e))?;
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
        CompressionType::Zlib => {
            // Raw deflate with a 4 KiB window, as qemu writes (window bits -12).
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(input.len());
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => out,
                Ok(_) => return Ok(None),
                Err(e) => return Err(Error::io("deflate", std::io::Error::other(e))),
            }
        }
        CompressionType::Zstd => {
            zstd::bulk::compress(input, 0).map_err(|e| Error::io("zstd compression", e))?
        }
    };
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

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[], &mut out).is_err());
    }
}
