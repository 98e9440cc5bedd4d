//! NBD (Network Block Device) for cowimg, written from the protocol specification
//! (NetworkBlockDevice/nbd `doc/proto.md`).
//!
//! * [`codec`]: pure encoding and decoding of every message cowimg sends or receives
//!   (handshake, options, requests, simple and structured replies, block status). It does
//!   no I/O, so a server can reuse it and the tests can feed it arbitrary bytes.
//! * [`url`]: the NBD names qemu accepts (`nbd://`, `nbd+unix://`, the legacy `nbd:` forms),
//!   parsed in one place.
//! * [`client`]: a connection to an export, with many requests in flight at once (a reader
//!   thread hands each reply to the request it answers), bounded memory, and every length
//!   the server sends checked before it is trusted.

pub mod client;
pub mod codec;
pub mod server;
pub mod url;

pub use client::{Client, ExportInfo};
pub use url::{Address, Target};
