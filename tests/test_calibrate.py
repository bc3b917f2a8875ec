"""Calibration that travels with the model: ``MIMOWrapper.calibrate``, the calibrated ``predict``, and the
temperature buffer through the state dict, ``save_model`` / ``load_model``, ``fold`` and ``torch.export``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from mixshare_layers import MIMOWrapper
from mixshare_layers.checkpoint import WRN_BUILDER, load_model, save_model
from mixshare_layers.deploy import FoldedMIMO
from mixshare_layers.evaluation import (
    calibration_under_shift,
    corrupt,
    evaluate_uncertainty,
    fit_temperature,
    shift_rows,
)
from mixshare_layers.functional import ensemble_log_probs, ensemble_probs
from mixshare_layers.models import wide_resnet

K = 4
WRN_KWARGS = {"depth": 10, "width": 1, "num_classes": K}
RULES = ("prob", "logit")


def _model(seed: int = 0, confidence: float = 1.0) -> MIMOWrapper:
    """A WRN ensemble whose heads read standardised features (an untrained core's pooled features barely vary from
    one image to the next), so that its members' logits spread like a trained network's; ``confidence`` scales
    them (small: the members are under-confident)."""
    torch.manual_seed(seed)
    model = MIMOWrapper(wide_resnet(**WRN_KWARGS), num_subnetworks=2, preset="mixshare").eval()
    pooled: list[torch.Tensor] = []
    hook = model.heads.register_forward_pre_hook(lambda _, args: pooled.append(args[0]))
    with torch.no_grad():
        model(torch.rand(256, 3, 16, 16, generator=torch.Generator().manual_seed(123)))
        hook.remove()
        mean, std = pooled[0].mean(0), pooled[0].std(0)
        d = mean.numel()
        weight = confidence * torch.randn(2, K, d) / math.sqrt(d) * torch.where(std > 1e-6, 1 / std, 0.0)
        model.heads.weight.copy_(weight)
        model.heads.bias.copy_(-(weight @ mean))
    return model


def _data(model: MIMOWrapper, n: int, seed: int, noise: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] and labels that agree with the model's ensemble except for a ``noise`` share of random ones
    (so the best temperature lies inside the bounds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g)
    y = model.predict(x, calibrated=False).argmax(1)
    flip = torch.rand(n, generator=g) < noise
    return x, torch.where(flip, torch.randint(0, K, (n,), generator=g), y)


def _lbfgs_temperature(logits: torch.Tensor, y: torch.Tensor, rule: str) -> float:
    """The float64 reference: ``log T`` minimising the mean NLL of ``softmax(log p_ens / T)`` by LBFGS."""
    ens = ensemble_log_probs(logits.double(), rule)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -torch.log_softmax(ens / log_t.exp(), dim=-1).gather(1, y.view(-1, 1)).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


@pytest.fixture(scope="module")
def calibrated() -> tuple[MIMOWrapper, torch.Tensor, torch.Tensor, dict[str, float]]:
    model = _model(confidence=0.3)
    x, y = _data(model, 160, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the optimum lies inside the bounds
        return model, x, y, model.calibrate(x, y, batch_size=64)


# ---------------------------------------------------------------------------------------------------------------
# the fit
# ---------------------------------------------------------------------------------------------------------------
def test_fitted_temperatures_match_a_float64_lbfgs_reference(calibrated):
    model, x, y, fitted = calibrated
    assert set(fitted) == set(RULES)
    with torch.no_grad():
        logits = model(x)
    for i, rule in enumerate(RULES):
        reference = _lbfgs_temperature(logits, y, rule)
        # the golden-section search stops at a bracket of width 1e-4 in log T and returns its middle
        assert abs(math.log(fitted[rule]) - math.log(reference)) < 1e-4, (rule, fitted[rule], reference)
        assert float(model.temperature[i]) == pytest.approx(fitted[rule], rel=1e-7)  # stored in float32
    assert fitted["prob"] < 1.0 and fitted["logit"] < 1.0  # the heads were made under-confident


def test_calibration_is_deterministic_and_is_fit_temperature(calibrated):
    model, x, y, fitted = calibrated
    again = _model(confidence=0.3)
    assert again.calibrate(x, y, batch_size=64) == fitted  # same data, same temperatures, to the last bit
    assert torch.equal(again.temperature, model.temperature)
    with torch.no_grad():
        logits = model(x)
    assert {rule: fit_temperature(logits, y, rule) for rule in RULES} == fitted


def test_calibration_lowers_the_nll_of_an_under_confident_model():
    model = _model(seed=2, confidence=0.2)
    x_val, y_val = _data(model, 160, seed=3)
    x_test, y_test = _data(model, 160, seed=4)

    def nll(probs: torch.Tensor) -> float:
        return float(-probs.gather(1, y_test.view(-1, 1)).log().mean())

    raw = {rule: nll(model.predict(x_test, rule)) for rule in RULES}
    fitted = model.calibrate(x_val, y_val)
    for rule in RULES:
        assert fitted[rule] < 0.8
        assert nll(model.predict(x_test, rule)) < raw[rule] - 0.05, rule
        assert nll(model.predict(x_test, rule, calibrated=False)) == raw[rule]
        # a temperature keeps the arg-max
        assert torch.equal(
            model.predict(x_test, rule).argmax(1), model.predict(x_test, rule, calibrated=False).argmax(1)
        )


def test_predict_is_tempered_and_forward_is_not(calibrated):
    model, x, _, _ = calibrated
    raw_model = _model(confidence=0.3)
    with torch.no_grad():
        logits = model(x[:8])
        assert torch.equal(logits, raw_model(x[:8]))  # forward gives the members' own logits
    for rule in RULES:
        expected = torch.softmax(ensemble_log_probs(logits, rule) / model.temperature[RULES.index(rule)], dim=-1)
        torch.testing.assert_close(model.predict(x[:8], rule), expected, rtol=0, atol=0)
        assert torch.equal(model.predict(x[:8], rule, calibrated=False), ensemble_probs(logits, rule))
        assert torch.equal(raw_model.predict(x[:8], rule), ensemble_probs(logits, rule))  # T = 1: untouched


def test_train_and_eval_mode_are_restored():
    model = _model()
    x, y = _data(model, 24, seed=5)
    model.train()
    model.calibrate(x, y)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    model.calibrate(x, y)
    assert not any(m.training for m in model.modules())
    model.train()
    with pytest.raises(ValueError, match="x must have shape"):  # a failing forward restores the mode too
        model.calibrate(torch.rand(4, 3, 3, 16, 16), torch.zeros(4, dtype=torch.long))
    assert model.training


# ---------------------------------------------------------------------------------------------------------------
# bad data
# ---------------------------------------------------------------------------------------------------------------
X8 = torch.rand(8, 3, 16, 16)
Y8 = torch.arange(8) % K


@pytest.mark.parametrize(
    ("images", "labels", "kwargs", "error", "match"),
    [
        ([X8[0], X8[1]], Y8[:2], {}, TypeError, r"images must be a torch\.Tensor .*torch\.stack\(images, dim=0\)"),
        (X8[0], Y8, {}, ValueError, r"images must be a non-empty batch of shape \(N, C, H, W\) .* got \(3, 16, 16\)"),
        (X8[:0], Y8[:0], {}, ValueError, r"images must be a non-empty batch .* got \(0, 3, 16, 16\)"),
        ((X8 * 255).to(torch.uint8), Y8, {}, TypeError, r"images must be floating-point images.*torch\.uint8"),
        (X8, Y8[:5], {}, ValueError, r"labels must have shape \(N,\) = \(8,\) to match images of shape"),
        (X8, Y8.view(2, 4), {}, ValueError, r"labels must have shape \(N,\) = \(8,\).* got \(2, 4\)"),
        (X8, Y8.float(), {}, TypeError, r"labels must hold integer class indices, but got dtype torch\.float32"),
        (X8, Y8 > 1, {}, TypeError, r"labels must hold integer class indices, but got dtype torch\.bool"),
        (X8, [0] * 8, {}, TypeError, r"labels must be a torch\.Tensor of integer class indices, but got list"),
        (X8, Y8 + 1, {}, ValueError, r"labels must be class indices in \[0, 4\), but got values from 1 to 4"),
        (X8, Y8 - 1, {}, ValueError, r"labels must be class indices in \[0, 4\), but got values from -1 to 2"),
        (X8, Y8, {"batch_size": 0}, ValueError, r"batch_size must be"),
        (X8, Y8, {"bounds": [0.1, 2.0]}, TypeError, r"bounds must be a tuple \(low, high\)"),
        (X8, Y8, {"bounds": (0.0, 2.0)}, ValueError, r"bounds\[0\] must be in \(0, inf\]"),
        (X8, Y8, {"bounds": (2.0, 1.0)}, ValueError, r"bounds\[1\] must be in \(2, inf\]"),
    ],
    ids=[
        "list",
        "one-image",
        "empty",
        "uint8",
        "count",
        "labels-2d",
        "labels-float",
        "labels-bool",
        "labels-list",
        "above-range",
        "negative",
        "batch-size",
        "bounds-list",
        "bounds-zero",
        "bounds-order",
    ],
)
def test_bad_data_is_refused_with_one_line_errors(images, labels, kwargs, error, match):
    model = _model()
    model.temperature.fill_(0.5)
    with pytest.raises(error, match=match) as info:
        model.calibrate(images, labels, **kwargs)
    assert "\n" not in str(info.value)
    assert torch.equal(model.temperature, torch.full((2,), 0.5))  # a refused call changes nothing


def test_non_finite_logits_and_an_optimum_on_the_bounds():
    model = _model()
    x, y = _data(model, 24, seed=6)
    with pytest.warns(RuntimeWarning, match=r"lies on the edge of bounds=\(1\.0, 1\.1\)") as record:
        model.calibrate(x, y, bounds=(1.0, 1.1))
    assert record[0].filename == __file__  # the warning points at the caller
    with torch.no_grad():
        model.heads.bias[0, 0] = float("nan")
    with pytest.raises(ValueError, match="the model's logits on images are not all finite"):
        model.calibrate(x, y)


def test_bad_predict_and_folded_arguments():
    model = _model()
    with pytest.raises(TypeError, match="calibrated must be a bool"):
        model.predict(X8, calibrated="yes")  # type: ignore[arg-type]
    folded = model.fold()
    with pytest.raises(ValueError, match="rule must be one of 'prob', 'logit'"):
        folded.predict(X8, "vote")
    with pytest.raises(ValueError, match=r"temperature must be a tensor of shape \(2,\), but got \(3,\)"):
        FoldedMIMO(folded.encoder, folded.core, folded.head, 2, temperature=torch.ones(3))


# ---------------------------------------------------------------------------------------------------------------
# the temperature travels with the model
# ---------------------------------------------------------------------------------------------------------------
def test_saved_loaded_and_folded_model_predicts_what_it_predicted(calibrated, tmp_path):
    model, x, _, _ = calibrated
    x = x[:16]
    before = {rule: model.predict(x, rule) for rule in RULES}
    path = save_model(tmp_path / "calibrated.pt", model, builder=WRN_BUILDER, builder_kwargs=WRN_KWARGS)
    loaded, _ = load_model(path)
    assert torch.equal(loaded.temperature, model.temperature)
    folded, folded_loaded = model.fold(), loaded.fold()
    assert torch.equal(folded_loaded.temperature, model.temperature)
    exported = torch.export.export(
        _Probabilities(folded_loaded), (x[:3],), dynamic_shapes=({0: torch.export.Dim("b")},)
    )
    with torch.no_grad():
        for rule in RULES:
            # save + load: bitwise
            assert torch.equal(loaded.predict(x, rule), before[rule])
            assert torch.equal(folded_loaded.predict(x, rule), folded.predict(x, rule))
            # fold: the encoders' kernel is summed once instead of per call, so float32 rounding (atol 1e-6 on
            # probabilities; in float64 the fold agrees to 1e-12, tests/test_fold.py)
            torch.testing.assert_close(folded_loaded.predict(x, rule), before[rule], rtol=1e-5, atol=1e-6)
            raw = ensemble_probs(folded_loaded(x), rule)
            torch.testing.assert_close(folded_loaded.predict(x, rule, calibrated=False), raw, rtol=0, atol=0)
            assert not torch.allclose(raw, before[rule], atol=1e-3)  # the calibration did change the probabilities
        torch.testing.assert_close(exported.module()(x), before["prob"], rtol=1e-5, atol=1e-6)


class _Probabilities(nn.Module):
    """An export of the folded model's calibrated probabilities."""

    def __init__(self, folded: nn.Module) -> None:
        super().__init__()
        self.folded = folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.folded.predict(x)


