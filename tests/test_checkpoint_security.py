"""No entry point runs code from a checkpoint: a crafted file is fed to each, run as its command line.

Each file's pickle calls ``exec`` (which would create a marker file of its own) when unpickled without
``weights_only=True``. The commands run in one fresh process started with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
(which turns the ``torch.load`` calls that leave ``weights_only`` out into full unpickles), each as ``python -m``
would run it (``script_runs.run_commands``: ``__main__``, its own ``sys.argv``; the example scripts as
``examples.NAME``); the other tests of each entry point check the same with and without that variable. Every
command must refuse its file in one line (exit code 2), except the table script, which reports the cell's checkpoint
as unusable and goes on, and no marker may exist afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoint_cases import code_running_checkpoint
from script_runs import run_commands

CONFIG = {"depth": 10, "width": 1, "method": "mixmo", "num_subnetworks": 2, "epochs": 3}
NAMES = ("analysis", "resume_file", "resume_folder", "export_onnx", "table1", "verify", "convert")


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
    commands = {
        "analysis": ("mixshare_layers.analysis", [evil("analysis"), "--out", tmp / "an", "--no-plots"]),
        "resume_file": ("examples.cifar100_wrn", ["--resume", evil("resume_file")]),
        "resume_folder": ("examples.cifar100_wrn", ["--resume", run]),
        "export_onnx": ("examples.export_onnx", ["--checkpoint", evil("export_onnx"), "--out", tmp / "m.onnx"]),
        "table1": (
            "examples.reproduce_table1",
            ["--methods", "mixmo", "--seeds", "0", "--out-dir", tmp / "table1" / "table"],
        ),
        "verify": ("mixshare_layers.checkpoint", ["verify", evil("verify")]),
        "convert": ("mixshare_layers.checkpoint", ["convert", evil("convert"), tmp / "conv.pt"]),
    }
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    results = run_commands(list(commands.values()), cwd=tmp, env=env)
    return tmp, {name: [r.code, r.out, r.err] for name, r in zip(commands, results, strict=True)}


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
