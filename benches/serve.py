#!/usr/bin/env python3
"""`cowimg serve` against `qemu-nbd` on the same image (issue 17): `nbdcopy` reading the whole
export, 4 KiB random reads and writes at queue depth 16 through one connection (libnbd's
asynchronous API), the same reads of an overlay whose backing file is an NBD export 2 ms away
(nbdkit's delay filter), and a client's read latency during `serve --stream`; every server on
a Unix socket, started and stopped by PID by this script.

    python3 benches/serve.py                 # 2 GiB qcow2 holding 2 GiB, 3 rounds
    python3 benches/serve.py --size 512M --rounds 1

Needs qemu-img, qemu-io, qemu-nbd, nbdkit, nbdcopy and Debian's python3-libnbd (this script re-runs
itself under /usr/bin/python3 when the first python3 on PATH lacks the module). Builds cowimg
with cargo unless --cowimg names a binary. Prints Markdown tables.
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

try:
    import nbd
except ImportError:
    if sys.executable != "/usr/bin/python3" and os.path.exists("/usr/bin/python3"):
        os.execv("/usr/bin/python3", ["/usr/bin/python3", *sys.argv])
    sys.exit("needs python3-libnbd (Debian: apt-get install python3-libnbd)")

from benchlib import MiB, add_cowimg_arg, cowimg, sh, size


class Server:
    """One NBD server on `sock`, stopped by PID (SIGTERM, then SIGKILL after 10 s)."""

    def __init__(self, cmd, sock, cwd):
        if os.path.exists(sock):
            os.unlink(sock)
        self.p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 20
        while not os.path.exists(sock):
            if self.p.poll() is not None or time.time() > deadline:
                self.stop()
                sys.exit(f"{cmd[0]} did not listen: {self.p.stderr.read().decode()}")
            time.sleep(0.01)
        self.url = f"nbd+unix:///?socket={sock}"

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def random_io(url, write, seconds, depth=16, block=4096, seed=1):
    """Requests per second of `block`-byte random reads (or writes) with `depth` in flight."""
    h = nbd.NBD()
    h.connect_uri(url)
    blocks = h.get_size() // block
    rng = random.Random(seed)
    # One buffer for every read in flight: the bytes read are not looked at.
    buf = nbd.Buffer(block)
    data = bytearray(os.urandom(block))
    done = 0
    in_flight = 0

    def completed(*_):
        nonlocal done, in_flight
        done += 1
        in_flight -= 1
        return 1

    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        while in_flight < depth:
            off = rng.randrange(blocks) * block
            if write:
                h.aio_pwrite(data, off, completion=completed)
            else:
                h.aio_pread(buf, off, completion=completed)
            in_flight += 1
        h.poll(-1)
    while in_flight > 0:
        h.poll(-1)
    elapsed = time.monotonic() - start
    if write:
        h.flush()
    h.shutdown()
    del buf
    return done / elapsed


def read_latency(url, seconds, block=4096, seed=7):
    """Median and 99th percentile (microseconds) of `block`-byte random reads, one at a time."""
    h = nbd.NBD()
    h.connect_uri(url)
    blocks = h.get_size() // block
    rng = random.Random(seed)
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        off = rng.randrange(blocks) * block
        t = time.perf_counter()
        h.pread(block, off)
        lat.append((time.perf_counter() - t) * 1e6)
    h.shutdown()
    lat.sort()
    return statistics.median(lat), lat[int(len(lat) * 0.99)]


def nbdcopy_read(url):
    t = time.monotonic()
    sh("nbdcopy", url, "null:")
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G", help="virtual size, all of it data (default 2G)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, servers alternating")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per random-I/O run")
    ap.add_argument("--stream-speed", default="100M", help="the stream's cap in the latency row")
    add_cowimg_arg(ap)
    a = ap.parse_args()
    cow = cowimg(a)
    total = size(a.size)
    with tempfile.TemporaryDirectory() as d:
        sh("qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", str(total), cwd=d)
        piece = 512 * MiB
        cmds = [x for off in range(0, total, piece)
                for x in ("-c", f"write -P 0x5c {off} {min(piece, total - off)}")]
        sh("qemu-io", *cmds, "img.qcow2", cwd=d)
        sock = os.path.join(d, "s.sock")
        servers = {
            "cowimg serve": [cow, "serve", "-t", "-k", sock, "img.qcow2"],
            # qemu-nbd's defaults for a qcow2 file, plus what makes it comparable: the
            # same socket, persistent, cache=writeback (cowimg syncs on FLUSH only).
            "qemu-nbd": ["qemu-nbd", "-t", "-k", sock, "-f", "qcow2", "--cache=writeback",
                         "img.qcow2"],
        }
        results = {name: {"nbdcopy": [], "randread": [], "randwrite": []} for name in servers}
        for r in range(a.rounds):
            for name, cmd in servers.items():
                srv = Server(cmd, sock, d)
                try:
                    results[name]["nbdcopy"].append(nbdcopy_read(srv.url))
                    results[name]["randread"].append(random_io(srv.url, False, a.seconds, seed=r))
                    results[name]["randwrite"].append(random_io(srv.url, True, a.seconds, seed=r))
                finally:
                    srv.stop()
                print(f"round {r + 1} {name}: " + ", ".join(
                    f"{k} {v[-1]:.2f}" for k, v in results[name].items()), file=sys.stderr)
        # A client's read latency on an overlay over the image while `serve --stream` copies
        # the image into it at a cap, against the same reads from qemu-nbd serving the same
        # overlay (qemu-nbd has no background stream).
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "img.qcow2", "-F", "qcow2", "ov.qcow2", cwd=d)
        sh("cp", "--sparse=always", "ov.qcow2", "ov-pristine.qcow2", cwd=d)
        latency = {}
        for name, cmd in (
            (f"cowimg serve --stream --speed {a.stream_speed}",
             [cow, "serve", "-t", "-k", sock, "--stream", "--speed", a.stream_speed, "ov.qcow2"]),
            ("qemu-nbd (no stream)", ["qemu-nbd", "-t", "-k", sock, "-f", "qcow2", "--cache=writeback",
                                      "ov.qcow2"]),
        ):
            sh("cp", "--sparse=always", "ov-pristine.qcow2", "ov.qcow2", cwd=d)
            srv = Server(cmd, sock, d)
            try:
                latency[name] = read_latency(srv.url, min(a.seconds, 0.8 * total / size(a.stream_speed)))
            finally:
                srv.stop()
        # Random reads through a backing file that is 2 ms away (nbdkit's delay filter): each
        # request waits on the network, so one connection's requests must run at once.
        sh("truncate", "-s", str(256 * MiB), "remote.raw", cwd=d)
        sh("qemu-io", "-f", "raw", "-c", f"write -P 0x3c 0 {256 * MiB}", "remote.raw", cwd=d)
        base_sock = os.path.join(d, "base.sock")
        nbdkit = Server(["nbdkit", "-f", "-U", base_sock, "--filter=delay", "file", "remote.raw",
                         "delay-read=2ms"], base_sock, d)
        remote_iops = {}
        try:
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"nbd+unix:///?socket={base_sock}",
               "-F", "raw", "ovr.qcow2", cwd=d)
            for name, cmd in (
                ("cowimg serve", [cow, "serve", "-t", "-k", sock, "ovr.qcow2"]),
                ("qemu-nbd", ["qemu-nbd", "-t", "-k", sock, "-f", "qcow2", "--cache=writeback",
                              "ovr.qcow2"]),
            ):
                srv = Server(cmd, sock, d)
                try:
                    remote_iops[name] = random_io(srv.url, False, a.seconds)
                finally:
                    srv.stop()
        finally:
            nbdkit.stop()
        med = {n: {k: statistics.median(v) for k, v in res.items()} for n, res in results.items()}
        c, q = med["cowimg serve"], med["qemu-nbd"]
        print(f"{a.rounds} rounds, {total >> 20} MiB qcow2 (all data), one connection per run\n")
        print("| measure | cowimg serve | qemu-nbd | cowimg/qemu-nbd |")
        print("| --- | ---: | ---: | ---: |")
        print(f"| nbdcopy to null: (s, median) | {c['nbdcopy']:.2f} | {q['nbdcopy']:.2f} "
              f"| {c['nbdcopy'] / q['nbdcopy']:.2f} (time) |")
        for k in ("randread", "randwrite"):
            print(f"| 4 KiB random {k[4:]}s, QD 16 (IOPS, median) | {c[k]:.0f} | {q[k]:.0f} "
                  f"| {c[k] / q[k]:.2f} (rate) |")
        c_r, q_r = remote_iops["cowimg serve"], remote_iops["qemu-nbd"]
        print(f"| 4 KiB random reads, QD 16, of an overlay whose backing file is 2 ms away "
              f"(IOPS, one run) | {c_r:.0f} | {q_r:.0f} | {c_r / q_r:.2f} (rate) |")
        print("\n| 4 KiB random reads, QD 1, on an overlay of the image | median us | p99 us |")
        print("| --- | ---: | ---: |")
        for name, (p50, p99) in latency.items():
            print(f"| {name} | {p50:.0f} | {p99:.0f} |")


if __name__ == "__main__":
    main()
