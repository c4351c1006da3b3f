#!/usr/bin/env python3
"""What one fdatasync costs on this disk: appending to a file that grows,
against writing over a file already filled with zeros.

A sync after an append also writes the inode (the file's size changed);
over a pre-filled file it writes the data alone. Every log here (a
classic queue's, the quorum queues' shared log, a stream's segments)
appends, so each group commit pays the first figure.

    perf/fsync_probe.py [DIR] [SYNCS] [BYTES]   (defaults: $TMPDIR or /tmp, 2000, 4096)
"""
import os
import sys
import tempfile
import time


def per_sync(path, prefilled, n, size):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        if prefilled:
            os.write(fd, b"\0" * (size * n))
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        buf = b"x" * size
        start = time.perf_counter()
        for _ in range(n):
            os.write(fd, buf)
            os.fdatasync(fd)
        return (time.perf_counter() - start) / n * 1e6
    finally:
        os.close(fd)
        os.unlink(path)


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
    path = os.path.join(folder, "wasmq-fsync-probe")
    for _ in range(3):
        grow = per_sync(path, False, n, size)
        over = per_sync(path, True, n, size)
        print(f"append: {grow:.0f} µs per sync; over a pre-filled file: {over:.0f} µs per sync")


if __name__ == "__main__":
    main()
