"""mixshare_layers.integrations.torch_uncertainty: layouts, loss, and fit + test under torch-uncertainty's trainer."""

from __future__ import annotations

import copy
import math

import einops
import pytest
import torch

pytest.importorskip("torch_uncertainty")

from torch_uncertainty import TUTrainer
from torch_uncertainty.post_processing import TemperatureScaler
from torch_uncertainty.routines import ClassificationRoutine
from torch_uncertainty.transforms import MIMOBatchFormat

from mixshare_layers import MIMOWrapper, SyntheticImageDataset
from mixshare_layers.data import synthetic_ood_dataset
from mixshare_layers.evaluation import evaluate_uncertainty
from mixshare_layers.functional import ensemble_log_probs
from mixshare_layers.integrations.lightning import MIMOProgress
from mixshare_layers.integrations.torch_uncertainty import (
    EnsembleLogits,
    MIMOClassificationRoutine,
    TorchUncertaintyBatchFormat,
    TorchUncertaintyMIMO,
    TorchUncertaintyMIMOLoss,
    fit_temperature_scaler,
    to_temperature_scaler,
)
from mixshare_layers.models import wide_resnet

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore:.*isinstance\\(treespec, LeafSpec\\)"
)


def _model(preset: str = "mixshare", m: int = 2, k: int = 4) -> MIMOWrapper:
    # MixMo's larger initial weights: a barely trained network's scores then have no float32 near-ties, which
    # torch-uncertainty (float32) and the library (float64) would order differently in the exact AUROC comparison
    return MIMOWrapper(wide_resnet(10, 1, num_classes=k, init="mixmo"), m, preset)


def _trainer(**kw) -> TUTrainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    return TUTrainer(**{**defaults, **kw})


