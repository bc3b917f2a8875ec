"""No entry point runs code from a checkpoint: a crafted file is fed to each, run as its command line.

Each file's pickle calls ``exec`` (which would create a marker file of its own) when unpickled without
``weights_only=True``. The commands run in one fresh process started with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
(which turns the ``torch.load`` calls that leave ``weights_only`` out into full unpickles), each as ``python -m``
or ``python script.py`` would run it (``runpy``, ``__main__``, its own ``sys.argv``); the other tests of each entry
point check the same in-process, with and without that variable. Every command must refuse its file in one line
(exit code 2), except the table script, which reports the cell's checkpoint as unusable and goes on, and no
marker may exist afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from checkpoint_cases import code_running_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"depth": 10, "width": 1, "method": "mixmo", "num_subnetworks": 2, "epochs": 3}
NAMES = ("analysis", "resume_file", "resume_folder", "export_onnx", "table1", "verify", "convert")

_DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    commands = json.loads(sys.argv[1])
    results = {}
    for name, (kind, target, argv) in commands.items():
        out, err = io.StringIO(), io.StringIO()
        sys.argv = [target, *argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if kind == "module":
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(target, run_name="__main__")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        results[name] = [code, out.getvalue(), err.getvalue()]
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict[str, list]]:
    tmp = tmp_path_factory.mktemp("security")

    def evil(name: str) -> Path:
        folder = tmp / name
        folder.mkdir()
        return code_running_checkpoint(folder / "evil.pt", folder / "marker", config=CONFIG, epoch=1)

    run = tmp / "resume_folder" / "run"  # a run folder whose checkpoint.pt is the crafted file
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(CONFIG))
    code_running_checkpoint(run / "checkpoint.pt", tmp / "resume_folder" / "marker", config=CONFIG, epoch=1)
    cell = tmp / "table1" / "table" / "runs" / "mixmo-s0"  # a finished table cell: its checkpoint feeds a column
    cell.mkdir(parents=True)
    code_running_checkpoint(cell / "checkpoint.pt", tmp / "table1" / "marker", config=CONFIG, epoch=1)
    summary = {"ensemble_acc": 1.0, "mean_individual_acc": 1.0, "classifier_sharing": 1.0, "run_dir": str(cell)}
    (cell / "summary.json").write_text(json.dumps(summary))
    ex = str(ROOT / "examples")
    commands = {
        "analysis": (
            "module", "mixshare_layers.analysis", [str(evil("analysis")), "--out", str(tmp / "an"), "--no-plots"]
        ),
        "resume_file": ("path", f"{ex}/cifar100_wrn.py", ["--resume", str(evil("resume_file"))]),
        "resume_folder": ("path", f"{ex}/cifar100_wrn.py", ["--resume", str(run)]),
        "export_onnx": (
            "path", f"{ex}/export_onnx.py", ["--checkpoint", str(evil("export_onnx")), "--out", str(tmp / "m.onnx")]
        ),
        "table1": (
            "path", f"{ex}/reproduce_table1.py",
            ["--methods", "mixmo", "--seeds", "0", "--out-dir", str(tmp / "table1" / "table")],
        ),
        "verify": ("module", "mixshare_layers.checkpoint", ["verify", str(evil("verify"))]),
        "convert": ("module", "mixshare_layers.checkpoint", ["convert", str(evil("convert")), str(tmp / "conv.pt")]),
    }  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(commands)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", NAMES)
def test_entry_point_refuses_code_running_checkpoint(results, name: str) -> None:
    tmp, outcome = results
    code, out, err = outcome[name]
    assert not (tmp / name / "marker").exists(), f"{name} ran the checkpoint's code"
    if name == "table1":  # the cell's sum-ratio column is left empty, with the reason
        assert code == 0, err[-2000:]
        assert "sum-ratio column left empty" in out and "refused" in out and "builtins.exec" in out
        return
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0], err[-2000:]
    assert "builtins.exec" in lines[0]
    assert not (tmp / "an").exists() and not (tmp / "m.onnx").exists() and not (tmp / "conv.pt").exists()
