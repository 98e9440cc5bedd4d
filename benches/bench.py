#!/usr/bin/env python3
"""cowimg benchmark harness (issue #7).

Times cowimg against qemu-img on deterministic backing chains and checks every result,
so a fast wrong answer cannot pass.  Python 3 standard library only; needs qemu-img,
qemu-io, cp, dd, cat and a Rust toolchain (cowimg is built with `cargo build --release`).

    python3 benches/bench.py                 # 1 GiB fixtures, 5 counted runs
    python3 benches/bench.py --size 4G       # the full run
    python3 benches/bench.py --quick         # 256 MiB, 1 run: for development

Fixtures are built once (fixed seed) under --dir and reused while their stamp exists.
Each timed operation gets a fresh sparse copy of the image it modifies (copying is not
timed); `sync` runs before every timed command; cowimg and its peer run interleaved
(warm-up pair, then --runs counted pairs).  The Markdown report goes to stdout and,
with --report, to a file.  Exit status: 0 if every check passed, 1 if any row FAILED,
2 on a setup error.
"""

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
FIXTURE_VERSION = 1  # bump when the fixture recipe changes: old caches are then ignored
READONLY_RUNS_FACTOR = 5  # check/info rows run this many times --runs pairs
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, LC_ALL="C")


def parse_size(s):
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", s.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 256M, 1G, 4G)")
    return int(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}[m.group(2).upper()]


