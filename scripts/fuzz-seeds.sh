#!/usr/bin/env bash
# Makes the seed images of the fuzz targets with qemu-img and qemu-io: small qcow2 and QED
# files (small clusters, so that every table fits in a few KiB) covering the on-disk features.
# Usage: scripts/fuzz-seeds.sh DIR   (the in-tree fuzzer makes the same set in its test)
set -euo pipefail
out=${1:?usage: $0 DIR}
mkdir -p "$out"
cd "$out"
q() { qemu-img "$@" >/dev/null; }
io() { local f=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done; qemu-io -f "$(fmt "$f")" "${a[@]}" "$f" >/dev/null; }
fmt() { case $1 in *.qed) echo qed;; *) echo qcow2;; esac; }
data=("write -q -P 0x11 0 3k" "write -q -z 8k 2k" "write -q -P 0x22 20k 1k")
q create -q -f qcow2 -o cluster_size=512 v3_512.qcow2 64k;            io v3_512.qcow2 "${data[@]}" "write -q -c -P 0x33 32k 512"
q create -q -f qcow2 -o cluster_size=512,compat=0.10 v2_512.qcow2 64k; io v2_512.qcow2 "${data[@]}"
q create -q -f qcow2 -o cluster_size=4k v3_4k.qcow2 256k;              io v3_4k.qcow2 "${data[@]}" "write -q -c -P 0x33 64k 8k"
q create -q -f qcow2 -o cluster_size=16k,extended_l2=on ext_16k.qcow2 256k; io ext_16k.qcow2 "${data[@]}"
q create -q -f qcow2 -o cluster_size=4k,compression_type=zstd zstd.qcow2 64k; io zstd.qcow2 "write -q -c -P 0x44 0 8k" "write -q -P 1 16k 1k"
q create -q -f qcow2 -o cluster_size=512,refcount_bits=1 rc1.qcow2 32k; io rc1.qcow2 "${data[@]}"
q create -q -f qcow2 -o cluster_size=512,refcount_bits=64 rc64.qcow2 32k; io rc64.qcow2 "${data[@]}"
q create -q -f qcow2 -o cluster_size=512,lazy_refcounts=on lazy.qcow2 32k; io lazy.qcow2 "${data[@]}"
q create -q -f qcow2 -o cluster_size=512 snap.qcow2 32k; io snap.qcow2 "write -q -P 5 0 2k"; q snapshot -c s1 snap.qcow2; io snap.qcow2 "write -q -P 6 1k 2k"
q create -q -f qcow2 -o cluster_size=4k bitmap.qcow2 64k; q bitmap --add bitmap.qcow2 b0; io bitmap.qcow2 "write -q -P 7 0 4k"
q create -q -f raw base.raw 64k
q create -q -f qcow2 -o cluster_size=512 -b base.raw -F raw backed.qcow2; io backed.qcow2 "write -q -P 8 1k 1k"
q create -q -f qed -o cluster_size=4k,table_size=1 t1.qed 64k   # qemu cannot open it; cowimg must refuse it cleanly
q create -q -f qed -o cluster_size=4k,table_size=2 t2.qed 1M; io t2.qed "${data[@]}" "write -q -P 9 600k 4k"
q create -q -f qed -o cluster_size=4k -b base.raw -F raw backed.qed; io backed.qed "write -q -P 8 1k 1k"
rm -f base.raw
ls -l
