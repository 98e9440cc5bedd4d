#!/usr/bin/env python3
"""Accuracy of a live speed change (issue 18): `cowimg stream --speed OLD` on an overlay over
a base holding SIZE of data, `cowimg job set-speed NEW` after a few seconds, then the rate
achieved over the next WINDOW seconds from two `job query` samples, against NEW.

    python3 benches/job_speed.py                      # 2 GiB, 20M -> 50M, 10 s window
    python3 benches/job_speed.py --old 50M --new 10M  # a lower cap

Python 3 standard library; needs qemu-img and qemu-io; builds cowimg with cargo unless
--cowimg names a binary. Prints one Markdown table row per run."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchlib import MiB, add_cowimg_arg, cowimg, size


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G", help="data in the base (default 2G)")
    ap.add_argument("--old", default="20M", help="initial --speed (default 20M)")
    ap.add_argument("--new", default="50M", help="the cap set while it runs (default 50M)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds before set-speed")
    ap.add_argument("--window", type=float, default=10.0, help="seconds measured after it")
    ap.add_argument("--runs", type=int, default=3)
    add_cowimg_arg(ap)
    a = ap.parse_args()
    cow = cowimg(a)
    new = size(a.new)
    total = size(a.size)
    need = size(a.old) * a.settle + new * (a.window + 1)
    if total < need:
        sys.exit(f"--size {a.size} ends before the window does: give at least {int(need) >> 20}M")
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, XDG_RUNTIME_DIR=d)
        run = lambda *c: subprocess.run(c, cwd=d, env=env, check=True, capture_output=True, text=True)
        run("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", str(total))
        piece = 512 * MiB  # qemu-io takes at most 2 GiB per request
        cmds = [a for off in range(0, total, piece)
                for a in ("-c", f"write -P 0x5c {off} {min(piece, total - off)}")]
        run("qemu-io", *cmds, "base.qcow2")
        print(f"| run | --speed | set-speed | window s | copied in window | achieved MiB/s | error vs new cap |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for i in range(1, a.runs + 1):
            for f in ("top.qcow2",):
                if os.path.exists(os.path.join(d, f)):
                    os.unlink(os.path.join(d, f))
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
            job = subprocess.Popen([cow, "stream", "--speed", a.old, "--job-id", "bench", "top.qcow2"],
                                   cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                query = lambda: json.loads(run(cow, "job", "query", "--output", "json", "bench").stdout)
                deadline = time.time() + 20
                while True:
                    try:
                        query()
                        break
                    except subprocess.CalledProcessError:
                        if time.time() > deadline:
                            sys.exit("the job never listened")
                        time.sleep(0.02)
                time.sleep(a.settle)
                run(cow, "job", "set-speed", "bench", a.new)
                t0, q0 = time.monotonic(), query()
                time.sleep(a.window)
                t1, q1 = time.monotonic(), query()
                copied = q1["copied"] - q0["copied"]
                rate = copied / (t1 - t0)
                print(f"| {i} | {a.old} | {a.new} | {t1 - t0:.2f} | {copied >> 20} MiB | {rate / MiB:.2f} "
                      f"| {100 * (rate - new) / new:+.2f}% |", flush=True)
                run(cow, "job", "cancel", "bench")
            finally:
                job.kill()
                job.wait()


if __name__ == "__main__":
    main()