def human(n):
    for unit, f in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= f:
            v = n / f
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd, cwd=None, check=True, quiet=False):
    """Run an untimed helper command; returns CompletedProcess (text)."""
    p = subprocess.run(cmd, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise SetupError(f"{' '.join(cmd)} (in {cwd}) exited {p.returncode}:\n{p.stderr.strip()}")
    return p


class SetupError(Exception):
    pass


def allocated(path):
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def rm(*paths):
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------------
# timing


class Run:
    def __init__(self, wall, cpu, rss_kib, rc, out, err):
        self.wall, self.cpu, self.rss_kib, self.rc, self.out, self.err = wall, cpu, rss_kib, rc, out, err
        self.written = 0


TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def timed(cmd, cwd, capture=True):
    """Run cmd and measure it: wall time, user+sys CPU and peak RSS of the command.

    CPU is user+sys from wait4's rusage (it includes the reaped descendants).  Peak RSS comes
    from GNU time (-f %M) when it is there: the direct child of a Python process reports at
    least Python's own RSS (maxrss survives exec after vfork)."""
    os.sync()  # dirty pages left by the previous step would otherwise throttle this run
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as tf:
        argv = [TIME, "-q", "-f", "%M", "-o", tf.name, *cmd] if TIME else cmd
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL,
                             stdout=out if capture else subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        cpu, rss = ru.ru_utime + ru.ru_stime, ru.ru_maxrss
        if TIME:
            fields = tf.read().split()
            if fields:
                rss = int(fields[-1])  # CPU stays wait4's: microseconds, not GNU time's 10 ms
            # GNU time exits with the command's status; a killed command shows as 128+n
        out.seek(0)
        err.seek(0)
        return Run(wall, cpu, rss, rc, out.read().decode(errors="replace"),
                   err.read().decode(errors="replace"))


# ---------------------------------------------------------------------------------------
# fixtures


def extents(rng, size, fill, min_len=1 * MiB, max_len=8 * MiB, align=4 * KiB):
    """Scattered extents covering about `fill` of [0, size): lengths uniform in
    [min_len, max_len], gaps uniform with the mean that gives the fill ratio."""
    mean_len = (min_len + max_len) / 2
    mean_gap = mean_len * (1 - fill) / fill
    off = int(rng.uniform(0, mean_gap)) // align * align
    while off < size:
        ln = min(rng.randrange(min_len, max_len + 1, align), size - off)
        yield off, ln
        off += ln + int(rng.uniform(0, 2 * mean_gap)) // align * align


def layer_commands(rng, spans, srcs, zero_share=0.12):
    """qemu-io commands for the spans: about half byte patterns, half data from the
    pseudo-random source files, and a share of zero writes."""
    cmds = []
    for off, ln in spans:
        r = rng.random()
        if r < zero_share:
            cmds.append(f"write -q -z {off} {ln}")
        elif r < zero_share + (1 - zero_share) / 2:
            cmds.append(f"write -q -P 0x{rng.randrange(1, 256):02x} {off} {ln}")
        else:
            cmds.append(f"write -q -s {rng.choice(srcs)} {off} {ln}")
    return cmds


def qemu_io(fmt, path, cmds):
    for i in range(0, len(cmds), 200):
        args = ["qemu-io", "-f", fmt]
        for c in cmds[i:i + 200]:
            args += ["-c", c]
        p = sh(args + [path])
        if p.stdout.strip() or p.stderr.strip():  # -q writes print nothing unless they fail
            raise SetupError(f"qemu-io on {path}: {p.stdout}{p.stderr}")


class Fixtures:
    """All fixture images for one (size, seed).  Layout under root:
    src/        four 1 MiB pseudo-random pattern files (entropy 4, 5, 6, 8 bits/byte)
    qcow2/      A.qcow2 <- B.qcow2 <- C.qcow2, and N.qcow2 (an unrelated image, same size)
    qed/        the same chain (same writes) in QED, and N.qed
    zlib/ zstd/ A compressed with zlib / zstd, under copies of qcow2's B and C
    raw/        A as raw under copies of qcow2's B and C
    deep/       L01 <- ... <- L64 small qcow2 overlays (L16 is the 16-deep top)
    big/        a 1 TiB sparse qcow2 holding min(size, 1 GiB)
    C.raw       raw copy of C (all of qcow2/qed/zlib/zstd/raw read the same), L16.raw, L64.raw
    """

    def __init__(self, root, size, seed):
        self.size, self.seed = size, seed
        self.root = os.path.join(root, f"fixtures-{human(size).replace(' ', '')}-seed{seed}-v{FIXTURE_VERSION}")
        self.ref = os.path.join(self.root, "C.raw")

    def d(self, name):
        return os.path.join(self.root, name)

    def rng(self, what):
        return random.Random(f"cowimg-bench/{self.seed}/{what}")

    def step(self, name, build):
        stamp = os.path.join(self.root, f".done-{name}")
        if os.path.exists(stamp):
            return
        log(f"building fixture {name} ({human(self.size)}) in {self.root}")
        t0 = time.time()
        d = self.d(name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        build(d)
        os.sync()
        open(stamp, "w").close()
        log(f"  {name} done in {time.time() - t0:.1f}s")

    def build(self):
        os.makedirs(self.root, exist_ok=True)
        self.step("src", self._src)
        self.srcs = [os.path.join(self.d("src"), f"data{i}.bin") for i in range(4)]
        size, fill = self.size, {"A": 0.60, "B": 0.15, "C": 0.05, "N": 0.30}
        self.layers = {}
        for name in "ABCN":
            rng = self.rng(name)
            self.layers[name] = layer_commands(rng, list(extents(rng, size, fill[name])), self.srcs)
        self.step("qcow2", lambda d: self._chain(d, "qcow2"))
        self.step("qed", lambda d: self._chain(d, "qed"))
        self.step("ref", self._ref)
        self.step("zlib", lambda d: self._compressed(d, []))
        self.step("zstd", lambda d: self._compressed(d, ["-o", "compression_type=zstd"]))
        self.step("raw", self._raw)
        self.step("deep", self._deep)
        self.step("big", self._big)

    def _src(self, d):
        for i, bits in enumerate((4, 5, 6, 8)):
            rng = self.rng(f"src{i}")
            # bytes drawn from an alphabet of 2**bits symbols: 8 bits does not compress, 4 about 2:1
            table = bytes((b % (1 << bits)) * 7 % 256 for b in range(256))
            data = rng.randbytes(MiB).translate(table)
            with open(os.path.join(d, f"data{i}.bin"), "wb") as f:
                f.write(data)

    def _chain(self, d, fmt):
        A, B, C, N = (f"{x}.{fmt}" for x in "ABCN")
        sh(["qemu-img", "create", "-q", "-f", fmt, A, str(self.size)], cwd=d)
        sh(["qemu-img", "create", "-q", "-f", fmt, "-b", A, "-F", fmt, B], cwd=d)
        sh(["qemu-img", "create", "-q", "-f", fmt, "-b", B, "-F", fmt, C], cwd=d)
        sh(["qemu-img", "create", "-q", "-f", fmt, N, str(self.size)], cwd=d)
        for img, name in ((A, "A"), (B, "B"), (C, "C"), (N, "N")):
            qemu_io(fmt, os.path.join(d, img), self.layers[name])

    def _ref(self, d):
        rm(self.ref)
        sh(["qemu-img", "convert", "-O", "raw", "qcow2/C.qcow2", "C.raw"], cwd=self.root)
        # the QED chain got the same writes: it must read the same
        sh(["qemu-img", "compare", "-q", "-F", "raw", "qed/C.qed", "C.raw"], cwd=self.root)

    def _copy_bc(self, d):
        for x in ("B", "C"):
            sh(["cp", "--sparse=always", os.path.join(self.d("qcow2"), f"{x}.qcow2"), d])

    def _compressed(self, d, opts):
        sh(["qemu-img", "convert", "-c", "-O", "qcow2", *opts, os.path.join(self.d("qcow2"), "A.qcow2"),
            "A.qcow2"], cwd=d)
        self._copy_bc(d)
        sh(["qemu-img", "compare", "-q", "-F", "raw", "C.qcow2", self.ref], cwd=d)

    def _raw(self, d):
        sh(["qemu-img", "convert", "-O", "raw", os.path.join(self.d("qcow2"), "A.qcow2"), "A.raw"], cwd=d)
        self._copy_bc(d)
        sh(["qemu-img", "rebase", "-u", "-b", "A.raw", "-F", "raw", "B.qcow2"], cwd=d)
        sh(["qemu-img", "compare", "-q", "-F", "raw", "C.qcow2", self.ref], cwd=d)

    def _deep(self, d):
        # 64 small overlays, no big base: flattening cost is dominated by chain lookups
        for i in range(1, 65):
            name = f"L{i:02d}.qcow2"
            back = ["-b", f"L{i - 1:02d}.qcow2", "-F", "qcow2"] if i > 1 else []
            sh(["qemu-img", "create", "-q", "-f", "qcow2", *back, name, str(self.size)], cwd=d)
            rng = self.rng(f"deep{i}")
            spans = sorted({(rng.randrange(0, self.size - MiB, 4 * KiB), rng.randrange(64 * KiB, MiB + 1, 4 * KiB))
                            for _ in range(4)})
            qemu_io("qcow2", os.path.join(d, name), layer_commands(rng, spans, self.srcs))
        for top in ("L16", "L64"):
            sh(["qemu-img", "convert", "-O", "raw", f"{top}.qcow2", f"{top}.raw"], cwd=d)

    def _big(self, d):
        held = min(self.size, GiB)
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "big.qcow2", str(TiB)], cwd=d)
        rng = self.rng("big")
        n = 64
        step, ln = TiB // n, held // n
        spans = [(i * step + rng.randrange(0, step - ln, 64 * KiB), ln) for i in range(n)]
        qemu_io("qcow2", os.path.join(d, "big.qcow2"), layer_commands(rng, spans, self.srcs, zero_share=0))


