"""The library's WRN and CIFAR stem, the synthetic dataset, and a short training run that must lower the loss."""

from __future__ import annotations

import math

import pytest
import torch

from mixshare_layers import MIMOWrapper, SyntheticImageDataset
from mixshare_layers.models import WideResNet, cifar_resnet, torch_he_heads_init_, wide_resnet


# -- models ----------------------------------------------------------------------------------------------------------
def test_wrn_28_10_mimo_parameter_count():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = MIMOWrapper(wide_resnet(28, 10, num_classes=100), num_subnetworks=2, preset="mixmo")
    n = sum(p.numel() for p in model.parameters())
    assert 36.5e6 < n < 36.7e6  # MixMo: 36.6M parameters for WRN-28-10, M = 2, 100 classes


@pytest.mark.parametrize("depth,width", [(10, 1), (16, 2)])
def test_wrn_structure_and_final_maps(depth, width):
    torch.manual_seed(0)
    model = wide_resnet(depth, width, num_classes=7)
    assert isinstance(model, WideResNet)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [(depth - 4) // 6] * 3
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 64 * width, 8, 8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    split = model.mimo_split()
    assert split.encoder is model.conv1 and split.classifier is model.fc and split.reinit is not None


def test_wrn_init_is_truncated_he_normal():
    torch.manual_seed(0)
    w = wide_resnet(10, 4, init="mixmo").layer3[0].conv1.weight.detach()
    std = math.sqrt(2.0 / w[0].numel())
    assert float(w.abs().max()) <= 2 * std / 0.87962566103423978 + 1e-6  # truncated at two standard deviations
    assert abs(float(w.std()) / std - 1) < 0.05  # He's variance kept after truncation


def test_wrn_classifier_and_mimo_heads_follow_mixmo_init():
    """MixMo's WRN: truncated He-normal (fan-in) classifier with zero bias, and so are the M heads of a wrapper
    (independent draws), not nn.Linear's default (that left MixMo's members 15-20 points weaker)."""
    torch.manual_seed(0)
    fc = wide_resnet(10, 4, num_classes=100, init="mixmo").fc
    std = math.sqrt(2.0 / 256)
    assert not fc.bias.detach().any()
    assert float(fc.weight.detach().abs().max()) <= 2 * std / 0.87962566103423978 + 1e-6
    assert abs(float(fc.weight.detach().std()) / std - 1) < 0.05
    heads = MIMOWrapper(wide_resnet(10, 4, num_classes=100, init="mixmo"), 3, preset="mixmo").heads
    w = heads.weight.detach()
    assert not heads.bias.detach().any() and not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert all(abs(float(w[i].std()) / std - 1) < 0.05 for i in range(3))
    assert float(w.abs().max()) <= 2 * std / 0.87962566103423978 + 1e-6


def test_wrn_torch_init_is_pytorchs_default_everywhere_it_draws():
    """init="torch": Kaiming-uniform (a = sqrt(5)) weights, bound 1 / sqrt(fan_in), uniform biases; the wrapper's
    independent encoder copies and its M heads are drawn the same way (the split's reinit)."""
    torch.manual_seed(0)
    net = wide_resnet(10, 4, num_classes=100, init="torch")
    conv = net.layer3[0].conv1.weight.detach()
    bound = 1 / math.sqrt(conv[0].numel())
    assert float(conv.abs().max()) <= bound and abs(float(conv.std()) / (bound / math.sqrt(3)) - 1) < 0.05
    assert net.fc.bias.detach().any() and float(net.fc.bias.detach().abs().max()) <= 1 / math.sqrt(256)
    model = MIMOWrapper(net, 3, preset="mixmo")
    w = model.heads.weight.detach()
    assert not torch.equal(w[0], w[1]) and float(w.abs().max()) <= 1 / math.sqrt(256)
    assert all(abs(float(w[i].std()) / (1 / math.sqrt(3 * 256)) - 1) < 0.05 for i in range(3))
    kernels = model.encoder.kernels().detach()
    assert not torch.equal(kernels[0], kernels[1]) and float(kernels.abs().max()) <= 1 / math.sqrt(27)


def test_wrn_default_init_is_pytorchs_convolutions_with_he_normal_heads():
    """The default, "torch-he-heads": convolutions and the wrapper's encoder copies as PyTorch draws them
    (Kaiming-uniform, bound 1 / sqrt(fan_in)), the classifier and the M heads truncated He-normal (fan-in, std
    sqrt(2 / fan_in)) with zero biases; bit for bit "torch" followed by He-normal linear layers."""
    torch.manual_seed(0)
    net = wide_resnet(10, 4, num_classes=100)
    assert net.init == "torch-he-heads" and net.initializer is torch_he_heads_init_
    conv = net.layer3[0].conv1.weight.detach()
    bound = 1 / math.sqrt(conv[0].numel())
    assert float(conv.abs().max()) <= bound and abs(float(conv.std()) / (bound / math.sqrt(3)) - 1) < 0.05
    std = math.sqrt(2.0 / 256)
    model = MIMOWrapper(net, 3, preset="mixmo")
    for w, b in ((net.fc.weight, net.fc.bias), (model.heads.weight, model.heads.bias)):
        w = w.detach()
        assert not b.detach().any() and float(w.abs().max()) <= 2 * std / 0.87962566103423978 + 1e-6
        assert abs(float(w.std()) / std - 1) < 0.05
    assert not torch.equal(model.heads.weight[0], model.heads.weight[1])
    kernels = model.encoder.kernels().detach()
    assert not torch.equal(kernels[0], kernels[1]) and float(kernels.abs().max()) <= 1 / math.sqrt(27)
    torch.manual_seed(1)
    a = wide_resnet(10, 1, num_classes=7)
    torch.manual_seed(1)
    b = wide_resnet(10, 1, num_classes=7, init="torch")
    conv_a, conv_b = (dict(n.named_parameters()) for n in (a, b))
    assert all(torch.equal(conv_a[k], conv_b[k]) for k in conv_a if "fc" not in k)  # the same draws before the heads


def test_wrn_init_choices_and_custom_initialiser():
    calls = []

    def mine(module: torch.nn.Module) -> None:
        calls.append(type(module).__name__)
        for sub in module.modules():
            if isinstance(sub, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.zeros_(sub.weight)

    net = wide_resnet(10, 1, num_classes=5, init=mine)
    assert calls == ["WideResNet"] and not net.fc.weight.detach().any() and net.init == "mine"
    MIMOWrapper(net, 2, preset="mixmo")
    assert calls.count("Linear") == 2  # one draw per head, with the backbone's initialiser
    with pytest.raises(ValueError, match="init must be one of"):
        wide_resnet(10, 1, init="he")
    with pytest.raises(TypeError, match=r"init must be one of .* or a callable, but got int"):
        wide_resnet(10, 1, init=3)  # type: ignore[arg-type]


def test_wrn_errors():
    with pytest.raises(ValueError, match=r"depth must be 6n \+ 4 \(e.g. 10, 16, 22, 28, 40\), but got 12"):
        wide_resnet(12, 2)
    with pytest.raises(ValueError, match="width must be an integer >= 1, but got 0"):
        wide_resnet(10, 0)


def test_cifar_resnet_gives_4x4_final_maps():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = cifar_resnet(torchvision.models.resnet18(num_classes=10))
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    wrapped = MIMOWrapper(model, 2, "mixshare")
    feats = wrapped.core(wrapped.encoder(torch.randn(2, 3, 32, 32)))
    assert feats.shape == (2, 512, 4, 4)
    with pytest.raises(TypeError, match="model must be a torchvision-style ResNet with conv1 and maxpool, got Linear"):
        cifar_resnet(torch.nn.Linear(3, 3))


# -- synthetic data --------------------------------------------------------------------------------------------------
def test_synthetic_dataset_is_deterministic_balanced_uint8():
    a = SyntheticImageDataset(200, num_classes=10, seed=3)
    b = SyntheticImageDataset(200, num_classes=10, seed=3)
    assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)
    assert a.data.shape == (200, 3, 32, 32) and a.data.dtype == torch.uint8
    assert a.targets.dtype == torch.int64 and torch.bincount(a.targets).tolist() == [20] * 10
    assert not torch.equal(SyntheticImageDataset(200, seed=4).data, a.data)
    assert not torch.equal(SyntheticImageDataset(200, seed=3, train=False).data, a.data)
    image, label = a[5]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32) and 0 <= float(image.min()) <= 1
    assert label == int(a.targets[5]) and len(a) == 200
    small = SyntheticImageDataset(8, num_classes=2, image_size=8, channels=1, transform=lambda t: t.shape)
    assert small[0][0] == (1, 8, 8)


