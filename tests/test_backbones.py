"""Backbones: a fast representative set of torchvision and timm models, one per layout and head kind.

Each model (small configurations, random weights) is checked end to end: it wraps; one training step gives a finite
loss and finite, non-zero gradients to every member's encoder and head; ``pretrained=True`` in eval mode gives the
backbone's logits (max abs difference / logit scale <= 1e-5, float32); ``fold()`` equals the eval forward; the
folded model exports with ``torch.export`` and its export equals it. ``benchmarks/backbone_coverage.py`` runs the
same checks on every torchvision builder and every timm family (docs/backbones.md).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from mixshare_layers import MIMOLoss, MIMOWrapper

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

TOL = 1e-5


@dataclass
class Case:
    build: Callable[[], nn.Module]
    size: int
    layout: str
    pooling: str
    linear_head: bool
    overrides: dict = field(default_factory=dict)  # unmix_mode="none" where the head does not average
    num_prefix_tokens: int = 0
    linear_encoder: bool = True


def _tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig

    return torchvision.models.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5)


def _tv_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)


def _timm_vit(**kw) -> Callable[[], nn.Module]:
    base = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
    return lambda: timm.create_model("vit_tiny_patch16_224", **{**base, **kw})


NONE = {"unmix_mode": "none"}
CASES = {
    # channels-first CNN, linear head
    "tv-resnet": Case(_tv_resnet, 32, "channels_first", "avg", True),
    "timm-resnet18d-deep-stem": Case(
        lambda: timm.create_model("resnet18d", num_classes=5), 32, "channels_first", "avg", True
    ),
    # LayerNorm after the pooling
    "tv-convnext": Case(_tv_convnext, 32, "channels_first", "avg", False),
    "timm-convnext": Case(
        lambda: timm.create_model("test_convnext", num_classes=5), 64, "channels_first", "avg", False
    ),
    # an MLP head
    "tv-mobilenet-v3": Case(
        lambda: torchvision.models.mobilenet_v3_small(num_classes=5), 32, "channels_first", "avg", False
    ),
    "timm-mobilenetv3": Case(
        lambda: timm.create_model("mobilenetv3_small_050", num_classes=5), 32, "channels_first", "avg", False
    ),
    # a head whose first layer works in place (torchvision's Dropout(inplace=True)): each member gets its own input
    "tv-mnasnet-inplace-dropout": Case(
        lambda: torchvision.models.mnasnet0_5(num_classes=5), 32, "channels_first", "avg", False
    ),
    # channels-last maps
    "tv-swin": Case(
        lambda: torchvision.models.SwinTransformer([4, 4], 16, [1, 1], [1, 2], [2, 2], num_classes=5),
        32,
        "channels_last",
        "avg",
        True,
    ),
    "timm-swin": Case(
        lambda: timm.create_model(
            "swin_tiny_patch4_window7_224",
            img_size=32,
            embed_dim=16,
            depths=(1, 1),
            num_heads=(1, 2),
            window_size=2,
            num_classes=5,
        ),
        32,
        "channels_last",
        "avg",
        True,
    ),
    # tokens: a class token (no unmixing), class + register tokens averaged out, no prefix at all
    "tv-vit-class-token": Case(
        lambda: torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=5),
        32,
        "tokens",
        "token",
        False,
        NONE,
        1,
    ),
    "timm-vit-class-token": Case(_timm_vit(), 32, "tokens", "token", True, NONE, 1),
    "timm-vit-registers-avg": Case(_timm_vit(reg_tokens=2, global_pool="avg"), 32, "tokens", "avg", False, {}, 3),
    "timm-vit-no-prefix-avg": Case(_timm_vit(class_token=False, global_pool="avg"), 32, "tokens", "avg", False),
    # heads that pool by themselves: attention pooling, a 1x1-conv classifier before the pooling
    "timm-vit-attention-pool": Case(_timm_vit(global_pool="map"), 32, "tokens", "head", False, NONE, 1),
    "tv-squeezenet": Case(
        lambda: torchvision.models.squeezenet1_1(num_classes=5), 64, "channels_first", "head", False, NONE
    ),
    # a first layer that is not a plain convolution: TF "same" padding, weight standardisation
    "timm-conv2d-same": Case(
        lambda: timm.create_model("tf_mobilenetv3_small_minimal_100", num_classes=5), 32, "channels_first", "avg", False
    ),
    "timm-std-conv": Case(
        lambda: timm.create_model("test_nfnet", num_classes=5), 64, "channels_first", "avg", True, linear_encoder=False
    ),
    # an input transform before the first layer (GoogLeNet's transform_input)
    "tv-googlenet-transform-input": Case(
        lambda: torchvision.models.GoogLeNet(num_classes=5, aux_logits=False, transform_input=True, init_weights=True),
        64,
        "channels_first",
        "avg",
        False,
    ),
}


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.abs().max())
    assert scale > 0
    return float((got - expected).abs().max()) / scale


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request) -> tuple[str, Case, nn.Module]:
    c = CASES[request.param]
    torch.manual_seed(0)
    net = c.build().eval()
    with torch.no_grad():  # random heads can be zero-initialised (timm, torchvision ViTs): make the logits informative
        for module in net.modules():
            if isinstance(module, nn.Linear) and float(module.weight.abs().max()) == 0:
                nn.init.normal_(module.weight, std=0.5)
    return request.param, c, net


def _images(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_wraps_exactly_folds_and_exports(case):
    name, c, net = case
    x = _images(2, 3, c.size, c.size, seed=1)
    with torch.no_grad():
        expected = net(x)
    model = MIMOWrapper(net, 2, "mixshare", pretrained=True, **c.overrides).eval()
    assert (model.layout, model.pooling, model.num_prefix_tokens) == (c.layout, c.pooling, c.num_prefix_tokens)
    assert model.heads.is_linear == c.linear_head
    assert model.encoder.is_linear == c.linear_encoder
    with torch.no_grad():
        got = model(x)
        assert got.shape == (2, 2, 5)
        for i in range(2):  # every member is the backbone
            assert _relative(got[:, i], expected) <= TOL, name
        folded = model.fold()
        assert _relative(folded(x), got) <= TOL
    exported = torch.export.export(folded, (x,))
    with torch.no_grad():
        assert _relative(exported.module()(x), got) <= TOL


def test_one_training_step_reaches_every_member(case):
    name, c, net = case
    torch.manual_seed(0)
    model = MIMOWrapper(copy.deepcopy(net), 2, "mixshare", **c.overrides).train()
    x = _images(2, 2, 3, c.size, c.size, seed=2)
    labels = torch.tensor([[0, 1], [2, 3]])

    def step() -> None:
        model.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a small backbone's last maps can be 1x1 (the Unmixer warns once)
            out = model(x)
        loss = MIMOLoss(1.0)(out, labels)
        assert torch.isfinite(loss)
        loss.backward()

    step()
    if not any(bool(p.detach().any()) for p in model.heads.parameters()):
        # heads that start at zero (torchvision's ViT initialises its head so) pass nothing back on the first step:
        # one SGD step on them, and the next backward reaches the encoders
        assert all(p.grad is not None and bool(p.grad.any()) for p in model.heads.parameters() if p.dim() > 1)
        torch.optim.SGD(model.heads.parameters(), lr=0.1).step()
        step()
    for p in model.parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), name
    enc = model.encoder
    for i in range(2):
        g_enc = (
            enc.weight.grad.view(2, -1)[i]
            if enc.fused
            else torch.cat([p.grad.flatten() for p in enc.encoders[i].parameters() if p.grad is not None])
        )
        if model.heads.is_linear:
            g_head = model.heads.weight.grad[i].flatten()
        else:
            g_head = torch.cat([p.grad.flatten() for p in model.heads.members[i].parameters() if p.grad is not None])
        assert g_enc.abs().sum() > 0 and g_head.abs().sum() > 0, (name, i)


# -- where the mixing and the unmixing happen on a vision transformer ------------------------------------------------
def test_vit_mixes_the_patch_grid_before_positions_and_prefix_tokens():
    """The core run on a mixed patch grid is timm's forward_features with the patch projection's output replaced
    by that grid: positional embeddings and class / register tokens are added to the mixed grid, as in timm."""
    torch.manual_seed(0)
    net = _timm_vit(reg_tokens=2, global_pool="avg")().eval()
    model = MIMOWrapper(net, 2, "mixshare").eval()
    mixed = _images(2, 32, 4, 4, seed=3)  # a (B, D, h, w) grid, as the patch projection returns
    handle = net.patch_embed.proj.register_forward_hook(lambda module, args, out: mixed)
    try:
        with torch.no_grad():
            expected = net.forward_features(_images(2, 3, 32, 32, seed=4))
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(model.core(mixed), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["full", "partial", "fadeout"])
def test_vit_unmixes_the_patch_tokens_through_the_masks(mode):
    """Training: each member's head reads the masked average of the final patch tokens (prefix tokens left out),
    the masks being the input mix brought to the token grid."""
    from mixshare_layers.functional import unmix_pool_reference
    from mixshare_layers.functional.layout import as_maps

    torch.manual_seed(0)
    model = MIMOWrapper(_timm_vit(reg_tokens=2, global_pool="avg")(), 2, "mixshare", unmix_mode=mode).train()
    seen = {}
    model.core.register_forward_hook(lambda m, a, out: seen.update(features=out))
    model.heads.register_forward_pre_hook(lambda m, args: seen.update(pooled=args[0]))
    model.set_progress(0.1)
    out = model(_images(3, 2, 3, 32, 32, seed=5))
    info, features = out.mix_info, seen["features"].detach()
    assert (info.height, info.width) == (4, 4) and features.shape == (3, 3 + 16, 32)
    unmixer = model.unmixer
    strength = float(unmixer.strength(0.1)) if mode == "fadeout" else 0.0
    num_unmixed = unmixer.num_unmixed(32) if mode == "partial" else None
    grid = as_maps(features.double(), "tokens", num_prefix_tokens=3, grid=(4, 4))
    expected = unmix_pool_reference(grid, info.to(dtype=torch.float64), strength=strength, num_unmixed=num_unmixed)
    torch.testing.assert_close(seen["pooled"].double(), expected, rtol=1e-5, atol=1e-6)


def test_channels_last_backbone_unmixes_its_maps():
    from mixshare_layers.functional import unmix_pool_reference

    torch.manual_seed(0)
    model = MIMOWrapper(CASES["tv-swin"].build(), 2, "unmix-aligned").train()
    seen = {}
    model.core.register_forward_hook(lambda m, a, out: seen.update(features=out))
    model.heads.register_forward_pre_hook(lambda m, args: seen.update(pooled=args[0]))
    out = model(_images(2, 2, 3, 32, 32, seed=6))
    features = seen["features"].detach()  # (B, h, w, D)
    expected = unmix_pool_reference(features.permute(0, 3, 1, 2).double(), out.mix_info.to(dtype=torch.float64))
    torch.testing.assert_close(seen["pooled"].double(), expected, rtol=1e-5, atol=1e-6)


# -- refusals name the reason and a way out that works ---------------------------------------------------------------
def test_class_token_refuses_unmixing_and_the_advice_works():
    net = _timm_vit()()
    with pytest.raises(ValueError, match=r"unmixes the final features.*class token.*unmix_mode='none'"):
        MIMOWrapper(net, 2, "mixshare")
    assert MIMOWrapper(net, 2, "mixshare", unmix_mode="none").unmixer.mode == "none"
    assert MIMOWrapper(net, 2, "mixmo").pooling == "token"
    # the other way out: a head that averages the patch tokens
    model = MIMOWrapper(_timm_vit(global_pool="avg", class_token=False)(), 2, "mixshare")
    assert model.pooling == "avg" and model.unmixer.mode == "fadeout"
    with pytest.raises(ValueError, match=r"head \(Sequential\) reads the features itself"):
        MIMOWrapper(torchvision.models.squeezenet1_1(num_classes=5), 2, "unmix")


def test_timm_model_without_classifier_is_refused_with_the_fix():
    from mixshare_layers import UnsupportedBackboneError

    net = timm.create_model("test_resnet", num_classes=0)
    with pytest.raises(UnsupportedBackboneError, match=r"has no classifier.*reset_classifier\(10\)"):
        MIMOWrapper(net, 2)
    net.reset_classifier(10)
    assert MIMOWrapper(net, 2).num_classes == 10


class _TwoBranches(nn.Module):
    """timm's API, but features from two branches (one per image scale), like CrossViT."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_a, self.stem_b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x):
        return [self.stem_a(x), self.stem_b(x)]

    def forward_head(self, feats):
        return self.fc(torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_unsplittable_timm_like_model_is_refused_and_a_manual_split_works():
    from mixshare_layers import BackboneSplit, UnsupportedBackboneError

    net = _TwoBranches()
    with pytest.raises(
        UnsupportedBackboneError, match=r"the image feeds several layers of _TwoBranches.*BackboneSplit"
    ):
        MIMOWrapper(net, 2)
    # the advice: say where the parts are (here: the first branch only, with its own head)
    split = BackboneSplit(encoder=net.stem_a, core=nn.ReLU(), classifier=nn.Linear(8, 4))
    model = MIMOWrapper(split=split, num_subnetworks=2)
    assert model(_images(2, 2, 3, 8, 8, seed=0)).logits.shape == (2, 2, 4)


def test_modified_torchvision_model_is_checked_and_a_manual_split_keeps_it_exact():
    from mixshare_layers import BackboneSplit, UnsupportedBackboneError
    from mixshare_layers.adapters import check_split

    net = _tv_resnet().eval()
    net.avgpool = nn.AdaptiveMaxPool2d(1)  # no longer what the ResNet split assumes
    with pytest.raises(UnsupportedBackboneError, match=r"does not compute ResNet's function.*BackboneSplit"):
        MIMOWrapper(net, 2)
    core = nn.Sequential(net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    split = BackboneSplit(net.conv1, core, nn.Sequential(net.avgpool, nn.Flatten(1), net.fc), pooling="head")
    x = _images(2, 3, 32, 32, seed=0)
    assert check_split(net, split, x) <= TOL
    model = MIMOWrapper(split=split, num_subnetworks=2, preset="mixmo", encoder_init="aligned", pretrained=True)
    with torch.no_grad():
        assert _relative(model.eval()(x)[:, 1], net(x)) <= TOL


def test_register_adapter_for_your_own_architecture():
    from mixshare_layers import BackboneSplit, UnsupportedBackboneError
    from mixshare_layers.adapters import register_adapter, split_backbone

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.mixer = nn.Sequential(nn.GELU(), nn.Conv2d(8, 8, 1))
            self.head = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 3))

        def forward(self, x):
            return self.head(self.mixer(self.embed(x)).mean(dim=(2, 3)))

    with pytest.raises(UnsupportedBackboneError, match=r"no adapter knows how to split a Net.*register_adapter"):
        MIMOWrapper(Net(), 2)
    handle = register_adapter(Net, lambda net: BackboneSplit(net.embed, net.mixer, net.head))
    try:
        net = Net().eval()
        x = _images(2, 3, 16, 16, seed=0)
        model = MIMOWrapper(net, 2, "mixshare", pretrained=True).eval()
        with torch.no_grad():
            assert _relative(model(x)[:, 0], net(x)) <= TOL
        # a predicate registered later is tried first
        other = register_adapter(lambda m: isinstance(m, Net), lambda net: BackboneSplit(net.embed, nn.Identity(),
                                                                                        nn.Linear(8, 2)))  # fmt: skip
        assert split_backbone(Net()).classifier.out_features == 2
        other.remove()
        assert split_backbone(Net()).classifier is not None and isinstance(split_backbone(Net()).head, nn.Sequential)
    finally:
        handle.remove()
    with pytest.raises(UnsupportedBackboneError):
        split_backbone(Net())
    with pytest.raises(TypeError, match="match must be a class or a predicate, but got int"):
        register_adapter(3, lambda net: None)
    handle = register_adapter(Net, lambda net: (net.embed, net.mixer))
    try:
        with pytest.raises(TypeError, match=r"the adapter registered for Net must return a BackboneSplit, but got"):
            split_backbone(Net())
    finally:
        handle.remove()