# ---------------------------------------------------------------------------------------
# correctness checks (untimed)


def qinfo(path):
    p = sh(["qemu-img", "info", "-U", "--output", "json", path])
    return json.loads(p.stdout)


def verify_image(path, fmt, size, ref, backing, ref_fmt="raw"):
    """None if the image at path reads like ref, has the expected backing file and
    size, and qemu-img check finds it clean; else a description of what is wrong."""
    if not os.path.exists(path):
        return f"{path} does not exist"
    info = qinfo(path)
    problems = []
    if info.get("format") != fmt:
        problems.append(f"format {info.get('format')} (expected {fmt})")
    if info.get("virtual-size") != size:
        problems.append(f"virtual size {info.get('virtual-size')} (expected {size})")
    if info.get("backing-filename") != backing:
        problems.append(f"backing file {info.get('backing-filename')!r} (expected {backing!r})")
    if fmt != "raw":
        c = sh(["qemu-img", "check", "-U", path], check=False)
        if c.returncode != 0:
            problems.append(f"qemu-img check exit {c.returncode}: {(c.stdout + c.stderr).strip()[:400]}")
    c = sh(["qemu-img", "compare", "-U", "-f", fmt, "-F", ref_fmt, path, ref], check=False)
    if c.returncode != 0:
        problems.append(f"qemu-img compare with {os.path.basename(ref)} exit {c.returncode}: "
                        f"{(c.stdout + c.stderr).strip()[:400]}")
    return "; ".join(problems) or None


INFO_KEYS = ("filename", "format", "virtual-size", "cluster-size", "backing-filename",
             "backing-filename-format", "full-backing-filename")


def info_projection(text):
    return [{k: d.get(k) for k in INFO_KEYS} for d in json.loads(text)]


CHECK_KEYS = ("check-errors", "corruptions", "leaks", "allocated-clusters", "total-clusters",
              "image-end-offset")


def check_projection(text):
    d = json.loads(text)
    return {k: d.get(k, 0) for k in CHECK_KEYS}


# ---------------------------------------------------------------------------------------
# benchmark rows


class Row:
    """One operation on one fixture, cowimg against a peer command.

    kind: 'inplace' (a fresh sparse copy of `top` is made as run-<top> before each run and
    the command modifies it), 'output' (the command writes run-out.<ext>, removed before each
    run), 'readonly'.  Commands name the copy/output through {T} and {O}.  verify(run, tool)
    returns None or a description of what is wrong."""

    def __init__(self, fixture, op, cwd, kind, cow, peer, peer_label, verify, top=None, out=None,
                 na_probe=False):
        self.fixture, self.op, self.cwd, self.kind = fixture, op, cwd, kind
        self.cow_t, self.peer_t, self.peer_label = cow, peer, peer_label
        self.verify, self.top, self.out, self.na_probe = verify, top, out, na_probe
        self.runs = {"cowimg": [], "peer": []}
        self.failed = []  # descriptions
        self.na = None
        self.repro = None

    @property
    def name(self):
        return f"{self.fixture}: {self.op}"

    def target(self):
        return os.path.join(self.cwd, "run-" + self.top if self.kind == "inplace" else self.out)

    def cmd(self, tmpl):
        t = "run-" + self.top if self.top else ""
        return [a.replace("{T}", t).replace("{O}", self.out or "") for a in tmpl]

    def prepare(self):
        if self.kind == "inplace":
            dst = self.target()
            rm(dst)
            sh(["cp", "--sparse=always", os.path.join(self.cwd, self.top), dst])
            return allocated(dst)
        if self.kind == "output":
            rm(self.target())
        return 0

    def cleanup(self):
        if self.kind in ("inplace", "output"):
            rm(self.target())


class CommitRow(Row):
    """commit TOP into its backing file BASE: both are fresh sparse copies for each run
    (run-TOP rebased onto run-BASE with `rebase -u`, metadata only), and run-BASE is what the
    command writes and what is checked."""

    def __init__(self, fixture, op, cwd, fmt, cow, peer, peer_label, verify, base, top):
        super().__init__(fixture, op, cwd, "inplace", cow, peer, peer_label, verify, top=top)
        self.fmt, self.base = fmt, base

    def target(self):
        return os.path.join(self.cwd, "run-" + self.base)

    def prepare(self):
        for f in (self.base, self.top):
            dst = os.path.join(self.cwd, "run-" + f)
            rm(dst)
            sh(["cp", "--sparse=always", os.path.join(self.cwd, f), dst])
        sh(["qemu-img", "rebase", "-u", "-b", "run-" + self.base, "-F", self.fmt, "run-" + self.top],
           cwd=self.cwd)
        return allocated(self.target())

    def cleanup(self):
        rm(self.target(), os.path.join(self.cwd, "run-" + self.top))


def refcount_width_check(bits):
    """The image checks clean and has refcount entries of `bits` bits."""
    def v(row, run, tool):
        c = sh(["qemu-img", "check", "-U", row.target()], check=False)
        if c.returncode != 0:
            return f"qemu-img check exit {c.returncode}: {(c.stdout + c.stderr).strip()[:400]}"
        got = qinfo(row.target()).get("format-specific", {}).get("data", {}).get("refcount-bits")
        return None if got == bits else f"refcount bits {got} (expected {bits})"
    return v


