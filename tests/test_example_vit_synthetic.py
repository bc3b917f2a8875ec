"""examples/vit_synthetic.py in its seconds-long --smoke mode, run as a user runs it: what its summary reports is
well-formed for a MixShare ViT and for the plain ViT, its JSON is the whole summary, harder-data options reach both
splits, a temperature is fitted on held-out images, ``--reinit`` chooses how the heads are drawn, and bad sizes are
refused.

The module's fixture runs every command first, in one process (``script_runs.run_commands``); the tests read what
each left.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from script_runs import run_commands

from mixshare_layers.data import Normalize
from mixshare_layers.evaluation import tempered_log_probs
from mixshare_layers.evaluation.metrics import EnsembleMetrics

MODULE = "examples.vit_synthetic"
TRAINED = {  # with timm installed: name -> options after --smoke; each writes <name>/vit.json
    "mixshare": ["--method", "mixshare"],
    "single": ["--method", "single"],
    "harder": ["--object-size", "0.5", "--clutter", "0.7", "--train", "64"],
    "held_out": ["--val", "32", "--steps", "20"],
    "reinit_torch": ["--method", "mixmo", "--reinit", "torch"],
}
BAD = {
    "rows": (["--rows", "15"], "--rows 15 must be a multiple of the batch repetition 2"),
    "val": (["--val", "96"], "--val 96 must be at least 0 and below --train 96"),
    "object_size": (["--object-size", "1.5"], "object_size"),
    "clutter": (["--clutter", "-1"], "clutter"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(folder, {name: result})``: the training runs (with timm installed) and the refused command lines, all as
    ``python -m examples.vit_synthetic`` in one process."""
    tmp = tmp_path_factory.mktemp("vit")
    commands = {name: ["--smoke", *argv] for name, (argv, _) in BAD.items()}
    if importlib.util.find_spec("timm") is not None:
        commands.update({name: ["--smoke", *argv, "--json", tmp / name / "vit.json"] for name, argv in TRAINED.items()})
    results = run_commands([(MODULE, argv) for argv in commands.values()])
    return tmp, dict(zip(commands, results, strict=True))


def _trained(runs, name: str) -> tuple[object, dict]:
    """The result of a training run and the summary it wrote (the test is skipped without timm)."""
    if name not in runs[1]:
        pytest.skip("needs timm")
    res = runs[1][name]
    assert res.code == 0, res.err[-3000:]
    return res, json.loads((runs[0] / name / "vit.json").read_text())


@pytest.mark.parametrize("method", ["mixshare", "single"])
def test_smoke_summary(runs, method):
    res, out = _trained(runs, method)
    path = runs[0] / method / "vit.json"
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
    assert [p.name for p in path.parent.iterdir()] == ["vit.json"]  # written whole: no temporary file left beside it
    ensemble = f"{method}, seed 0: ensemble {100 * out['ensemble_acc']:.2f} %"  # the printed summary is the JSON's
    assert ensemble in res.out and ("sharing" in res.out) == (m > 1)


def test_rows_must_be_a_multiple_of_the_repetition(runs):
    res = runs[1]["rows"]
    assert res.code == 2 and BAD["rows"][1] in res.err


def test_harder_data_options_reach_the_dataset(runs):
    res, out = _trained(runs, "harder")
    (data,) = [line for line in res.out.splitlines() if line.startswith("data: ")]
    train, test = data.split("; test split: ")
    for split, flag in ((train, "train=True"), (test, "train=False")):  # the training and the test split are the
        assert flag in split and "object_size=0.5, clutter=0.7" in split, data  # same harder task
    assert out["config"]["object_size"] == 0.5 and out["config"]["clutter"] == 0.7


@pytest.mark.parametrize("name", ["object_size", "clutter"])
def test_bad_data_options_are_refused(runs, name):
    res = runs[1][name]
    assert res.code == 2 and name in res.err.strip().splitlines()[-1], res.err[-3000:]