def test_pretrained_is_exact_for_three_members():
    torch.manual_seed(0)
    net = timm.create_model("test_convnext", num_classes=5).eval()
    x = _images(2, 3, 64, 64, seed=0)
    model = MIMOWrapper(net, 3, "mixshare", pretrained=True).eval()
    with torch.no_grad():
        expected = net(x)
        got = model(x)
    for i in range(3):
        assert _relative(got[:, i], expected) <= TOL


@pytest.mark.parametrize("name", ["timm-vit-registers-avg", "tv-swin"])
def test_onnx_export_of_token_and_channels_last_backbones(name, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = MIMOWrapper(CASES[name].build(), 2, "mixshare", **CASES[name].overrides).eval()
    folded = model.fold()
    x = _images(2, 3, 32, 32, seed=0)
    path = tmp_path / "model.onnx"
    torch.onnx.export(folded, (x,), str(path), input_names=["images"], output_names=["logits"], dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)


def test_splitting_leaves_the_backbone_as_it_was():
    """The core is a shallow copy of the timm model sharing its modules: the model itself keeps its encoder and head,
    still runs, and a hook added to it later does not fire inside the wrapper."""
    torch.manual_seed(0)
    net = _timm_vit(global_pool="avg")().eval()
    x = _images(2, 3, 32, 32, seed=0)
    with torch.no_grad():
        before = net(x)
    model = MIMOWrapper(net, 2, "mixshare", pretrained=True).eval()
    assert isinstance(net.patch_embed.proj, nn.Conv2d) and isinstance(net.head, nn.Linear)
    assert model.core.backbone.blocks is net.blocks  # shared, not copied
    fired = []
    net.register_forward_hook(lambda *args: fired.append(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=0)
        model(x)
    assert fired == [1]


class _TimmLike(nn.Module):
    """A small model with timm's API, configurable to break the automatic split in the ways a model can."""

    def __init__(self, kind: str = "plain") -> None:
        super().__init__()
        self.kind = kind
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.other = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.fc = nn.Linear(8, 4)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x):
        if self.kind == "odd-size":
            assert x.shape[-1] == 40, "this model takes 40x40 images"
        if self.kind == "scaled-input":
            x = x * 2.0  # a tensor operation before any layer
        y = self.stem(x)
        if self.kind == "two-stems":
            y = y + self.other(x)
        return self.body(y)

    def forward_head(self, y):
        return self.fc(y.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_timm_like_refusals_and_their_way_out():
    from mixshare_layers import BackboneSplit, UnsupportedBackboneError
    from mixshare_layers.adapters import split_timm

    torch.manual_seed(0)
    assert MIMOWrapper(_TimmLike(), 2).encoder.in_channels == 3  # the plain model splits
    net = _TimmLike("odd-size").eval()
    with pytest.raises(UnsupportedBackboneError, match=r"runs on none of the probe sizes.*split_timm\(m, image_size="):
        MIMOWrapper(net, 2)
    model = MIMOWrapper(net, 2, "mixshare", split=lambda m: split_timm(m, image_size=40), pretrained=True).eval()
    x = _images(2, 3, 40, 40, seed=0)
    with torch.no_grad():
        assert _relative(model(x)[:, 1], net(x)) <= TOL

    net = _TimmLike("scaled-input").eval()
    with pytest.raises(UnsupportedBackboneError, match=r"no module of _TimmLike receives the image itself"):
        MIMOWrapper(net, 2)

    class Double(nn.Module):  # the tensor operation, as a parameter-free preprocess shared by the members
        def forward(self, x):
            return x * 2.0

    split = BackboneSplit(net.stem, net.body, net.fc, preprocess=Double())
    model = MIMOWrapper(split=split, num_subnetworks=2, pretrained=True).eval()
    with torch.no_grad():
        assert _relative(model(x)[:, 0], net(x)) <= TOL
        assert _relative(model.fold()(x), model(x)) <= TOL

    with pytest.raises(UnsupportedBackboneError, match=r"the image feeds several layers of _TimmLike \(other, stem\)"):
        MIMOWrapper(_TimmLike("two-stems"), 2)


class _HeadReadsTheModel(nn.Module):
    """timm's API, with a head that reads tensors of the model itself besides calling its modules (as EfficientViM
    weighs its per-scale heads with a parameter of the model): no module hook sees those reads."""

    def __init__(self, features_read_offset: bool = False) -> None:
        super().__init__()
        self.features_read_offset = features_read_offset
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.fc = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 4))
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, 8))
        self._temperature = 2.0  # private: the head's shell starts with the public attributes only

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x):
        y = self.body(self.stem(x))
        return y - self.offset[:, None, None] if self.features_read_offset else y

    def forward_head(self, y):
        return self.scale * self.fc(y.mean(dim=(2, 3)) + self.offset) / self._temperature

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize("features_read_offset", [False, True])
def test_timm_head_reading_tensors_of_the_model_itself_splits_exactly(features_read_offset):
    """The head's shell gets the parameter, buffer and private attribute the head reads from the model itself; the
    core leaves them to the heads, unless its features read one of them too: then it keeps the model's tensors."""
    from mixshare_layers.adapters import check_split, split_timm

    torch.manual_seed(0)
    net = _HeadReadsTheModel(features_read_offset).eval()
    split = split_timm(net)
    assert (split.layout, split.pooling) == ("channels_first", "avg")
    shell = split.head.model
    assert shell.scale is net.scale and shell.offset is net.offset and shell._temperature == 2.0
    core = split.core.backbone
    assert ("scale" in dict(core.named_parameters(recurse=False))) == features_read_offset
    assert ("offset" in dict(core.named_buffers(recurse=False))) == features_read_offset
    x = _images(2, 3, 16, 16, seed=0)
    assert check_split(net, split, x) <= TOL
    model = MIMOWrapper(net, 2, "mixshare", pretrained=True).eval()
    with torch.no_grad():
        for i in range(2):
            assert _relative(model(x)[:, i], net(x)) <= TOL
    model.train()(_images(2, 2, 3, 16, 16, seed=1)).logits.sum().backward()
    scales = [member.model.scale for member in model.heads.members]
    assert scales[0] is not scales[1] and all(s.grad.abs().sum() > 0 for s in scales)  # each member's own