def make_rows(fx, cow):
    size, ref = fx.size, fx.ref
    rows = []

    def img_check(fmt, backing, ref_path=ref):
        def v(row, run, tool):
            return verify_image(row.target(), fmt, size, ref_path, backing)
        return v

    WB = ["-t", "writeback"]
    for fmt in ("qcow2", "qed"):
        d = fx.d(fmt)
        A, C, N = f"A.{fmt}", f"C.{fmt}", f"N.{fmt}"
        rows.append(Row(fmt, "stream C (full flatten)", d, "inplace", [cow, "stream", "{T}"],
                        ["qemu-img", "rebase", "-b", "", "{T}"], 'qemu-img rebase -b ""',
                        img_check(fmt, None), top=C))
        rows.append(Row(fmt, "stream --base A C (partial)", d, "inplace", [cow, "stream", "--base", A, "{T}"],
                        ["qemu-img", "rebase", "-b", A, "-F", fmt, "{T}"], f"qemu-img rebase -b A -F {fmt}",
                        img_check(fmt, A), top=C))
        rows.append(Row(fmt, "rebase -b N C (safe, unrelated base)", d, "inplace",
                        [cow, "rebase", "-b", N, "-F", fmt, "{T}"],
                        ["qemu-img", "rebase", "-b", N, "-F", fmt, "{T}"], f"qemu-img rebase -b N -F {fmt}",
                        img_check(fmt, N), top=C))
        if fmt == "qcow2":
            for ofmt in ("qcow2", "raw"):
                for cache, label in ((WB, "-t writeback"), ([], "default -t unsafe")):
                    rows.append(Row(fmt, f"convert -O {ofmt} C", d, "output",
                                    [cow, "convert", "-O", ofmt, C, "{O}"],
                                    ["qemu-img", "convert", *cache, "-m", "8", "-W", "-O", ofmt, C, "{O}"],
                                    f"qemu-img convert {label} -m 8 -W",
                                    img_check(ofmt, None), out=f"run-out.{ofmt}"))
            # Archival output (issue 9): compressed convert, and the output sizes (below).
            for ctype in ("zlib", "zstd"):
                rows.append(Row(fmt, f"convert -c -O qcow2 ({ctype}) C", d, "output",
                                [cow, "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", C, "{O}"],
                                ["qemu-img", "convert", "-c", *WB, "-m", "8", "-W", "-O", "qcow2", "-o",
                                 f"compression_type={ctype}", C, "{O}"],
                                "qemu-img convert -c -t writeback -m 8 -W",
                                img_check("qcow2", None), out=f"run-out-{ctype}.qcow2"))
        if fmt == "qcow2":
            # Issue 19: commit C into B (C emptied, as qemu-img's default), B then reads as C did.
            rows.append(CommitRow(fmt, "commit C (into B)", d, fmt, [cow, "commit", "{T}"],
                                  ["qemu-img", "commit", "-q", "{T}"], "qemu-img commit",
                                  lambda row, run, tool, A=A: verify_image(row.target(), "qcow2", size, ref, A),
                                  base=f"B.{fmt}", top=C))
            # ... and B (about 15% of the disk) into A, the bottom: A then reads as B did.
            rows.append(CommitRow(fmt, "commit B (into A)", d, fmt, [cow, "commit", "{T}"],
                                  ["qemu-img", "commit", "-q", "{T}"], "qemu-img commit",
                                  lambda row, run, tool, fmt=fmt: verify_image(
                                      row.target(), fmt, size, os.path.join(row.cwd, f"B.{fmt}"), None,
                                      ref_fmt=fmt),
                                  base=A, top=f"B.{fmt}"))
            # Issue 19: the refcount width of A (every refcount block rewritten).
            rows.append(Row(fmt, "amend -o refcount_bits=64 A", d, "inplace",
                            [cow, "amend", "-o", "refcount_bits=64", "{T}"],
                            ["qemu-img", "amend", "-o", "refcount_bits=64", "{T}"], "qemu-img amend",
                            refcount_width_check(64), top=A))
        rows.append(Row(fmt, f"check A ({human(allocated(os.path.join(d, A)))} allocated)", d, "readonly",
                        [cow, "check", "--output", "json", A], ["qemu-img", "check", "--output", "json", A],
                        "qemu-img check", check_verify(), na_probe=True))
    for name, top in (("zlib", "C.qcow2"), ("zstd", "C.qcow2"), ("raw", "C.qcow2")):
        label = {"zlib": "qcow2 chain, A zlib-compressed", "zstd": "qcow2 chain, A zstd-compressed",
                 "raw": "qcow2 chain over raw A"}[name]
        rows.append(Row(label, "stream C (full flatten)", fx.d(name), "inplace", [cow, "stream", "{T}"],
                        ["qemu-img", "rebase", "-b", "", "{T}"], 'qemu-img rebase -b ""',
                        img_check("qcow2", None), top=top))
    d = fx.d("deep")
    for depth in (16, 64):
        top = f"L{depth}.qcow2"
        rows.append(Row(f"deep {depth}", "stream top (full flatten)", d, "inplace", [cow, "stream", "{T}"],
                        ["qemu-img", "rebase", "-b", "", "{T}"], 'qemu-img rebase -b ""',
                        img_check("qcow2", None, os.path.join(d, f"L{depth}.raw")), top=top))
    rows.append(Row("deep 64", "info --backing-chain", d, "readonly",
                    [cow, "info", "--backing-chain", "--output", "json", "L64.qcow2"],
                    ["qemu-img", "info", "--backing-chain", "--output", "json", "L64.qcow2"],
                    "qemu-img info --backing-chain", info_verify()))
    d = fx.d("big")
    rows.append(Row(f"1 TiB qcow2 holding {human(min(size, GiB))}", "check", d, "readonly",
                    [cow, "check", "--output", "json", "big.qcow2"],
                    ["qemu-img", "check", "--output", "json", "big.qcow2"], "qemu-img check",
                    check_verify(), na_probe=True))
    return rows


