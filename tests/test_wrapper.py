"""MIMOWrapper: shapes, train = composition of the parts, eval = float64 reference, function preservation of
pretrained backbones through every adapter, round-trips, torch.compile, helpers and error paths."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixshare_layers import BackboneSplit, CutMixMixer, MIMOLoss, MIMOOutput, MIMOWrapper, UnsupportedBackboneError
from mixshare_layers.functional import ensemble_probs, mix, rebalanced_weights, unmix_pool
from mixshare_layers.models import wide_resnet

ALIGNED_PRESETS = ["unmix-aligned", "mixshare", "mixshare-partial"]


def tiny_split(num_classes: int = 5) -> BackboneSplit:
    """A small CNN: conv encoder, BN-ReLU-conv(stride 2)-ReLU core, linear classifier."""
    encoder = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    core = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
    return BackboneSplit(encoder=encoder, core=core, classifier=nn.Linear(12, num_classes))


def tiny_model(m: int = 2, preset: str = "mixshare", **kw) -> MIMOWrapper:
    return MIMOWrapper(num_subnetworks=m, preset=preset, split=tiny_split(), **kw)


def _x(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


# -- cardinality -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("preset", ["mimo", "mixmo", "unmix", "mixshare", "mixshare-partial"])
def test_shapes(m, b, preset):
    model = tiny_model(m, preset)
    out = model(_x(b, m, 3, 8, 8))
    assert isinstance(out, MIMOOutput)
    assert out.logits.shape == (b, m, 5)
    assert out.mix_info.ratios.shape == (b, m) and (out.mix_info.height, out.mix_info.width) == (8, 8)
    model.eval()
    assert model(_x(b, 3, 8, 8)).shape == (b, m, 5)
    assert model(_x(b, m, 3, 8, 8)).shape == (b, m, 5)
    assert model(_x(0, 3, 8, 8)).shape == (0, m, 5)


# -- feature: train = the composition of the parts, eval = a hand-computed float64 reference ---------------------------
@pytest.mark.parametrize("preset", ["mixmo", "unmix", "mixshare", "mixshare-partial"])
def test_train_forward_is_the_composition_of_the_parts(preset):
    model = tiny_model(3, preset).double()
    model.set_progress(0.2)
    x = _x(4, 3, 3, 8, 8, dtype=torch.float64)
    out = model(x, generator=torch.Generator().manual_seed(5))
    enc = model.encoder(x)
    info = model.mixer.make_params(enc, model.progress, generator=torch.Generator().manual_seed(5))
    for a, b in zip(out.mix_info._replace(loss_weights=None), info, strict=True):
        assert a is b is None or torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    # the output carries the preset's loss weights (what MIMOLoss() uses)
    torch.testing.assert_close(out.mix_info.loss_weights, rebalanced_weights(info.ratios, model.config.rebalance_root))
    feats = model.core(mix(enc, info, 3.0))
    unmixer = model.unmixer
    strength = min(1.0, 0.2 / unmixer.fadeout_end) if unmixer.mode == "fadeout" else 0.0
    k = {"none": 0, "full": None, "partial": unmixer.num_unmixed(feats.shape[1]), "fadeout": None}[unmixer.mode]
    pooled = unmix_pool(feats, info, strength=strength, num_unmixed=k)
    torch.testing.assert_close(out.logits, model.heads(pooled))


@pytest.mark.parametrize("m", [1, 2, 3])
def test_eval_matches_float64_reference_from_the_parts(m):
    model = tiny_model(m, "mixmo").double()
    model.train()
    for _ in range(2):  # give BatchNorm non-trivial running statistics
        model(_x(6, m, 3, 8, 8, seed=1, dtype=torch.float64))
    model.eval()
    x = _x(5, 3, 8, 8, seed=2, dtype=torch.float64)
    kernel = model.encoder.kernels().sum(0)  # the summed encoder kernels, one convolution
    feats = model.core(F.conv2d(x, kernel, None, 1, 1))
    pooled = feats.mean(dim=(2, 3))  # global average pooling, shared by every head
    w, bias = model.heads.weight, model.heads.bias
    expected = torch.stack([pooled @ w[i].T + bias[i] for i in range(m)], dim=1)
    calls = []
    handle = model.core.register_forward_hook(lambda *args: calls.append(1))
    got = model(x)
    handle.remove()
    torch.testing.assert_close(got, expected)
    assert len(calls) == 1  # one pass of the core for all M heads
    # the M-input eval form with the same image in every slot gives the same logits
    torch.testing.assert_close(model(x[:, None].expand(-1, m, -1, -1, -1)), expected)


@pytest.mark.parametrize("preset", ALIGNED_PRESETS)
@pytest.mark.parametrize("m", [2, 3])
def test_pretrained_resnet18_function_preservation(resnet18, preset, m):
    x = _x(2, 3, 64, 64, seed=3)
    with torch.no_grad():
        expected = resnet18(x)
        model = MIMOWrapper(copy.deepcopy(resnet18), m, preset, pretrained=True).eval()
        got = model(x)
    assert got.shape == (2, m, 10)
    for i in range(m):
        torch.testing.assert_close(got[:, i], expected, rtol=1e-5, atol=1e-5)
    assert model.predict(x).argmax(1).tolist() == expected.argmax(1).tolist()


def test_progress_drives_fadeout_in_the_wrapper():
    model = tiny_model(2, "mixshare")
    seen = []
    model.heads.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = _x(4, 2, 3, 8, 8)
    model.set_progress(0.0)
    model(x)
    model.set_progress(model.unmixer.fadeout_end)
    model(x)
    assert not torch.allclose(seen[0][:, 0], seen[0][:, 1])  # full unmixing: members see different features
    torch.testing.assert_close(seen[1][:, 0], seen[1][:, 1])  # faded out: one shared vector
    assert float(model.progress) == pytest.approx(1 / 3)


def test_seeded_generator_reproduces_the_train_forward():
    model = tiny_model(2, "mixmo")
    x = _x(3, 2, 3, 8, 8)
    a = model(x, generator=torch.Generator().manual_seed(0))
    b = model(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert torch.equal(a.mix_info.boxes, b.mix_info.boxes)


# -- round-trips -----------------------------------------------------------------------------------------------------
def test_state_dict_round_trip_deepcopy_pickle():
    torch.manual_seed(0)
    model = MIMOWrapper(wide_resnet(10, 1, num_classes=4), 2, "mixshare")
    model.set_progress(0.4)
    model(_x(4, 2, 3, 16, 16))  # update BN statistics
    model.eval()
    x = _x(3, 3, 16, 16, seed=1)
    expected = model(x)
    fresh = MIMOWrapper(wide_resnet(10, 1, num_classes=4), 2, "mixshare")
    fresh.load_state_dict(model.state_dict())
    assert "progress" in model.state_dict() and float(fresh.progress) == pytest.approx(0.4)
    for other in (fresh, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        other.eval()
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
        assert float(other.progress) == pytest.approx(0.4)


# -- compile ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["mixshare", "mixmo"])
def test_compile_fullgraph_train_and_eval(preset):
    model = tiny_model(3, preset)
    model.set_progress(0.1)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = _x(4, 3, 3, 8, 8)
    out = compiled(x)
    # the compiled graph may draw λ with another (equally distributed) sampler than eager mode, so compare with the
    # eager parts replaying the compiled forward's own mix
    info = out.mix_info
    torch.testing.assert_close(info.masks_at().sum(1), torch.ones(4, 8, 8))
    torch.testing.assert_close(info.masks_at().mean(dim=(2, 3)), info.ratios)
    features = model.core(model.mixer.apply(model.encoder(x), info))
    torch.testing.assert_close(out.logits, model.heads(model.unmixer(features, info, model.progress)))
    model.eval()
    x4 = _x(4, 3, 8, 8)
    torch.testing.assert_close(compiled(x4), model(x4))


def test_compile_survives_dynamic_shapes_and_1x1_maps():
    # a core that pools to 1x1 (the Unmixer's warning path must stay out of the graph), and a second batch size that
    # makes dynamo recompile with dynamic shapes (random draws must not break the graph then)
    split = tiny_split()
    split = split._replace(core=nn.Sequential(split.core, nn.AdaptiveAvgPool2d(1)))
    model = MIMOWrapper(num_subnetworks=2, preset="unmix", split=split)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for b in (4, 3, 5):
            assert compiled(_x(b, 2, 3, 8, 8)).logits.shape == (b, 2, 5)


# -- helpers ---------------------------------------------------------------------------------------------------------
def test_predict_ensemble_and_estimator_major():
    model = tiny_model(3, "mixmo")
    x = _x(4, 3, 8, 8)
    probs = model.predict(x)
    assert model.training  # mode restored
    model.eval()
    logits = model(x)
    torch.testing.assert_close(probs, logits.softmax(-1).mean(1))
    torch.testing.assert_close(model.predict(x, rule="logit"), logits.mean(1).softmax(-1))
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    torch.testing.assert_close(MIMOWrapper.ensemble(logits), ensemble_probs(logits))
    flat = MIMOWrapper.estimator_major(logits)
    assert flat.shape == (12, 5)
    for i in range(3):
        torch.testing.assert_close(flat[i * 4 : (i + 1) * 4], logits[:, i])


def test_loss_and_batcher_follow_the_preset():
    y = torch.randint(5, (4, 2), generator=torch.Generator().manual_seed(0))
    for preset, root in (("mixshare", 1.0), ("mixmo", 3.0), ("mimo", None)):
        model = tiny_model(2, preset)
        out = model(_x(4, 2, 3, 8, 8))
        expected = MIMOLoss(root)(out, y)  # the preset's root, given explicitly
        for loss_fn in (model.make_loss(), MIMOLoss()):  # the output carries it: both spellings give the same loss
            torch.testing.assert_close(loss_fn(out, y), expected, rtol=0, atol=0)
            torch.testing.assert_close(loss_fn(out.logits, y, out.mix_info), expected, rtol=0, atol=0)
        assert out.mix_info.loss_weights.sum(1).tolist() == pytest.approx([2.0] * 4)
    model = tiny_model(2, "mixshare")
    assert model.make_batcher(2).input_repetition == pytest.approx(0.1)
    assert model.make_batcher(2).batch_repetition == 2
    assert tiny_model(2, "mixmo").make_loss(label_smoothing=0.1).label_smoothing == pytest.approx(0.1)
    assert tiny_model(2, "mixshare", alpha=1.0).mixer.alpha == 1.0
    assert "preset='mixshare'" in repr(model)


# -- adapters --------------------------------------------------------------------------------------------------------
def _check_adapter(backbone: nn.Module, size: int = 32) -> None:
    """Eval function preservation when wrapped as pretrained (so the split is exact), then a train forward."""
    backbone.eval()
    x = _x(2, 3, size, size, seed=4)
    with torch.no_grad():
        expected = backbone(x)
        model = MIMOWrapper(backbone, 2, "mixshare", pretrained=True).eval()  # shares the backbone's core
        got = model(x)
        torch.testing.assert_close(got[:, 0], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[:, 1], expected, rtol=1e-4, atol=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # backbones with 1x1 final maps at this size warn once
            out = model.train()(_x(2, 2, 3, size, size, seed=5))
    assert out.logits.shape == (2, 2, expected.shape[1])


def test_adapter_torchvision_resnet18(resnet18):
    _check_adapter(copy.deepcopy(resnet18))


def test_adapter_torchvision_wide_resnet50_2():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = MIMOWrapper(torchvision.models.wide_resnet50_2(num_classes=7), 2, "mixmo")
    assert model.encoder.kernels().shape == (2, 64, 3, 7, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert model(_x(2, 2, 3, 32, 32)).logits.shape == (2, 2, 7)


def test_adapter_library_wrn():
    torch.manual_seed(0)
    _check_adapter(wide_resnet(10, 1, num_classes=6), size=16)


def test_adapter_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    _check_adapter(timm.create_model("resnet18", num_classes=6))
    name = "test_efficientnet" if "test_efficientnet" in timm.list_models("test_*") else "efficientnet_b0"
    _check_adapter(timm.create_model(name, num_classes=6))


def test_manual_split_and_split_function():
    split = tiny_split()
    model = MIMOWrapper(num_subnetworks=2, preset="unmix", split=split)
    assert model.core is split.core
    model2 = MIMOWrapper(nn.Module(), 2, "unmix", split=lambda _: tiny_split())
    assert model2(_x(2, 2, 3, 8, 8)).logits.shape == (2, 2, 5)


def test_heads_use_the_split_reinit_or_linear_default():
    """Without a reinit the heads get nn.Linear's default; with one, one independent draw of it per head."""
    torch.manual_seed(0)
    plain = MIMOWrapper(split=tiny_split(), num_subnetworks=2, preset="mixmo").heads
    bound = 1 / plain.in_features**0.5
    assert float(plain.weight.detach().abs().max()) <= bound and plain.bias.detach().abs().max() > 0
    calls = []

    def reinit(module):
        calls.append(type(module).__name__)
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(float(len(calls)))

    model = MIMOWrapper(split=tiny_split()._replace(reinit=reinit), num_subnetworks=3, preset="mixmo")
    w = model.heads.weight.detach()
    # the independent encoders come first (3 Conv2d draws), then the 3 heads
    assert calls == ["Conv2d"] * 3 + ["Linear"] * 3
    assert [float(w[i].unique()) for i in range(3)] == [4.0, 5.0, 6.0]
    assert torch.equal(model.heads.bias.detach(), torch.tensor([[4.0] * 5, [5.0] * 5, [6.0] * 5]))
    pretrained = MIMOWrapper(split=tiny_split()._replace(reinit=reinit), num_subnetworks=2, pretrained=True)
    assert torch.equal(pretrained.heads.weight[0], pretrained.heads.weight[1])  # copies of the classifier


