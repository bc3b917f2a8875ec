"""Folding "norm + linear" heads (``mixshare_layers.deploy.fold_heads``): one shared norm and one stacked linear layer.

Every fold is compared in float64 with the unfolded wrapper in eval mode (the reference: the members' own heads run
one after the other), on heads whose affine parameters are random (a fresh LayerNorm's ``gamma = 1, beta = 0`` would
hide a wrong fold).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixshare_layers import BackboneSplit, MIMOWrapper, MultiHead
from mixshare_layers.deploy import FoldedMIMO, fold_heads
from mixshare_layers.deploy import heads as head_patterns

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

K = 5


def _randomise_heads(model: MIMOWrapper, seed: int = 0) -> MIMOWrapper:
    """Different random affine parameters and statistics in every member's head, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.heads.modules():
            for name, low, high in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5), ("running_mean", -0.5, 0.5),
                                    ("running_var", 0.5, 2.0)):  # fmt: skip
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    if isinstance(module, nn.Linear) and name == "weight":
                        low, high = -0.3, 0.3
                    tensor.copy_(torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype) * (high - low) + low)
    return model


def _wrap(net: nn.Module, m: int = 2, **kw) -> MIMOWrapper:
    return _randomise_heads(MIMOWrapper(net, m, "mixmo", **kw)).double().eval()


def _assert_norm_linear(folded: FoldedMIMO, d: int, m: int, norm: type[nn.Module] = nn.LayerNorm) -> None:
    """The folded head is the single "norm without affine, then Linear(D, M * K)" form."""
    head = folded.head
    assert isinstance(head, nn.Sequential) and len(head) == 2 and folded.stacked
    assert type(head[0]) is norm and head[0].weight is None and getattr(head[0], "bias", None) is None
    assert tuple(head[0].normalized_shape) == (d,)
    assert type(head[1]) is nn.Linear and (head[1].in_features, head[1].out_features) == (d, m * K)
    assert folded.num_classes == K


def _assert_same(folded: nn.Module, model: nn.Module, x: torch.Tensor, tol: float = 1e-10) -> None:
    with torch.no_grad():
        expected = model(x)
        got = folded(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max()))


def _vit(**kw) -> nn.Module:
    base = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": K}
    return timm.create_model("vit_tiny_patch16_224", **{**base, **kw})


BACKBONES = {
    "timm ViT, average of the patches": (lambda: _vit(global_pool="avg", class_token=False), 32, 32),
    "timm ViT, class token, average of the patches": (lambda: _vit(global_pool="avg"), 32, 32),
    "timm ConvNeXt (norm after the pooling)": (lambda: timm.create_model("test_convnext", num_classes=K), 64, None),
    "torchvision convnext_tiny (LayerNorm2d on the (B, D, 1, 1) view)": (
        lambda: torchvision.models.convnext_tiny(num_classes=K),
        32,
        768,
    ),
}


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("m", [2, 3])
def test_norm_linear_heads_of_backbones_fold_exactly(name, m):
    build, size, _ = BACKBONES[name]
    torch.manual_seed(0)
    model = _wrap(build(), m)
    assert not model.heads.is_linear  # the unfolded heads are M copies of the backbone's own head
    folded = model.fold()
    d = folded.head[1].in_features
    _assert_norm_linear(folded, d, m)
    _assert_same(folded, model, torch.randn(3, 3, size, size, dtype=torch.float64))


def _tiny_split(head: nn.Module, d: int = 12) -> BackboneSplit:
    core = nn.Sequential(nn.BatchNorm2d(d), nn.ReLU(), nn.Conv2d(d, d, 3, padding=1))
    return BackboneSplit(encoder=nn.Conv2d(3, d, 3, padding=1), core=core, classifier=head)


@pytest.mark.parametrize(
    ("norm_kw", "linear_bias", "folded_bias"),
    [
        ({}, True, True),
        ({"bias": False}, True, True),  # a LayerNorm without shift
        ({"bias": False}, False, False),  # nothing to add: no bias at all
        ({"elementwise_affine": False}, False, False),
        ({"elementwise_affine": False}, True, True),
        ({}, False, True),  # the members' beta gives the folded layer a bias
    ],
)
def test_hand_made_layernorm_dropout_linear_head(norm_kw, linear_bias, folded_bias):
    torch.manual_seed(0)
    head = nn.Sequential(nn.LayerNorm(12, eps=1e-3, **norm_kw), nn.Dropout(0.3), nn.Linear(12, K, bias=linear_bias))
    model = _wrap(None, 3, split=_tiny_split(head))
    folded = model.fold()
    _assert_norm_linear(folded, 12, 3)
    assert folded.head[0].eps == 1e-3 and (folded.head[1].bias is not None) == folded_bias
    _assert_same(folded, model, torch.randn(4, 3, 8, 8, dtype=torch.float64))