def test_temperature_fitted_on_held_out_images(runs):
    _, plain = _trained(runs, "mixshare")
    assert plain["temperature"] is None and plain["calibrated"] is None
    res, out = _trained(runs, "held_out")
    assert 0.05 <= out["temperature"] <= 20.0
    for key in ("nll", "ece", "brier"):
        assert math.isfinite(out["calibrated"][key]) and out["calibrated"][key] >= 0
    assert out["config"]["val"] == 32
    assert f"temperature {out['temperature']:.3f} (fitted on 32 held-out training images)" in res.out


def test_evaluate_at_a_temperature_matches_a_float64_reference():
    """The example's evaluation at a temperature (``EnsembleMetrics`` fed ``tempered_log_probs``, on images
    standardised by ``Normalize``) against a float64 reference."""
    g = torch.Generator().manual_seed(0)
    m, k = 2, 5
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, k, (40,), generator=g)
    normalize = Normalize.from_images(x)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, m * k), torch.nn.Unflatten(1, (m, k)))
    with torch.no_grad():
        model[1].weight.mul_(20)  # confident members, so that the temperature matters
        logits = model(normalize(x))
    probs = logits.double().softmax(-1).mean(1)  # the ensemble: mean of the member probabilities
    for t in (1.0, 0.5, 3.0):
        metrics = EnsembleMetrics(m, "prob")
        metrics.update(logits, y, log_probs=None if t == 1.0 else tempered_log_probs(logits, "prob", t)[0])
        res = metrics.compute()
        tempered = (probs.log() / t).log_softmax(-1)
        assert res["nll"] == pytest.approx(-tempered[torch.arange(40), y].mean().item(), rel=1e-4)
        assert res["ensemble_acc"] == pytest.approx((probs.argmax(-1) == y).double().mean().item())
        members = (logits.double().argmax(-1) == y[:, None]).double().mean(0).tolist()
        assert res["individual_acc"] == pytest.approx(members)


def test_val_must_leave_training_images(runs):
    res = runs[1]["val"]
    assert res.code == 2 and BAD["val"][1] in res.err


def test_reinit_torch_trains(runs):
    _, default = _trained(runs, "mixshare")
    res, out = _trained(runs, "reinit_torch")
    assert default["config"]["reinit"] == "backbone" and out["config"]["reinit"] == "torch"
    assert len(out["individual_acc"]) == 2 and math.isfinite(out["nll"]) and "mixmo, seed 0: ensemble" in res.out


@pytest.mark.parametrize("method", ["mixshare", "mixmo"])
def test_reinit_chooses_how_the_heads_are_drawn(method):
    """On the built model (no training): timm's ViT initialisation draws each head's linear layer truncated-normal
    with std 0.02 and a zero bias; PyTorch's default uniform in +-1 / sqrt(dim) (std 1 / sqrt(3 dim)), bias too.
    The core is the backbone's as built, the same in both."""
    pytest.importorskip("timm")
    vit = importlib.import_module(MODULE)
    models = {}
    for reinit in ("backbone", "torch"):
        args = vit.build_parser().parse_args(["--method", method, "--dim", "64", "--classes", "40",
                                              "--reinit", reinit])  # fmt: skip
        torch.manual_seed(0)
        models[reinit] = vit.build_model(args, 2)
    for reinit, model in models.items():
        heads = [member.model.head for member in model.heads.members]
        assert len(heads) == 2 and not torch.equal(heads[0].weight, heads[1].weight)  # one draw per head
        for head in heads:
            weight, bias = head.weight.detach(), head.bias.detach()
            std = float(weight.std())
            if reinit == "backbone":
                assert std == pytest.approx(0.02, rel=0.1) and not bias.any()
            else:
                assert std == pytest.approx(1 / math.sqrt(3 * 64), rel=0.1) and bias.abs().max() > 0
                assert weight.abs().max() <= 1 / math.sqrt(64) and bias.abs().max() <= 1 / math.sqrt(64)
    cores = [list(m.core.parameters()) for m in models.values()]
    assert all(torch.equal(a, b) for a, b in zip(*cores, strict=True))