def _nearest_class_mean_accuracy(train_feats, train_y, test_feats, test_y, num_classes):
    mu, sd = train_feats.mean(0), train_feats.std(0) + 1e-9
    a, b = (train_feats - mu) / sd, (test_feats - mu) / sd
    centroids = torch.stack([a[train_y == k].mean(0) for k in range(num_classes)])
    return float((torch.cdist(b, centroids).argmin(1) == test_y).double().mean())


def _spectrum(ds):
    """Amplitude spectrum of the zero-mean images, symmetrised over horizontal flips: blind to shifts and flips."""
    x = ds.data.double()
    amp = torch.fft.fft2(x - x.mean(dim=(2, 3), keepdim=True)).abs()
    return ((amp + amp.flip(-1).roll(1, -1)) / 2).flatten(1).log1p()


def test_synthetic_classes_differ_in_space_not_in_colour():
    train = SyntheticImageDataset(1000, num_classes=5, seed=0)
    test = SyntheticImageDataset(500, num_classes=5, seed=0, train=False)
    colour = [ds.data.double().mean(dim=(2, 3)) for ds in (train, test)]
    per_class = torch.stack([colour[0][train.targets == k].mean(0) for k in range(5)])
    se = colour[0].std(0) / math.sqrt(200)
    # class mean colours agree within 5 standard errors of a class mean
    assert bool(((per_class - colour[0].mean(0)).abs() < 5 * se).all())
    # a nearest-class-mean classifier on colour is at chance (0.2; 0.35 is ~8 standard errors above it) ...
    assert _nearest_class_mean_accuracy(colour[0], train.targets, colour[1], test.targets, 5) < 0.35
    # ... and on a spatial statistic it is nearly perfect: the label lives in the spatial structure
    spatial = _nearest_class_mean_accuracy(_spectrum(train), train.targets, _spectrum(test), test.targets, 5)
    assert spatial > 0.9