def check_verify():
    expected = {}

    def v(row, run, tool):
        if "want" not in expected:
            p = sh(row.cmd(row.peer_t), cwd=row.cwd, check=False)
            expected["want"] = (p.returncode, check_projection(p.stdout))
        rc, want = expected["want"]
        if run.rc != rc:
            return f"exit {run.rc}, qemu-img check exits {rc}: {run.err.strip()[:300]}"
        try:
            got = check_projection(run.out)
        except ValueError:
            return f"output is not JSON: {run.out[:200]!r}"
        if got != want:
            return f"JSON {got} differs from qemu-img's {want}"
        return None
    return v


def info_verify():
    want = {}

    def v(row, run, tool):
        if "w" not in want:
            want["w"] = info_projection(sh(row.cmd(row.peer_t), cwd=row.cwd).stdout)
        if run.rc != 0:
            return f"exit {run.rc}: {run.err.strip()[:300]}"
        try:
            got = info_projection(run.out)
        except ValueError:
            return f"output is not JSON: {run.out[:200]!r}"
        if got != want["w"]:
            diff = [i for i, (a, b) in enumerate(zip(got, want["w"])) if a != b]
            return f"{len(got)} images listed (qemu-img: {len(want['w'])}); first differing entry " \
                   f"{diff[:1]}: {[got[i] for i in diff[:1]]} vs {[want['w'][i] for i in diff[:1]]}"
        return None
    return v


def run_one(row, tool, verify):
    """Prepare, time, measure and (if verify) check one run. Returns Run or raises RowFailed."""
    before = row.prepare()
    tmpl = row.cow_t if tool == "cowimg" else row.peer_t
    r = timed(row.cmd(tmpl), row.cwd)
    if row.kind == "readonly":
        problem = row.verify(row, r, tool) if verify else None
    elif r.rc != 0:
        problem = f"exit {r.rc}: {(r.err or r.out).strip()[:500]}"
    else:
        r.written = max(0, allocated(row.target()) - before)
        problem = row.verify(row, r, tool) if verify else None
    if problem:
        raise RowFailed(tool, problem, row.cmd(tmpl))
    return r


class RowFailed(Exception):
    def __init__(self, tool, problem, cmd):
        super().__init__(f"{tool}: {problem}")
        self.tool, self.problem, self.cmd = tool, problem, cmd


def bench_row(row, runs, verify_peer_every):
    log(f"{row.name}  [{row.peer_label}]")
    try:
        if row.na_probe:
            probe = timed(row.cmd(row.cow_t), row.cwd)
            if probe.rc != 0 and "not implemented" in probe.err.lower():
                row.na = probe.err.strip().splitlines()[-1] if probe.err.strip() else "not implemented"
                log(f"  n/a: {row.na}; timing the peer alone")
                for i in range(runs + 1):
                    r = run_one(row, "peer", verify=(i == 0))
                    if i > 0:
                        row.runs["peer"].append(r)
                return
        for i in range(runs + 1):  # run 0 is the warm-up
            pair = {}
            for tool in ("cowimg", "peer"):
                pair[tool] = run_one(row, tool, verify=(tool == "cowimg" or i == 0 or verify_peer_every))
                if i > 0:
                    row.runs[tool].append(pair[tool])
            log(f"  run {i}{' (warm-up)' if i == 0 else ''}: cowimg {pair['cowimg'].wall:.3f}s, "
                f"peer {pair['peer'].wall:.3f}s")
    except RowFailed as e:
        row.failed.append(str(e))
        row.repro = f"cd {row.cwd} && cp --sparse=always {row.top} run-{row.top} && " if row.kind == "inplace" else f"cd {row.cwd} && "
        row.repro += " ".join(shq(a) for a in e.cmd)
        log(f"  FAILED: {e}")
    finally:
        row.cleanup()


def shq(a):
    return a if a and re.fullmatch(r"[\w./=+:,@-]+", a) else "'" + a.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------------------------------
# physical limits and throttle


def dd_write(scratch, nbytes, direct, runs):
    out = os.path.join(scratch, "dd.out")
    count = max(1, math.ceil(nbytes / (4 * MiB)))
    flags = ["oflag=direct"] if direct else []
    times = []
    for _ in range(runs):
        rm(out)
        r = timed(["dd", "if=/dev/zero", f"of={out}", "bs=4M", f"count={count}", "conv=fsync", *flags], scratch)
        if r.rc != 0:
            raise SetupError(f"dd failed: {r.err}")
        times.append(r.wall)
    rm(out)
    return count * 4 * MiB, statistics.median(times)


def cat_read(files, cwd, runs):
    timed(["cat", *files], cwd, capture=False)  # warm read
    times = [timed(["cat", *files], cwd, capture=False).wall for _ in range(runs)]
    return sum(os.path.getsize(os.path.join(cwd, f)) for f in files), statistics.median(times)