def test_a_state_dict_without_the_temperature_loads_uncalibrated(calibrated):
    model, x, _, _ = calibrated
    old = {k: v for k, v in model.state_dict().items() if k != "temperature"}
    fresh = _model(seed=7)
    fresh.temperature.fill_(0.5)
    fresh.load_state_dict(old)  # strict
    assert torch.equal(fresh.temperature, torch.ones(2))
    with torch.no_grad():
        assert torch.equal(fresh.predict(x[:8]), ensemble_probs(model(x[:8]), "prob"))
    folded = model.fold()
    old_folded = {k: v for k, v in folded.state_dict().items() if k != "temperature"}
    fresh_folded = _model(seed=7).fold()
    fresh_folded.temperature.fill_(0.5)
    fresh_folded.load_state_dict(old_folded)
    assert torch.equal(fresh_folded.temperature, torch.ones(2))


def test_evaluate_uncertainty_reports_raw_and_calibrated_with_the_models_temperature(calibrated):
    model, x, y, fitted = calibrated
    test = (x[:64], y[:64])
    for rule in RULES:
        report = evaluate_uncertainty(model, test, rule=rule, corruptions=())
        assert report["temperature"] == float(model.temperature[RULES.index(rule)])
        assert report["temperature"] == pytest.approx(fitted[rule], rel=1e-7)
        assert report["temperature_source"] == "model"
        assert report["calibrated"]["clean"]["nll"] < report["clean"]["nll"]
    folded = evaluate_uncertainty(model.fold(), test, corruptions=())  # the folded model keeps it too
    assert folded["temperature_source"] == "model" and folded["temperature"] == float(model.temperature[0])
    members = evaluate_uncertainty(model, test, temperature_mode="members", corruptions=())
    assert members["temperature"] is None and "calibrated" not in members  # fitted in the other mode
    given = evaluate_uncertainty(model, test, temperature=2.0, corruptions=())
    assert given["temperature"] == 2.0 and given["temperature_source"] == "given"
    plain = evaluate_uncertainty(_model(), test, corruptions=())
    assert plain["temperature"] is None and plain["temperature_source"] is None and "calibrated" not in plain


