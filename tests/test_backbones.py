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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small backbone's last maps can be 1x1 (the Unmixer warns once)
        out = model(x)
    loss = MIMOLoss(1.0)(out, labels)
    assert torch.isfinite(loss)
    loss.backward()
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