def throttle(fx, cow, speed, runs):
    d = fx.d("qcow2")
    row = Row("qcow2", f"stream --speed {speed} C", d, "inplace", [cow, "stream", "--speed", speed, "--output", "json", "{T}"],
              None, None, None, top="C.qcow2")
    cap = parse_size(speed)
    res = {"speed": speed, "cap": cap, "runs": [], "failed": None}
    log(f"throttle {speed}")
    try:
        for _ in range(runs):
            row.prepare()
            r = timed(row.cmd(row.cow_t), d)
            if r.rc != 0:
                raise RowFailed("cowimg", f"exit {r.rc}: {r.err.strip()[:300]}", row.cmd(row.cow_t))
            j = json.loads(r.out)
            problem = verify_image(row.target(), "qcow2", fx.size, fx.ref, None)
            if problem:
                raise RowFailed("cowimg", problem, row.cmd(row.cow_t))
            res["runs"].append((j["copied"], j["elapsed"], r.wall))
            log(f"  copied {human(j['copied'])} in {j['elapsed']:.2f}s = {j['copied'] / j['elapsed'] / MiB:.1f} MiB/s")
    except (RowFailed, ValueError, KeyError) as e:
        res["failed"] = str(e)
        log(f"  FAILED: {e}")
    finally:
        row.cleanup()
    return res


# ---------------------------------------------------------------------------------------
# report


def machine_facts(scratch, cow, commit):
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = human(int(line.split()[1]) * KiB)
    except OSError:
        pass
    fstype = sh(["df", "--output=fstype", scratch], check=False).stdout.split()[-1:] or ["?"]
    qv = sh(["qemu-img", "--version"]).stdout.splitlines()[0]
    rustc = sh(["rustc", "--version"], check=False).stdout.strip() or "?"
    return [("cores", f"{os.cpu_count()} ({cpu})"), ("memory", mem),
            ("scratch dir", f"`{scratch}` ({fstype[0]})"), ("kernel", platform.release()),
            ("qemu-img", qv), ("cowimg", f"commit {commit}, `cargo build --release` ({rustc})")]


def fmt_s(x):
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def stats(rs):
    w = [r.wall for r in rs]
    return {"med": statistics.median(w), "min": min(w), "max": max(w),
            "cpu": statistics.median(r.cpu for r in rs), "rss": max(r.rss_kib for r in rs) / 1024,
            "written": statistics.median(r.written for r in rs)}


