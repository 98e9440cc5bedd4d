#!/usr/bin/env python3
"""Reference digest of a raw disk in blkhash's construction (blksum 0.10 and later), the
oracle of tests/checksum.rs. Deliberately naive: every block is read and hashed, no zero
shortcut, no threads, so it shares nothing with cowimg's implementation but the spec
(docs/checksum.md):

    H( H(block 0) || H(block 1) || ... || H(block N-1) || le64(size) )

with 64 KiB blocks, the last one shorter when the size is not a multiple of 64 KiB.

Usage: blkhash.py [-a ALGORITHM] FILE...   (prints "DIGEST  FILE" lines, as blksum does)
"""

import argparse
import hashlib
import struct

BLOCK_SIZE = 64 * 1024


def digest(path, algorithm):
    outer = hashlib.new(algorithm)
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK_SIZE)
            if not block:
                break
            outer.update(hashlib.new(algorithm, block).digest())
            size += len(block)
    outer.update(struct.pack("<Q", size))
    return outer.hexdigest()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-a", "--algorithm", default="sha256")
    p.add_argument("files", nargs="+")
    args = p.parse_args()
    # openssl's names (sha512-256) are hashlib's with an underscore.
    algorithm = args.algorithm.replace("-", "_")
    for path in args.files:
        print(f"{digest(path, algorithm)}  {path}")


if __name__ == "__main__":
    main()