def test_synthetic_errors():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, but got 1"):
        SyntheticImageDataset(10, num_classes=1)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, but got 0"):
        SyntheticImageDataset(0)
    with pytest.raises(ValueError, match=r"noise must be in \[0, inf\], but got -1"):
        SyntheticImageDataset(10, noise=-1.0)


# -- learning --------------------------------------------------------------------------------------------------------
def test_thirty_training_steps_lower_the_loss():
    torch.manual_seed(0)
    ds = SyntheticImageDataset(512, num_classes=4, image_size=16, seed=0, noise=1.0)
    x_all = (ds.data.float() / 255 - 0.5) / 0.25
    model = MIMOWrapper(wide_resnet(10, 1, num_classes=4), num_subnetworks=2, preset="mixshare")
    batcher = model.make_batcher(1, generator=torch.Generator().manual_seed(0))
    loss_fn = model.make_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        idx = (torch.arange(32) + 32 * step) % len(ds)
        xs, ys = batcher(x_all[idx], ds.targets[idx])
        model.set_progress(step / 30)
        loss = loss_fn(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(math.isfinite(v) for v in losses)
    # starts near chance (M ln K) and falls clearly (by ~50% with this seed; 15% asked)
    assert abs(first - 2 * math.log(4)) < 0.3
    assert last < 0.85 * first
