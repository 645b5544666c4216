"""
bench/fingerprint.py -- what the content fingerprints cost (issue 17): model.weights_fingerprint on a
checkpoint-sized safetensors file of random bytes (default 16 GiB in 291 tensors, Llama-3-8B's count), read
cold (its pages dropped from the page cache with posix_fadvise) and warm, against a full sha256 of the same
bytes; and train.data_fingerprint (a full sha256 of the split files) on 1 GiB of token file, cold and warm.

Run:  python -m bench fingerprint [--gib 16 --tensors 291 --dir /tmp]
"""
import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_random_safetensors(f, total, n):
    """A valid safetensors file of n F32 tensors of random bytes, `total` bytes of data in all."""
    per = total // n // 4 * 4
    header, off = {}, 0
    for i in range(n):
        header[f"model.layers.{i}.weight"] = {"dtype": "F32", "shape": [per // 4], "data_offsets": [off, off + per]}
        off += per
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    rng = np.random.default_rng(0)
    with open(f, "wb") as fh:
        fh.write(len(h).to_bytes(8, "little") + h)
        for _ in range(n):
            left = per
            while left:
                k = min(left, 1 << 26)
                fh.write(rng.bytes(k))
                left -= k
        fh.flush()
        os.fsync(fh.fileno())
    return off


def drop_cache(f):
    fd = os.open(f, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the page cache (no root needed)
    os.close(fd)


def sha256_file(f, limit=None):
    h, n = hashlib.sha256(), 0
    with open(f, "rb") as fh:
        while (chunk := fh.read(1 << 24)) and (limit is None or n < limit):
            h.update(chunk)
            n += len(chunk)
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=16.0)
    p.add_argument("--tensors", type=int, default=291)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--sha_gib", type=float, default=2.0, help="GiB of the file a full sha256 reads (cold), extrapolated")
    a = p.parse_args(argv)
    from model import weights_fingerprint
    d = Path(tempfile.mkdtemp(dir=a.dir))
    try:
        f = d / "model.safetensors"
        t0 = time.perf_counter()
        size = write_random_safetensors(f, int(a.gib * 2**30), a.tensors)
        print(f"wrote {size / 2**30:.2f} GiB in {a.tensors} tensors in {time.perf_counter() - t0:.1f} s")
        rows = []
        for state in ("cold", "warm", "cold"):
            if state == "cold":
                drop_cache(f)
            t0 = time.perf_counter()
            fp = weights_fingerprint(d)
            rows.append((state, time.perf_counter() - t0, fp))
        for state, dt, fp in rows:
            print(f"weights_fingerprint {state}: {dt * 1000:.1f} ms ({fp}), reads {a.tensors} x 8 x 512 B = "
                  f"{a.tensors * 8 * 512 / 2**20:.2f} MiB")
        drop_cache(f)
        t0 = time.perf_counter()
        n = sha256_file(f, int(a.sha_gib * 2**30))
        dt = time.perf_counter() - t0
        print(f"full sha256, cold: {n / 2**30 / dt:.2f} GiB/s -> {size / (n / dt):.1f} s for the whole file")
        data = d / "data"  # train.data_fingerprint itself, on 1 GiB of token file read twice: the second is warm
        data.mkdir()
        rng = np.random.default_rng(1)
        with open(data / "train.bin", "wb") as fh:
            for _ in range(16):
                fh.write(rng.bytes(1 << 26))
            fh.flush()
            os.fsync(fh.fileno())  # written pages must be clean for drop_cache to drop them
        from train import data_fingerprint
        for state in ("cold", "warm"):
            if state == "cold":
                drop_cache(data / "train.bin")
            t0 = time.perf_counter()
            data_fingerprint(data)
            print(f"train.data_fingerprint, {state}: {time.perf_counter() - t0:.2f} s per GiB of token files")
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
