"""The integration examples run end to end in their seconds-long --smoke mode (examples/lightning_wrn.py,
examples/torch_uncertainty_wrn.py), and what they report is consistent."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore:.*isinstance\\(treespec, LeafSpec\\)"
)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def test_torch_uncertainty_example(tmp_path, capsys):
    pytest.importorskip("torch_uncertainty")
    out = _load("torch_uncertainty_wrn").main(["--smoke", "--out-dir", str(tmp_path)])
    theirs, ours = out["torch_uncertainty"], out["mixshare_layers"]
    # the two libraries evaluate the same ensemble (mean of member probabilities) and agree
    assert theirs["test/cls/Acc"] == pytest.approx(ours["clean"]["ensemble_acc"], abs=1e-5)
    assert theirs["test/cls/NLL"] == pytest.approx(ours["clean"]["nll"], abs=1e-5)
    assert theirs["ood/AUROC"] == pytest.approx(ours["ood"]["synthetic"]["mutual_information"]["auroc"], abs=1e-5)
    assert 0.0 <= theirs["ood/FPR95"] <= 1.0
    assert "torch-uncertainty" in capsys.readouterr().out
    assert list(tmp_path.rglob("metrics.csv"))  # the CSV logger wrote the run's logs


def test_lightning_example(tmp_path, capsys):
    pytest.importorskip("lightning")
    out = _load("lightning_wrn").main(["--smoke", "--out-dir", str(tmp_path)])
    assert {"val/ensemble_acc", "val/individual_acc/0", "val/individual_acc/1", "val/disagreement"} <= set(out["val"])
    assert {"test/aurc", "test/ood1/mutual_information/auroc"} <= set(out["test"])
    report = json.loads((tmp_path / "uncertainty.json").read_text())
    assert report["temperature"] > 0 and set(report["shift"]) == {"contrast"}
    assert out["test"]["test/ensemble_acc"] == pytest.approx(report["clean"]["ensemble_acc"], abs=1e-6)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "uncertainty.png").is_file()
    assert "OOD AUROC" in capsys.readouterr().out
