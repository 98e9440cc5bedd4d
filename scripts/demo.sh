#!/usr/bin/env bash
# Builds cowimg, makes a small A <- B <- C chain with qemu-img/qemu-io in a scratch
# directory, and shows cowimg at work on it.
set -euo pipefail
cd "$(dirname "$0")/.."
# The first build takes about a minute: say so, and let cargo show its progress on stderr
# rather than sitting silent.
echo "building cowimg (first build takes a minute)" >&2
cargo build --release
COWIMG="$PWD/target/release/cowimg"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
qemu-img create -q -f qcow2 A.qcow2 64M
qemu-io -c "write -q -P 0x11 0 4M" A.qcow2
qemu-img create -q -f qcow2 -b A.qcow2 -F qcow2 B.qcow2
qemu-io -c "write -q -P 0x22 1M 1M" -c "write -q -z 3M 512k" B.qcow2
"$COWIMG" create -f qcow2 -b B.qcow2 -F qcow2 --copy-on-read C.qcow2
qemu-io -c "write -q -P 0x33 2M 64k" C.qcow2
qemu-img convert -O raw C.qcow2 before.raw
set -x
"$COWIMG" info --backing-chain C.qcow2
"$COWIMG" map C.qcow2
"$COWIMG" convert -O qcow2 C.qcow2 flat.qcow2     # C is flagged copy-on-read: the read pulls B's and A's clusters into C
"$COWIMG" compare before.raw flat.qcow2
"$COWIMG" stream B.qcow2                          # A <- B <- C becomes B <- C: B is standalone
"$COWIMG" stream --base B.qcow2 C.qcow2 || true   # nothing to do: says so
"$COWIMG" compare before.raw C.qcow2
"$COWIMG" stream --progress json C.qcow2          # C standalone, progress as JSON lines
qemu-img check C.qcow2
"$COWIMG" info C.qcow2
