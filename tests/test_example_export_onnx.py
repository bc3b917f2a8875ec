"""examples/export_onnx.py: the checkpoint it reads (safely), its one-line errors, and one real export."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_cases import CASES, code_running_checkpoint, make_case

from mixshare_layers import MIMOWrapper
from mixshare_layers.checkpoint import save_checkpoint
from mixshare_layers.models import wide_resnet

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "export_onnx.py"
CONFIG = {"depth": 10, "width": 1, "method": "mixmo", "num_subnetworks": 2}


@pytest.fixture(scope="module")
def export():
    spec = importlib.util.spec_from_file_location("_export_onnx_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, MIMOWrapper]:
    torch.manual_seed(0)
    model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixmo")
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"model": model.state_dict(), "config": CONFIG, "epoch": 1})
    return path, model


def _run_cli(export, argv, capsys):
    capsys.readouterr()
    try:
        code = export.cli(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _one_line_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


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


@pytest.mark.parametrize(("argv", "needle"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_one_line_exit_2(export, trained, tmp_path, capsys, argv, needle):
    _, model = trained
    (tmp_path / "a-file").write_text("not a folder")
    torch.save(model.state_dict(), tmp_path / "state.pt")  # a bare state_dict of WRN-10-1, 10 classes
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{state}", str(tmp_path / "state.pt")) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "m.onnx")]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = _run_cli(export, [*out, "--depth", "10", "--width", "1", *argv], capsys)
    _one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_one_line_exit_2(export, trained, tmp_path, case, capsys):
    good, _ = trained
    bad = tmp_path / f"{case}.pt"
    make_case(case, good, bad, tmp_path / "marker")
    code, err = _run_cli(export, ["--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx")], capsys)
    if case == "missing_model":  # no "model" entry: read as a bare state_dict, which does not fit
        _one_line_error(code, err, str(bad), "does not fit")
    else:
        _one_line_error(code, err, str(bad))
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "marker").exists()


def test_code_running_checkpoint_never_runs(export, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "marker"
    evil = code_running_checkpoint(tmp_path / "evil.pt", marker, config=CONFIG)
    for env in (None, "1"):
        if env is not None:
            monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", env)
        code, err = _run_cli(export, ["--checkpoint", str(evil), "--out", str(tmp_path / "m.onnx")], capsys)
        _one_line_error(code, err, str(evil), "refused", "builtins.exec")
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_export_of_a_training_checkpoint(export, trained, tmp_path, capsys):
    for name in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(name)
    path, model = trained
    threads = torch.get_num_threads()
    try:
        out = export.main(["--checkpoint", str(path), "--out", str(tmp_path / "m.onnx")])
    finally:
        torch.set_num_threads(threads)
    assert out == tmp_path / "m.onnx" and out.stat().st_size > 0
    assert "architecture from the checkpoint: WRN-10-1, 10 classes, M = 2, mixmo" in capsys.readouterr().out
    import onnxruntime as ort

    x = torch.randn(3, 3, 32, 32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": x.numpy()})
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "m.onnx"]  # no temporary file left
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
