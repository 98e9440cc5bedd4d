#!/usr/bin/env bash
# Compares the size of `convert -c` outputs (zlib and zstd) of cowimg and qemu-img on a
# realistic input: a 2 GiB ext4 image holding ~700 MiB of this machine's /usr/bin,
# /usr/share/{doc,man,locale}, Python's library and /etc (text and binaries), made with
# `mke2fs -d`. Needs qemu-img, mke2fs and ~4 GB of $TMPDIR; takes about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
COWIMG="$PWD/target/release/cowimg"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/stage/usr/share" "$dir/stage/usr/lib"
cp -a /usr/bin "$dir/stage/usr/" 2>/dev/null || true
cp -a /usr/share/doc /usr/share/man /usr/share/locale "$dir/stage/usr/share/" 2>/dev/null || true
cp -a /usr/lib/python3* "$dir/stage/usr/lib/" 2>/dev/null || true
cp -a /etc "$dir/stage/" 2>/dev/null || true
echo "input: $(du -sh "$dir/stage" | cut -f1) of files in a 2 GiB ext4 image"
truncate -s 2G "$dir/root.raw"
mke2fs -q -t ext4 -d "$dir/stage" "$dir/root.raw"
rm -rf "$dir/stage"
for kind in zlib zstd; do
  qemu-img convert -c -O qcow2 -o compression_type=$kind "$dir/root.raw" "$dir/q.qcow2"
  "$COWIMG" convert -c -O qcow2 -o compression_type=$kind "$dir/root.raw" "$dir/c.qcow2"
  qemu-img compare -q "$dir/root.raw" "$dir/c.qcow2"
  q=$(stat -c %s "$dir/q.qcow2")
  c=$(stat -c %s "$dir/c.qcow2")
  awk -v k=$kind -v q="$q" -v c="$c" 'BEGIN { printf "%s: qemu-img %d bytes, cowimg %d bytes (%+.2f%%)\n", k, q, c, (c - q) * 100 / q }'
done
