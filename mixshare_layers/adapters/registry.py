"""The adapter registry: how :func:`split_backbone` finds the split of a backbone, and how to add your own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .check import check_split, probe_images
from .split import BackboneSplit, UnsupportedBackboneError
from .timm import is_timm_like, split_timm
from .torchvision import is_torchvision_model, split_torchvision

__all__ = ["AdapterHandle", "register_adapter", "split_backbone"]

Adapter = Callable[[nn.Module], BackboneSplit]
Match = type | Callable[[nn.Module], bool]

HOW_TO = (
    "Give the split yourself: MIMOWrapper(split=BackboneSplit(encoder=<first layer>, core=<the rest, up to the "
    "features before global pooling>, classifier=<the head, from the pooled vector to the logits>, layout=..., "
    "pooling=...), num_subnetworks=...), register an adapter for your class with "
    "mixshare_layers.adapters.register_adapter(YourNet, lambda net: BackboneSplit(...)), or add a mimo_split() "
    "method to your model that returns a BackboneSplit."
)


@dataclass(eq=False)
class AdapterHandle:
    """What :func:`register_adapter` returns: :meth:`remove` unregisters the adapter."""

    match: Match
    adapter: Adapter
    _registry: list[AdapterHandle] = field(repr=False, default_factory=list)

    def matches(self, backbone: nn.Module) -> bool:
        if isinstance(self.match, type):
            return isinstance(backbone, self.match)
        return bool(self.match(backbone))

    def remove(self) -> None:
        """Unregister the adapter (a no-op if it was already removed)."""
        if self in self._registry:
            self._registry.remove(self)


_USER: list[AdapterHandle] = []


def register_adapter(match: Match, adapter: Adapter) -> AdapterHandle:
    """Teach :func:`split_backbone` (and so ``MIMOWrapper(net, ...)``) to split your own architecture.

    Registered adapters are tried before the built-in ones (torchvision, timm), the most recent first.

    Args:
        match: a class (instances of it and of its subclasses match) or a predicate ``backbone -> bool``.
        adapter: a function ``backbone -> BackboneSplit`` whose parts are the backbone's own modules.

    Returns:
        A handle; ``handle.remove()`` unregisters the adapter.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.stem, self.body, self.fc = nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(8, 5)
        >>> handle = register_adapter(Net, lambda net: BackboneSplit(net.stem, net.body, net.fc))
        >>> split_backbone(Net()).classifier
        Linear(in_features=8, out_features=5, bias=True)
        >>> handle.remove()
    """
    if not (isinstance(match, type) or callable(match)):
        raise TypeError(f"match must be a class or a predicate, but got {type(match).__name__}")
    if not callable(adapter):
        raise TypeError(f"adapter must be a function of the backbone returning a BackboneSplit, got {adapter!r}")
    handle = AdapterHandle(match, adapter, _USER)
    _USER.insert(0, handle)
    return handle


_BUILTIN: list[tuple[Callable[[nn.Module], bool], Adapter]] = [
    (is_torchvision_model, split_torchvision),
    (is_timm_like, split_timm),
]


def _resnet_like(model: nn.Module) -> bool:
    names = ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc")
    return all(isinstance(getattr(model, n, None), nn.Module) for n in names) and isinstance(
        getattr(model, "relu", None) or getattr(model, "act1", None), nn.Module
    )


def _split_resnet_like(model: Any) -> BackboneSplit:
    """A model with torchvision ResNet's attribute names (``conv1 ... layer4``, ``fc``) and average pooling."""
    act = getattr(model, "relu", None) or model.act1
    core = nn.Sequential(model.bn1, act, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4)
    split = BackboneSplit(encoder=model.conv1, core=core, classifier=model.fc)
    channels = model.conv1.in_channels if isinstance(model.conv1, nn.Conv2d) else 3
    try:
        images, _ = probe_images(model, [32, 64, 224], channels)
        check_split(model, split, images)
    except ValueError as exc:
        raise UnsupportedBackboneError(
            f"{type(model).__name__} (split by its ResNet attribute names): {exc}. " + HOW_TO
        ) from exc
    return split


_BUILTIN.append((_resnet_like, _split_resnet_like))


def _check(split: object, source: str) -> BackboneSplit:
    if not isinstance(split, BackboneSplit):
        raise TypeError(f"{source} must return a BackboneSplit, but got {type(split).__name__}")
    return split.validate()


def split_backbone(backbone: nn.Module) -> BackboneSplit:
    """Split ``backbone`` into encoder / core / head.

    In order: the backbone's own ``mimo_split()`` method (the library's CIFAR WRN), the adapters registered with
    :func:`register_adapter`, then the built-in ones: every torchvision classification model
    (:func:`~mixshare_layers.adapters.torchvision.split_torchvision`), any model with timm's classification API
    (:func:`~mixshare_layers.adapters.timm.split_timm`), and models with torchvision ResNet's attribute names.
    The built-in adapters check their split against the backbone on a probe batch.

    Args:
        backbone: the classification network to split.

    Returns:
        A :class:`BackboneSplit` holding the backbone's own modules (not copies; a timm core is a shallow copy of
        the model sharing them).

    Raises:
        UnsupportedBackboneError: no adapter recognises the backbone, or its adapter cannot split it; the message
            says why and how to give the split by hand.

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
        return _check(own(), f"{type(backbone).__name__}.mimo_split()")
    for handle in list(_USER):
        if handle.matches(backbone):
            return _check(handle.adapter(backbone), f"the adapter registered for {type(backbone).__name__}")
    for matches, adapter in _BUILTIN:
        if matches(backbone):
            return _check(adapter(backbone), adapter.__name__)
    raise UnsupportedBackboneError(f"no adapter knows how to split a {type(backbone).__name__}. " + HOW_TO)


def resolve_split(
    backbone: nn.Module | None, split: BackboneSplit | Callable[[nn.Module], BackboneSplit] | None
) -> BackboneSplit:
    """The checked split of ``MIMOWrapper(backbone, split=split)``: ``split`` itself, ``split(backbone)``, or, when
    ``split`` is ``None``, :func:`split_backbone` of the backbone.

    Raises:
        TypeError: no backbone where one is needed, or a ``split`` that is not a split or a function returning one.
    """
    if split is None:
        if backbone is None:
            raise TypeError(
                "backbone is None: give a backbone to wrap, or split=BackboneSplit(encoder=..., core=..., "
                "classifier=...)"
            )
        return split_backbone(backbone)
    if isinstance(split, BackboneSplit):
        return split.validate()
    if not callable(split):
        raise TypeError(f"split must be a BackboneSplit or a callable, but got {type(split).__name__}")
    if backbone is None:
        raise TypeError("split is a function of the backbone, but backbone is None")
    return _check(split(backbone), "split(backbone)")