def test_timm_efficientvim_head_weights_go_to_the_heads():
    """EfficientViM's head weighs its per-scale heads with ``weights``, a parameter of the model itself."""
    torch.manual_seed(0)
    net = timm.create_model("efficientvim_m1", num_classes=5).eval()
    with torch.no_grad():
        net.weights.copy_(torch.linspace(-1.0, 1.0, net.weights.numel()))  # uneven: each scale's head counts
    x = _images(2, 3, 64, 64, seed=0)
    model = MIMOWrapper(net, 2, "mixmo", encoder_init="aligned", pretrained=True).eval()
    assert model.pooling == "head" and "weights" not in dict(model.core.backbone.named_parameters(recurse=False))
    with torch.no_grad():
        assert _relative(model(x)[:, 1], net(x)) <= TOL


def test_analysis_reads_every_layout():
    """Encoder influence = the patch-embedding kernels, classifier influence = the head's first layer; the variance
    influence probes timm's own stages (tokens of a ViT, channels-last maps of a Swin)."""
    from mixshare_layers.analysis import (
        classifier_influence,
        default_variance_layers,
        encoder_influence,
        feature_variance_influence,
        sharing_rates,
    )

    torch.manual_seed(0)
    vit = MIMOWrapper(_timm_vit(global_pool="avg", reg_tokens=1)(), 2, "mixmo")
    assert encoder_influence(vit).shape == (2, 32)  # the patch projection's 32 output channels
    assert classifier_influence(vit).shape == (2, 32)  # the head's first layer: Linear(32, 5) after fc_norm
    assert set(sharing_rates(vit)) >= {"encoder", "classifier"}
    assert default_variance_layers(vit) == ["core.backbone.blocks.0", "core.backbone.blocks.1"]
    out = feature_variance_influence(vit, _images(6, 3, 32, 32, seed=0), batch_size=3)
    assert {k: tuple(v.shape) for k, v in out.items()} == {n: (2, 32) for n in default_variance_layers(vit)}
    swin = MIMOWrapper(CASES["timm-swin"].build(), 2, "mixmo")
    out = feature_variance_influence(swin, _images(4, 3, 32, 32, seed=0), batch_size=2)
    assert [tuple(v.shape) for v in out.values()] == [(2, 16), (2, 32)]  # channels read last
    mobilenet = MIMOWrapper(torchvision.models.mobilenet_v3_small(num_classes=5), 2, "mixmo")
    assert classifier_influence(mobilenet).shape == (2, 576)  # the MLP's first Linear reads the pooled 576 channels


