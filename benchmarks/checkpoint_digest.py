#!/usr/bin/env python
"""One ``hashlib.sha256`` pass on one core against the threaded 4 MiB-block tree digest, on checkpoint files.

The tree digest (the SHA-256 of the SHA-256s of consecutive 4 MiB blocks, the blocks hashed on a thread pool of
``min(8, cpu_count)`` threads) is what checkpoint files of format version 1 carry; the single pass is what version 2
carries. Both read the file through one 4 MiB buffer, as a load does. Files: a WRN-28-2 wrapped with M = 2 (preset
mixshare) saved with ``save_model``, and one ~500 MB file. Prints the median of ``--repeats`` runs (after one warm-up
run that fills the page cache) as a markdown table.

    TMPDIR=/dev/shm python benchmarks/checkpoint_digest.py --repeats 7
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mixshare_layers import MIMOWrapper
from mixshare_layers.checkpoint import WRN_BUILDER, save_checkpoint, save_model
from mixshare_layers.models import wide_resnet

BLOCK = 4 << 20


def single_pass(path: Path) -> str:
    digest = hashlib.sha256()
    buf = memoryview(bytearray(BLOCK))
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            digest.update(buf[:n])
    return digest.hexdigest()


def threaded_tree(path: Path) -> str:
    workers = max(1, min(8, os.cpu_count() or 1))
    top = hashlib.sha256()
    with open(path, "rb") as fh, ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        while block := fh.read(BLOCK):
            pending.append(pool.submit(lambda b: hashlib.sha256(b).digest(), block))
            while len(pending) > 2 * workers:  # a few blocks in flight, as the version-1 code did
                top.update(pending.popleft().result())
        while pending:
            top.update(pending.popleft().result())
    return top.hexdigest()


def median_time(fn, path: Path, repeats: int) -> float:
    fn(path)  # warm-up: page cache, thread start-up code paths
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--big-mb", type=int, default=500, help="size of the large file")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, hashing threads {max(1, min(8, os.cpu_count() or 1))}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        kwargs = {"depth": 28, "width": 2, "num_classes": 100}
        model = MIMOWrapper(wide_resnet(**kwargs), num_subnetworks=2, preset="mixshare")
        files = {
            "WRN-28-2, M = 2 (save_model)": save_model(
                Path(folder) / "wrn28_2.pt", model, builder=WRN_BUILDER, builder_kwargs=kwargs
            ),
            f"{args.big_mb} MB (save_checkpoint)": save_checkpoint(
                Path(folder) / "big.pt", {"w": torch.randn(args.big_mb * 250_000, generator=torch.Generator())}
            ),
        }
        print("| file | size | one sha256 pass, 1 core | threaded 4 MiB-block tree | ratio |")
        print("|---|---|---|---|---|")
        for name, path in files.items():
            one = median_time(single_pass, path, args.repeats)
            tree = median_time(threaded_tree, path, args.repeats)
            size = path.stat().st_size / 1e6
            print(f"| {name} | {size:.1f} MB | {one * 1e3:.1f} ms | {tree * 1e3:.1f} ms | {tree / one:.2f} |")


if __name__ == "__main__":
    main()
