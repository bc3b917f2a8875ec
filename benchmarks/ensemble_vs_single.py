#!/usr/bin/env python
"""What a MixShare ensemble buys over the plain backbone trained the same way, across WRN widths and budgets.

Each run is ``examples/cifar100_wrn.py --quick`` (the built-in hard synthetic task: 40 classes of textures in a
small window on clutter, 24x24, 4500 training / 500 validation / 2000 test images; WRN-10-w; SGD with a cosine
schedule; the temperature fitted on the validation split) with one ``--method``, ``--width``, ``--epochs`` and
``--seed``, run as a child process with one intra-op thread. The table gives, per width, budget and method, the
mean ± standard error over seeds of what the example's ``summary.json`` reports: test accuracy (ensemble and mean
member), NLL raw and calibrated, ECE raw and calibrated, accuracy on the corrupted test images, OOD AUROC (max
probability) and training time; and per width and budget the MixShare - single difference of each, with ``**``
where it exceeds two standard errors of the difference (seeds are paired: the same data, batch order and
corruptions).

Usage:
    python benchmarks/ensemble_vs_single.py --widths 1 2 4 --epochs 10 20 --seeds 0 1 2 --jobs 2 --out runs/evs
    python benchmarks/ensemble_vs_single.py --methods single mimo --widths 2 --out runs/evs   # another preset
    python benchmarks/ensemble_vs_single.py --table-only --out runs/evs    # tabulate the runs that are there

A run whose ``summary.json`` exists is skipped, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cifar100_wrn.py"
# (column, how to read it from a summary.json, format)
COLUMNS: tuple[tuple[str, Any, str], ...] = (
    ("acc (%)", lambda s: s["shift"]["clean"]["ensemble_acc_pct"], ".2f"),
    ("members (%)", lambda s: s["shift"]["clean"]["mean_individual_acc_pct"], ".2f"),
    ("NLL", lambda s: s["shift"]["clean"]["nll_nats"], ".3f"),
    ("NLL cal.", lambda s: s["shift"]["calibrated_clean"]["nll_nats"], ".3f"),
    ("ECE (%)", lambda s: s["shift"]["clean"]["ece_pct"], ".2f"),
    ("ECE cal. (%)", lambda s: s["shift"]["calibrated_clean"]["ece_pct"], ".2f"),
    ("corrupted acc (%)", lambda s: s["shift"]["corruption_mean"]["ensemble_acc_pct"], ".2f"),
    ("OOD AUROC (%)", lambda s: s["shift"]["ood"]["synthetic"]["msp"]["auroc_pct"], ".2f"),
    ("train (s)", lambda s: s["train_time_s"], ".0f"),
)
METHODS = ("single", "mixshare")  # the default pair; any preset can join with --methods


def run_name(method: str, width: int, epochs: int, seed: int) -> str:
    return f"{method}-w{width}-e{epochs}-s{seed}"


def train(out: Path, method: str, width: int, epochs: int, seed: int, extra: list[str]) -> Path:
    """One run of the example (skipped when its summary exists); returns its summary's path."""
    name = run_name(method, width, epochs, seed)
    summary = out / name / "summary.json"
    if summary.is_file():
        return summary
    if (out / name).exists():  # an interrupted run: start it again
        subprocess.run(["rm", "-rf", str(out / name)], check=True)
    command = [sys.executable, str(EXAMPLE), "--quick", "--method", method, "--width", str(width), "--epochs",
               str(epochs), "--seed", str(seed), "--threads", "1", "--tensorboard", "false", "--progress", "false",
               "--baseline", "false", "--out-dir", str(out), "--run-name", name, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = out / f"{name}.log"
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"{name} failed (exit {done.returncode}): see {log}")
    print(f"done {name}", flush=True)
    return summary


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan"))


def table(out: Path) -> str:
    """The markdown tables of every run under ``out``."""
    runs: dict[tuple[int, int], dict[str, dict[int, dict]]] = {}
    for path in sorted(out.glob("*/summary.json")):
        s = json.loads(path.read_text())
        method, w, e, seed = path.parent.name.rsplit("-", 3)
        runs.setdefault((int(w[1:]), int(e[1:])), {}).setdefault(method, {})[int(seed[1:])] = s
    head = "| width | epochs (steps) | method | seeds | " + " | ".join(c for c, _, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (4 + len(COLUMNS))]
    diffs = ["| width | epochs | method | seeds | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
             "|" + "---|" * (4 + len(COLUMNS))]  # fmt: skip
    for (w, e), by_method in sorted(runs.items()):
        order = sorted(by_method, key=lambda name: (name != "single", name))
        for method in order:
            got = by_method[method]
            steps = next(iter(got.values()))["steps"]
            cells = []
            for _, read, fmt in COLUMNS:
                m, se = mean_se([read(s) for s in got.values()])
                cells.append(f"{m:{fmt}} ± {se:{fmt}}")
            lines.append(f"| {w} | {e} ({steps}) | {method} | {len(got)} | " + " | ".join(cells) + " |")
        for method in order[1:] if order and order[0] == "single" else ():
            paired = sorted(set(by_method["single"]) & set(by_method[method]))
            if len(paired) < 2:
                continue
            cells = []
            for _, read, fmt in COLUMNS:
                d = [read(by_method[method][i]) - read(by_method["single"][i]) for i in paired]
                m, se = mean_se(d)
                cells.append(f"{m:+{fmt}} ± {se:{fmt}}" + (" **" if abs(m) > 2 * se else ""))
            diffs.append(f"| {w} | {e} | {method} | {len(paired)} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", "Each method - single, paired by seed (** beyond 2 standard errors):", "", *diffs])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="'single' and presets")
    p.add_argument("--widths", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, nargs="+", default=[10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/ensemble_vs_single"))
    p.add_argument("--table-only", action="store_true")
    p.add_argument("extra", nargs="*", help="more options for the example, after --")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        todo = [(m, w, e, s) for w in args.widths for e in args.epochs for s in args.seeds for m in args.methods]
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(train, args.out, *t, args.extra) for t in todo]:
                future.result()
    print(table(args.out))


if __name__ == "__main__":
    main()