def test_several_feature_maps_are_read_by_the_heads():
    """A model whose features are one map per scale (CoaT's class tokens of three scales): the heads read the list."""
    torch.manual_seed(0)
    net = timm.create_model("coat_tiny", img_size=32, num_classes=5).eval()
    x = _images(2, 3, 32, 32, seed=0)
    model = MIMOWrapper(net, 2, "mixmo", encoder_init="aligned", pretrained=True).eval()
    assert model.pooling == "head"
    with torch.no_grad():
        assert _relative(model(x)[:, 1], net(x)) <= TOL
        assert _relative(model.fold()(x), model(x)) <= TOL
    out = model.train()(_images(2, 2, 3, 32, 32, seed=1))
    out.logits.sum().backward()
    assert model.heads.members[1].model.head.weight.grad.abs().sum() > 0


# -- each split draws its copies with its backbone's own initialiser ------------------------------------------------
def _assert_same_distribution(drawn: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """``drawn`` (several draws, pooled) against ``reference`` (the backbone's own draw): equal where the reference is
    a constant (zeros, ones), else the same mean and standard deviation up to 6 standard errors of the comparison.

    The standard error of a sample standard deviation over ``n`` values is at most ``std / sqrt(2 n)`` for the
    distributions drawn here (normal, truncated normal, uniform: kurtosis <= 3), of a mean ``std / sqrt(n)``; 6 of
    them put a false failure below 1e-8 per check, while the errors this catches (PyTorch's default instead of the
    family's, a kept pretrained value) are several times larger on the sizes used.
    """
    drawn, reference = drawn.detach().double().flatten(), reference.detach().double().flatten()
    if reference.numel() < 2 or float(reference.std()) == 0.0:
        assert torch.equal(drawn.unique(), reference.unique()), what
        return
    n, r = drawn.numel(), reference.numel()
    std, ref_std = float(drawn.std()), float(reference.std())
    assert abs(std / ref_std - 1) <= 6 * (1 / (2 * n) + 1 / (2 * r)) ** 0.5, (what, std, ref_std)
    assert abs(float(drawn.mean() - reference.mean())) <= 6 * ref_std * (1 / n + 1 / r) ** 0.5, what


def _fill(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters all hold 2.5 (biases -0.7), as a pretrained module's would: whatever
    an initialiser leaves behind shows."""
    filled = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in filled.named_parameters():
            p.fill_(-0.7 if name.endswith("bias") else 2.5)
    return filled


def _assert_reinit_is_the_backbones_own(split, draws: int = 4) -> None:
    """Each part of the split (the backbone's own modules, as its constructor drew them) against ``draws`` copies
    redrawn by the split's reinit, parameter by parameter."""
    for part in (split.encoder, split.classifier):
        copies = [_fill(part) for _ in range(draws)]
        for c in copies:
            split.reinit(c)
        for name, reference in part.named_parameters():
            drawn = torch.stack([c.get_parameter(name) for c in copies])
            _assert_same_distribution(drawn, reference, f"{type(part).__name__}.{name}")


def _tv_regnet() -> nn.Module:
    from torchvision.models.regnet import BlockParams

    params = BlockParams.from_init_params(depth=2, w_0=16, w_a=8.0, w_m=2.0, group_width=8)
    return torchvision.models.RegNet(params, num_classes=100)


def _tv_convnext_100() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig

    return torchvision.models.ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)], num_classes=100)


