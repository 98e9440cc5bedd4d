#!/bin/bash
# Benchmark row (issue 16): convert of a 2 GiB image holding 1 GiB of random data (128 runs
# of 8 MiB, one every 16 MiB) into a fresh `nbdkit memory 2G` export on a Unix socket, cowimg
# against nbdcopy and qemu-img convert -n. Each run gets a new export; the tools alternate,
# one warm-up round, then ROUNDS counted rounds; the first counted run of each tool is checked
# with `qemu-img compare` (a fast wrong copy cannot pass). Prints one line per run and the
# medians. Needs nbdkit, nbdcopy, qemu-img, qemu-nbd, bc; cowimg built with
# `cargo build --release`.
#
#     benches/nbd_destination.sh [DIR [ROUNDS]]     # DIR defaults to /dev/shm/cowimg-nbd-bench
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-/dev/shm/cowimg-nbd-bench}
rounds=${2:-5}
cowimg=$repo/target/release/cowimg
[ -x "$cowimg" ] || { echo "build cowimg first: cargo build --release" >&2; exit 2; }
mkdir -p "$dir"
cd "$dir"
if [ ! -e src.qcow2 ]; then
    truncate -s 2G src.raw
    for i in $(seq 0 127); do
        dd if=/dev/urandom of=src.raw bs=8M count=1 seek=$((i * 2)) conv=notrunc status=none
    done
    qemu-img convert -f raw -O qcow2 src.raw src.qcow2
fi
sock=$dir/m.sock
url="nbd+unix:///?socket=$sock"

# One timed copy by tool $1 into a new export; $2 = 1 to check the result.
run() {
    rm -f "$sock"
    nbdkit -f -U "$sock" memory 2G &
    local srv=$!
    for _ in $(seq 250); do [ -S "$sock" ] && break; sleep 0.02; done
    sync
    local s e
    s=$(date +%s.%N)
    case $1 in
        cowimg) "$cowimg" convert -n src.qcow2 "$url" ;;
        cowimg-target-is-zero) "$cowimg" convert -n --target-is-zero src.qcow2 "$url" ;;
        nbdcopy) nbdcopy src.raw "$url" ;;
        nbdcopy-from-qemu-nbd) nbdcopy -- [ qemu-nbd -r -f qcow2 src.qcow2 ] "$url" ;;
        qemu-img) qemu-img convert -n -f qcow2 -O raw src.qcow2 "$url" ;;
        qemu-img-W-m16) qemu-img convert -n -W -m 16 -f qcow2 -O raw src.qcow2 "$url" ;;
    esac
    e=$(date +%s.%N)
    if [ "$2" = 1 ] && ! qemu-img compare -q src.qcow2 "$url"; then
        echo "FAILED: $1 wrote a different disk" >&2
        kill "$srv"
        exit 1
    fi
    kill "$srv"
    wait "$srv" 2>/dev/null || true
    echo "$1 $(echo "$e - $s" | bc)"
}

tools="cowimg nbdcopy nbdcopy-from-qemu-nbd qemu-img qemu-img-W-m16 cowimg-target-is-zero"
for t in $tools; do run "$t" 0 >/dev/null; done # warm-up
: >times.txt
for r in $(seq "$rounds"); do
    for t in $tools; do run "$t" $([ "$r" = 1 ] && echo 1 || echo 0) | tee -a times.txt; done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - <<'PY'
import collections, statistics
d = collections.defaultdict(list)
for line in open("times.txt"):
    tool, secs = line.split()
    d[tool].append(float(secs))
for tool, v in d.items():
    print(f"{tool:24} median {statistics.median(v):.2f} s   runs " + " ".join(f"{x:.2f}" for x in sorted(v)))
PY
