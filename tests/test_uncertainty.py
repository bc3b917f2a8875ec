"""mixshare_layers.evaluation: float64 references, equality with torch-uncertainty / torchmetrics / scikit-learn."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from mixshare_layers.evaluation import (
    UNCERTAINTY_SCORES,
    UncertaintyMetrics,
    adaptive_calibration_error,
    aurc,
    classwise_calibration_bins,
    classwise_calibration_error,
    classwise_calibration_error_from_bins,
    entropy,
    fit_temperature,
    ood_detection_metrics,
    risk_coverage_curve,
    tempered_log_probs,
    uncertainty_scores,
)
from mixshare_layers.evaluation.metrics import EnsembleMetrics, expected_calibration_error
from mixshare_layers.functional import ensemble_log_probs


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(b: int = 300, m: int = 3, k: int = 7, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    return scale * torch.randn(b, m, k, generator=_gen(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------------------
# scores
# ------------------------------------------------------------------------------------------------------------------
def _scores_reference(logits: torch.Tensor, rule: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {s: [] for s in UNCERTAINTY_SCORES}
    for row in logits.double():
        members = [torch.softmax(z, 0) for z in row]
        mixture = sum(members) / len(members)
        p = mixture if rule == "prob" else torch.softmax(row.mean(0), 0)

        def h(q: torch.Tensor) -> float:
            return -sum(float(v) * math.log(float(v)) for v in q if v > 0)

        out["msp"].append(1 - float(p.max()))
        out["entropy"].append(h(p))
        expected = sum(h(q) for q in members) / len(members)
        out["mutual_information"].append(h(mixture) - expected)
        out["expected_entropy"].append(expected)
    return out


@pytest.mark.parametrize("rule", ["prob", "logit"])
def test_scores_match_a_float64_loop(rule):
    logits = _logits(40)
    got = uncertainty_scores(logits, rule)
    ref = _scores_reference(logits, rule)
    for name in UNCERTAINTY_SCORES:
        torch.testing.assert_close(got[name], torch.tensor(ref[name], dtype=torch.float64), atol=1e-12, rtol=0)
    if rule == "prob":  # the decomposition of the predictive entropy
        torch.testing.assert_close(got["entropy"], got["mutual_information"] + got["expected_entropy"])
    assert float(got["mutual_information"].min()) >= 0


def test_scores_equal_torch_uncertainty_criteria():
    pytest.importorskip("torch_uncertainty")
    from torch_uncertainty.ood_criteria import EntropyCriterion, MaxSoftmaxCriterion, MutualInformationCriterion

    logits = _logits(64).float()
    probs = logits.softmax(-1)  # (B, M, K), the routine's probs_per_est
    ours = uncertainty_scores(logits, "prob")
    torch.testing.assert_close(ours["msp"] - 1, MaxSoftmaxCriterion()(probs.mean(1)))
    torch.testing.assert_close(ours["expected_entropy"], EntropyCriterion()(probs))
    torch.testing.assert_close(ours["mutual_information"], MutualInformationCriterion()(probs), atol=1e-5, rtol=1e-5)


def test_entropy_handles_zero_probabilities_and_one_member():
    assert float(entropy(torch.tensor([1.0, 0.0]).log())) == 0.0
    scores = uncertainty_scores(_logits(5, m=1))
    assert torch.equal(scores["mutual_information"], torch.zeros(5, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------------------------
# OOD detection
# ------------------------------------------------------------------------------------------------------------------
def _ood_cases():
    g = _gen(1)
    yield torch.randn(300, generator=g), torch.randn(200, generator=g) + 0.8  # continuous
    # heavy ties: scores on a grid of 6 values, ties across the two sets
    yield torch.randint(6, (250,), generator=g).float(), (torch.randint(6, (150,), generator=g) + 1).float()
    yield torch.zeros(5), torch.zeros(3)  # every score tied
    yield torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9, 0.7])  # perfect separation


def _fpr_reference(id_s: list[float], ood_s: list[float], recall: float) -> float:
    for t in sorted(set(id_s + ood_s), reverse=True):
        tpr = sum(s >= t for s in ood_s) / len(ood_s)
        if tpr >= recall:
            return sum(s >= t for s in id_s) / len(id_s)
    raise AssertionError


@pytest.mark.filterwarnings("ignore:Metric `FPR95` will save all targets")
@pytest.mark.parametrize("case", range(4))
def test_ood_metrics_equal_sklearn_torchmetrics_and_torch_uncertainty(case):
    metrics_mod = pytest.importorskip("sklearn.metrics")
    id_s, ood_s = list(_ood_cases())[case]
    got = ood_detection_metrics(id_s, ood_s)
    y = torch.cat([torch.zeros(id_s.numel()), torch.ones(ood_s.numel())])
    s = torch.cat([id_s, ood_s])
    assert got["auroc"].dtype == torch.float64
    assert float(got["auroc"]) == pytest.approx(metrics_mod.roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)
    assert float(got["aupr"]) == pytest.approx(metrics_mod.average_precision_score(y.numpy(), s.numpy()), abs=1e-12)
    assert float(got["fpr95"]) == pytest.approx(_fpr_reference(id_s.tolist(), ood_s.tolist(), 0.95), abs=1e-12)
    pytest.importorskip("torch_uncertainty")
    from torch_uncertainty.metrics import FPR95
    from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

    assert float(got["auroc"]) == pytest.approx(float(BinaryAUROC()(s, y.long())), abs=1e-6)
    assert float(got["aupr"]) == pytest.approx(float(BinaryAveragePrecision()(s, y.long())), abs=1e-6)
    assert float(got["fpr95"]) == pytest.approx(float(FPR95(pos_label=1)(s, y.long())), abs=1e-6)


def test_ood_metrics_extremes_and_errors():
    perfect = ood_detection_metrics(torch.tensor([0.0, 0.1]), torch.tensor([0.5, 0.6]))
    assert [float(v) for v in perfect.values()] == [1.0, 1.0, 0.0]
    reversed_ = ood_detection_metrics(torch.tensor([0.5, 0.6]), torch.tensor([0.0, 0.1]))
    assert float(reversed_["auroc"]) == 0.0 and float(reversed_["fpr95"]) == 1.0
    with pytest.raises(ValueError, match="needs in-distribution and OOD samples, but got 0 in-distribution"):
        ood_detection_metrics(torch.zeros(0), torch.ones(3))
    with pytest.raises(ValueError, match="the scores contain NaN"):
        ood_detection_metrics(torch.tensor([math.nan]), torch.ones(3))
    with pytest.raises(TypeError, match="id_scores must be floating point"):
        ood_detection_metrics(torch.zeros(3, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match=r"ood_scores must have shape \(N,\)"):
        ood_detection_metrics(torch.zeros(3), torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"recall must be in \(0, 1\]"):
        ood_detection_metrics(torch.zeros(3), torch.ones(3), recall=0.0)


# ------------------------------------------------------------------------------------------------------------------
# AURC
# ------------------------------------------------------------------------------------------------------------------
def _tu_style_aurc(order_errors: list[float]) -> float:
    n = len(order_errors)
    risks = [sum(order_errors[:k]) / k for k in range(1, n + 1)]
    area = sum((risks[i] + risks[i + 1]) / 2 / n for i in range(n - 1))
    return area / (1 - 1 / n)


def test_aurc_equals_torch_uncertainty_on_untied_scores():
    pytest.importorskip("torch_uncertainty")
    from torch_uncertainty.metrics import AURC

    logits = _logits(500, m=1).float()[:, 0]
    probs = logits.softmax(-1)
    targets = torch.randint(7, (500,), generator=_gen(3))
    errors = (probs.argmax(1) != targets).float()
    metric = AURC()
    metric.update(probs, targets)
    assert float(aurc(1 - probs.max(1).values, errors)) == pytest.approx(float(metric.compute()), abs=1e-6)


def test_aurc_with_ties_is_the_mean_over_orders_of_the_ties():
    uncertainty = torch.tensor([0.1, 0.3, 0.3, 0.3, 0.5, 0.5, 0.9])
    errors = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    groups = [[0], [1, 2, 3], [4, 5], [6]]
    values = []
    for p1 in itertools.permutations(groups[1]):
        for p2 in itertools.permutations(groups[2]):
            order = [0, *p1, *p2, 6]
            values.append(_tu_style_aurc([float(errors[i]) for i in order]))
    assert float(aurc(uncertainty, errors)) == pytest.approx(sum(values) / len(values), abs=1e-12)
    # the curve is the expected risk: at k = 2 the tie at 0.3 holds 2/3 of an error
    cov, risk = risk_coverage_curve(uncertainty, errors)
    assert cov.tolist() == [k / 7 for k in range(1, 8)]
    assert float(risk[1]) == pytest.approx((2 / 3) / 2, abs=1e-15)
    # an uninformative (constant) score: the error rate at every coverage
    flat = aurc(torch.zeros(7), errors)
    assert float(flat) == pytest.approx(4 / 7, abs=1e-12)


def test_aurc_errors():
    with pytest.raises(ValueError, match="AURC needs at least 2 samples, but got 1"):
        aurc(torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="errors must be a tensor of the shape of uncertainty"):
        aurc(torch.zeros(3), torch.zeros(2))


# ------------------------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------------------------
def test_adaptive_ece_equals_a_loop_and_torch_uncertainty():
    probs = _logits(403, m=1)[:, 0].softmax(-1)
    targets = torch.randint(7, (403,), generator=_gen(4))
    conf, pred = probs.max(1)
    order = conf.argsort().tolist()
    sizes = [len(c) for c in torch.arange(403).tensor_split(15)]
    total, start = 0.0, 0
    for size in sizes:
        idx = order[start : start + size]
        start += size
        total += abs(sum(float(conf[i]) for i in idx) - sum(float(pred[i] == targets[i]) for i in idx))
    got = adaptive_calibration_error(probs, targets)
    assert float(got) == pytest.approx(total / 403, abs=1e-12)
    pytest.importorskip("torch_uncertainty")
    from torch_uncertainty.metrics import CalibrationError

    tu = CalibrationError(task="multiclass", adaptive=True, num_bins=15, num_classes=7)
    tu.update(probs.float(), targets)
    assert float(got) == pytest.approx(float(tu.compute()), abs=1e-6)
    # fewer samples than bins: one sample per bin
    few = adaptive_calibration_error(probs[:4], targets[:4])
    hits = (pred[:4] == targets[:4]).double()
    assert float(few) == pytest.approx(float((conf[:4] - hits).abs().mean()), abs=1e-12)


def test_classwise_ece_equals_a_loop_and_torch_uncertainty():
    probs = _logits(300, m=1, k=5)[:, 0].softmax(-1)
    targets = torch.randint(5, (300,), generator=_gen(5))
    per_class = []
    for c in range(5):
        bins: dict[int, list[float]] = {}
        for i in range(300):
            p = float(probs[i, c])
            b = min(max(math.ceil(p * 15) - 1, 0), 14)
            acc = bins.setdefault(b, [0.0, 0.0])
            acc[0] += p
            acc[1] += float(targets[i] == c)
        per_class.append(sum(abs(a - h) for a, h in bins.values()) / 300)
    got = classwise_calibration_error(probs, targets)
    assert float(got) == pytest.approx(sum(per_class) / 5, abs=1e-12)
    # the bin sums add up over batches
    parts = classwise_calibration_bins(probs[:120], targets[:120])
    parts += classwise_calibration_bins(probs[120:], targets[120:])
    assert float(classwise_calibration_error_from_bins(parts)) == pytest.approx(float(got), abs=1e-12)
    pytest.importorskip("torch_uncertainty")
    from torch_uncertainty.metrics import ClasswiseCalibrationError

    tu = ClasswiseCalibrationError(num_classes=5, num_bins=15)
    tu.update(probs.float(), targets)
    assert float(got) == pytest.approx(float(tu.compute()), abs=1e-5)


def test_calibration_errors():
    p = torch.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"targets must have shape \(B,\) = \(4,\)"):
        adaptive_calibration_error(p, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="targets must hold integer class indices"):
        classwise_calibration_error(p, torch.zeros(4))
    with pytest.raises(ValueError, match=r"probs must have shape \(B, K\)"):
        classwise_calibration_error(p[0], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_bins must be an integer >= 1"):
        adaptive_calibration_error(p, torch.zeros(4, dtype=torch.long), num_bins=0)


# ------------------------------------------------------------------------------------------------------------------
# temperature scaling
# ------------------------------------------------------------------------------------------------------------------
def _calibration_problem(n: int = 3000, m: int = 2, k: int = 6, over: float = 2.5, seed: int = 0):
    g = _gen(seed)
    z = 1.5 * torch.randn(n, k, generator=g, dtype=torch.float64)
    y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    members = over * (z.unsqueeze(1) + 0.7 * torch.randn(n, m, k, generator=g, dtype=torch.float64))
    return members, y


def _nll(logits, y, rule, t, mode) -> float:
    ens, _ = tempered_log_probs(logits.double(), rule, t, mode)
    return float(-ens.gather(1, y.view(-1, 1)).mean())


@pytest.mark.parametrize(("rule", "mode"), [("prob", "ensemble"), ("logit", "ensemble"), ("prob", "members")])
def test_fitted_temperature_minimises_the_validation_nll(rule, mode):
    logits, y = _calibration_problem()
    t = fit_temperature(logits, y, rule, mode=mode)
    grid = torch.exp(torch.linspace(math.log(0.2), math.log(10.0), 2001, dtype=torch.float64))
    best = min(grid.tolist(), key=lambda v: _nll(logits, y, rule, v, mode))
    assert t == pytest.approx(best, rel=2e-3)
    # a stationary point: d NLL / d T = 0
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    if mode == "members":
        ens = ensemble_log_probs(logits / tt, rule)
    else:
        ens = torch.log_softmax(ensemble_log_probs(logits, rule) / tt, dim=-1)
    (grad,) = torch.autograd.grad(-ens.gather(1, y.view(-1, 1)).mean(), tt)
    assert abs(float(grad)) < 1e-4
    assert t > 1.5  # the members were made over-confident
    # accuracy is unchanged by the temperature, except where it reweighs the members of a mixture
    before = ensemble_log_probs(logits, rule).argmax(1)
    after, _ = tempered_log_probs(logits, rule, t, mode)
    if mode == "ensemble" or rule == "logit":
        assert torch.equal(before, after.argmax(1))
    else:
        assert float((before == after.argmax(1)).double().mean()) > 0.95


def test_temperature_of_the_averaged_logits_equals_torch_uncertainty():
    pytest.importorskip("torch_uncertainty")
    from torch_uncertainty.post_processing import TemperatureScaler

    logits, y = _calibration_problem(n=2000)
    ours = fit_temperature(logits.float(), y, "logit")
    scaler = TemperatureScaler(model=None, max_iter=200)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits.float().mean(1), y), batch_size=500)
    scaler.fit(loader, progress=False)
    theirs = float(scaler.temperature[0].detach())
    assert ours == pytest.approx(theirs, rel=5e-3)  # its LBFGS stops near the optimum ...
    # ... ours at it
    assert _nll(logits, y, "logit", ours, "ensemble") <= _nll(logits, y, "logit", theirs, "ensemble") + 1e-12


def test_tempered_log_probs_identities():
    logits = _logits(20)
    for rule in ("prob", "logit"):
        ens, members = tempered_log_probs(logits, rule, 1.0)
        torch.testing.assert_close(ens, ensemble_log_probs(logits, rule))
        torch.testing.assert_close(members, logits.log_softmax(-1))
    # with averaged logits, dividing the members or the ensemble is the same
    a, _ = tempered_log_probs(logits, "logit", 1.7, "ensemble")
    b, _ = tempered_log_probs(logits, "logit", 1.7, "members")
    torch.testing.assert_close(a, b)


def test_temperature_errors_and_bound_warning():
    logits, y = _calibration_problem(n=200)
    with pytest.warns(RuntimeWarning, match="lies on the edge of bounds"):
        fit_temperature(logits, y, bounds=(0.05, 1.0))
    with pytest.raises(ValueError, match="cannot fit a temperature on an empty validation set"):
        fit_temperature(logits[:0], y[:0])
    with pytest.raises(ValueError, match=r"targets must have shape \(N,\) = \(200,\)"):
        fit_temperature(logits, y[:5])
    with pytest.raises(ValueError, match="mode must be one of 'ensemble', 'members'"):
        fit_temperature(logits, y, mode="pooled")
    with pytest.raises(ValueError, match=r"bounds\[1\] must be in \(2, inf\]"):
        fit_temperature(logits, y, bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"temperature must be in \(0, inf\]"):
        tempered_log_probs(logits, "prob", 0.0)


# ------------------------------------------------------------------------------------------------------------------
# UncertaintyMetrics
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule", "temperature", "mode"),
    [("prob", 1.0, "ensemble"), ("logit", 1.0, "ensemble"), ("prob", 1.8, "ensemble"), ("prob", 0.7, "members")],
)
def test_uncertainty_metrics_equal_the_functions(rule, temperature, mode):
    logits = _logits(250, m=2, k=5).float()
    targets = torch.randint(5, (250,), generator=_gen(6))
    acc = UncertaintyMetrics(2, 5, rule, temperature=temperature, temperature_mode=mode)
    for chunk in range(0, 250, 64):  # streaming in uneven batches
        acc.update(logits[chunk : chunk + 64], targets[chunk : chunk + 64])
    out = acc.compute()
    ens, _ = tempered_log_probs(logits.double(), rule, temperature, mode)
    probs = ens.exp()
    scores = uncertainty_scores(logits.double(), rule, temperature=temperature, temperature_mode=mode)
    errors = probs.argmax(1) != targets
    assert out["count"] == 250
    assert out["nll"] == pytest.approx(float(-ens.gather(1, targets.view(-1, 1)).mean()), abs=1e-5)
    assert out["ece"] == pytest.approx(float(expected_calibration_error(probs, targets)), abs=1e-5)
    assert out["adaptive_ece"] == pytest.approx(float(adaptive_calibration_error(probs, targets)), abs=1e-5)
    assert out["classwise_ece"] == pytest.approx(float(classwise_calibration_error(probs, targets)), abs=1e-5)
    assert out["aurc"] == pytest.approx(float(aurc(scores["msp"], errors)), abs=1e-5)
    assert out["mean_confidence"] == pytest.approx(float(probs.max(1).values.mean()), abs=1e-5)
    for name in ("entropy", "mutual_information", "expected_entropy"):
        assert out[name] == pytest.approx(float(scores[name].mean()), abs=1e-5)
    rel = out["reliability"]
    assert sum(rel["count"]) == 250 and len(rel["count"]) == 15
    hits = sum(a * c for a, c in zip(rel["accuracy"], rel["count"], strict=True) if c)
    assert hits == pytest.approx(250 * out["ensemble_acc"])
    for name, values in acc.scores().items():
        torch.testing.assert_close(values, scores[name], atol=1e-5, rtol=1e-5)
    if temperature == 1.0:  # the EnsembleMetrics part is EnsembleMetrics
        base = EnsembleMetrics(2, rule)
        base.update(logits, targets)
        for key, value in base.compute().items():
            assert out[key] == pytest.approx(value)
    assert (out["rule"], out["temperature"], out["temperature_mode"]) == (rule, temperature, mode)


def test_uncertainty_metrics_empty_reset_and_errors():
    acc = UncertaintyMetrics(2, 4)
    out = acc.compute()
    assert out["count"] == 0 and math.isnan(out["aurc"]) and math.isnan(out["adaptive_ece"])
    assert out["reliability"]["confidence"] == [None] * 15
    acc.update(torch.randn(8, 2, 4), torch.randint(4, (8,)))
    acc.sync()  # no process group: a no-op
    acc.reset()
    assert acc.compute()["count"] == 0
    with pytest.raises(ValueError, match="do not match num_subnetworks=2 and num_classes=4"):
        acc.update(torch.randn(8, 3, 4), torch.randint(4, (8,)))
    with pytest.raises(ValueError, match=r"temperature_mode must be one of"):
        UncertaintyMetrics(2, 4, temperature_mode="pooled")
    assert "temperature=1" in repr(acc)
    with pytest.raises(ValueError, match=r"log_probs must have shape \(B, K\) = \(8, 4\)"):
        EnsembleMetrics(2).update(torch.randn(8, 2, 4), torch.randint(4, (8,)), log_probs=torch.randn(8, 5))


def test_report_is_json_serialisable():
    acc = UncertaintyMetrics(2, 3)
    acc.update(torch.randn(30, 2, 3), torch.randint(3, (30,)))
    json.dumps(acc.compute())
