"""examples/vit_synthetic.py in its seconds-long --smoke mode, run in-process through ``main(argv)``: what its summary
reports is well-formed for a MixShare ViT and for the plain ViT, its JSON equals it, and bad sizes are refused."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("timm")
    spec = importlib.util.spec_from_file_location("vit_synthetic", ROOT / "examples" / "vit_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vit_synthetic"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("vit_synthetic", None)
    return module


@pytest.mark.parametrize("method", ["mixshare", "single"])
def test_smoke_summary(example, method, tmp_path, capsys):
    path = tmp_path / "runs" / "vit.json"
    out = example.main(["--smoke", "--method", method, "--json", str(path)])
    m = 1 if method == "single" else 2
    cfg = out["config"]
    assert cfg["num_subnetworks"] == m and cfg["batch_repetition"] == (1 if method == "single" else 2)
    assert len(out["individual_acc"]) == m
    fractions = {key: out[key] for key in ("ensemble_acc", "mean_individual_acc", "disagreement", "ece")}
    fractions.update({f"individual_acc[{i}]": acc for i, acc in enumerate(out["individual_acc"])})
    for key, value in fractions.items():
        assert 0.0 <= value <= 1.0, (key, value)
    assert out["mean_individual_acc"] == pytest.approx(sum(out["individual_acc"]) / m)
    assert out["chance"] == pytest.approx(1 / cfg["classes"])
    assert math.isfinite(out["nll"]) and out["nll"] >= 0 and math.isfinite(out["brier"]) and out["brier"] >= 0
    assert math.isfinite(out["loss"]) and out["train_time_s"] > 0 and out["rows_per_s"] > 0
    assert out["steps"] == cfg["steps"] and [h["step"] for h in out["history"]] == [cfg["steps"]]
    if m == 1:  # one member: the ensemble is that member, and nothing is shared
        assert out["ensemble_acc"] == pytest.approx(out["individual_acc"][0]) and out["disagreement"] == 0.0
        for key in ("classifier_sharing", "encoder_sharing"):
            assert out[key] is None and out[f"{key}_sum_ratio"] is None
    else:
        for key in ("classifier_sharing", "encoder_sharing"):
            for name in (key, f"{key}_sum_ratio"):
                assert 0.0 <= out[name] <= 100.0, (name, out[name])
    assert json.loads(path.read_text()) == json.loads(json.dumps(out))  # written whole, the same summary
    assert [p.name for p in path.parent.iterdir()] == ["vit.json"]  # no temporary file left beside it
    text = capsys.readouterr().out
    assert f"{method}, seed 0: ensemble" in text and ("sharing" in text) == (m > 1)


def test_rows_must_be_a_multiple_of_the_repetition(example, capsys):
    with pytest.raises(SystemExit):
        example.main(["--smoke", "--rows", "15"])
    assert "--rows 15 must be a multiple of the batch repetition 2" in capsys.readouterr().err


def test_harder_data_options_reach_the_dataset(example, monkeypatch):
    seen = []
    real = example.SyntheticImageDataset

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(example, "SyntheticImageDataset", spy)
    out = example.main(["--smoke", "--object-size", "0.5", "--clutter", "0.7", "--train", "64"])
    assert [(kw["object_size"], kw["clutter"], kw.get("train", True)) for kw in seen] == [
        (0.5, 0.7, True),
        (0.5, 0.7, False),
    ]  # the training and the test split are the same harder task
    assert out["config"]["object_size"] == 0.5 and out["config"]["clutter"] == 0.7


@pytest.mark.parametrize(
    ("option", "value", "name"), [("--object-size", "1.5", "object_size"), ("--clutter", "-1", "clutter")]
)
def test_bad_data_options_are_refused(example, option, value, name):
    with pytest.raises(ValueError, match=name):
        example.main(["--smoke", option, value])


@pytest.mark.filterwarnings("ignore:the fitted temperature")  # a 20-step model may well sit at the bound
def test_temperature_fitted_on_held_out_images(example):
    plain = example.main(["--smoke"])
    assert plain["temperature"] is None and plain["calibrated"] is None
    out = example.main(["--smoke", "--val", "32", "--steps", "20"])
    assert 0.05 <= out["temperature"] <= 20.0
    for key in ("nll", "ece", "brier"):
        assert math.isfinite(out["calibrated"][key]) and out["calibrated"][key] >= 0
    assert out["config"]["val"] == 32


def test_evaluate_at_a_temperature_matches_a_float64_reference(example):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    m, k = 2, 5
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, k, (40,), generator=g)
    augment = example.Augment(x, 0.0, g)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, m * k), torch.nn.Unflatten(1, (m, k)))
    with torch.no_grad():
        model[1].weight.mul_(20)  # confident members, so that the temperature matters
        logits = model(augment.normalize(x)).double()
    probs = logits.softmax(-1).mean(1)  # the ensemble: mean of the member probabilities
    for t in (1.0, 0.5, 3.0):
        res = example.evaluate(model, x, y, augment, m, temperature=t)
        tempered = (probs.log() / t).log_softmax(-1)
        assert res["nll"] == pytest.approx(-tempered[torch.arange(40), y].mean().item(), rel=1e-4)
        assert res["ensemble_acc"] == pytest.approx((probs.argmax(-1) == y).double().mean().item())
        members = (logits.argmax(-1) == y[:, None]).double().mean(0).tolist()
        assert res["individual_acc"] == pytest.approx(members)


def test_val_must_leave_training_images(example, capsys):
    with pytest.raises(SystemExit):
        example.main(["--smoke", "--val", "96"])
    assert "--val 96 must be at least 0 and below --train 96" in capsys.readouterr().err