TV_FAMILIES = {  # small members of every family the torchvision adapter splits, 100 classes for large head samples
    "resnet": lambda: torchvision.models.resnet18(num_classes=100),
    "regnet": _tv_regnet,
    "efficientnet": lambda: torchvision.models.efficientnet_b0(num_classes=100),
    "mobilenet": lambda: torchvision.models.mobilenet_v3_small(num_classes=100),
    "mnasnet": lambda: torchvision.models.mnasnet0_5(num_classes=100),
    "convnext": _tv_convnext_100,
    "densenet": lambda: torchvision.models.DenseNet(8, (1, 1), 64, num_classes=100),
    "shufflenet": lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=100),
    "squeezenet": lambda: torchvision.models.squeezenet1_1(num_classes=100),
    "googlenet": lambda: torchvision.models.GoogLeNet(num_classes=100, aux_logits=False, init_weights=True),
    "maxvit": lambda: torchvision.models.MaxVit((64, 64), 32, 2, [32], [1], 8, 0.0, num_classes=100),
    "swin": lambda: torchvision.models.SwinTransformer([4, 4], 32, [1, 1], [1, 2], [2, 2], num_classes=100),
    "vit": lambda: torchvision.models.VisionTransformer(32, 8, 1, 2, 64, 64, representation_size=64, num_classes=100),
}