# -- errors ----------------------------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match=r"preset must be one of 'mimo', 'mixmo', .*'mixshare-partial', but got 'mix'"):
        tiny_model(2, "mix")
    with pytest.raises(ValueError, match="num_subnetworks must be an integer >= 1, but got 0"):
        tiny_model(0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'alfa'; valid options are alpha, .*input_repetition"):
        tiny_model(2, alfa=1.0)
    with pytest.raises(ValueError, match=r"unmix_mode must be one of 'none', 'full', 'partial', 'fadeout'"):
        tiny_model(2, unmix_mode="half")
    with pytest.raises(ValueError, match=r"encoder_init must be one of 'independent', 'aligned', 'colinear'"):
        tiny_model(2, encoder_init="same")
    with pytest.raises(UnsupportedBackboneError, match=r"no adapter knows how to split a Sequential.*BackboneSplit"):
        MIMOWrapper(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), 2)
    with pytest.raises(TypeError, match="backbone is None"):
        MIMOWrapper(None, 2)
    with pytest.raises(TypeError, match="split must be a BackboneSplit or a callable, but got int"):
        MIMOWrapper(nn.Module(), 2, split=3)
    with pytest.raises(TypeError, match=r"split\(backbone\) must return a BackboneSplit, but got tuple"):
        MIMOWrapper(nn.Module(), 2, split=lambda _: (1, 2))
    with pytest.raises(TypeError, match=r"split.classifier must be an nn.Module, but got int"):
        MIMOWrapper(split=tiny_split()._replace(classifier=3))
    model = tiny_model(2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, M=2, C, H, W\) in training mode.*\(4, 3, 8, 8\)"):
        model(_x(4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(B, M=2, C, H, W\) in training mode"):
        model(_x(4, 3, 3, 8, 8))
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\], but got 1.5"):
        model.set_progress(1.5)
    with pytest.raises(ValueError, match=r"rule must be one of 'prob', 'logit', but got 'vote'"):
        model.predict(_x(2, 3, 8, 8), rule="vote")
    model.eval()
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\) or \(B, M=2, C, H, W\)"):
        model(_x(3, 8, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\) or \(B, M=2, C, H, W\)"):
        model(_x(2, 3, 3, 8, 8))
    pooled = tiny_split()._replace(core=nn.Sequential(nn.Flatten(), nn.LazyLinear(12)))
    with pytest.raises(ValueError, match=r"the core must return spatial feature maps \(B, D, h, w\).*\(2, 12\)"):
        MIMOWrapper(split=pooled)(_x(2, 2, 3, 8, 8))


class _Patches(nn.Module):
    """A 4x4 patch embedding with a channels-last output (B, h, w, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class _Tokens(nn.Module):
    """(B, h, w, C) -> a class token and the patch grid, (B, 1 + h w, C); ``drop`` tokens fewer at the end."""

    def __init__(self, drop: int = 0, batch: slice = slice(None)) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.lin = nn.Linear(8, 8)
        self.drop, self.batch = drop, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(1, 2)
        out = self.lin(torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1))
        return out[self.batch, : out.shape[1] - self.drop]


def token_split(pooling: str = "avg", core: nn.Module | None = None) -> BackboneSplit:
    return BackboneSplit(
        encoder=_Patches(),
        core=_Tokens() if core is None else core,
        classifier=nn.Linear(8, 5),
        layout="tokens",
        num_prefix_tokens=1,
        pooling=pooling,
        encoding_layout="channels_last",
    )


def _count_calls(monkeypatch, owner, name: str) -> list[int]:
    calls = [0]
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("pooling", ["avg", "token"])
def test_a_tokens_forward_checks_the_features_once(monkeypatch, pooling):
    import mixshare_layers.adapters.split as split_module
    import mixshare_layers.functional.layout as layout_module
    import mixshare_layers.functional.mixing as mixing_module
    import mixshare_layers.functional.unmixing as unmixing_module
    import mixshare_layers.layers.mixer as mixer_module
    import mixshare_layers.layers.unmixer as unmixer_module
    import mixshare_layers.wrapper as wrapper_module

    unmixing = {} if pooling == "avg" else {"unmix_mode": "none"}
    model = MIMOWrapper(split=token_split(pooling), num_subnetworks=2, preset="mixshare", **unmixing)
    core_checks = _count_calls(monkeypatch, wrapper_module, "check_core_features")
    # the mixer's two public steps (make_params, then apply) check what each is given, so that replacing
    # make_params replays a recorded mix; mix() itself does not check again
    encoding_checks = _count_calls(monkeypatch, CutMixMixer, "_check")
    mix_checks = _count_calls(monkeypatch, mixer_module, "_check_mix_inputs")
    again = [
        _count_calls(monkeypatch, unmixer_module, "check_features"),
        _count_calls(monkeypatch, layout_module, "check_features"),
        _count_calls(monkeypatch, unmixing_module, "_check_unmix_inputs"),
        _count_calls(monkeypatch, mixing_module, "_check_mix_inputs"),
        _count_calls(monkeypatch, split_module.BackboneSplit, "pool"),
    ]
    monkeypatch.setattr(wrapper_module, "BackboneSplit", None)  # no split is built per call
    out = model(_x(3, 2, 3, 16, 16))
    assert out.logits.shape == (3, 2, 5) and core_checks == [1] and encoding_checks == [2] and mix_checks == [1]
    logits = model.eval()(_x(3, 3, 16, 16))
    assert logits.shape == (3, 2, 5) and core_checks == [2]
    assert [c[0] for c in again] == [0, 0, 0, 0, 0]


def test_the_core_output_is_checked_in_one_place():
    model = MIMOWrapper(split=token_split(), num_subnetworks=2, preset="mixshare")
    with pytest.raises(ValueError, match=r"the core must return tokens \(B, P \+ h w, D\) with P = 1 .*\(3, 1, 8\)"):
        MIMOWrapper(split=token_split(core=_Tokens(drop=16)), num_subnetworks=2)(_x(3, 2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"for the batch of 3, but returned \(2, 17, 8\)"):
        MIMOWrapper(split=token_split(core=_Tokens(batch=slice(1, None))), num_subnetworks=2)(_x(3, 2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"for the batch of 3, but returned \(2, 17, 8\)"):
        MIMOWrapper(split=token_split(core=_Tokens(batch=slice(1, None))), num_subnetworks=2).eval()(_x(3, 3, 16, 16))
    # the layout and P have one owner: the unmixer; the wrapper reads them from there
    assert (model.layout, model.num_prefix_tokens, model.pooling) == ("tokens", 1, "avg")
    assert (model.unmixer.layout, model.unmixer.num_prefix_tokens) == ("tokens", 1)
    assert model.split() == token_split()._replace(
        encoder=model.encoder, core=model.core, classifier=model.heads, reinit=None
    )


# -- CUDA: no host synchronisation, so the whole training step records in a CUDA graph -------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["mixmo", "mixshare", "mixshare-partial"])
def test_cuda_training_step_never_syncs_and_replays_as_a_cuda_graph(preset):
    torch.manual_seed(0)
    model = MIMOWrapper(wide_resnet(10, 1, num_classes=10), 2, preset).cuda().train()
    model.set_progress(0.5)
    loss_fn = model.make_loss()
    x = torch.randn(8, 2, 3, 32, 32, device="cuda")
    y = torch.randint(10, (8, 2), device="cuda")

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        return loss, out.mix_info.ratios, out.mix_info.cutmix

    step()  # warm-up (cuDNN choices, cached constants)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the step raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, ratios, cutmix = step()
    graph.replay()
    first_loss, first_ratios = loss.clone(), ratios.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and torch.isfinite(first_loss)
    assert not torch.equal(ratios, first_ratios)  # every replay draws a new mix (the RNG advances in the graph)
    torch.testing.assert_close(ratios.sum(1), torch.ones(8, device="cuda"))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if model.mixer.cutmix_ramp > 0:  # the replays read the progress buffer: at the end of the ramp, no CutMix
        model.set_progress(1.0)
        for _ in range(3):
            graph.replay()
            assert not bool(cutmix)