def test_float32_fold_keeps_the_dtype_and_matches():
    torch.manual_seed(0)
    head = nn.Sequential(nn.LayerNorm(12), nn.Dropout(0.1), nn.Linear(12, K))
    model = _randomise_heads(MIMOWrapper(None, 2, "mixmo", split=_tiny_split(head))).eval()
    folded = model.fold()
    _assert_norm_linear(folded, 12, 2)
    assert folded.head[1].weight.dtype == torch.float32
    _assert_same(folded, model, torch.randn(4, 3, 8, 8), tol=1e-5)


def test_rmsnorm_head_folds_into_rmsnorm_without_affine():
    torch.manual_seed(0)
    head = nn.Sequential(nn.RMSNorm(12, eps=1e-4), nn.Linear(12, K))
    model = _wrap(None, 2, split=_tiny_split(head))
    folded = model.fold()
    _assert_norm_linear(folded, 12, 2, norm=nn.RMSNorm)
    assert folded.head[0].eps == 1e-4
    _assert_same(folded, model, torch.randn(4, 3, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_head_folds_into_the_linear_layer(affine):
    torch.manual_seed(0)
    head = nn.Sequential(nn.BatchNorm1d(12, affine=affine), nn.Dropout(0.2), nn.Linear(12, K, bias=False))
    model = _wrap(None, 2, split=_tiny_split(head))
    folded = model.fold()
    assert type(folded.head) is nn.Linear and folded.head.bias is not None and folded.head.out_features == 2 * K
    _assert_same(folded, model, torch.randn(4, 3, 8, 8, dtype=torch.float64))


def test_dropout_flatten_linear_head_stacks_like_linear_heads():
    torch.manual_seed(0)  # torchvision's EfficientNet / MobileNetV2 classifier: dropout then the linear layer
    head = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Flatten(1), nn.Linear(12, K))
    model = _wrap(None, 2, split=_tiny_split(head))
    folded = model.fold()
    assert type(folded.head) is nn.Linear
    _assert_same(folded, model, torch.randn(4, 3, 8, 8, dtype=torch.float64))


class _ShuffledNorm(nn.Module):
    """A LayerNorm + Linear head that swaps the two halves of the features first: it traces as moves of values only,
    but is not the norm + linear of the pooled vector (LayerNorm commutes with the swap; the affine does not)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, K)

    def forward(self, x):
        x = x.view(x.shape[0], 2, -1).transpose(1, 2).reshape(x.shape[0], -1)
        return self.fc(self.norm(x))


class _HalfMean(nn.Module):
    """Normalises the mean of the vector and zeros (x / 2): equal to norm(x) but for the eps."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d, eps=1e-2), nn.Linear(d, K)

    def forward(self, x):
        return self.fc(self.norm(torch.cat([x[:, None], x.new_zeros(x.shape)[:, None]], 1).mean(1)))


class _Branching(nn.Module):
    """Data-dependent control flow: not traceable."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, K)

    def forward(self, x):
        return self.fc(self.norm(x)) if x.sum() > 0 else self.fc(x)


class _Bypass(nn.Module):
    """The linear layer also reads the un-normalised vector."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(2 * d, K)

    def forward(self, x):
        return self.fc(torch.cat([self.norm(x), x], dim=1))


NOT_FOLDABLE = {
    "LayerNorm -> GELU -> Linear": lambda: nn.Sequential(nn.LayerNorm(12), nn.GELU(), nn.Linear(12, K)),
    "MLP": lambda: nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, K)),
    "LayerNorm -> Linear -> LayerNorm": lambda: nn.Sequential(nn.LayerNorm(12), nn.Linear(12, K), nn.LayerNorm(K)),
    "BatchNorm1d without running statistics": lambda: nn.Sequential(
        nn.BatchNorm1d(12, track_running_stats=False), nn.Linear(12, K)
    ),
    "features shuffled before the norm": lambda: _ShuffledNorm(12),
    "mean with zeros before the norm": lambda: _HalfMean(12),
    "data-dependent branch": lambda: _Branching(12),
    "linear layer bypassing the norm": lambda: _Bypass(12),
}

