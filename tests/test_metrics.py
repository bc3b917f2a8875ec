"""Tests of mixshare_layers.evaluation.metrics against float64 references written the slow, obvious way."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mixshare_layers.evaluation.metrics import (
    EnsembleMetrics,
    brier_score,
    calibration_bins,
    collapsed_members,
    disagreement,
    expected_calibration_error,
)
from mixshare_layers.functional import ensemble_log_probs


def _reference(logits: torch.Tensor, targets: torch.Tensor, rule: str, num_bins: int = 15) -> dict:
    """Every metric with Python loops over samples, in float64."""
    logits = logits.double()
    b, m, k = logits.shape
    if rule == "prob":
        probs = logits.softmax(-1).mean(1)
    else:
        probs = logits.mean(1).softmax(-1)
    hits = nll = brier = dis = 0.0
    members = [0.0] * m
    bins = [[0, 0.0, 0.0] for _ in range(num_bins)]
    for i in range(b):
        y = int(targets[i])
        p = probs[i]
        pred = int(p.argmax())
        hits += pred == y
        nll -= math.log(float(p[y]))
        brier += sum((float(p[c]) - (c == y)) ** 2 for c in range(k))
        preds = [int(logits[i, j].argmax()) for j in range(m)]
        for j in range(m):
            members[j] += preds[j] == y
        pairs = list(itertools.combinations(range(m), 2))
        if pairs:
            dis += sum(preds[a] != preds[c] for a, c in pairs) / len(pairs)
        conf = float(p.max())
        idx = min(max(math.ceil(conf * num_bins) - 1, 0), num_bins - 1)
        bins[idx][0] += 1
        bins[idx][1] += conf
        bins[idx][2] += pred == y
    ece = sum(abs(c - h) for _, c, h in bins) / b
    return {
        "ensemble_acc": hits / b,
        "individual_acc": [v / b for v in members],
        "nll": nll / b,
        "brier": brier / b,
        "disagreement": dis / b,
        "ece": ece,
    }


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("rule", ["prob", "logit"])
def test_streaming_metrics_match_reference(m: int, rule: str) -> None:
    g = torch.Generator().manual_seed(m)
    logits = 2.0 * torch.randn(37, m, 6, generator=g)
    targets = torch.randint(6, (37,), generator=g)
    acc = EnsembleMetrics(m, rule)
    for part in range(0, 37, 10):  # uneven chunks: the sums must not depend on the batching
        acc.update(logits[part : part + 10], targets[part : part + 10])
    got = acc.compute()
    ref = _reference(logits, targets, rule)
    assert got["count"] == 37
    for key in ("ensemble_acc", "nll", "brier", "disagreement", "ece"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    assert got["individual_acc"] == pytest.approx(ref["individual_acc"])
    assert got["mean_individual_acc"] == pytest.approx(sum(ref["individual_acc"]) / m)


def test_functional_metrics_match_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 3, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(5, (50,), generator=g)
    probs = ensemble_log_probs(logits).exp()
    ref = _reference(logits, targets, "prob")
    assert float(expected_calibration_error(probs, targets)) == pytest.approx(ref["ece"])
    assert float(brier_score(probs, targets)) == pytest.approx(ref["brier"])
    assert float(disagreement(logits)) == pytest.approx(ref["disagreement"])


def test_calibration_invariants() -> None:
    # one-hot correct predictions: confidence 1 and accuracy 1 -> ECE 0, Brier 0; all in the last bin
    targets = torch.tensor([0, 2, 1])
    probs = torch.nn.functional.one_hot(targets, 3).double()
    bins = calibration_bins(probs, targets)
    assert bins[0, -1] == 3 and bins[0, :-1].sum() == 0
    assert float(expected_calibration_error(probs, targets)) == 0.0
    assert float(brier_score(probs, targets)) == 0.0
    # confidently wrong: Brier reaches its maximum of 2 (sum over classes, not divided by K)
    wrong = torch.nn.functional.one_hot((targets + 1) % 3, 3).double()
    assert float(brier_score(wrong, targets)) == pytest.approx(2.0)
    assert float(expected_calibration_error(wrong, targets)) == pytest.approx(1.0)


def test_identical_members_never_disagree() -> None:
    logits = torch.randn(20, 1, 7).expand(20, 4, 7)
    assert float(disagreement(logits)) == 0.0
    acc = EnsembleMetrics(4)
    acc.update(logits, torch.randint(7, (20,)))
    out = acc.compute()
    assert out["disagreement"] == 0.0
    assert out["individual_acc"] == [out["ensemble_acc"]] * 4


def test_reset_clears_state() -> None:
    acc = EnsembleMetrics(2)
    acc.update(torch.randn(4, 2, 3), torch.zeros(4, dtype=torch.long))
    acc.reset()
    assert acc.compute()["count"] == 0


def test_errors() -> None:
    acc = EnsembleMetrics(2)
    with pytest.raises(ValueError, match=r"logits must have 3 dimensions|\(B, M, K\)"):
        acc.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_subnetworks=2"):
        acc.update(torch.randn(4, 3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must have shape \(B,\) = \(4,\)"):
        acc.update(torch.randn(4, 2, 5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class indices"):
        acc.update(torch.randn(4, 2, 5), torch.zeros(4))
    with pytest.raises(ValueError, match="rule must be one of 'prob', 'logit'"):
        EnsembleMetrics(2, "median")
    with pytest.raises(ValueError, match="num_bins must be an integer >= 1"):
        calibration_bins(torch.rand(3, 2), torch.zeros(3, dtype=torch.long), num_bins=0)


def test_collapsed_members_flags_near_chance_members_only_when_another_learned():
    # a quick Table 1 MixMo run before the heads' initialisation was fixed: 98.8 / 0.4 % with 20 classes
    # (below the 5 % of chance)
    assert collapsed_members([0.988, 0.004], 20) == [1]
    assert collapsed_members(torch.tensor([0.02, 0.70, 0.011]), 100) == [0, 2]  # tensors too, any M
    assert collapsed_members([0.80, 0.71], 20) == []  # two learning members: healthy, however unequal
    assert collapsed_members([0.06, 0.05], 20) == []  # nobody learned yet: nothing to compare with
    assert collapsed_members([0.9], 10) == []  # one member cannot collapse relative to itself
    # the thresholds: gain over chance g = (a - 1/K) / (1 - 1/K); collapsed iff g <= tolerance * max g
    k, best = 10, 0.91
    g_best = (best - 0.1) / 0.9
    edge = 0.1 + 0.9 * 0.1 * g_best  # exactly 10 % of the best member's gain
    assert collapsed_members([best, edge - 1e-9], k) == [1]
    assert collapsed_members([best, edge + 1e-6], k) == []
    assert collapsed_members([best, edge + 1e-6], k, tolerance=0.2) == [1]
    assert collapsed_members([0.2, 0.1], 10) == [1]  # the best gain 0.11 >= min_gain = 0.1: judged
    assert collapsed_members([0.18, 0.1], 10) == []  # the best gain 0.089: not learned enough to judge
    assert collapsed_members([0.2, 0.1], 10, min_gain=0.2) == []


def test_collapsed_members_errors():
    with pytest.raises(ValueError, match=r"member_acc must be in \[0, 1\], but got 98.8"):
        collapsed_members([98.8, 0.4], 20)  # percentages: divide by 100
    with pytest.raises(ValueError, match="num_classes"):
        collapsed_members([0.5, 0.5], 1)
    with pytest.raises(ValueError, match="flat sequence"):
        collapsed_members([], 10)
    with pytest.raises(ValueError, match="tolerance"):
        collapsed_members([0.5, 0.1], 10, tolerance=1.0)
    with pytest.raises(ValueError, match="min_gain"):
        collapsed_members([0.5, 0.1], 10, min_gain=0.0)
    with pytest.raises(TypeError, match="member_acc must be a real number"):
        collapsed_members(["high", 0.1], 10)
