"""The backbones' own initialisers: how a split's ``reinit`` draws the M encoder copies and the M heads.

A wrapper that does not start from pretrained weights draws its independent encoder copies and its heads afresh.
They should start as the backbone's own layers start, so each built-in adapter gives its split the initialiser of
the backbone's family:

* torchvision: :data:`TORCHVISION_INITS`, one small initialiser per family, written from the rules each
  ``torchvision.models`` constructor applies to its layers (the rules that reach a first layer and a head);
* timm: :class:`TimmInit`, timm's own functions for the model (its ViT initialisation, its EfficientNet one, the
  model's ``_init_weights``...), in the order given there.

Every initialiser here redraws a module *entirely*: each submodule first gets its ``reset_parameters()`` (every
layer as PyTorch constructs it: a norm back to scale 1 and shift 0), then the family's rules overwrite what the
family initialises its own way. A submodule with parameters but no ``reset_parameters()`` and no rule of the family
keeps its values (none of the heads and first layers the adapters produce has one).
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor, nn

from ..layers.encoder import reset_all_parameters
from .surgery import head_shell

__all__ = ["TORCHVISION_INITS", "FamilyInit", "TimmInit"]

Rule = Callable[[str, nn.Module], None]  # (the submodule's name in the part, the submodule)


class FamilyInit:
    """A family's initialiser: every submodule reset to PyTorch's default, then the family's rule on each one.

    Args:
        family: the family's name (for ``repr`` and the docs).
        rule: called as ``rule(name, submodule)`` on every submodule of the module initialised (itself too, with
            the name ``""``), children before their parent (as ``nn.Module.apply``); it initialises the layers the
            family treats its own way.

    Example:
        >>> import torch
        >>> conv = nn.Conv2d(3, 64, 7, bias=False)
        >>> TORCHVISION_INITS["resnet"](conv)  # kaiming-normal, fan-out, ReLU gain: std sqrt(2 / (64 * 49))
        >>> abs(float(conv.weight.std()) / math.sqrt(2 / (64 * 49)) - 1) < 0.05
        True
    """

    def __init__(self, family: str, rule: Rule | None = None) -> None:
        self.family = family
        self.rule = rule

    def __repr__(self) -> str:
        return f"FamilyInit({self.family!r})"

    def __call__(self, module: nn.Module) -> None:
        reset_all_parameters(module)
        if self.rule is not None:
            for name, sub in reversed(list(module.named_modules())):
                self.rule(name, sub)


# -- torchvision ---------------------------------------------------------------------------------------------------
def _zero_bias(module: nn.Module) -> None:
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        nn.init.zeros_(bias)


def _norm_one_zero(module: nn.Module, kinds: tuple[type, ...] = (nn.BatchNorm2d, nn.GroupNorm)) -> None:
    weight = getattr(module, "weight", None)
    if isinstance(module, kinds) and isinstance(weight, Tensor):
        nn.init.ones_(weight)
        _zero_bias(module)


def _resnet(name: str, m: nn.Module) -> None:
    """Convolutions Kaiming-normal (fan-out, ReLU), BatchNorm / GroupNorm 1 and 0, linear layers as PyTorch's."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    _norm_one_zero(m)


def _regnet(name: str, m: nn.Module) -> None:
    """Convolutions normal with std ``sqrt(2 / (k_h k_w C_out))``, BatchNorm 1 / 0, linear N(0, 0.01) and zero bias."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.01)
        _zero_bias(m)
    _norm_one_zero(m, (nn.BatchNorm2d,))


def _efficientnet(name: str, m: nn.Module) -> None:
    """Convolutions Kaiming-normal (fan-out) with zero bias, norms 1 / 0, linear uniform in ``+-1 / sqrt(out)``."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        _zero_bias(m)
    elif isinstance(m, nn.Linear):
        bound = 1.0 / math.sqrt(m.out_features)
        nn.init.uniform_(m.weight, -bound, bound)
        _zero_bias(m)
    _norm_one_zero(m)


