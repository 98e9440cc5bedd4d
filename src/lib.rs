//! cowimg: a qemu-img-like tool for QEMU disk images, built around copy-on-read and image
//! streaming. The on-disk formats live in the `cowimg-formats` crate; this crate holds
//! backing chains, the copy engine, and the commands.

pub mod chain;
pub mod checksum;
pub mod commands;
pub mod commit;
pub mod copy;
pub mod diff;
pub mod error;
pub mod lock;
pub mod output;
pub mod progress;
pub mod ratelimit;
pub mod resize;
pub mod size;
pub mod stream;

pub use error::{Error, Result};
