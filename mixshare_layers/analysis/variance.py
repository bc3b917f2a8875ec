"""Influence of intermediate feature maps on each subnetwork (paper, App. D, Fig. 6; MixMo's appendix).

Inside the shared core there are no per-subnetwork weights to look at, so the influence of a channel on subnetwork
i is measured through the data: feed input slot i with the images of a data set while every other slot holds one
fixed image d, record the feature map ``F (N, C, h, w)`` at a layer, and take

    importance_i(c) = mean over (h, w) of Var over the N images of F[:, c, h, w].

A channel that only carries information about input j != i does not move when input i varies: its importance for
subnetwork i is 0. The resulting ``(M, C)`` table is an influence histogram like the kernel norms of
:mod:`~mixshare_layers.analysis.sharing`, and :func:`~mixshare_layers.analysis.sharing_rate` applies to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..vocabulary import FEATURE_LAYOUTS

__all__ = ["default_variance_layers", "feature_variance_influence"]


def default_variance_layers(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_modules()``) of the layers probed by default: the output of each stage of the core.

    A *stage* is a direct child of the wrapper's ``core`` that is a non-empty ``nn.Sequential`` (the
    library's CIFAR WRN: ``core.0 .. core.2`` = ``layer1 .. layer3``; a torchvision ResNet: ``core.3 .. core.6`` =
    ``layer1 .. layer4``), or, for a timm model, each module of its ``feature_info`` (its stages or blocks). When
    the core has neither (a user's custom core), the core itself (its final features) is probed.

    Args:
        model: a :class:`~mixshare_layers.MIMOWrapper` (anything with a ``.core`` module).

    Example:
        >>> from mixshare_layers import MIMOWrapper
        >>> from mixshare_layers.models import wide_resnet
        >>> default_variance_layers(MIMOWrapper(wide_resnet(10, 1, 10), 2))
        ['core.0', 'core.1', 'core.2']
    """
    core = getattr(model, "core", None)
    if not isinstance(core, nn.Module):
        raise TypeError(f"model must be a MIMOWrapper (with a .core module), but got {type(model).__name__}")
    backbone = getattr(core, "backbone", None)  # a timm model's spliced core: the stages timm itself reports
    info = getattr(backbone, "feature_info", None)
    if isinstance(backbone, nn.Module) and isinstance(info, list):
        modules = dict(backbone.named_modules())
        stages = [f"core.backbone.{i['module']}" for i in info if isinstance(i, dict) and i.get("module") in modules]
        if stages:
            return stages
    names = [
        f"core.{name}" for name, child in core.named_children() if isinstance(child, nn.Sequential) and len(child) > 0
    ]
    return names or ["core"]


def _batches(data: object, batch_size: int) -> Iterator[Tensor]:
    """Yield ``(b, C, H, W)`` image batches from a tensor, or from an iterable of tensors / (images, labels) pairs."""
    if isinstance(data, Tensor):
        if data.dim() != 4:
            raise ValueError(f"data must be a tensor of images (N, C, H, W), but got shape {tuple(data.shape)}")
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size]
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            "data must be a tensor (N, C, H, W) or an iterable of image batches (e.g. a DataLoader yielding "
            f"(images, labels)), but got {type(data).__name__}"
        )
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"every batch of data must be images (b, C, H, W) (or a tuple starting with them), got {got}"
            )
        yield x