def _loader(ds, batch_size: int = 8, shuffle: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def test_model_layouts():
    model = _model(m=3)
    net = TorchUncertaintyMIMO(model)
    x = torch.rand(3 * 4, 3, 8, 8)  # estimator-major: block i = member i's 4 images
    torch.manual_seed(0)
    logits = net(x)
    torch.manual_seed(0)
    direct = model(einops.rearrange(x, "(m b) c h w -> b m c h w", m=3))
    assert logits.shape == (12, 4)
    assert torch.equal(logits, einops.rearrange(direct.logits, "b m k -> (m b) k"))
    net.eval()
    y = torch.rand(5, 3, 8, 8)
    out = net(y)
    assert torch.equal(out.view(3, 5, 4), model(y).transpose(0, 1))  # "(m b) k": torch-uncertainty's eval layout
    assert net.num_estimators == 3 and net.num_classes == 4
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters())
    net.train()
    with pytest.raises(ValueError, match=r"estimator-major .* with M=3 .* got 10 rows, not a multiple of 3"):
        net(torch.rand(10, 3, 8, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(M \* B, C, H, W\)"):
        net(torch.rand(3, 2, 3, 8, 8))
    with pytest.raises(TypeError, match="model must be a MIMOWrapper"):
        TorchUncertaintyMIMO(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_batch_format_rows():
    model = _model(m=3)
    fmt = TorchUncertaintyBatchFormat(model, batch_repetition=2)
    images = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 3, 4, 4)  # image i is filled with i
    labels = torch.arange(10) + 100
    x, y = fmt((images, labels))
    assert x.shape == (3 * 20, 3, 4, 4) and y.shape == (60,)
    ids = x[:, 0, 0, 0].long()
    assert torch.equal(y, ids + 100)  # every label goes with its image
    blocks = ids.view(3, 20)  # member i's 20 rows
    for member in blocks:
        assert torch.equal(member.sort().values, torch.arange(10).repeat_interleave(2))  # each image b times
    same = (blocks[0] == blocks[1]) & (blocks[1] == blocks[2])
    assert int(same.sum()) >= round(0.1 * 20)  # MixShare's 10 % input repetition
    assert "batch_repetition=2" in repr(fmt)
    assert TorchUncertaintyBatchFormat(TorchUncertaintyMIMO(model)).batcher.num_subnetworks == 3


@pytest.mark.parametrize("preset", ["mimo", "mixmo", "mixshare"])
def test_loss_is_the_preset_loss_on_the_last_mix(preset):
    model = _model(preset)
    net = TorchUncertaintyMIMO(model)
    criterion = TorchUncertaintyMIMOLoss(net, label_smoothing=0.1)
    assert list(criterion.parameters()) == [] and "num_estimators=2" in repr(criterion)
    x, targets = torch.rand(2 * 6, 3, 8, 8), torch.randint(4, (12,))
    logits = net(x)
    info = net._last[1]
    loss = criterion(logits, targets)
    rows, labels = logits.view(2, 6, 4).transpose(0, 1), targets.view(2, 6).T
    expected = model.make_loss(label_smoothing=0.1)(rows, labels, info)
    assert torch.equal(loss, expected)
    if preset == "mimo":  # weights of 1: M times torch-uncertainty's mean cross-entropy
        ce = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
        torch.testing.assert_close(loss, 2 * ce)
    loss.backward()
    assert model.heads.weight.grad is not None
    # the mix is used once: the same logits again are refused in training
    with pytest.raises(ValueError, match="the loss must receive the logits of the model's latest training forward"):
        criterion(logits, targets)
    net.eval()
    with torch.no_grad():
        out = net(torch.rand(6, 3, 8, 8))
    eval_loss = criterion(out, targets)  # no mix in eval: weights of 1
    torch.testing.assert_close(eval_loss, model.make_loss(0.1)(out.view(2, 6, 4).transpose(0, 1), targets.view(2, 6).T))
    with pytest.raises(ValueError, match=r"targets must have shape \(M \* B,\) = \(12,\)"):
        criterion(out, targets[:5])


def test_fit_and_test_match_the_library_metrics():
    torch.manual_seed(0)
    model = _model("mixmo", k=4)
    train = SyntheticImageDataset(48, num_classes=4, image_size=8)
    test = SyntheticImageDataset(40, num_classes=4, image_size=8, train=False)
    ood = synthetic_ood_dataset(test, 24)
    routine = MIMOClassificationRoutine(
        model,
        batch_repetition=2,
        eval_ood=True,
        ood_criterion="mutual_information",
        optim_recipe=lambda net: torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
    )
    seen = []
    record = lambda mod, args: seen.append(float(model.progress)) if mod.training else None  # noqa: E731
    routine.model.register_forward_pre_hook(record)
    trainer = _trainer(max_epochs=2)
    trainer.fit(routine, _loader(train, shuffle=True))
    assert seen == pytest.approx([k / 12 for k in range(12)])  # progress per optimizer step, 6 steps x 2 epochs
    results = trainer.test(routine, dataloaders=[_loader(test), _loader(ood)], verbose=False)[0]
    report = evaluate_uncertainty(model, test, ood={"ood": _loader(ood)}, corruptions=())
    ours = report["clean"]
    pairs = {
        "test/cls/Acc": ours["ensemble_acc"],
        "test/cls/NLL": ours["nll"],
        "test/cal/ECE": ours["ece"],
        "test/cal/aECE": ours["adaptive_ece"],
        "test/sc/AURC": ours["aurc"],
        "test/ens_MI": ours["mutual_information"],
        "test/ens_Disagreement": ours["disagreement"],
        "ood/AUROC": report["ood"]["ood"]["mutual_information"]["auroc"],
        "ood/AUPR": report["ood"]["ood"]["mutual_information"]["aupr"],
        "ood/FPR95": report["ood"]["ood"]["mutual_information"]["fpr95"],
    }
    for key, value in pairs.items():
        assert results[key] == pytest.approx(value, abs=1e-5), key


def test_plain_routine_with_the_pieces_and_torch_uncertainty_batch_format():
    torch.manual_seed(0)
    model = _model("mimo")
    net = TorchUncertaintyMIMO(model)
    routine = ClassificationRoutine(
        model=net,
        num_classes=4,
        loss=TorchUncertaintyMIMOLoss(net),
        is_ensemble=True,
        format_batch_fn=MIMOBatchFormat(num_estimators=2, rho=0.0, batch_repeat=1),  # its own formatter
        optim_recipe=torch.optim.SGD(net.parameters(), lr=0.01),
    )
    trainer = _trainer(max_epochs=1, callbacks=[MIMOProgress()])
    trainer.fit(routine, _loader(SyntheticImageDataset(32, num_classes=4, image_size=8)))
    assert float(model.progress) == pytest.approx(3 / 4)


def test_routine_arguments():
    with pytest.raises(TypeError, match="MIMOClassificationRoutine sets num_classes itself"):
        MIMOClassificationRoutine(_model(), num_classes=4)
    with pytest.raises(ValueError, match="progress must be one of 'step', 'epoch'"):
        MIMOClassificationRoutine(_model(), progress="batch")
    routine = MIMOClassificationRoutine(_model(), progress=None)
    assert routine.configure_callbacks() == []
    assert isinstance(routine.format_batch_fn, TorchUncertaintyBatchFormat)


# ---------------------------------------------------------------------------------------------------------------
# calibration through torch-uncertainty's TemperatureScaler
# ---------------------------------------------------------------------------------------------------------------
def _calibration_case(seed: int, confidence: float) -> tuple[MIMOWrapper, torch.Tensor, torch.Tensor]:
    """A WRN ensemble whose heads read standardised features (so its logits spread like a trained network's,
    ``confidence`` scaling them), and 400 images labelled by its ensemble except for a quarter of random labels."""
    torch.manual_seed(seed)
    model = MIMOWrapper(wide_resnet(10, 1, num_classes=4), 2, "mixshare").eval()
    pooled: list[torch.Tensor] = []
    hook = model.heads.register_forward_pre_hook(lambda _, args: pooled.append(args[0]))
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.rand(400, 3, 16, 16, generator=g)
    with torch.no_grad():
        model(x)
        hook.remove()
        mean, std = pooled[0].mean(0), pooled[0].std(0).clamp_min(1e-6)
        weight = confidence * torch.randn(2, 4, mean.numel()) / mean.numel() ** 0.5 / std
        model.heads.weight.copy_(weight)
        model.heads.bias.copy_(-(weight @ mean))
    y = model.predict(x, calibrated=False).argmax(1)
    y = torch.where(torch.rand(400, generator=g) < 0.25, torch.randint(0, 4, (400,), generator=g), y)
    return model, x, y


def _mean_nll(model: MIMOWrapper, x: torch.Tensor, y: torch.Tensor, rule: str, t: float) -> float:
    """The float64 NLL of ``softmax(log p_ens / t)``."""
    with torch.no_grad():
        ens = ensemble_log_probs(model(x).double(), rule)
    return float(-torch.log_softmax(ens / t, -1).gather(1, y.view(-1, 1)).mean())


@pytest.mark.parametrize(("seed", "confidence"), [(0, 0.3), (3, 3.0)], ids=["under-confident", "over-confident"])
@pytest.mark.parametrize("rule", ["prob", "logit"])
def test_their_scaler_and_calibrate_fit_the_same_temperature(seed, confidence, rule):
    model, x, y = _calibration_case(seed, confidence)
    i = ("prob", "logit").index(rule)
    ours = copy.deepcopy(model).calibrate(x, y)[rule]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    model.train()
    scaler = fit_temperature_scaler(model, loader, rule)  # their defaults: LBFGS, lr 0.1, 100 iterations
    assert model.training  # its mode is restored
    theirs = float(model.temperature[i])
    assert theirs == pytest.approx(float(scaler.temperature[0].detach()), rel=1e-7)
    assert float(model.temperature[1 - i]) == 1.0  # the other rule's is left alone
    model.eval()
    # both minimise the same NLL: their default LBFGS stops on a loss change under 1e-9 (lr 0.1, float32), about
    # 0.1-0.2 % of T away from the optimum here, where the NLL is flat (it differs by less than 1e-5 nats)
    assert abs(math.log(theirs / ours)) < 5e-3, (ours, theirs)
    assert _mean_nll(model, x, y, rule, theirs) - _mean_nll(model, x, y, rule, ours) < 1e-5
    # run to convergence (full quasi-Newton steps), theirs meets ours within our search's bracket (5e-5 in log T)
    fit_temperature_scaler(model, loader, rule, lr=1.0, max_iter=1000)
    assert abs(math.log(float(model.temperature[i]) / ours)) < 1e-4, (ours, float(model.temperature[i]))


def test_their_scaler_holds_our_temperature():
    model, x, y = _calibration_case(0, 0.3)
    assert not to_temperature_scaler(model).trained  # T = 1: nothing fitted yet
    model.calibrate(x[:200], y[:200])
    for rule in ("prob", "logit"):
        scaler = to_temperature_scaler(model, rule)
        assert scaler.trained
        assert float(scaler.temperature[0].detach()) == pytest.approx(
            float(model.temperature[("prob", "logit").index(rule)])
        )
        probs = scaler(x[200:]).softmax(-1)  # their forward: the tempered ensemble logits
        torch.testing.assert_close(probs, model.predict(x[200:], rule), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(probs, model.predict(x[200:], rule, calibrated=False), atol=1e-3)


def test_calibration_interop_errors(monkeypatch):
    model, x, y = _calibration_case(0, 0.3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    with pytest.raises(TypeError, match="model must be a MIMOWrapper, but got Linear"):
        fit_temperature_scaler(torch.nn.Linear(2, 2), loader)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be a MIMOWrapper, but got Linear"):
        to_temperature_scaler(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rule must be one of 'prob', 'logit'"):
        fit_temperature_scaler(model, loader, "vote")
    with pytest.raises(ValueError, match="rule must be one of 'prob', 'logit'"):
        to_temperature_scaler(model, "vote")
    with pytest.raises(TypeError, match="sets the scaler's device itself; do not pass it"):
        fit_temperature_scaler(model, loader, device="cpu")
    with pytest.raises(ValueError, match=r"needs its model in eval mode \(call \.eval\(\)\)"):
        EnsembleLogits(model).train()(torch.rand(2, 3, 16, 16))

    def negative(self, dataloader, save_logits=False, progress=True):  # a fit that ends below zero
        self.inv_temp.data.fill_(-2.0)

    monkeypatch.setattr(TemperatureScaler, "fit", negative)
    model.eval().temperature.fill_(0.7)
    with pytest.raises(ValueError, match=r"converged to temperature -0\.5 on this data; nothing was stored"):
        fit_temperature_scaler(model, loader)
    assert torch.equal(model.temperature, torch.full((2,), 0.7))