def _mobilenet(name: str, m: nn.Module) -> None:
    """Convolutions Kaiming-normal (fan-out) with zero bias, norms 1 / 0, linear N(0, 0.01) with zero bias."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        _zero_bias(m)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.01)
        _zero_bias(m)
    _norm_one_zero(m)


def _mnasnet(name: str, m: nn.Module) -> None:
    """Convolutions Kaiming-normal (fan-out, ReLU), BatchNorm 1 / 0, linear Kaiming-uniform (fan-out, gain 1)."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        _zero_bias(m)
    elif isinstance(m, nn.Linear):
        nn.init.kaiming_uniform_(m.weight, mode="fan_out", nonlinearity="sigmoid")
        _zero_bias(m)
    _norm_one_zero(m, (nn.BatchNorm2d,))


def _trunc_02(name: str, m: nn.Module) -> None:
    """ConvNeXt: convolutions and linear layers truncated-normal with std 0.02, zero bias (norms as PyTorch's)."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        _zero_bias(m)


def _densenet(name: str, m: nn.Module) -> None:
    """Convolutions Kaiming-normal (fan-in), BatchNorm 1 / 0, linear layers PyTorch's weight with a zero bias."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight)
    elif isinstance(m, nn.Linear):
        _zero_bias(m)
    _norm_one_zero(m, (nn.BatchNorm2d,))


def _squeezenet(name: str, m: nn.Module) -> None:
    """Convolutions Kaiming-uniform (fan-in) with zero bias, except the classifier's (the convolution beside the
    final average pool) N(0, 0.01)."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_uniform_(m.weight)
        _zero_bias(m)
    if any(isinstance(c, nn.AdaptiveAvgPool2d) for c in m.children()):  # the classifier: after its children
        for child in m.children():
            if isinstance(child, nn.Conv2d):
                nn.init.normal_(child.weight, 0.0, 0.01)


def _vgg(name: str, m: nn.Module) -> None:
    """Convolutions Kaiming-normal (fan-out, ReLU) with zero bias, BatchNorm 1 / 0, linear N(0, 0.01), zero bias."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        _zero_bias(m)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.01)
        _zero_bias(m)
    _norm_one_zero(m, (nn.BatchNorm2d,))


def _inception(std: float, name: str, m: nn.Module) -> None:
    """GoogLeNet / Inception v3: convolution and linear weights normal truncated at +-2 (absolute) with std ``std``
    (Inception v3: a layer's own ``stddev`` attribute where it has one), BatchNorm 1 / 0; biases PyTorch's."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, 0.0, float(getattr(m, "stddev", std)), -2.0, 2.0)
    _norm_one_zero(m, (nn.BatchNorm2d,))


def _maxvit(name: str, m: nn.Module) -> None:
    """Convolutions and linear layers N(0, 0.02) with zero bias, BatchNorm 1 / 0."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        _zero_bias(m)
    _norm_one_zero(m, (nn.BatchNorm2d,))


def _swin(name: str, m: nn.Module) -> None:
    """Linear layers truncated-normal with std 0.02 and zero bias (the patch convolution and norms PyTorch's)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        _zero_bias(m)


def _vit(name: str, m: nn.Module) -> None:
    """The patchifying convolution (stride = kernel > 1) truncated-normal with std ``sqrt(1 / fan_in)`` and zero
    bias; in the heads, ``pre_logits`` the same and the final ``head`` all zeros; a convolutional stem's layers
    PyTorch's."""
    last = name.rsplit(".", 1)[-1]
    if isinstance(m, nn.Conv2d) and m.kernel_size == m.stride and m.kernel_size[0] * m.kernel_size[1] > 1:
        nn.init.trunc_normal_(m.weight, std=math.sqrt(1.0 / m.weight[0].numel()))
        _zero_bias(m)
    elif isinstance(m, nn.Linear) and last == "pre_logits":
        nn.init.trunc_normal_(m.weight, std=math.sqrt(1.0 / m.in_features))
        _zero_bias(m)
    elif isinstance(m, nn.Linear) and last == "head":
        nn.init.zeros_(m.weight)
        _zero_bias(m)