NUMERICALLY_CAUGHT = ("features shuffled before the norm", "mean with zeros before the norm")


@pytest.mark.parametrize("name", list(NOT_FOLDABLE))
def test_heads_that_do_not_fold_stay_generic_and_exact(name):
    torch.manual_seed(0)
    model = _wrap(None, 2, split=_tiny_split(NOT_FOLDABLE[name]()))
    assert fold_heads(model.heads) is None
    if name in NUMERICALLY_CAUGHT:  # recognised as norm + linear by the trace, refused by the float64 check
        assert all(head_patterns.match(member) is not None for member in model.heads.members)
    folded = model.fold()
    assert isinstance(folded.head, MultiHead) and not folded.stacked
    _assert_same(folded, model, torch.randn(4, 3, 8, 8, dtype=torch.float64))


def test_members_with_different_eps_or_dtype_stay_generic():
    torch.manual_seed(0)
    head = nn.Sequential(nn.LayerNorm(12), nn.Linear(12, K))
    model = _wrap(None, 3, split=_tiny_split(head))
    model.heads.members[1][0].eps = 1e-2  # the members no longer normalise the pooled vector the same way
    folded = model.fold()
    assert isinstance(folded.head, MultiHead)
    _assert_same(folded, model, torch.randn(4, 3, 8, 8, dtype=torch.float64))
    model.heads.members[1][0].eps = 1e-5
    assert isinstance(fold_heads(model.heads), nn.Sequential)
    model.heads.members[2].float()  # which dtype would the folded layer take?
    assert fold_heads(model.heads) is None


def test_fold_heads_api():
    linear = MultiHead(12, K, 3)
    stacked = fold_heads(linear)
    assert type(stacked) is nn.Linear and stacked.out_features == 3 * K
    x = torch.randn(4, 12)
    torch.testing.assert_close(stacked(x).view(4, 3, K), linear(x))
    maps = MultiHead.from_module(nn.Sequential(nn.LayerNorm(12), nn.Linear(12, K)), 2, input_ndim=2)
    assert fold_heads(maps) is None  # heads reading tokens, not pooled vectors
    with pytest.raises(TypeError, match="heads must be a MultiHead, but got Linear"):
        fold_heads(nn.Linear(12, K))


def test_folded_mimo_accepts_norm_linear_heads_only():
    encoder, core = nn.Conv2d(3, 12, 3), nn.Identity()
    folded = FoldedMIMO(encoder, core, nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 2 * K)), 2).eval()
    assert folded.num_classes == K and "num_classes=5" in repr(folded)
    assert folded(torch.randn(3, 3, 8, 8)).shape == (3, 2, K)
    with pytest.raises(ValueError, match="out_features=10 is not a multiple of num_subnetworks=3"):
        FoldedMIMO(encoder, core, nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 2 * K)), 3)
    for head in (
        nn.Sequential(nn.LayerNorm(7), nn.Linear(12, 2 * K)),  # the norm does not normalise the linear layer's input
        nn.Sequential(nn.GELU(), nn.Linear(12, 2 * K)),
        nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 2 * K), nn.Identity()),
    ):
        with pytest.raises(TypeError, match=r"head must be an nn.Linear, an nn.Sequential\(nn.LayerNorm"):
            FoldedMIMO(encoder, core, head, 2)


def test_folded_vit_exports():
    torch.manual_seed(0)
    model = _randomise_heads(MIMOWrapper(_vit(global_pool="avg", class_token=False), 2, "mixshare")).eval()
    folded = model.fold()
    _assert_norm_linear(folded, 32, 2)
    exported = torch.export.export(folded, (torch.randn(2, 3, 32, 32),),
                                   dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))  # fmt: skip
    y = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(y), model(y), rtol=1e-5, atol=1e-5)


def test_folded_vit_onnx_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _randomise_heads(MIMOWrapper(_vit(global_pool="avg", class_token=False), 2, "mixshare")).eval()
    folded = model.fold()
    path = tmp_path / "vit.onnx"
    torch.onnx.export(folded, (torch.randn(2, 3, 32, 32),), str(path), input_names=["images"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                      dynamo=True)  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.randn(3, 3, 32, 32)
    (got,) = session.run(["logits"], {"images": y.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(y), rtol=1e-4, atol=1e-4)