def report(args, fx, facts, rows, dd_rows, cat_rows, thr, started, loads):
    L = []
    L.append("# cowimg benchmarks\n")
    if args.note:
        L.append(f"> **Note:** {args.note}\n")
    shown, skip = [], False
    for a in args.argv:  # the command line, without the note
        if skip or a == "--note" or a.startswith("--note="):
            skip = a == "--note"
            continue
        shown.append(shq(a))
    L.append(f"Generated by `{' '.join(['python3', 'benches/bench.py'] + shown)}` on "
             f"{time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(started))} "
             f"(took {(time.time() - started) / 60:.1f} min). "
             f"Fixture size {human(fx.size)}, seed {fx.seed}, {args.runs} counted run(s) per tool after a warm-up.\n")
    L.append("## Machine\n")
    L.append("| | |\n| --- | --- |")
    for k, v in facts:
        L.append(f"| {k} | {v} |")
    L.append(f"| load average | {loads[0]} at start, {loads[1]} at end |\n")
    L.append("## Method\n")
    L.append(
        "Fixtures (built once with qemu-img/qemu-io, fixed seed, cached): a qcow2 chain `A <- B <- C` with A about 60% "
        "filled in scattered 1-8 MiB extents (about half byte patterns, half pseudo-random data of 4-8 bits of entropy "
        "per byte, 12% zero writes), B overwriting about 15% and C about 5% (4 KiB-aligned, so partial clusters occur); "
        "the same writes as a QED chain; A compressed with zlib and with zstd, and A as raw, under copies of B and C; "
        "chains of 16 and 64 small qcow2 overlays (4 writes of 64 KiB-1 MiB each); a 1 TiB qcow2 holding "
        f"{human(min(fx.size, GiB))}; N, an unrelated image of the same size (30% filled) as the new base for `rebase`.\n")
    L.append(
        "Each operation runs on a fresh `cp --sparse=always` copy of the image it modifies (not timed), with backing "
        "files shared and warm in the page cache; `sync` runs before every timed command; cowimg and the peer alternate "
        f"(a warm-up pair, then the counted pairs; {READONLY_RUNS_FACTOR} times as many for `check` and `info`, which "
        "take milliseconds). Wall time is the median; *ratio* is the median of the per-pair "
        "ratios cowimg/peer (below 1: cowimg faster). CPU is user+sys (median), RSS the peak over the counted runs "
        "(`wait4` rusage). *Written* is the growth of the output's allocated size; MiB/s is written / median time.\n")
    L.append(
        "Every cowimg result (and the peer's warm-up result) is checked: `qemu-img compare` against a raw copy of the "
        "original top (or of L16/L64), the expected backing file and size from `qemu-img info`, and a clean "
        "`qemu-img check`; `check` and `info` outputs are compared with qemu-img's JSON. A failed check marks the row "
        "FAILED.\n")

    L.append("## Physical limits\n")
    L.append("Writing as many bytes as the operation wrote with `dd if=/dev/zero bs=4M conv=fsync` (through the page "
             "cache, then fsync) and with `oflag=direct conv=fsync`, median of "
             f"{args.dd_runs} run(s):\n")
    L.append("| bytes (as written by) | dd buffered + fsync s | MiB/s | dd direct s | MiB/s |")
    L.append("| --- | ---: | ---: | ---: | ---: |")
    for nbytes, who, t_buf, t_dir in dd_rows:
        L.append(f"| {human(nbytes)} ({who}) | {fmt_s(t_buf)} | {nbytes / MiB / t_buf:.0f} | {fmt_s(t_dir)} | "
                 f"{nbytes / MiB / t_dir:.0f} |")
    L.append("")
    L.append("Reading the chain's files from the page cache (`cat files > /dev/null` after a warm read):\n")
    L.append("| chain | files | bytes | s | MiB/s |")
    L.append("| --- | --- | ---: | ---: | ---: |")
    for name, files, nbytes, t in cat_rows:
        L.append(f"| {name} | {' '.join(files)} | {human(nbytes)} | {fmt_s(t)} | {nbytes / MiB / t:.0f} |")
    L.append("")

    L.append("## Results\n")
    L.append("| fixture | operation | tool | median s | min-max s | ratio cowimg/peer | written | MiB/s | CPU s | "
             "peak RSS MiB | result |")
    L.append("| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        if row.na:
            L.append(f"| {row.fixture} | {row.op} | cowimg | n/a | | | | | | | n/a ({row.na}) |")
            if row.runs["peer"]:
                s = stats(row.runs["peer"])
                L.append(f"| | | {row.peer_label} | {fmt_s(s['med'])} | {fmt_s(s['min'])}-{fmt_s(s['max'])} | | - | - | "
                         f"{fmt_s(s['cpu'])} | {s['rss']:.0f} | |")
            else:
                L.append(f"| | | {row.peer_label} | | | | | | | | |")
            continue
        if row.failed and not row.runs["cowimg"]:
            L.append(f"| {row.fixture} | {row.op} | cowimg | | | | | | | | **FAILED** |")
            L.append(f"| | | {row.peer_label} | | | | | | | | |")
            continue
        c, p = row.runs["cowimg"], row.runs["peer"]
        n = min(len(c), len(p))
        ratio = statistics.median(c[i].wall / p[i].wall for i in range(n)) if n else None
        result = "**FAILED**" if row.failed else "ok"
        for i, (tool, rs) in enumerate((("cowimg", c), (row.peer_label, p))):
            if not rs:
                L.append(f"| | | {tool} | | | | | | | | |")
                continue
            s = stats(rs)
            mibs = f"{s['written'] / MiB / s['med']:.0f}" if s["written"] else "-"
            L.append(
                f"| {row.fixture if i == 0 else ''} | {row.op if i == 0 else ''} | {tool} | {fmt_s(s['med'])} | "
                f"{fmt_s(s['min'])}-{fmt_s(s['max'])} | {(f'**{ratio:.2f}**' if ratio is not None else '') if i == 0 else ''} | "
                f"{human(int(s['written'])) if s['written'] else '-'} | {mibs} | {fmt_s(s['cpu'])} | {s['rss']:.0f} | "
                f"{result if i == 0 else ''} |")
    L.append("")

    L.append("## Throttle accuracy\n")
    L.append("`cowimg stream --speed RATE --output json C` on the qcow2 chain: bytes copied / copying time (the "
             "`copied` and `elapsed` it reports) against the cap.\n")
    L.append("| cap | runs | copied | copying s (median) | achieved MiB/s | error vs cap | wall s | result |")
    L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for t in thr:
        if not t["runs"]:
            L.append(f"| {t['speed']} | 0 | | | | | | **FAILED** |")
            continue
        rates = [c / e for c, e, _ in t["runs"]]
        rate = statistics.median(rates)
        err = (rate - t["cap"]) / t["cap"] * 100
        L.append(f"| {t['speed']} ({t['cap'] / MiB:.0f} MiB/s) | {len(t['runs'])} | {human(t['runs'][0][0])} | "
                 f"{fmt_s(statistics.median(e for _, e, _ in t['runs']))} | {rate / MiB:.1f} | {err:+.1f}% | "
                 f"{fmt_s(statistics.median(w for _, _, w in t['runs']))} | {'**FAILED**' if t['failed'] else 'ok'} |")
    L.append("")

    failures = [(r.name, f, r.repro) for r in rows for f in r.failed] + \
               [(f"throttle {t['speed']}", t["failed"], None) for t in thr if t["failed"]]
    if failures:
        L.append("## Failures\n")
        for name, f, repro in failures:
            L.append(f"- **{name}** — {f}" + (f"\n  reproduce: `{repro}`" if repro else ""))
        L.append("")
    return "\n".join(L) + "\n", bool(failures)


# ---------------------------------------------------------------------------------------


def build_cowimg(scratch, rev=None):
    """cargo build --release of the work tree (or of commit `rev`, exported with git archive
    into the scratch dir and built there with its own target dir); returns a private copy
    of the binary, so that another build in this checkout cannot swap it mid-run."""
    src_dir, env = REPO, ENV
    if rev:
        sha = sh(["git", "rev-parse", "--verify", rev + "^{commit}"], cwd=REPO).stdout.strip()
        src_dir = os.path.join(scratch, "src", sha[:12])
        if not os.path.exists(os.path.join(src_dir, "Cargo.toml")):
            os.makedirs(src_dir, exist_ok=True)
            archive = subprocess.Popen(["git", "archive", sha], cwd=REPO, stdout=subprocess.PIPE)
            subprocess.run(["tar", "-x", "-C", src_dir], stdin=archive.stdout, check=True)
            if archive.wait() != 0:
                raise SetupError(f"git archive {sha} failed")
        env = dict(ENV, CARGO_TARGET_DIR=os.path.join(scratch, "target"))
    log(f"cargo build --release in {src_dir}")
    p = subprocess.run(["cargo", "build", "--release", "--bin", "cowimg"], cwd=src_dir, env=env)
    if p.returncode != 0:
        raise SetupError("cargo build --release failed (use --cowimg PATH to bench an existing binary)")
    target = env.get("CARGO_TARGET_DIR", os.path.join(src_dir, "target"))
    dst = os.path.join(scratch, "bin", "cowimg")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    rm(dst)
    shutil.copy2(os.path.join(target, "release", "cowimg"), dst)
    return dst


def git_commit(rev=None):
    if rev:
        return sh(["git", "rev-parse", "--short=12", rev], cwd=REPO).stdout.strip()
    head = sh(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, check=False).stdout.strip() or "unknown"
    dirty = sh(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, check=False).stdout.strip()
    if not dirty:
        return head
    import hashlib
    diff = subprocess.run(["git", "diff", "HEAD"], cwd=REPO, stdout=subprocess.PIPE).stdout
    return f"{head} + uncommitted changes in the work tree (`git diff HEAD` sha256 {hashlib.sha256(diff).hexdigest()[:12]})"


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=None, help="virtual size of the fixtures (default 1G)")
    ap.add_argument("--runs", type=int, default=None, help="counted runs per tool after a warm-up (default 5)")
    ap.add_argument("--quick", action="store_true", help="development mode: 256M and 1 run unless given")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "cowimg-bench"),
                    help="scratch directory for fixtures and runs (default /tmp/cowimg-bench)")
    ap.add_argument("--report", help="also write the Markdown report to this file")
    ap.add_argument("--cowimg", help="bench this binary instead of building with cargo build --release")
    ap.add_argument("--rev", help="build this commit (exported with git archive) instead of the work tree")
    ap.add_argument("--only", help="run only rows whose name matches this regex (throttle rows: 'throttle')")
    ap.add_argument("--throttle-runs", type=int, default=None, help="runs per --speed cap (default: --runs, at most 3)")
    ap.add_argument("--verify-peer-every-run", action="store_true",
                    help="check every peer result too (default: the peer's warm-up result only)")
    ap.add_argument("--note", help="a note printed at the top of the report")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.size is None:
        args.size = 256 * MiB if args.quick else GiB
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.size % MiB or args.size < 64 * MiB:
        ap.error("--size must be a multiple of 1 MiB and at least 64M")
    args.dd_runs = min(args.runs, 3)
    thr_runs = args.throttle_runs if args.throttle_runs is not None else min(args.runs, 3)

    for tool in ("qemu-img", "qemu-io", "dd", "cp", "cat"):
        if not shutil.which(tool):
            raise SetupError(f"{tool} not found (qemu-img and qemu-io: Debian package qemu-utils)")
    started = time.time()
    loads = [os.getloadavg()]
    scratch = os.path.abspath(args.dir)
    os.makedirs(scratch, exist_ok=True)
    cow = os.path.abspath(args.cowimg) if args.cowimg else build_cowimg(scratch, args.rev)
    commit = f"{git_commit()} (binary given: {args.cowimg})" if args.cowimg else git_commit(args.rev)
    facts = machine_facts(scratch, cow, commit)

    fx = Fixtures(scratch, args.size, args.seed)
    fx.build()

    rows = make_rows(fx, cow)
    sel = re.compile(args.only) if args.only else None
    rows = [r for r in rows if not sel or sel.search(r.name)]
    for row in rows:
        # check and info take milliseconds: more pairs, so that scheduling noise averages out
        bench_row(row, args.runs * (READONLY_RUNS_FACTOR if row.kind == "readonly" else 1),
                  args.verify_peer_every_run)

    thr = []
    if not sel or sel.search("throttle"):
        for speed in ("50M", "200M"):
            thr.append(throttle(fx, cow, speed, thr_runs))

    # physical limits: dd of as many bytes as each writing operation wrote (distinct sizes)
    dd_rows, seen = [], {}
    for row in rows:
        if row.runs["cowimg"] and row.kind != "readonly":
            nbytes = int(stats(row.runs["cowimg"])["written"])
            key = math.ceil(nbytes / (64 * MiB))  # sizes within 64 MiB share one measurement
            if nbytes and key not in seen:
                seen[key] = row.name
                log(f"dd {human(nbytes)}")
                b, t_buf = dd_write(scratch, nbytes, False, args.dd_runs)
                _, t_dir = dd_write(scratch, nbytes, True, args.dd_runs)
                dd_rows.append((b, row.name, t_buf, t_dir))
    cat_rows = []
    for name, files in (("qcow2", ["A.qcow2", "B.qcow2", "C.qcow2"]), ("qed", ["A.qed", "B.qed", "C.qed"]),
                        ("zlib", ["A.qcow2", "B.qcow2", "C.qcow2"]), ("raw", ["A.raw", "B.qcow2", "C.qcow2"])):
        if not sel or any(r.cwd == fx.d(name) for r in rows):
            log(f"cat {name}")
            nbytes, t = cat_read(files, fx.d(name), args.dd_runs)
            cat_rows.append((name, files, nbytes, t))

    loads.append(os.getloadavg())
    loads = [" ".join(f"{x:.1f}" for x in l) for l in loads]
    text, failed = report(args, fx, facts, rows, dd_rows, cat_rows, thr, started, loads)
    sys.stdout.write(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
        log(f"report written to {args.report}")
    if failed:
        log("some rows FAILED (see the Failures section)")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SetupError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(2)