class _Moments:
    """Streaming mean and sum of squared deviations per element (Chan et al.'s parallel update, float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, batch: Tensor) -> None:
        x = batch.detach().double()
        n = x.shape[0]
        mean = x.mean(dim=0)
        m2 = (x - mean).square().sum(dim=0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def variance(self) -> Tensor:
        assert self.m2 is not None  # only called after at least one update (checked by the caller)
        return self.m2 / (self.count - 1)


@torch.no_grad()
def feature_variance_influence(
    model: nn.Module,
    data: Tensor | Iterable[object],
    layers: Sequence[str] | None = None,
    fixed_input: Tensor | None = None,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    layout: str | None = None,
) -> dict[str, Tensor]:
    """App. D's influence of the channels of intermediate layers on each subnetwork.

    For each subnetwork i, input slot i runs over ``data`` while every other slot holds ``fixed_input``; forward
    hooks record the output of each named layer, and the importance of channel c for subnetwork i is the variance
    over the data (unbiased, float64, streamed over batches) averaged over the spatial positions (or tokens). The
    model runs in
    eval mode (BatchNorm with running statistics, encodings summed, no masks) with ``(B, M, C, H, W)`` inputs;
    its training/eval mode is restored afterwards.

    Args:
        model: a :class:`~mixshare_layers.MIMOWrapper` (any backbone) with M >= 2, whose eval forward accepts
            ``(B, M, C, H, W)``.
        data: images ``(N, C, H, W)`` as the model expects them (normalised like its training inputs), or an
            iterable of such batches or of ``(images, labels)`` pairs (a ``DataLoader``); at least 2 images. An
            iterable is traversed once per subnetwork, so it must be re-iterable.
        layers: names of modules in ``model.named_modules()`` whose output is probed: maps ``(B, C, h, w)`` (or
            ``(B, h, w, C)``, see ``layout``), or tokens ``(B, N, C)`` for a token model; default
            :func:`default_variance_layers` (after each stage of the core).
        fixed_input: ``(C, H, W)`` image held by the other inputs; default the first image of ``data``.
        batch_size: images per forward pass when ``data`` is a tensor.
        device: where to run (default: the device of the model's parameters).
        layout: how the probed 4-D maps hold their channels: ``"channels_first"`` or ``"channels_last"`` (timm and
            torchvision Swin stages); default the model's feature layout (``model.layout``). With ``"tokens"``, 3-D
            outputs are tokens ``(B, N, C)`` (every token, prefix ones included, is a position) and 4-D ones maps
            (a hybrid's convolutional stages).

    Returns:
        ``{layer name: (M, C_layer) float64 tensor}`` on the CPU, in the order of ``layers``.

    Shape:
        - data: ``(N, C, H, W)``; fixed_input: ``(C, H, W)``; each result: ``(M, C_layer)``.

    Example:
        >>> from mixshare_layers import MIMOWrapper
        >>> from mixshare_layers.models import wide_resnet
        >>> model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixmo")
        >>> out = feature_variance_influence(model, torch.randn(8, 3, 32, 32), batch_size=4)
        >>> {name: tuple(v.shape) for name, v in out.items()}
        {'core.0': (2, 16), 'core.1': (2, 32), 'core.2': (2, 64)}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a MIMOWrapper), but got {type(model).__name__}")
    m = getattr(model, "num_subnetworks", None)
    if not isinstance(m, int) or m < 2:
        raise ValueError(f"model must be a MIMOWrapper with num_subnetworks >= 2, but got num_subnetworks={m!r}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if isinstance(layers, str):
        raise TypeError(
            f"layers must be a sequence of module names, not a single string ({layers!r}); use [{layers!r}]"
        )
    names = default_variance_layers(model) if layers is None else list(layers)
    if not names:
        raise ValueError("layers must name at least one module, but got an empty sequence")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        sample = ", ".join(repr(n) for n in list(modules)[:12] if n)
        raise ValueError(f"layers {missing} are not modules of the model; names look like: {sample}, ...")
    if len(set(names)) != len(names):
        raise ValueError(f"layers must not repeat a name, but got {names}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    if fixed_input is None:
        first = next(iter(_batches(data, batch_size)), None)
        if first is None or first.shape[0] == 0:
            raise ValueError("data is empty: it must hold at least 2 images")
        fixed_input = first[0]
    if not isinstance(fixed_input, Tensor) or fixed_input.dim() != 3:
        got = tuple(fixed_input.shape) if isinstance(fixed_input, Tensor) else type(fixed_input).__name__
        raise ValueError(f"fixed_input must be one image (C, H, W), but got {got}")
    fixed = fixed_input.to(device)

    captured: dict[str, Tensor] = {}

    layout = getattr(model, "layout", "channels_first") if layout is None else layout
    check_choice("layout", layout, FEATURE_LAYOUTS)
    channels_last = layout == "channels_last"

    def make_hook(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if not isinstance(output, Tensor) or output.dim() not in ((3, 4) if layout == "tokens" else (4,)):
                got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                what = "feature maps (B, C, h, w)" + (" or tokens (B, N, C)" if layout == "tokens" else "")
                raise ValueError(f"layer {name!r} must output {what} to be probed, but gave {got}")
            if output.dim() == 3 or channels_last:  # channels last: (B, h, w, C) or tokens (B, N, C)
                output = output.movedim(-1, 1)
            captured[name] = output

        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        results: dict[str, list[Tensor]] = {n: [] for n in names}
        for i in range(m):
            moments = {n: _Moments() for n in names}
            for x in _batches(data, batch_size):
                if x.shape[0] == 0:
                    continue
                if x.shape[1:] != fixed.shape:
                    raise ValueError(
                        f"images of data have shape {tuple(x.shape[1:])} but fixed_input has shape {tuple(fixed.shape)}"
                    )
                x = x.to(device=device, dtype=fixed.dtype)
                inputs = fixed.expand(x.shape[0], m, *fixed.shape).clone()  # (b, M, C, H, W), every slot = d
                inputs[:, i] = x  # slot i runs over the data
                captured.clear()
                model(inputs)
                for n in names:
                    if n not in captured:
                        raise ValueError(f"layer {n!r} was not called by the model's eval forward")
                    moments[n].update(captured[n])
            for n in names:
                if moments[n].count < 2:
                    raise ValueError(f"data must hold at least 2 images to measure a variance, got {moments[n].count}")
                variance = moments[n].variance()  # (C, h, w) or (C, N)
                results[n].append(variance.flatten(1).mean(dim=1).cpu())  # (C,)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: torch.stack(results[n]) for n in names}
