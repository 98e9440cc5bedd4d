#!/usr/bin/env python3
"""Remote layers over HTTP with latency (issue 16): a raw base served by a Range-answering
HTTP server that waits DELAY before answering each request, and

* `cowimg stream` of a qcow2 overlay whose backing file is the URL, against
  `qemu-img rebase -b ""` of an overlay on the same file read through nbdkit's curl plugin
  (qemu-img's own curl driver is in qemu-block-extra, not installed with qemu-utils);
* `cowimg convert -O raw` of the URL, against `nbdcopy` through nbdkit's curl plugin and
  `curl -o` (one connection);

with the time, and the requests and bytes the server answered.

    python3 benches/remote_http.py                  # 1 GiB of data, 2 ms and 10 ms
    python3 benches/remote_http.py --size 256M --delays 2ms

The server is this script (`--serve`, Python's threaded http.server with keep-alive, ETag,
Last-Modified and sendfile), started and stopped by PID for each run. HTTP has no block
status: every byte of a raw file is transferred, so the base is all data. Every result is
checked with `qemu-img compare` against the base. Needs qemu-img, nbdkit (curl plugin),
nbdcopy and curl; builds cowimg with cargo unless --cowimg names a binary. Prints a
Markdown table.
"""

import argparse
import http.server
import os
import socket
import subprocess
import sys
import tempfile
import time

from benchlib import MiB, add_cowimg_arg, check_same, cowimg, sh, size, stop, timed, wait_socket


def delay_seconds(s):
    return float(s[:-2]) / 1000 if s.endswith("ms") else float(s)


def serve(port, path, delay, countfile):
    """The HTTP server: GET and HEAD of one file, 206 for a Range, after `delay` seconds."""
    st = os.stat(path)
    total = st.st_size
    etag = f'"{st.st_ino:x}-{st.st_mtime_ns:x}"'
    stats = {"requests": 0, "bytes": 0}

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def headers_for(self, start, end, partial):
            self.send_response(206 if partial else 200)
            if partial:
                self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", self.date_time_string(int(st.st_mtime)))
            self.end_headers()

        def span(self):
            r = self.headers.get("Range")
            if not r:
                return 0, total - 1, False
            a, b = r.split("=", 1)[1].split("-")
            return int(a), min(int(b) if b else total - 1, total - 1), True

        def do_HEAD(self):
            time.sleep(delay)
            self.headers_for(0, total - 1, False)

        def do_GET(self):
            time.sleep(delay)
            start, end, partial = self.span()
            self.headers_for(start, end, partial)
            with open(path, "rb") as f:
                self.connection.sendfile(f, start, end - start + 1)
            stats["requests"] += 1
            stats["bytes"] += end - start + 1
            with open(countfile, "w") as c:
                c.write(f"{stats['requests']} {stats['bytes']}\n")

    class Server(http.server.ThreadingHTTPServer):
        # The default backlog of 5 drops the SYNs of a client opening many connections at
        # once, which then wait a second to retry: a measure of the kernel, not of the client.
        request_queue_size = 256
        daemon_threads = True

    srv = Server(("127.0.0.1", port), H)
    srv.serve_forever()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, what):
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"{what} did not listen")
            time.sleep(0.02)


def run_one(d, port, delay, cmd, prepare):
    """Starts the server, prepares, times `cmd`, stops it: (seconds, requests, bytes)."""
    count = os.path.join(d, "count.txt")
    if os.path.exists(count):
        os.unlink(count)
    srv = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(port),
                            os.path.join(d, "base.raw"), delay, count])
    curl = None
    try:
        wait_listening(port, srv, "the HTTP server")
        # nbdkit's curl plugin in front of the server, for the NBD peers.
        sock = os.path.join(d, "curl.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        curl = subprocess.Popen(["nbdkit", "-f", "-U", sock, "curl",
                                 f"url=http://127.0.0.1:{port}/base.raw"], stderr=subprocess.PIPE)
        wait_socket(sock, curl, "nbdkit curl")
        prepare()
        if os.path.exists(count):
            os.unlink(count)
        elapsed = timed(cmd, d)
    finally:
        if curl:
            stop(curl)
        stop(srv)
    reqs, nbytes = (int(x) for x in open(count).read().split()) if os.path.exists(count) else (0, 0)
    return elapsed, reqs, nbytes


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), sys.argv[3], delay_seconds(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="size of the base, all data (default 1G)")
    ap.add_argument("--delays", default="2ms,10ms", help="latency added to each request")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool (the median is shown)")
    add_cowimg_arg(ap)
    a = ap.parse_args()
    cow = cowimg(a)
    total = size(a.size)
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "base.raw"), "wb") as f:
            for i in range(total // MiB):
                f.write(bytes([1 + i % 250]) * MiB)
        url = f"http://127.0.0.1:{port}/base.raw"
        nbd = f"nbd+unix:///?socket={os.path.join(d, 'curl.sock')}"

        def overlay(backing):
            def make():
                if os.path.exists(os.path.join(d, "ov.qcow2")):
                    os.unlink(os.path.join(d, "ov.qcow2"))
                sh("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw",
                   "-o", f"size={total}", "ov.qcow2", cwd=d)
            return make

        def no_output():
            if os.path.exists(os.path.join(d, "out.raw")):
                os.unlink(os.path.join(d, "out.raw"))

        rows = [
            ("stream (full) of an overlay", [
                ("cowimg stream", [cow, "stream", "ov.qcow2"], overlay(url), "ov.qcow2"),
                ('qemu-img rebase -b "" (via nbdkit curl)', ["qemu-img", "rebase", "-b", "", "ov.qcow2"],
                 overlay(nbd), "ov.qcow2"),
            ]),
            ("convert to a raw file", [
                ("cowimg convert -O raw", [cow, "convert", "-O", "raw", url, "out.raw"], no_output, "out.raw"),
                ("curl -o", ["curl", "-sf", "-o", "out.raw", url], no_output, "out.raw"),
                ("nbdcopy --flush (via nbdkit curl)", ["nbdcopy", "--flush", nbd, "out.raw"], no_output,
                 "out.raw"),
            ]),
        ]
        print(f"Base: {total >> 20} MiB raw, all data, served over HTTP/1.1 with the delay added "
              f"before each answer.\n")
        print("| delay | operation | tool | median s | GET requests | bytes served | ratio cowimg/tool |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
        for delay in a.delays.split(","):
            for op, tools in rows:
                ours = None
                for label, cmd, prepare, result in tools:
                    tries = [run_one(d, port, delay, cmd, prepare) for _ in range(a.runs)]
                    elapsed = sorted(t[0] for t in tries)[len(tries) // 2]
                    _, reqs, nbytes = tries[-1]
                    check_same(label, result, "base.raw", d)
                    if ours is None:
                        ours, ratio = elapsed, ""
                    else:
                        ratio = f"**{ours / elapsed:.2f}**"
                    print(f"| {delay} | {op} | {label} | {elapsed:.2f} | {reqs} | {nbytes >> 20} MiB | {ratio} |",
                          flush=True)


if __name__ == "__main__":
    main()
