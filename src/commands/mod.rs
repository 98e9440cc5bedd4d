//! The commands: each parses nothing itself (that is `main`), calls the library, prints, and
//! returns its exit status.

pub mod amend;
pub mod check;
pub mod checksum;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod info;
pub mod job;
pub mod jobs;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod reset;
pub mod resize;
pub mod serve;
pub mod snapshot;
pub mod stream;

use serde::Serialize;
use serde_json::Value;

/// JSON with 4-space indentation, as qemu-img prints it.
pub fn pretty_json(v: &Value) -> String {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser)
        .expect("serialising a Value cannot fail");
    String::from_utf8(out).expect("JSON is UTF-8")
}