@pytest.mark.parametrize("family", sorted(TV_FAMILIES))
def test_torchvision_split_reinit_is_the_familys_own(family):
    """The split's reinit is the family's, and it draws a first layer and a head as torchvision's constructor does:
    every parameter, from copies whose values were all overwritten first (a pretrained LayerNorm's too)."""
    from mixshare_layers.adapters import split_torchvision
    from mixshare_layers.adapters.inits import TORCHVISION_INITS

    torch.manual_seed(0)
    split = split_torchvision(TV_FAMILIES[family]())
    assert split.reinit is TORCHVISION_INITS[family]
    _assert_reinit_is_the_backbones_own(split)


@pytest.mark.parametrize(
    ("build", "family"),
    [
        (lambda: torchvision.models.vgg11_bn(), "vgg"),
        (lambda: torchvision.models.alexnet(), "alexnet"),
        (lambda: torchvision.models.inception_v3(init_weights=True), "inception"),
        (lambda: torchvision.models.efficientnet_v2_s(), "efficientnet"),
        (lambda: torchvision.models.mobilenet_v2(), "mobilenet"),
        (lambda: torchvision.models.resnext50_32x4d(), "resnet"),
        (lambda: torchvision.models.swin_v2_t(), "swin"),
        (lambda: torchvision.models.maxvit_t(), "maxvit"),
        (lambda: torchvision.models.vit_b_16(), "vit"),
    ],
)
def test_torchvision_family_of_each_class(build, family):
    """Every class the adapter splits has its family (built on the meta device: no tensors, no time)."""
    from mixshare_layers.adapters.torchvision import torchvision_family

    with torch.device("meta"):
        model = build()
    assert torchvision_family(model) == family


