#!/usr/bin/env python
"""Cost of the safe checkpoint files: ``save_checkpoint`` / ``load_checkpoint`` next to bare ``torch.save`` / ``load``.

For each size, every repeat runs in turn: ``torch.save`` to a file + fsync (what the training script did before),
``save_checkpoint(..., keep_previous=True)`` (digest computed while writing, the file read back and verified, the
previous file kept), ``torch.load(..., weights_only=True)`` and ``load_checkpoint`` (digest checked, then the same
load). Prints the medians and the ratios as a markdown table.

    flock /tmp/mixshare_cpu.lock python benchmarks/checkpoint_io.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mixshare_layers import MIMOWrapper
from mixshare_layers.checkpoint import load_checkpoint, save_checkpoint
from mixshare_layers.models import wide_resnet


def training_checkpoint(width: int) -> dict:
    """What examples/cifar100_wrn.py saves for a WRN-28-``width``, M = 2: weights and SGD momentum buffers."""
    model = MIMOWrapper(wide_resnet(28, width, 100), 2, preset="mixshare")
    momentum = {i: {"momentum_buffer": p.detach().clone()} for i, p in enumerate(model.parameters())}
    return {"model": model.state_dict(), "optimizer": {"state": momentum, "param_groups": []}, "epoch": 1}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bare_save(payload: dict, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 10], help="WRN-28-k checkpoints to time")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| checkpoint | size | torch.save + fsync | save_checkpoint | ratio | torch.load | load_checkpoint | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        for width in args.widths:
            payload = training_checkpoint(width)
            bare, ours = Path(folder) / "bare.pt", Path(folder) / "ours.pt"
            times: dict[str, list[float]] = {"save": [], "ours_save": [], "load": [], "ours_load": []}
            steps = {
                "save": lambda p=payload, f=bare: bare_save(p, f),
                "ours_save": lambda p=payload, f=ours: save_checkpoint(f, p, keep_previous=True),
                "load": lambda f=bare: torch.load(f, map_location="cpu", weights_only=True),
                "ours_load": lambda f=ours: load_checkpoint(f),
            }
            for _ in range(args.repeats + 1):  # the first round warms the page cache, not counted
                for key, step in steps.items():
                    times[key].append(timed(step))
            med = {k: statistics.median(v[1:]) for k, v in times.items()}
            size = ours.stat().st_size / 1e6
            print(
                f"| WRN-28-{width}, M = 2, weights + momentum | {size:.0f} MB | {med['save']:.3f} s | "
                f"{med['ours_save']:.3f} s | {med['ours_save'] / med['save']:.2f} | {med['load']:.3f} s | "
                f"{med['ours_load']:.3f} s | {med['ours_load'] / med['load']:.2f} |"
            )


if __name__ == "__main__":
    main()
