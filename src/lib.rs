//! cowimg: a qemu-img-like tool for QEMU disk images, built around copy-on-read and image
//! streaming. The on-disk formats live in the `cowimg-formats` crate; this crate holds
//! backing chains, the copy engine and the jobs; the command line (its parsing and the
//! commands that print) lives in the binary.
//!
//! # A snapshot test on a golden fixture
//!
//! A test gets a throw-away overlay over a golden image in a temporary directory, writes
//! through it, and asserts on what the disk now holds: its [`checksum`](checksum::checksum)
//! (format-independent, the same as `cowimg checksum` and `blksum` print), and the ranges
//! where it differs from the golden image ([`diff`](diff::diff), as `cowimg compare --diff`).
//! docs/golden-fixtures.md walks through it.
//!
//! ```
//! use cowimg::chain::{Chain, OpenOptions};
//! use cowimg::checksum::{checksum, Options};
//! use cowimg::blockstatus;
//! use cowimg::diff::{diff, Range, Side};
//! use cowimg::output::create_overlay;
//! use cowimg_formats::Format;
//!
//! # fn main() -> cowimg::Result<()> {
//! let dir = tempfile::tempdir().expect("temp dir");
//! let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
//!
//! // The golden fixture: 1 MiB of 'G', then 1 MiB of zeros (a test suite keeps it as a file).
//! std::fs::write(path("golden.raw"), [vec![b'G'; 1 << 20], vec![0; 1 << 20]].concat())
//!     .expect("golden fixture");
//!
//! // A qcow2 overlay over it (cowimg create -f qcow2 -b golden.raw -F raw test.qcow2).
//! create_overlay(&path("test.qcow2"), "golden.raw", Format::Raw)?;
//!
//! // The test writes through the overlay; the golden file is never modified.
//! let test = Chain::open(&path("test.qcow2"), OpenOptions::write(None))?;
//! test.write(4096, b"changed")?;
//! test.write(1 << 20, &[0x5a; 512])?;
//! test.commit()?;
//!
//! // Where the disk now differs from the golden one: whole 512-byte sectors, merged.
//! let golden = Chain::open(&path("golden.raw"), OpenOptions::read(None, false))?;
//! let d = diff(&golden, &test, None)?;
//! assert_eq!(
//!     d.ranges,
//!     [
//!         Range { offset: 4096, length: 512, a: Side::Data, b: Side::Data },
//!         Range { offset: 1 << 20, length: 512, a: Side::Zero, b: Side::Data },
//!     ]
//! );
//!
//! // The digest of the whole disk: compare with a recorded value, or with the digest of a
//! // reference image in any format (here: the golden disk with the same two writes).
//! let mut want = [vec![b'G'; 1 << 20], vec![0; 1 << 20]].concat();
//! want[4096..4103].copy_from_slice(b"changed");
//! want[1 << 20..(1 << 20) + 512].fill(0x5a);
//! std::fs::write(path("want.raw"), want).expect("reference");
//! let want = Chain::open(&path("want.raw"), OpenOptions::read(None, false))?;
//! let sum = checksum(&test, &Options::default())?;
//! assert_eq!(sum, checksum(&want, &Options::default())?);
//! assert_eq!(sum.hex().len(), 64); // sha256
//!
//! // The overlay's own layout, for a snapshot: what it holds and what shows through.
//! let layout: Vec<_> = blockstatus::entries(&test, 0, test.size())?
//!     .iter()
//!     .map(|e| format!("{} +{} depth {} data {}", e.start, e.length, e.depth, e.data))
//!     .collect();
//! insta::assert_debug_snapshot!(layout, @r#"
//! [
//!     "0 +65536 depth 0 data true",
//!     "65536 +983040 depth 1 data true",
//!     "1048576 +65536 depth 0 data true",
//!     "1114112 +983040 depth 1 data true",
//! ]
//! "#);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod blockstatus;
pub mod chain;
pub mod checksum;
pub mod commit;
pub mod compare;
pub mod copy;
pub mod diff;
pub mod error;
pub mod extent;
pub mod job;
pub mod lock;
pub mod output;
pub mod progress;
pub mod ratelimit;
pub mod remote;
pub mod resize;
pub mod serve;
pub mod size;
pub mod stream;

pub use error::{Error, Result};
