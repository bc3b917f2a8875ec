"""examples/export_onnx.py, run as a user runs it: the checkpoint it reads (safely), its one-line errors, and one
real export.

The module's fixture runs every command first (``script_runs``), each in a folder of its own; the tests read what
each left.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_cases import CASES, code_running_checkpoint, make_case
from script_runs import Result, run, run_all, run_commands

from mixshare_layers import MIMOWrapper
from mixshare_layers.checkpoint import save_checkpoint
from mixshare_layers.models import wide_resnet

SCRIPT, MODULE = "examples/export_onnx.py", "examples.export_onnx"
CONFIG = {"depth": 10, "width": 1, "method": "mixmo", "num_subnetworks": 2}
EXTRAS = ("onnx", "onnxruntime", "onnxscript")

BAD_OPTIONS = [
    (["--depth", "11"], "--depth"),
    (["--width", "0"], "--width"),
    (["--num-classes", "0"], "--num-classes"),
    (["--num-subnetworks", "0"], "--num-subnetworks"),
    (["--preset", "bogus"], "--preset"),
    (["--out", "{tmp}"], "--out"),
    (["--out", "{tmp}/a-file/m.onnx"], "--out"),
    (["--checkpoint", "{tmp}/missing.pt"], "does not exist"),
    (["--checkpoint", "{state}", "--width", "2", "--num-classes", "10"], "give the --depth --width"),
]
BAD_IDS = [" ".join(a) for a, _ in BAD_OPTIONS]


def _model() -> MIMOWrapper:
    """WRN-10-1, 10 classes, M = 2, always the same weights (the global RNG left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixmo")


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    """``{key: (result, folder, files before)}`` for every command, each given a folder of its own: the bad options,
    the bad checkpoints and a real export of a training checkpoint (``checkpoint.pt``: CONFIG, the weights of
    ``_model()``) as ``python -m examples.export_onnx`` in one process; a code-running checkpoint under
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` as ``python examples/export_onnx.py`` in another, at the same time."""
    source = tmp_path_factory.mktemp("source")
    model = _model()
    save_checkpoint(source / "checkpoint.pt", {"model": model.state_dict(), "config": CONFIG, "epoch": 1})
    torch.save(model.state_dict(), source / "state.pt")  # a bare state_dict of WRN-10-1, 10 classes

    def folder(name: str) -> Path:
        new = tmp_path_factory.mktemp(name)
        shutil.copy(source / "checkpoint.pt", new / "checkpoint.pt")
        return new

    commands, folders, before = {}, {}, {}
    for argv, _ in BAD_OPTIONS:
        key = " ".join(argv)
        tmp = folders[key] = folder("option")
        (tmp / "a-file").write_text("not a folder")
        shutil.copy(source / "state.pt", tmp / "state.pt")
        argv = [a.replace("{tmp}", str(tmp)).replace("{state}", str(tmp / "state.pt")) for a in argv]
        out = [] if "--out" in argv else ["--out", str(tmp / "m.onnx")]
        before[key] = sorted(p.name for p in tmp.iterdir())
        commands[key] = [*out, "--depth", "10", "--width", "1", *argv]
    for case in sorted(CASES):
        tmp = folders[case] = folder(case)
        make_case(case, tmp / "checkpoint.pt", tmp / f"{case}.pt", tmp / "marker")
        commands[case] = ["--checkpoint", tmp / f"{case}.pt", "--out", tmp / "m.onnx"]
    if all(importlib.util.find_spec(name) is not None for name in EXTRAS):
        tmp = folders["export"] = folder("export")
        commands["export"] = ["--checkpoint", tmp / "checkpoint.pt", "--out", tmp / "m.onnx"]
    tmp = folders["evil"] = tmp_path_factory.mktemp("evil")
    evil = code_running_checkpoint(tmp / "evil.pt", tmp / "marker", config=CONFIG)
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    batch = [(MODULE, argv) for argv in commands.values()]
    done = run_all(
        {
            "batch": functools.partial(run_commands, batch),
            "evil": functools.partial(run, SCRIPT, "--checkpoint", evil, "--out", tmp / "m.onnx", env=env),
        }
    )
    results = dict(zip(commands, done["batch"], strict=True))
    results["evil"] = done["evil"]
    return {key: (res, folders[key], before.get(key)) for key, res in results.items()}


def _one_line_error(res: Result, *needles: str) -> str:
    lines = res.err_lines()
    assert res.code == 2, res.err
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(("argv", "needle"), BAD_OPTIONS, ids=BAD_IDS)
def test_bad_option_one_line_exit_2(outcome, argv, needle):
    res, folder, before = outcome[" ".join(argv)]
    _one_line_error(res, needle)
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_one_line_exit_2(outcome, case):
    res, folder, _ = outcome[case]
    bad = folder / f"{case}.pt"
    if case == "missing_model":  # no "model" entry: read as a bare state_dict, which does not fit
        _one_line_error(res, str(bad), "does not fit")
    else:
        _one_line_error(res, str(bad))
    assert not (folder / "m.onnx").exists() and not (folder / "marker").exists()


@pytest.mark.parametrize("key", ["code_running_pickle", "evil"], ids=["plain", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_code_running_checkpoint_never_runs(outcome, key):
    res, folder, _ = outcome[key]
    path = folder / ("evil.pt" if key == "evil" else f"{key}.pt")
    _one_line_error(res, str(path), "refused", "builtins.exec")
    assert not (folder / "marker").exists() and not (folder / "m.onnx").exists()


def test_export_of_a_training_checkpoint(outcome):
    for name in EXTRAS:
        pytest.importorskip(name)
    res, folder, _ = outcome["export"]
    assert res.code == 0, res.err[-3000:]
    out = folder / "m.onnx"
    assert out.stat().st_size > 0 and f"wrote {out}: logits (5, 2, 10)" in res.out
    assert "architecture from the checkpoint: WRN-10-1, 10 classes, M = 2, mixmo" in res.out
    import onnxruntime as ort

    model = _model()  # the weights of the checkpoint it exported
    x = torch.randn(3, 3, 32, 32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": x.numpy()})
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "m.onnx"]  # no temporary file left
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
