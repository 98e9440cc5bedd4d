//! The writing engine's data-safety rules, driven through the library: entries decoded as
//! qemu decodes them, cost bounded by what is allocated, leaks of a killed run reclaimed,
//! concurrent writes of any ranges, and no write lost when an image is dropped.

mod common;
use common::Scratch;

use cowimg::chain::{Chain, OpenOptions};

fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// A refcount table entry has no flag bits: bits 56-63 are part of the offset. An entry with
/// them set names a block far past the end of the file (qemu-img check: "refcount block 0 is
/// outside image"), and the writer must see the same block, not the one the low bits name.
#[test]
fn refcount_table_entries_keep_their_high_bits() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "img", "1M"]);
    let mut bytes = s.read_file("img");
    let table = be64(&bytes, 48) as usize;
    let entry = be64(&bytes, table) | (1 << 56);
    bytes[table..table + 8].copy_from_slice(&entry.to_be_bytes());
    s.write_file("img", &bytes);
    let r = s.run("qemu-img", &["check", "img"]);
    assert!(
        r.stderr.contains("refcount block 0 is outside image"),
        "{}",
        r.stderr
    );

    let path = s.path("img").to_string_lossy().into_owned();
    let chain = Chain::open(&path, OpenOptions::write(None)).expect("open for writing");
    let img = &chain.top().image;
    let result = img
        .write(0, &[7u8; 65536], &chain.below(0))
        .and_then(|()| img.commit());
    let err = result.expect_err("a write through a refcount block outside the image must fail");
    assert!(
        err.to_string().contains("refcount block 0"),
        "the error names the block: {err}"
    );
    drop(chain);
    assert_eq!(s.read_file("img"), bytes, "nothing was written");
}
