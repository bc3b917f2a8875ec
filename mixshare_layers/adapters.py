"""Splitting a backbone into encoder / core / classifier.

A MIMO network needs three pieces of a classification backbone:

* ``encoder``: the first layer (replicated M times), mapping an image to the shared latent space;
* ``core``: everything after it, up to the final *spatial* feature maps ``(B, D, h, w)`` (before global pooling);
* ``classifier``: the final ``nn.Linear(D, K)`` applied to the pooled features (replicated M times).

Known backbones are split automatically, in this order:

1. any module with a ``mimo_split()`` method returning a :class:`BackboneSplit` (the library's own CIFAR WRN);
2. torchvision ResNet / WideResNet / ResNeXt (and timm ResNets: same attribute names);
3. timm CNNs (``forward_features`` + ``get_classifier``): traced with ``torch.fx`` and cut after the first
   convolution; the head must be a global average pool followed by the linear classifier (checked numerically);
4. otherwise, pass ``split=BackboneSplit(encoder=..., core=..., classifier=...)`` (or a function of the backbone
   returning one) to :class:`~mixshare_layers.MIMOWrapper`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["BackboneSplit", "UnsupportedBackboneError", "split_backbone"]


class BackboneSplit(NamedTuple):
    """The three parts of a backbone.

    Attributes:
        encoder: first layer, ``(B, C, H, W) -> (B, C', H', W')``; an ``nn.Conv2d`` gets the fused MultiEncoder.
        core: ``(B, C', H', W') -> (B, D, h, w)``, the final spatial feature maps (no global pooling).
        classifier: ``nn.Linear(D, K)``.
        reinit: optional initialiser, called on copies of the encoder (``encoder_init="independent"``) and of the
            classifier (the M heads, unless ``pretrained``), one independent draw per copy; ``None``: their
            ``reset_parameters()`` (PyTorch's default initialisation). Give the backbone's own scheme here: how the
            heads start matters for MixMo (issue 12).

    Example:
        >>> from torch import nn
        >>> stem, body, fc = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Linear(8, 10)
        >>> split = BackboneSplit(encoder=stem, core=body, classifier=fc)
        >>> split.classifier.out_features, split.reinit is None
        (10, True)
    """

    encoder: nn.Module
    core: nn.Module
    classifier: nn.Linear
    reinit: Callable[[nn.Module], None] | None = None


class UnsupportedBackboneError(TypeError):
    """Raised when no adapter knows how to split a backbone; the message says how to give the split by hand.

    Example:
        >>> from torch import nn
        >>> try:
        ...     split_backbone(nn.Sequential(nn.Linear(4, 4)))
        ... except UnsupportedBackboneError as err:
        ...     print(str(err)[:45])
        no adapter knows how to split a Sequential. G
    """


_HOW_TO = (
    "Give the split yourself: MIMOWrapper(split=BackboneSplit(encoder=<first layer>, core=<the rest, returning "
    "(B, D, h, w) feature maps before global pooling>, classifier=<nn.Linear(D, K)>), num_subnetworks=...), or add a "
    "mimo_split() method to your model that returns a BackboneSplit."
)


def _split_resnet_like(model: nn.Module) -> BackboneSplit | None:
    names = ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc")
    if not all(hasattr(model, n) for n in names):
        return None
    act = getattr(model, "relu", None) or getattr(model, "act1", None)
    fc = model.fc
    if act is None or not isinstance(fc, nn.Linear):
        return None
    conv1, bn1, maxpool, *layers = (getattr(model, n) for n in names[:-1])  # getattr: any backbone's children
    core = nn.Sequential(bn1, act, maxpool, *layers)
    return BackboneSplit(encoder=conv1, core=core, classifier=fc)


class _FeaturesCall(nn.Module):
    """Calls ``backbone.forward_features`` so that torch.fx can trace it as a ``forward``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)  # type: ignore[operator]


def _split_timm_like(model: nn.Module) -> BackboneSplit | None:
    if not (hasattr(model, "forward_features") and hasattr(model, "get_classifier")):
        return None
    classifier = model.get_classifier()  # type: ignore[operator]
    if not isinstance(classifier, nn.Linear):
        raise UnsupportedBackboneError(
            f"{type(model).__name__}.get_classifier() is a {type(classifier).__name__}, not an nn.Linear. " + _HOW_TO
        )
    import torch.fx as fx

    try:
        graph_module = fx.symbolic_trace(_FeaturesCall(model))
    except Exception as exc:  # tracing failures come in many types
        raise UnsupportedBackboneError(
            f"could not trace {type(model).__name__}.forward_features with torch.fx ({exc}). " + _HOW_TO
        ) from exc
    graph = graph_module.graph
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    first_conv = None
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(graph_module.get_submodule(node.target), nn.Conv2d):
            first_conv = node
            break
    if first_conv is None or first_conv.args[0] is not placeholder:
        raise UnsupportedBackboneError(
            f"{type(model).__name__}.forward_features does not start with a convolution of its input. " + _HOW_TO
        )
    if len(placeholder.users) != 1:
        raise UnsupportedBackboneError(
            f"{type(model).__name__}.forward_features uses its input elsewhere than in its first convolution (e.g. "
            "its shape), so it cannot be cut after that convolution. " + _HOW_TO
        )
    encoder = graph_module.get_submodule(first_conv.target)
    with graph.inserting_before(first_conv):
        mixed = graph.placeholder("mixed")
    first_conv.replace_all_uses_with(mixed)
    graph.erase_node(first_conv)
    graph.erase_node(placeholder)
    graph.lint()
    core = fx.GraphModule(graph_module, graph, class_name=f"{type(model).__name__}Core")
    _check_plain_head(model, core, encoder, classifier)
    return BackboneSplit(encoder=encoder, core=core, classifier=classifier)


@torch.no_grad()
def _check_plain_head(model: nn.Module, core: nn.Module, encoder: nn.Module, classifier: nn.Linear) -> None:
    """Check numerically that ``forward_head`` is global average pooling followed by ``classifier``."""
    forward_head = getattr(model, "forward_head", None)
    if forward_head is None:
        return
    was_training = model.training
    model.eval()
    try:
        # timm models state the input size they expect; others get a 64x64 probe
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", ()))[-2:] or (64, 64)
        x = torch.randn(
            2, getattr(encoder, "in_channels", 3), *size, device=classifier.weight.device, dtype=classifier.weight.dtype
        )
        feats = core(encoder(x))
        expected = forward_head(feats)
        ours = None
        if feats.dim() == 4 and feats.shape[1] == classifier.in_features:
            ours = classifier(feats.mean(dim=(2, 3)))
    except Exception as exc:  # a backbone that cannot run the probe comes in many kinds
        raise UnsupportedBackboneError(
            f"could not run {type(model).__name__} split after its first convolution on a probe input ({exc}). "
            + _HOW_TO
        ) from exc
    finally:
        model.train(was_training)
    if ours is None or expected.shape != ours.shape or not torch.allclose(expected, ours, rtol=1e-4, atol=1e-4):
        raise UnsupportedBackboneError(
            f"{type(model).__name__}'s head is not a plain global average pool followed by its classifier (it may "
            "hold a norm, a conv or another pooling), so its features cannot be unmixed automatically. " + _HOW_TO
        )


_ADAPTERS: list[Callable[[nn.Module], BackboneSplit | None]] = [_split_resnet_like, _split_timm_like]


def split_backbone(backbone: nn.Module) -> BackboneSplit:
    """Split ``backbone`` with the first adapter that recognises it (see the module docstring).

    Args:
        backbone: the classification network to split.

    Returns:
        A :class:`BackboneSplit` holding the backbone's own modules (not copies).

    Raises:
        UnsupportedBackboneError: when no adapter recognises the backbone.

    Example:
        >>> from mixshare_layers.models import wide_resnet
        >>> split = split_backbone(wide_resnet(10, 1, num_classes=10))
        >>> split.encoder
        Conv2d(3, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
        >>> split.classifier
        Linear(in_features=64, out_features=10, bias=True)
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, but got {type(backbone).__name__}")
    own = getattr(backbone, "mimo_split", None)
    if callable(own):
        split = own()
        if not isinstance(split, BackboneSplit):
            raise TypeError(f"{type(backbone).__name__}.mimo_split() must return a BackboneSplit, got {type(split)}")
        return split
    for adapter in _ADAPTERS:
        split = adapter(backbone)
        if split is not None:
            return split
    raise UnsupportedBackboneError(f"no adapter knows how to split a {type(backbone).__name__}. " + _HOW_TO)