def test_torchvision_rules_of_the_families_too_large_to_build_here():
    """VGG, AlexNet and Inception v3 (hundreds of MB each), by their constructors' rules: VGG's convolutions
    Kaiming-normal (fan-out, ReLU) and linear layers N(0, 0.01), zero biases; AlexNet PyTorch's defaults; Inception
    v3 truncated normal with std 0.1 (a layer's own ``stddev`` where set)."""
    from mixshare_layers.adapters.inits import TORCHVISION_INITS

    torch.manual_seed(0)
    conv, linear = _fill(nn.Conv2d(3, 64, 3)), _fill(nn.Linear(512, 100))
    for part in (conv, linear):
        TORCHVISION_INITS["vgg"](part)
    _assert_same_distribution(conv.weight, torch.randn(64 * 27) * (2 / (64 * 9)) ** 0.5, "vgg conv")
    _assert_same_distribution(linear.weight, torch.randn(51200) * 0.01, "vgg linear")
    assert not conv.bias.any() and not linear.bias.any()
    conv = _fill(nn.Conv2d(3, 64, 11))
    TORCHVISION_INITS["alexnet"](conv)
    _assert_same_distribution(conv.weight, nn.Conv2d(3, 64, 11).weight, "alexnet conv")
    _assert_same_distribution(conv.bias, nn.Conv2d(3, 64, 11).bias, "alexnet conv bias")
    conv, linear = _fill(nn.Conv2d(3, 32, 3, bias=False)), _fill(nn.Linear(2048, 100))
    linear.stddev = 0.001
    for part in (conv, linear):
        TORCHVISION_INITS["inception"](part)
    _assert_same_distribution(conv.weight, torch.randn(32 * 27) * 0.1, "inception conv")
    _assert_same_distribution(linear.weight, torch.randn(204800) * 0.001, "inception linear (own stddev)")


