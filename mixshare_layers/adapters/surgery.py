"""Module surgery for automatic splits: a backbone's own forward, run from its encoder's output on.

A backbone with a feature-extraction method (timm's ``forward_features``) computes its features from the image in
code we do not want to rewrite per family. :class:`SplicedCore` runs that very code on a shallow copy of the
backbone whose encoder is replaced by a :class:`Slot`: the slot returns the (mixed) encoding it is handed, so the
rest of the method (norms, positional embeddings, prefix tokens, stages) runs exactly as in the backbone. The image
the method is called with is a zero-stride stand-in of the right shape (only its shape can be read before the
encoder: size checks), never materialised.

:func:`head_shell` does the converse for the head: an instance of the backbone's class holding only the modules its
head uses (and its plain attributes), so that the backbone's own ``forward_head`` runs on it; :func:`completing`
gives the shell what the head reads from the backbone itself rather than from a module (a parameter of the root).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Slot", "SplicedCore", "completing", "head_shell", "module_name", "spliced"]


def module_name(root: nn.Module, target: nn.Module) -> str:
    """The qualified name of ``target`` in ``root`` (``""`` for the root itself)."""
    for name, module in root.named_modules(remove_duplicate=False):
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing every submodule, parameter and attribute value of ``module``, with its own tables
    (children, parameters, buffers, hooks): replacing a child or adding a hook on one does not touch the other."""
    clone = copy.copy(module)
    for key, value in module.__dict__.items():
        if isinstance(value, (dict, set)):
            clone.__dict__[key] = copy.copy(value)
    return clone


def spliced(root: nn.Module, replacements: Mapping[str, nn.Module], drop: Iterable[str] = ()) -> nn.Module:
    """A copy of ``root`` with the submodules named in ``replacements`` swapped; ``root`` itself is unchanged.

    Only the modules on the paths to the replaced ones are copied (shallowly); every other submodule, parameter
    and buffer is shared with ``root``. ``drop`` names parameters / buffers of ``root`` itself left out of the copy.
    """
    new_root = _shallow(root)
    for name in drop:
        new_root._parameters.pop(name, None)
        new_root._buffers.pop(name, None)
    copies: dict[str, nn.Module] = {"": new_root}
    for name, replacement in replacements.items():
        parts = name.split(".")
        parent = new_root
        prefix = ""
        for part in parts[:-1]:
            prefix = f"{prefix}.{part}" if prefix else part
            if prefix not in copies:
                child = parent._modules[part]
                assert child is not None
                copies[prefix] = _shallow(child)
                parent._modules[part] = copies[prefix]
            parent = copies[prefix]
        parent._modules[parts[-1]] = replacement
    return new_root


class Slot(nn.Module):
    """Stands for a backbone's encoder inside :class:`SplicedCore`: returns the encoding it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.value: Tensor | None = None

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        if self.value is None:
            raise RuntimeError("the encoder's slot was called outside of its SplicedCore's forward")
        return self.value


class SplicedCore(nn.Module):
    """A backbone's feature method run from its encoder's output on (see the module docstring).

    Args:
        backbone: a copy of the backbone (from :func:`spliced`) whose encoder is a :class:`Slot`.
        slot_name: the slot's qualified name in ``backbone``.
        method: the backbone's method computing the features from an image (``"forward_features"``).
        image_channels: channels of the images the backbone takes.
        stride: ``(s_h, s_w)``, the encoder's downsampling; the stand-in image has ``s_h H' x s_w W'`` pixels for
            an ``H' x W'`` encoding.

    Shape:
        - Input: the encoding ``(B, C', H', W')``; output: the backbone's features.
    """

    def __init__(
        self, backbone: nn.Module, slot_name: str, method: str, image_channels: int, stride: tuple[int, int]
    ) -> None:
        super().__init__()
        if not isinstance(backbone.get_submodule(slot_name), Slot):
            raise TypeError(f"{slot_name!r} of the backbone must be a Slot")
        self.backbone = backbone
        self.slot_name = slot_name
        self.method = method
        self.image_channels = image_channels
        self.stride = stride

    def extra_repr(self) -> str:
        return f"encoder={self.slot_name!r}, method={self.method!r}, stride={self.stride}"

    def forward(self, encoding: Tensor) -> Tensor:
        slot = self.backbone.get_submodule(self.slot_name)
        assert isinstance(slot, Slot)
        h, w = encoding.shape[-2:]
        size = (encoding.shape[0], self.image_channels, h * self.stride[0], w * self.stride[1])
        stand_in = encoding.new_zeros(()).expand(size)  # shape only: no memory
        slot.value = encoding
        try:
            return getattr(self.backbone, self.method)(stand_in)
        finally:
            slot.value = None


def head_shell(model: nn.Module, children: Iterable[str]) -> nn.Module:
    """An instance of ``model``'s class holding only the direct children named in ``children`` (shared, not copied)
    and the plain attributes of ``model``, so that ``model``'s head methods run on it (see the module docstring)."""
    cls = type(model)
    shell = cls.__new__(cls)
    nn.Module.__init__(shell)
    for key, value in vars(model).items():
        if not key.startswith("_") and key != "training":
            shell.__dict__[key] = value
    keep = set(children)
    for name, child in model._modules.items():
        if name in keep or child is None:
            shell._modules[name] = child
    shell.training = model.training
    return shell


@contextlib.contextmanager
def completing(shell: nn.Module, model: nn.Module) -> Iterator[nn.Module]:
    """While open, ``shell`` takes from ``model`` each parameter, buffer or private attribute of ``model`` itself that
    it is asked for and lacks, and keeps it: run the head on the shell inside, and the shell ends up holding what the
    head reads from ``model`` directly, which no module hook sees.

    The shell's class is swapped, while open, for a subclass whose ``__getattr__`` (Python calls it only for an
    attribute not found otherwise) takes the attribute from ``model``; a name ``model`` lacks raises the usual
    ``AttributeError``.

    Example:
        >>> model = nn.Module()
        >>> model.scale, model.head = nn.Parameter(torch.ones(2)), nn.Linear(2, 2)
        >>> shell = head_shell(model, ["head"])
        >>> with completing(shell, model):
        ...     _ = shell.head(torch.zeros(1, 2)) * shell.scale
        >>> [name for name, _ in shell.named_parameters(recurse=False)]
        ['scale']
    """
    cls = type(shell)

    def take(self: nn.Module, name: str) -> Any:
        try:
            return cls.__getattr__(self, name)
        except AttributeError:
            for table in ("_parameters", "_buffers", "__dict__"):
                if name in getattr(model, table):
                    getattr(self, table)[name] = getattr(model, table)[name]
                    return getattr(model, table)[name]
            raise

    namespace = {"__getattr__": take, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    shell.__class__ = type(cls.__name__, (cls,), namespace)
    try:
        yield shell
    finally:
        shell.__class__ = cls


@torch.no_grad()
def same_values(a: Tensor, b: Tensor, tolerance: float = 1e-4) -> bool:
    """Whether two outputs agree up to ``tolerance`` relative to ``b``'s scale (and have the same shape)."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.shape != b.shape:
        return False
    if b.numel() == 0:
        return True
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    return diff <= tolerance * max(scale, 1e-30) and bool(torch.isfinite(a).all())
