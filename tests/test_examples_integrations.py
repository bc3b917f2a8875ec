"""The integration examples run end to end in their seconds-long --smoke mode (examples/lightning_wrn.py,
examples/torch_uncertainty_wrn.py), as a user runs them, and what they report is consistent."""

from __future__ import annotations

import importlib.util
import json

import pytest
from script_runs import run_commands

EXTRAS = {"torch_uncertainty_wrn": "torch_uncertainty", "lightning_wrn": "lightning"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every example whose extra is installed, in --smoke mode, as ``python -m examples.NAME`` in one process:
    ``{name: (result, out_dir)}``."""
    outs = {name: tmp_path_factory.mktemp(name) for name, extra in EXTRAS.items() if importlib.util.find_spec(extra)}
    results = run_commands([(f"examples.{name}", ["--smoke", "--out-dir", out]) for name, out in outs.items()])
    return {name: (res, outs[name]) for name, res in zip(outs, results, strict=True)}


def _smoke(smoke, name: str):
    if name not in smoke:
        pytest.skip(f"needs {EXTRAS[name]}")
    return smoke[name]


def test_torch_uncertainty_example(smoke):
    res, out_dir = _smoke(smoke, "torch_uncertainty_wrn")
    assert res.code == 0, res.err[-3000:]
    theirs = json.loads((out_dir / "metrics.json").read_text())["test"]
    ours = json.loads((out_dir / "uncertainty.json").read_text())
    # the two libraries evaluate the same ensemble (mean of member probabilities) and agree
    assert theirs["test/cls/Acc"] == pytest.approx(ours["clean"]["ensemble_acc"], abs=1e-5)
    assert theirs["test/cls/NLL"] == pytest.approx(ours["clean"]["nll"], abs=1e-5)
    assert theirs["ood/AUROC"] == pytest.approx(ours["ood"]["synthetic"]["mutual_information"]["auroc"], abs=1e-5)
    assert 0.0 <= theirs["ood/FPR95"] <= 1.0
    assert "torch-uncertainty" in res.out
    assert list(out_dir.rglob("metrics.csv"))  # the CSV logger wrote the run's logs


def test_lightning_example(smoke):
    res, out_dir = _smoke(smoke, "lightning_wrn")
    assert res.code == 0, res.err[-3000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert {"val/ensemble_acc", "val/individual_acc/0", "val/individual_acc/1", "val/disagreement"} <= set(
        metrics["val"]
    )
    assert {"test/aurc", "test/ood1/mutual_information/auroc"} <= set(metrics["test"])
    report = json.loads((out_dir / "uncertainty.json").read_text())
    assert report["temperature"] > 0 and set(report["shift"]) == {"contrast"}
    assert metrics["test"]["test/ensemble_acc"] == pytest.approx(report["clean"]["ensemble_acc"], abs=1e-6)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out_dir / "uncertainty.png").is_file()
    assert "OOD AUROC" in res.out
