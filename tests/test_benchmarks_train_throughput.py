"""benchmarks/train_throughput.py (the example's loop against the bare step) runs and reports paired rates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_reports_the_loop_against_the_bare_step(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = ["--steps", "2", "--rounds", "3", "--images", "64", "--image-size", "16", "--json", str(tmp_path / "r.json")]
    proc = subprocess.run([sys.executable, "benchmarks/train_throughput.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result["script_rounds"]) == len(result["bare_rounds"]) == 3 and result["steps"] == 2
    assert result["script_images_per_s"] > 0 and result["bare_images_per_s"] > 0 and result["ratio"] > 0
    assert sorted(result["script_rounds"])[1] == result["script_images_per_s"]  # the median round
