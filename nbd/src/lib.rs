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
//! * [`server`]: the transmission side for `cowimg serve`: exports backed by a [`server::Backend`],
//!   every client request checked before it reaches the backend.
//!
//! ```
//! use cowimg_nbd::codec::{cmd, Request};
//! use cowimg_nbd::{Address, Target};
//!
//! // qemu's URL forms, parsed in one place.
//! let t = Target::parse("nbd+unix:///disk?socket=/run/nbd.sock").unwrap().unwrap();
//! assert_eq!(t.export, "disk");
//! assert_eq!(t.address, Address::Unix("/run/nbd.sock".into()));
//! let legacy = Target::parse("nbd:unix:/run/nbd.sock:exportname=disk").unwrap().unwrap();
//! assert_eq!(legacy, t);
//!
//! // A request header, as sent and as decoded.
//! let r = Request { flags: 0, kind: cmd::READ, cookie: 7, offset: 1 << 20, len: 512 << 10 };
//! assert_eq!(Request::decode(&r.encode()).unwrap(), r);
//! ```

#![warn(missing_docs)]

pub mod client;
pub mod codec;
pub mod server;
pub mod url;

pub use client::{Client, ExportInfo};
pub use url::{Address, Target};
