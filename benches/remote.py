#!/usr/bin/env python3
"""Remote layers over NBD with latency (issue 16): a raw base behind nbdkit's delay filter
(added latency per read request), and

* `cowimg stream` of a qcow2 overlay whose backing file is the NBD export, against
  `qemu-img rebase -b ""` of the same overlay;
* `cowimg convert -O raw` of the export, against `nbdcopy` to a file;

with the time, and the requests and bytes the server saw (nbdkit's stats filter): holes must
not be fetched.

    python3 benches/remote.py                       # 1 GiB virtual, 256 MiB data, 2 ms and 10 ms
    python3 benches/remote.py --data 1G --delays 2ms

The base holds DATA in 8 MiB runs spread over SIZE (the rest holes, which nbdkit's file plugin
reports as such). Each run gets a fresh nbdkit (started and stopped by PID) and a fresh
overlay; every result is checked with `qemu-img compare` against the base. Python 3 standard
library; needs qemu-img, qemu-io, nbdkit and nbdcopy; builds cowimg with cargo unless
--cowimg names a binary. Prints a Markdown table.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30, "TiB": 1 << 40}


def size(s):
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    return int(float(s[:-1]) * units[s[-1]]) if s[-1] in units else int(s)


def sh(*cmd, cwd=None):
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def served_reads(statsfile):
    """(read requests, bytes read) from nbdkit's stats file."""
    text = open(statsfile).read()
    m = re.search(r"^read: (\d+) ops, [\d.]+ s, ([\d.]+) (\w+)", text, re.M)
    if not m:
        return 0, 0
    return int(m.group(1)), int(float(m.group(2)) * UNITS[m.group(3)])


def run_one(d, delay, cmd, prepare):
    """Starts nbdkit, prepares, times `cmd`, stops nbdkit: (seconds, requests, bytes)."""
    sock = os.path.join(d, "base.sock")
    stats = os.path.join(d, "stats.txt")
    for f in (sock, stats):
        if os.path.exists(f):
            os.unlink(f)
    srv = subprocess.Popen(["nbdkit", "-f", "-U", sock, "--filter=stats", "--filter=delay",
                            "file", os.path.join(d, "base.raw"), f"delay-read={delay}",
                            f"statsfile={stats}"], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 20
        while not os.path.exists(sock):
            if srv.poll() is not None or time.time() > deadline:
                sys.exit(f"nbdkit did not listen: {srv.stderr.read().decode()}")
            time.sleep(0.01)
        prepare()
        # What earlier steps left dirty is written back first: else the first sync of a run
        # (cowimg's; an ext4 journal commit) pays for it.
        os.sync()
        t = time.monotonic()
        r = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        elapsed = time.monotonic() - t
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed: {r.stderr}")
    finally:
        srv.terminate()
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
    reqs, nbytes = served_reads(stats)
    return elapsed, reqs, nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="virtual size of the base (default 1G)")
    ap.add_argument("--data", default="256M", help="data in it, in 8 MiB runs (default 256M)")
    ap.add_argument("--delays", default="2ms,10ms", help="nbdkit delay-read values")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool (the median is shown)")
    ap.add_argument("--cowimg", help="the binary (default: cargo build --release)")
    a = ap.parse_args()
    cow = a.cowimg and os.path.abspath(a.cowimg)
    if not cow:
        sh("cargo", "build", "--release", "-q")
        cow = os.path.abspath("target/release/cowimg")
    total, data = size(a.size), size(a.data)
    runs = data // (8 * MiB)
    step = total // runs
    if runs == 0 or step < 8 * MiB:
        sys.exit("--data must be at least 8M and at most --size")
    with tempfile.TemporaryDirectory() as d:
        sh("truncate", "-s", str(total), "base.raw", cwd=d)
        cmds = [x for i in range(runs) for x in ("-c", f"write -P {1 + i % 250} {i * step} 8M")]
        sh("qemu-io", "-f", "raw", *cmds, "base.raw", cwd=d)
        url = f"nbd+unix:///?socket={os.path.join(d, 'base.sock')}"

        def overlay():
            if os.path.exists(os.path.join(d, "ov.qcow2")):
                os.unlink(os.path.join(d, "ov.qcow2"))
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", url, "-F", "raw", "ov.qcow2", cwd=d)

        def no_output():
            if os.path.exists(os.path.join(d, "out.raw")):
                os.unlink(os.path.join(d, "out.raw"))

        rows = [
            ("stream (full) of an overlay", [
                ("cowimg stream", [cow, "stream", "ov.qcow2"], overlay, "ov.qcow2"),
                ('qemu-img rebase -b ""', ["qemu-img", "rebase", "-b", "", "ov.qcow2"], overlay, "ov.qcow2"),
            ]),
            ("convert to a raw file", [
                ("cowimg convert -O raw", [cow, "convert", "-O", "raw", url, "out.raw"], no_output, "out.raw"),
                ("cowimg convert --jobs 16", [cow, "convert", "--jobs", "16", "-O", "raw", url, "out.raw"],
                 no_output, "out.raw"),
                # --flush: the copy is durable at the end, as cowimg's is (it syncs).
                ("nbdcopy --flush", ["nbdcopy", "--flush", url, "out.raw"], no_output, "out.raw"),
            ]),
        ]
        print(f"Base: {total >> 20} MiB raw holding {data >> 20} MiB in {runs} runs of 8 MiB, "
              f"behind nbdkit's delay filter.\n")
        print("| delay | operation | tool | median s | read requests | bytes read | ratio cowimg/peer |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
        for delay in a.delays.split(","):
            for op, tools in rows:
                times = []
                for label, cmd, prepare, result in tools:
                    tries = [run_one(d, delay, cmd, prepare) for _ in range(a.runs)]
                    elapsed = sorted(t[0] for t in tries)[len(tries) // 2]
                    _, reqs, nbytes = tries[-1]
                    fmt = "qcow2" if result.endswith("qcow2") else "raw"
                    c = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", result, "base.raw"],
                                       cwd=d, capture_output=True, text=True)
                    if c.returncode != 0:
                        sys.exit(f"{label}: the result differs from the base: {c.stdout}{c.stderr}")
                    times.append(elapsed)
                    # The peer is the last tool of the row; each cowimg variant against it.
                    ratio = " / ".join(f"**{t / elapsed:.2f}**" for t in times[:-1]) \
                        if label == tools[-1][0] else ""
                    print(f"| {delay} | {op} | {label} | {elapsed:.2f} | {reqs} | {nbytes >> 20} MiB | {ratio} |",
                          flush=True)


if __name__ == "__main__":
    main()
