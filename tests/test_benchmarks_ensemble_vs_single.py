"""benchmarks/ensemble_vs_single.py trains the example's runs, skips finished ones and pairs them by seed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--synthetic-train", "96", "--synthetic-test", "64", "--synthetic-classes", "4", "--synthetic-size", "16",
        "--batch-size", "32", "--eval-every", "0", "--eval-batch-size", "64", "--val-split", "0.25",
        "--shift-corruptions", "contrast", "--shift-severities", "3", "--ood-samples", "32"]  # fmt: skip


def _sweep(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, "benchmarks/ensemble_vs_single.py", "--out", str(out), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_sweep_trains_pairs_and_tabulates(tmp_path: Path) -> None:
    proc = _sweep(tmp_path, "--widths", "1", "--epochs", "1", "--seeds", "0", "1", "--jobs", "2", "--", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")}
    assert set(summaries) == {f"{m}-w1-e1-s{s}" for m in ("single", "mixshare") for s in (0, 1)}
    assert all(s["shift"]["calibrated_clean"] is not None for s in summaries.values())  # each fitted a temperature
    rows = {line.split(" | ")[2]: line for line in proc.stdout.splitlines() if line.startswith("| 1 | 1 ")}
    assert set(rows) == {"single", "mixshare"}
    # the paired difference of the accuracies, as the table gives it (mean over the two seeds)
    acc = {k: v["shift"]["clean"]["ensemble_acc_pct"] for k, v in summaries.items()}
    diff = [acc[f"mixshare-w1-e1-s{s}"] - acc[f"single-w1-e1-s{s}"] for s in (0, 1)]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("| 1 | 1 | mixshare | 2 |"))
    assert line.split(" | ")[4].startswith(f"{sum(diff) / 2:+.2f} ± {abs(diff[0] - diff[1]) / 2:.2f}")
    assert not math.isnan(float(line.split(" | ")[4].split(" ± ")[1].split()[0]))
    again = _sweep(tmp_path, "--widths", "1", "--epochs", "1", "--seeds", "0", "1", "--", *TINY)
    assert again.returncode == 0 and "done " not in again.stdout  # every run was there: nothing trained again
