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

from benchlib import MiB, add_cowimg_arg, check_same, cowimg, sh, size, stop, timed, wait_socket
UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30, "TiB": 1 << 40}


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
        wait_socket(sock, srv, "nbdkit")
        prepare()
        elapsed = timed(cmd, d)
    finally:
        stop(srv)
    reqs, nbytes = served_reads(stats)
    return elapsed, reqs, nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="virtual size of the base (default 1G)")
    ap.add_argument("--data", default="256M", help="data in it, in 8 MiB runs (default 256M)")
    ap.add_argument("--delays", default="2ms,10ms", help="nbdkit delay-read values")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool (the median is shown)")
    add_cowimg_arg(ap)
    a = ap.parse_args()
    cow = cowimg(a)
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
                    check_same(label, result, "base.raw", d)
                    times.append(elapsed)
                    # The peer is the last tool of the row; each cowimg variant against it.
                    ratio = " / ".join(f"**{t / elapsed:.2f}**" for t in times[:-1]) \
                        if label == tools[-1][0] else ""
                    print(f"| {delay} | {op} | {label} | {elapsed:.2f} | {reqs} | {nbytes >> 20} MiB | {ratio} |",
                          flush=True)


if __name__ == "__main__":
    main()