TIMM_FAMILIES = {  # the source of timm's initialisation each one gets
    "vit": (_timm_vit(embed_dim=192, depth=1, num_heads=3, num_classes=100), "get_init_weights_vit('')"),
    "vit-attention-pool": (
        _timm_vit(embed_dim=64, depth=1, global_pool="map", num_classes=100),
        "get_init_weights_vit('')",
    ),
    "swin": (
        lambda: timm.create_model(
            "swin_tiny_patch4_window7_224",
            img_size=32,
            embed_dim=32,
            depths=(1,),
            num_heads=(2,),
            window_size=2,
            num_classes=100,
        ),
        "get_init_weights_vit('')",
    ),
    "resnet": (lambda: timm.create_model("resnet18d", num_classes=100), "ResNet.init_weights"),
    "convnext": (lambda: timm.create_model("test_convnext", num_classes=100), "timm.models.convnext._init_weights"),
    "regnet": (lambda: timm.create_model("regnetx_002", num_classes=100), "timm.models.regnet._init_weights"),
    "mobilenetv3": (
        lambda: timm.create_model("mobilenetv3_small_050", num_classes=100),
        "efficientnet_init_weights",
    ),
    "pvt-v2 (a model's _init_weights)": (
        lambda: timm.create_model("pvt_v2_b0", num_classes=100),
        "PyramidVisionTransformerV2._init_weights",
    ),
}


@pytest.mark.parametrize("family", sorted(TIMM_FAMILIES))
def test_timm_split_reinit_is_timms_own(family):
    """The split's reinit is timm's initialisation of the model (the source it names), and it draws the first layer
    and the head as timm's constructor does, every parameter (norms of the head included)."""
    from mixshare_layers.adapters import split_timm
    from mixshare_layers.adapters.inits import TimmInit

    build, source = TIMM_FAMILIES[family]
    torch.manual_seed(0)
    split = split_timm(build())
    assert isinstance(split.reinit, TimmInit) and source in split.reinit.source
    _assert_reinit_is_the_backbones_own(split)


def test_timm_vit_heads_are_drawn_with_std_002():
    """A ViT's M heads are timm's (truncated normal, std 0.02, zero bias), not ``nn.Linear``'s default (std
    ``1 / sqrt(3 D)``, 0.042 for D = 192), at construction and after ``reset_parameters()``.

    3 heads of 100 x 192 weights: the sample standard deviation's relative standard error is ``1 / sqrt(2 n)`` =
    0.29 %, so 2 % is 7 of them, and 0.042 is 110 % away.
    """
    torch.manual_seed(0)
    net = _timm_vit(embed_dim=192, depth=1, num_heads=3, num_classes=100)()
    heads = MIMOWrapper(net, 3, "mixmo", unmix_mode="none").heads
    assert heads.is_linear and heads.weight.numel() == 3 * 100 * 192
    first = heads.weight.detach().clone()
    for _ in range(2):
        assert abs(float(heads.weight.detach().std()) / 0.02 - 1) < 0.02
        assert not heads.bias.detach().any() and not torch.equal(heads.weight[0], heads.weight[1])
        heads.reset_parameters()
    assert not torch.equal(heads.weight.detach(), first)


def test_pretrained_starts_as_the_backbone_whatever_its_initialiser():
    """``pretrained=True`` copies the backbone's first layer and head: a torchvision ViT with trained (non-zero)
    heads and a timm ViT stay exactly the backbone, member by member."""
    torch.manual_seed(0)
    tv = TV_FAMILIES["vit"]()
    with torch.no_grad():
        for p in tv.heads.parameters():
            p.normal_()
    for net in (tv.eval(), _timm_vit()().eval()):
        x = _images(2, 3, 32, 32, seed=3)
        model = MIMOWrapper(net, 3, "mixshare", unmix_mode="none", pretrained=True).eval()
        with torch.no_grad():
            expected, got = net(x), model(x)
        for i in range(3):
            assert _relative(got[:, i], expected) <= TOL