#: torchvision's initialisation of each family, keyed by family (the torchvision adapter's table says which class
#: is which family): what the family's constructor does to a freshly built first layer and head
TORCHVISION_INITS: dict[str, FamilyInit] = {
    "resnet": FamilyInit("resnet", _resnet),
    "regnet": FamilyInit("regnet", _regnet),
    "efficientnet": FamilyInit("efficientnet", _efficientnet),
    "mobilenet": FamilyInit("mobilenet", _mobilenet),
    "mnasnet": FamilyInit("mnasnet", _mnasnet),
    "convnext": FamilyInit("convnext", _trunc_02),
    "densenet": FamilyInit("densenet", _densenet),
    "shufflenet": FamilyInit("shufflenet"),  # no rules of its own: PyTorch's defaults
    "squeezenet": FamilyInit("squeezenet", _squeezenet),
    "vgg": FamilyInit("vgg", _vgg),
    "alexnet": FamilyInit("alexnet"),  # no rules of its own: PyTorch's defaults
    "googlenet": FamilyInit("googlenet", partial(_inception, 0.01)),
    "inception": FamilyInit("inception", partial(_inception, 0.1)),
    "maxvit": FamilyInit("maxvit", _maxvit),
    "swin": FamilyInit("swin", _swin),
    "vit": FamilyInit("vit", _vit),
}


