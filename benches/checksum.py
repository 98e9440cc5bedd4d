#!/usr/bin/env python3
"""Benchmark rows for `cowimg checksum` (docs/benchmarks.md#checksum).

    python3 benches/checksum.py [--dir /tmp/cowimg-bench-checksum] [--size 1G]

Builds (once, cached under --dir) a raw disk of --size pseudo-random bytes and its qcow2
copy, and a 1 TiB qcow2 (and sparse raw) holding --size of data in 1 MiB extents spread over
the whole disk. Times, one run each after a warm read (page cache):

    sha256sum DISK.raw   vs   cowimg checksum DISK.raw / DISK.qcow2
    cowimg checksum on the 1 TiB images

and checks every digest: raw and qcow2 agree, and the small disk's digest equals the Python
reference's (tests/tools/blkhash.py). Prints Markdown rows (wall s, CPU s = user+sys of the
child). Needs qemu-img, sha256sum and a release build (`cargo build --release`). Takes well
under a minute on 2 cores after the fixtures exist.
"""

import argparse
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COWIMG = os.path.join(REPO, "target", "release", "cowimg")
MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


def parse_size(s):
    units = {"M": MiB, "G": GiB}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def timed(cmd):
    """Runs cmd; returns (stdout, wall seconds, child CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out, wall, cpu


def digest(out):
    return out.split()[0]


def build(d, size):
    os.makedirs(d, exist_ok=True)
    raw, qcow2 = os.path.join(d, "disk.raw"), os.path.join(d, "disk.qcow2")
    big_raw, big = os.path.join(d, "big.raw"), os.path.join(d, "big.qcow2")
    stamp = os.path.join(d, f"stamp-{size}")
    if not os.path.exists(stamp):
        print(f"building fixtures in {d} ...", file=sys.stderr)
        # Random bytes, not a fixed seed: the rows check digests against each other and
        # against the reference, never against recorded values.
        with open(raw, "wb") as f:
            for _ in range(size // (64 * MiB)):
                f.write(os.urandom(64 * MiB))
        with open(big_raw, "wb") as f:
            f.truncate(TiB)
            step = TiB // (size // MiB)
            for i in range(size // MiB):
                f.seek(i * step)
                f.write(os.urandom(MiB))
        for src, dst in ((raw, qcow2), (big_raw, big)):
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", src, dst], check=True)
        open(stamp, "w").close()
    return raw, qcow2, big_raw, big


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/cowimg-bench-checksum")
    p.add_argument("--size", default="1G")
    a = p.parse_args()
    size = parse_size(a.size)
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=REPO, check=True)
    raw, qcow2, big_raw, big = build(a.dir, size)
    for f in (raw, qcow2, big):
        subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)  # warm

    rows = []
    ok = True
    ref = digest(subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "tools", "blkhash.py"), raw],
        check=True, capture_output=True, text=True).stdout)
    out, wall_sha, cpu_sha = timed(["sha256sum", raw])
    rows.append((f"{a.size} raw, random data", "sha256sum", wall_sha, cpu_sha, "-", "peer"))
    for name, img, extra in (
        (f"{a.size} raw, random data", raw, []),
        (f"{a.size} raw, random data", raw, ["--jobs", "1"]),
        (f"{a.size} qcow2, random data", qcow2, []),
    ):
        out, wall, cpu = timed([COWIMG, "checksum", *extra, img])
        good = digest(out) == ref
        ok &= good
        tool = "cowimg checksum " + " ".join(extra)
        rows.append((name, tool.strip(), wall, cpu, f"{wall_sha / wall:.1f}x",
                     "ok" if good else "FAILED (digest)"))
    digests = []
    for name, img in (("1 TiB qcow2 holding " + a.size, big),
                      ("1 TiB sparse raw holding " + a.size, big_raw)):
        out, wall, cpu = timed([COWIMG, "checksum", img])
        digests.append(digest(out))
        rows.append((name, "cowimg checksum", wall, cpu, "-", "ok"))
    if digests[0] != digests[1]:
        ok = False
        rows[-1] = rows[-1][:5] + ("FAILED (qcow2 and raw differ)",)

    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print()
    print("| disk | tool | wall s | CPU s | faster than sha256sum | result |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]} | {r[5]} |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