# ---------------------------------------------------------------------------------------------------------------
# calibration under shift
# ---------------------------------------------------------------------------------------------------------------
def _ece64(probs: torch.Tensor, y: torch.Tensor, num_bins: int = 15) -> float:
    """The float64 equal-width ECE, bins right-closed: ``(i / n, (i + 1) / n]``."""
    conf, pred = probs.max(1)
    hits = (pred == y).double()
    total = 0.0
    for i in range(num_bins):
        inside = (conf > i / num_bins) & (conf <= (i + 1) / num_bins)
        if inside.any():
            total += float((conf[inside] - hits[inside]).sum().abs())
    return total / len(y)


def test_calibrated_ece_per_corruption_uses_the_models_temperature(calibrated):
    model, x, y, _ = calibrated
    test = (x[:64], y[:64])
    report = evaluate_uncertainty(model, test, corruptions=("contrast", "gaussian_noise"), severities=(2, 5))
    assert report["temperature_source"] == "model" and report["temperature"] == float(model.temperature[0])
    rows = calibration_under_shift(report)
    assert [(r["shift"], r["severity"]) for r in rows] == [
        ("clean", 0), ("contrast", 2), ("contrast", 5), ("gaussian_noise", 2), ("gaussian_noise", 5),
        ("mean", 2), ("mean", 5), ("mean", "all"),
    ]  # fmt: skip
    t = model.temperature[0].double()
    for row in rows[1:5]:
        corrupted = corrupt(test[0], row["shift"], row["severity"], seed=0, index=torch.arange(64))
        with torch.no_grad():
            ens = ensemble_log_probs(model(corrupted).double(), "prob")
        for key, temperature in (("ece", 1.0), ("calibrated_ece", t)):
            assert row[key] == pytest.approx(_ece64(torch.softmax(ens / temperature, -1), test[1]), abs=1e-6)
        assert row["calibrated_ece"] == report["calibrated"]["shift"][row["shift"]][row["severity"]]["ece"]
        assert abs(row["calibrated_nll"] - row["nll"]) > 0.01  # (not always lower: a shift can undo a calibration)
    assert rows[-1]["calibrated_ece"] == pytest.approx(sum(r["calibrated_ece"] for r in rows[1:5]) / 4)
    # shift.csv's rows hold them too: the same shifts again at the model's temperature, ECE in percent
    shift_csv, _ = shift_rows(report)
    tempered = {(r["shift"], r["severity"]): r for r in shift_csv if r["temperature"] == report["temperature"]}
    for row in rows:
        assert tempered[row["shift"], row["severity"]]["ece_pct"] == pytest.approx(100 * row["calibrated_ece"])
    plain = calibration_under_shift(evaluate_uncertainty(_model(), test, corruptions=("contrast",), severities=(5,)))
    assert [r["calibrated_ece"] for r in plain] == [None] * 4 and all(r["ece"] > 0 for r in plain)
