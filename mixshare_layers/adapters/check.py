"""Checking that a split computes its backbone's function, on a probe batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_ndim
from .split import BackboneSplit

__all__ = ["check_split", "default_tolerance", "probe_images"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Put every submodule of ``modules`` in eval mode, and restore each one's own mode afterwards."""
    modes = {}
    for module in modules:
        if module is not None:
            for sub in module.modules():
                modes[sub] = sub.training
    try:
        for sub in modes:
            sub.training = False
        yield
    finally:
        for sub, training in modes.items():
            sub.training = training


def first_tensor(output: object) -> Tensor:
    """The logits of a backbone's output: the tensor itself, or the first field of a tuple (aux outputs)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the backbone must return its logits as a tensor, but returned {type(output).__name__}")


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


@torch.no_grad()
def probe_images(
    backbone: nn.Module, sizes: Iterable[int | tuple[int, int]], channels: int = 3, batch_size: int = 1
) -> tuple[Tensor, Tensor]:
    """A random batch of images the backbone accepts, and its logits (eval mode), trying ``sizes`` in order.

    Args:
        backbone: the classification network.
        sizes: candidate image sizes (``s`` or ``(h, w)``), smallest first; the first one the backbone runs on is
            used (models with a fixed input size fail fast on the others).
        channels: image channels.
        batch_size: images in the batch.

    Returns:
        ``(images (B, C, H, W), logits (B, K))``, on the backbone's device and in its dtype.

    Raises:
        ValueError: the backbone runs on none of the sizes (the message lists each size's error).
    """
    device, dtype = _device_dtype(backbone)
    errors = []
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        h, w = (size, size) if isinstance(size, int) else size
        images = torch.randn(batch_size, channels, h, w, generator=generator).to(device=device, dtype=dtype)
        try:
            with eval_mode(backbone):
                logits = first_tensor(backbone(images))
        except Exception as exc:  # a size a model refuses fails in many ways (asserts, shape errors)
            errors.append(f"{h}x{w}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        return images, logits
    raise ValueError(f"{type(backbone).__name__} runs on none of the probe sizes ({'; '.join(errors)})")


def default_tolerance(dtype: torch.dtype) -> float:
    """The relative difference a correct split may show in ``dtype`` (rounding of a different pooling kernel, of the
    summed encoder copies): 100 machine epsilons (``1.2e-5`` in float32, ``2.2e-14`` in float64), ``1e-2`` in
    float16, ``5e-2`` in bfloat16. A wrong split is off by far more (a non-linear layer moved across the pooling)."""
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2 if dtype == torch.float16 else 5e-2
    return 100 * torch.finfo(dtype).eps if dtype.is_floating_point else 1e-4


@torch.no_grad()
def check_split(backbone: nn.Module, split: BackboneSplit, images: Tensor, *, tolerance: float | None = None) -> float:
    """Check that ``split`` computes ``backbone``'s logits on ``images`` (both in eval mode; modes are restored).

    Args:
        backbone: the classification network.
        split: its parts (:class:`BackboneSplit`).
        images: a probe batch ``(B, C, H, W)`` the backbone accepts.
        tolerance: the largest accepted ``max |split - backbone| / max |backbone|`` (default
            :func:`default_tolerance` of the images' dtype).

    Returns:
        That relative difference (float rounding: about ``1e-7`` in float32 for an exact split).

    Raises:
        ValueError: the split's logits differ (shape, non-finite values, or beyond ``tolerance``); the message says
            by how much.

    Example:
        >>> from mixshare_layers.models import wide_resnet
        >>> from mixshare_layers.adapters import split_backbone
        >>> net = wide_resnet(10, 1, num_classes=10)
        >>> check_split(net, split_backbone(net), torch.randn(2, 3, 32, 32)) < 1e-6
        True
    """
    check_ndim("images", images, 4, "(B, C, H, W)")
    split.validate()
    with eval_mode(backbone, split.encoder, split.core, split.classifier):
        expected = first_tensor(backbone(images))
        got = split.logits(images)
    if got.shape != expected.shape:
        raise ValueError(
            f"the split returns logits of shape {tuple(got.shape)} where {type(backbone).__name__} returns "
            f"{tuple(expected.shape)}"
        )
    if not bool(torch.isfinite(got).all()):
        raise ValueError("the split's logits are not finite where the backbone's are")
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    diff = float((got - expected).abs().max()) if expected.numel() else 0.0
    relative = diff / scale if scale > 0 else diff
    if tolerance is None:
        tolerance = default_tolerance(images.dtype)
    if not relative <= tolerance:
        raise ValueError(
            f"the split does not compute {type(backbone).__name__}'s function: its logits differ by up to {diff:.3g} "
            f"({relative:.3g} of the logits' scale {scale:.3g}; tolerance {tolerance:g})"
        )
    return relative


def describe_sizes(sizes: Sequence[int | tuple[int, int]]) -> str:
    return ", ".join(f"{s}x{s}" if isinstance(s, int) else f"{s[0]}x{s[1]}" for s in sizes)
