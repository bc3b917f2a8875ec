"""Sharing rates, influence tables and App. D's variance influence (mixshare_layers.analysis)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mixshare_layers import BackboneSplit, MIMOWrapper, MultiEncoder, MultiHead
from mixshare_layers.analysis import (
    classifier_influence,
    default_variance_layers,
    encoder_influence,
    feature_sharing,
    feature_variance_influence,
    sharing_rate,
    sharing_rates,
)
from mixshare_layers.models import wide_resnet


@pytest.fixture(autouse=True)
def _seed():
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


def _naive_rate(h: torch.Tensor, reduction: str) -> float:
    """Float64 reference, one feature at a time."""
    rows = h.double().abs().tolist()
    lows = [min(col) for col in zip(*rows, strict=True)]
    highs = [max(col) for col in zip(*rows, strict=True)]
    if reduction == "sum-ratio":
        return 100.0 * sum(lows) / sum(highs)
    ratios = [lo / hi for lo, hi in zip(lows, highs, strict=True) if hi > 0]
    return 100.0 * sum(ratios) / len(ratios)


# ---------------------------------------------------------------------------------------------------------------
# sharing_rate
@pytest.mark.parametrize("reduction", ["mean-ratio", "sum-ratio"])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_sharing_rate_matches_float64_reference(m, reduction):
    h = torch.rand(m, 37) * torch.rand(1, 37) * 5
    assert float(sharing_rate(h, reduction)) == pytest.approx(_naive_rate(h, reduction), rel=1e-12)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_sharing_rate_invariances(m):
    h = torch.rand(m, 50).double() + 0.01
    for reduction in ("mean-ratio", "sum-ratio"):
        rate = sharing_rate(h, reduction)
        assert 0.0 <= float(rate) <= 100.0
        torch.testing.assert_close(sharing_rate(7.5 * h, reduction), rate)  # scale
        torch.testing.assert_close(sharing_rate(h[torch.randperm(m)], reduction), rate)  # subnetwork order
        torch.testing.assert_close(sharing_rate(h[:, torch.randperm(50)], reduction), rate)  # feature order


def test_sum_ratio_is_the_max_weighted_mean_of_feature_ratios():
    h = torch.rand(3, 40).double()
    ratios = feature_sharing(h)
    weights = h.max(dim=0).values
    torch.testing.assert_close(sharing_rate(h, "sum-ratio"), 100 * (ratios * weights).sum() / weights.sum())
    torch.testing.assert_close(sharing_rate(h, "mean-ratio"), 100 * ratios.mean())


def test_two_reductions_differ_when_weak_features_are_shared():
    # two strong private features and one weak shared feature: the per-feature mean counts the weak one fully
    h = torch.tensor([[10.0, 0.0, 0.1], [0.0, 10.0, 0.1]])
    assert float(sharing_rate(h, "mean-ratio")) == pytest.approx(100 / 3)
    assert float(sharing_rate(h, "sum-ratio")) == pytest.approx(100 * 0.1 / 20.1)


def test_unused_features_are_left_out_of_the_mean():
    h = torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    assert float(sharing_rate(h)) == pytest.approx(75.0)
    assert math.isnan(float(feature_sharing(h)[2]))
    assert float(sharing_rate(torch.zeros(2, 4))) == 0.0
    assert float(sharing_rate(torch.zeros(2, 4), "sum-ratio")) == 0.0


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (torch.rand(1, 5), ValueError, "at least 2 subnetworks"),
        (torch.rand(5), ValueError, r"influence must have shape \(M, F\)"),
        (torch.rand(2, 0), ValueError, "at least 1 feature"),
        (torch.tensor([[1.0, float("nan")], [1.0, 1.0]]), ValueError, "finite"),
        ([[1.0, 2.0], [1.0, 2.0]], TypeError, "influence must be a torch.Tensor"),
    ],
)
def test_sharing_rate_bad_input(value, error, match):
    with pytest.raises(error, match=match):
        sharing_rate(value)


def test_sharing_rate_bad_reduction():
    with pytest.raises(ValueError, match="reduction must be one of 'mean-ratio', 'sum-ratio', but got 'median'"):
        sharing_rate(torch.rand(2, 3), "median")


# ---------------------------------------------------------------------------------------------------------------
# influence tables from the weights
@pytest.mark.parametrize("m", [2, 3, 4])
def test_identical_encoders_and_heads_share_everything(m):
    model = MIMOWrapper(wide_resnet(10, 1, 10), m, preset="unmix-aligned", pretrained=True)  # aligned + copied heads
    enc, clf = encoder_influence(model), classifier_influence(model)
    assert enc.shape == (m, 16) and clf.shape == (m, 64)
    rates = sharing_rates(model)
    for key in ("encoder", "encoder_sum_ratio", "classifier", "classifier_sum_ratio"):
        assert rates[key] == pytest.approx(100.0, abs=1e-9)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_disjoint_channel_use_shares_nothing(m):
    channels, features = 4 * m, 6 * m
    enc = MultiEncoder(nn.Conv2d(3, channels, 3, padding=1), m)
    heads = MultiHead(features, 10, m)
    with torch.no_grad():
        for i in range(m):  # subnetwork i owns channels i, i + m, i + 2m, ... and the same for features
            enc.kernels()[i, [c for c in range(channels) if c % m != i]] = 0.0
            heads.weight[i, :, [d for d in range(features) if d % m != i]] = 0.0
    for reduction in ("mean-ratio", "sum-ratio"):
        assert float(sharing_rate(encoder_influence(enc), reduction)) == 0.0
        assert float(sharing_rate(classifier_influence(heads), reduction)) == 0.0


def test_influence_tables_match_naive_loops():
    m = 3
    model = MIMOWrapper(wide_resnet(10, 1, 7), m, preset="mixmo")
    kernels = model.encoder.kernels().detach().double()
    expected = torch.tensor(
        [[kernels[i, c].abs().sum().item() for c in range(16)] for i in range(m)], dtype=torch.float64
    )
    torch.testing.assert_close(encoder_influence(model).double(), expected, rtol=1e-6, atol=0)
    weight = model.heads.weight.detach().double()
    expected = torch.tensor(
        [[weight[i, :, d].abs().sum().item() for d in range(64)] for i in range(m)], dtype=torch.float64
    )
    torch.testing.assert_close(classifier_influence(model).double(), expected, rtol=1e-6, atol=0)


def test_encoder_influence_of_generic_conv_encoders():
    conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")  # not fused: M separate Conv2d copies
    enc = MultiEncoder(conv, 2, init="aligned")
    assert not enc.fused
    h = encoder_influence(enc)
    torch.testing.assert_close(h[0], conv.weight.detach().abs().sum(dim=(1, 2, 3)))
    assert float(sharing_rate(h)) == pytest.approx(100.0)


def test_influence_bad_models():
    enc = MultiEncoder(nn.Sequential(nn.Identity(), nn.ReLU()), 2)
    with pytest.raises(TypeError, match=r"needs encoders with an nn\.Conv2d or nn\.Linear.*Sequential"):
        encoder_influence(enc)
    with pytest.raises(TypeError, match=r"must be a MIMOWrapper \(or have a .heads MultiHead\), but got Linear"):
        classifier_influence(nn.Linear(3, 4))
    with pytest.raises(TypeError, match=r"have a .encoder MultiEncoder"):
        encoder_influence(nn.Linear(3, 4))


# ---------------------------------------------------------------------------------------------------------------
# feature_variance_influence (App. D)
def _toy_model(m: int) -> MIMOWrapper:
    """Encoder i writes to its own channels only (channel c belongs to subnetwork c % m), then a 1x1 identity map."""
    channels = 2 * m
    stage1 = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False))
    stage2 = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))
    split = BackboneSplit(
        encoder=nn.Conv2d(3, channels, 3, padding=1, bias=False),
        core=nn.Sequential(stage1, stage2),
        classifier=nn.Linear(channels, 5),
    )
    model = MIMOWrapper(split=split, num_subnetworks=m, preset="mixmo")
    with torch.no_grad():
        stage1[0].weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        for i in range(m):
            model.encoder.kernels()[i, [c for c in range(channels) if c % m != i]] = 0.0
    return model


@pytest.mark.parametrize("m", [2, 3])
def test_variance_influence_separates_private_channels(m):
    model = _toy_model(m).double()
    data = torch.randn(11, 3, 8, 8, dtype=torch.float64)
    out = feature_variance_influence(model, data, batch_size=4)  # batches of 4, 4, 3: streamed moments
    assert list(out) == ["core.0", "core.1"] == default_variance_layers(model)
    h = out["core.0"]
    assert h.shape == (m, 2 * m) and h.dtype == torch.float64
    for i in range(m):
        for c in range(2 * m):
            if c % m == i:
                assert h[i, c] > 1e-3  # input i moves its own channels
            else:
                assert h[i, c] == pytest.approx(0.0, abs=1e-20)  # and nobody else's
    assert float(sharing_rate(h)) == pytest.approx(0.0, abs=1e-12)
    assert float(sharing_rate(out["core.1"])) > 0.0  # the 3x3 conv mixes channels


def test_variance_influence_matches_one_shot_float64_reference():
    m = 2
    model = _toy_model(m).double()
    with torch.no_grad():
        model.core[1][1].weight.normal_()
    data = torch.randn(9, 3, 8, 8, dtype=torch.float64)
    fixed = torch.randn(3, 8, 8, dtype=torch.float64)
    out = feature_variance_influence(model, data, layers=["core.1"], fixed_input=fixed, batch_size=2)
    for i in range(m):
        inputs = fixed.expand(9, m, 3, 8, 8).clone()
        inputs[:, i] = data
        with torch.no_grad():
            maps = model.core(model.encoder(inputs).sum(dim=1))
        torch.testing.assert_close(out["core.1"][i], maps.var(dim=0).mean(dim=(1, 2)), rtol=1e-10, atol=1e-14)


def test_variance_influence_on_a_wrn_with_a_dataloader_restores_mode():
    model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixmo")
    model.train()
    data = torch.randn(6, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.zeros(6)), batch_size=4)
    from_loader = feature_variance_influence(model, loader, layers=["core.2"])
    from_tensor = feature_variance_influence(model, data, layers=["core.2"], batch_size=5)
    assert model.training
    torch.testing.assert_close(from_loader["core.2"], from_tensor["core.2"], rtol=1e-4, atol=1e-8)
    assert from_tensor["core.2"].shape == (2, 64)


def test_default_layers_of_a_torchvision_resnet():
    torchvision = pytest.importorskip("torchvision")
    model = MIMOWrapper(torchvision.models.resnet18(num_classes=10), 2)
    names = default_variance_layers(model)
    modules = dict(model.named_modules())
    assert names == ["core.3", "core.4", "core.5", "core.6"]
    assert [len(modules[n]) for n in names] == [2, 2, 2, 2]  # layer1..layer4, two BasicBlocks each


def test_default_layers_fall_back_to_the_core():
    split = BackboneSplit(encoder=nn.Conv2d(3, 4, 1), core=nn.ReLU(), classifier=nn.Linear(4, 2))
    assert default_variance_layers(MIMOWrapper(split=split, num_subnetworks=2)) == ["core"]
    with pytest.raises(TypeError, match=r"must be a MIMOWrapper \(with a .core module\)"):
        default_variance_layers(nn.Linear(2, 2))


def test_variance_influence_bad_input():
    model = _toy_model(2)
    data = torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"layers \['nope'\] are not modules of the model"):
        feature_variance_influence(model, data, layers=["nope"])
    with pytest.raises(TypeError, match="not a single string"):
        feature_variance_influence(model, data, layers="core.0")
    with pytest.raises(ValueError, match="at least 2 images"):
        feature_variance_influence(model, data[:1])
    with pytest.raises(ValueError, match=r"fixed_input must be one image \(C, H, W\), but got \(1, 3, 8, 8\)"):
        feature_variance_influence(model, data, fixed_input=data[:1])
    with pytest.raises(ValueError, match=r"data must be a tensor of images \(N, C, H, W\)"):
        feature_variance_influence(model, torch.randn(4, 3, 8))
    with pytest.raises(ValueError, match=r"must output feature maps \(B, C, h, w\)"):
        feature_variance_influence(model, data, layers=["heads"])
    with pytest.raises(ValueError, match="num_subnetworks >= 2"):
        split = BackboneSplit(encoder=nn.Conv2d(3, 4, 1), core=nn.ReLU(), classifier=nn.Linear(4, 2))
        feature_variance_influence(MIMOWrapper(split=split, num_subnetworks=1), data)