# -- timm ----------------------------------------------------------------------------------------------------------
def _timm_resnet(module: nn.Module, name: str = "") -> None:
    """timm's ``ResNet.init_weights`` on one layer: convolutions Kaiming-normal (fan-out, ReLU), the rest PyTorch's."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def _takes_a_module(fn: Callable[..., Any], *, named: bool) -> bool:
    """Whether ``fn`` can be called as ``fn(module)`` (``named``: as ``fn(module, name)``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    wanted = 2 if named else 1
    return len(positional) >= wanted and len(required) <= wanted


def _timm_scheme(model: nn.Module) -> tuple[str, Callable[..., None] | None, str]:
    """timm's initialisation of ``model``'s layers: ``(where it comes from, the function, how it is applied)``.

    In order: timm's ViT initialisation (``get_init_weights_vit`` of the model's ``weight_init_mode``) for a
    ``VisionTransformer`` or a model of a timm module that initialises with it (Swin, ViT-relpos, NaFlexViT);
    timm's EfficientNet initialisation (``efficientnet_init_weights``) for a model of a timm module built on it
    (EfficientNet, MobileNet v3 / v5, MixNet...); the model's ``_init_weights`` method taking a module; the
    ``_init_weights(module, name)`` function of the model's timm module (ConvNeXt, RegNet, ResNet v2, CSPNet,
    ByobNet, MLP-Mixer...); timm ``ResNet``'s rule for convolutions; otherwise PyTorch's defaults alone.
    The application is ``"named"`` (``fn(module, name)`` on each submodule, children first), ``"module"``
    (``fn(module)`` on each submodule, children first) or ``"whole"`` (``fn(part)`` once).
    """
    cls = type(model)
    home = sys.modules.get(cls.__module__)
    vit = sys.modules.get("timm.models.vision_transformer")
    own_vit = getattr(home, "get_init_weights_vit", None) if cls.__module__.startswith("timm.") else None
    if callable(own_vit) or (vit is not None and isinstance(model, vit.VisionTransformer)):
        make = own_vit if callable(own_vit) else vit.get_init_weights_vit  # type: ignore[union-attr]
        mode = str(getattr(model, "weight_init_mode", "") or "")
        classes = int(getattr(model, "num_classes", 0) or 0)
        head_bias = -math.log(classes) if "nlhb" in mode and classes > 1 else 0.0
        return f"{make.__module__}.get_init_weights_vit({mode!r})", make(mode, head_bias=head_bias), "named"
    goog = getattr(home, "efficientnet_init_weights", None)
    if cls.__module__.startswith("timm.") and callable(goog):
        return "timm's efficientnet_init_weights", goog, "whole"
    method = getattr(cls, "_init_weights", None)
    if callable(method) and _takes_a_module(getattr(model, "_init_weights"), named=False):  # noqa: B009 (typed Any)
        return f"{cls.__name__}._init_weights", method, "method"
    function = getattr(home, "_init_weights", None)
    if cls.__module__.startswith("timm.") and callable(function) and _takes_a_module(function, named=True):
        return f"{cls.__module__}._init_weights", function, "named"
    resnet = sys.modules.get("timm.models.resnet")
    if resnet is not None and isinstance(model, resnet.ResNet):
        return "timm.models.resnet.ResNet.init_weights (its rule for convolutions)", _timm_resnet, "named"
    return "PyTorch's defaults (no timm initialisation found for this model)", None, "whole"


class TimmInit:
    """timm's initialisation of a model, for the parts of its split (a copy of the first layer, a copy of the head).

    Each part is first reset to PyTorch's defaults (every layer as it is constructed: norms back to 1 and 0), then
    timm's own function for the model runs on it, with the layers' names as in the model (some timm functions
    treat ``head`` layers their own way). Where the function comes from, in order (its ``source`` says which):

    1. a ``VisionTransformer``, or a model of a timm module that initialises with it (Swin, ViT-relpos,
       NaFlexViT): timm's ``get_init_weights_vit`` of its ``weight_init_mode`` (default: ``init_weights_vit_timm``,
       linear layers truncated-normal with std 0.02 and zero bias);
    2. a model of a timm module built on timm's EfficientNet builder: its ``efficientnet_init_weights``;
    3. the model's ``_init_weights(module)`` method (run on an attribute-only copy of the model: no tensors kept);
    4. the ``_init_weights(module, name)`` function of the model's timm module (private in timm: a release that
       renames it makes this step fall through to the next);
    5. timm's ``ResNet``: its ``init_weights`` rule for convolutions (Kaiming-normal, fan-out, ReLU);
    6. otherwise PyTorch's defaults alone (the reset above).

    Args:
        model: the timm model the split comes from.
        names: the parts' names in the model: ``{"encoder": ..., "head": ...}`` (the head's when it is the model's
            own classifier layer).

    Example:
        >>> import timm
        >>> init = TimmInit(timm.create_model("test_vit", num_classes=10), {"encoder": "patch_embed.proj"})
        >>> init.source
        "timm.models.vision_transformer.get_init_weights_vit('')"
    """

    def __init__(self, model: nn.Module, names: dict[str, str] | None = None) -> None:
        self.source, self.fn, self.how = _timm_scheme(model)
        self.model_class = type(model)
        self.names = dict(names or {})
        # an instance of the model's class holding its plain attributes only, for an `_init_weights` method
        self.owner = head_shell(model, ()) if self.how == "method" else None

    def __repr__(self) -> str:
        return f"TimmInit({self.source!r})"

    def __call__(self, part: nn.Module) -> None:
        reset_all_parameters(part)
        if self.fn is None:
            return
        shell = getattr(part, "model", None)
        if isinstance(shell, self.model_class):  # a head running the model's own forward_head on a shell of it
            roots = list(shell.named_children())  # the shell itself is not a layer: its class is the model's
        else:
            kind = "head" if isinstance(part, nn.Linear) and "head" in self.names else "encoder"
            roots = [(self.names.get(kind, ""), part)]
        for root, module in roots:
            self._apply(module, root)

    def _apply(self, module: nn.Module, root: str) -> None:
        assert self.fn is not None
        if self.how == "whole":
            self.fn(module)
            return
        named = list(module.named_modules(prefix=root))
        for name, sub in reversed(named):  # children before their parent, as timm's named_apply and Module.apply
            if self.how == "named":
                self.fn(sub, name)
            else:
                self.fn(self.owner, sub)
