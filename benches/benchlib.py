"""What the side benchmarks (remote.py, remote_http.py, serve.py, job_speed.py) share: sizes,
quiet commands and the cowimg binary they time."""

import os
import subprocess
import sys
import time

MiB = 1 << 20


def size(s):
    """A size with an optional K/M/G suffix, in bytes: "256M" -> 268435456."""
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    return int(float(s[:-1]) * units[s[-1]]) if s[-1] in units else int(s)


def sh(*cmd, cwd=None):
    """Runs a command quietly; its failure stops the benchmark."""
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def add_cowimg_arg(ap):
    ap.add_argument("--cowimg", help="the binary (default: cargo build --release)")


def cowimg(a):
    """The binary named by --cowimg, or this checkout's, built with cargo."""
    if a.cowimg:
        return os.path.abspath(a.cowimg)
    sh("cargo", "build", "--release", "-q")
    return os.path.abspath("target/release/cowimg")


def wait_socket(path, proc, what):
    """Waits up to 20 s for `proc` (a server) to create its Unix socket at `path`."""
    deadline = time.time() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() > deadline:
            err = proc.stderr.read().decode() if proc.stderr else ""
            sys.exit(f"{what} did not listen: {err}")
        time.sleep(0.01)


def stop(proc):
    """Stops a server started by the benchmark, by its PID."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def timed(cmd, cwd):
    """Seconds `cmd` took; what earlier steps left dirty is written back first, else the
    first sync of a run (cowimg's; an ext4 journal commit) pays for it."""
    os.sync()
    t = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.monotonic() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {r.stderr}")
    return elapsed


def check_same(label, result, base, cwd):
    """Stops the benchmark unless `result` (qcow2 or raw, by its name) reads as `base` (raw)."""
    fmt = "qcow2" if result.endswith("qcow2") else "raw"
    c = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", result, base],
                       cwd=cwd, capture_output=True, text=True)
    if c.returncode != 0:
        sys.exit(f"{label}: the result differs from the base: {c.stdout}{c.stderr}")
