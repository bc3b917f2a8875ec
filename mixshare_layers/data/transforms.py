"""Batch transforms that run on the images' device: the CIFAR recipe's crop + flip, and per-channel standardisation.

Both take a whole batch ``(N, C, H, W)`` at once (no Python loop over images), so augmentation costs one indexing
kernel on the GPU instead of a DataLoader worker per image. They are what :class:`~mixshare_layers.MIMOBatcher`'s
``transform`` expects: each of its ``batch_repetition`` copies can get its own draw.

Example:
    >>> import torch
    >>> from mixshare_layers.data import Normalize, RandomCropFlip
    >>> images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    >>> normalize = Normalize.from_images(images)
    >>> augment = RandomCropFlip(padding=4)
    >>> normalize(augment(images)).shape
    torch.Size([8, 3, 32, 32])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_int, check_ndim

__all__ = ["Normalize", "RandomCropFlip", "channel_stats", "random_crop_flip"]


def random_crop_flip(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Random crop after zero padding and a random horizontal flip, drawn independently per image.

    Each image is padded by ``padding`` pixels on every side, a window of its own size is cut at an offset drawn
    uniformly in ``[0, 2 * padding]`` along each axis, and the window is mirrored left-right with probability 1/2.
    The draws use ``generator`` (on ``x``'s device) or the global generator.

    Args:
        x: images of any dtype (uint8 or float).
        padding: pixels of zero padding on each side (0: flips only).
        generator: the random generator, for replayable runs.

    Shape:
        - ``x``: ``(N, C, H, W)``; output: the same shape, dtype and device.
    """
    n, _, h, w = x.shape
    dev = x.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), device=dev, generator=generator)
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = offsets[0, :, None] + torch.arange(h, device=dev)  # (N, H): source rows in the padded image
    cols = offsets[1, :, None] + torch.arange(w, device=dev)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class RandomCropFlip(nn.Module):
    """:func:`random_crop_flip` as a module; a no-op in eval mode.

    Args:
        padding: pixels of zero padding on each side.
        generator: the random generator (on the images' device) for replayable runs; ``None``: the global one.
    """

    def __init__(self, padding: int = 4, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.padding = check_int("padding", padding, minimum=0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, but got {type(generator).__name__}")
        self.generator = generator

    def extra_repr(self) -> str:
        return f"padding={self.padding}"

    def forward(self, x: Tensor) -> Tensor:
        check_ndim("x", x, 4, "(N, C, H, W)")
        if not self.training:
            return x
        return random_crop_flip(x, self.padding, self.generator)


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) standard deviation of images scaled to ``[0, 1]``, in float64.

    uint8 images are divided by 255; float images are taken as already in ``[0, 1]``. The sums run over chunks of
    ``chunk`` images, so a float64 copy of the whole set is never made.

    Shape:
        - ``images``: ``(N, C, H, W)``; outputs: ``(C,)`` and ``(C,)``.
    """
    check_ndim("images", images, 4, "(N, C, H, W)")
    if images.shape[0] == 0:
        raise ValueError(f"images must hold at least one image, but got shape {tuple(images.shape)}")
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    for part in images.split(chunk):
        xs = part.double().transpose(0, 1).reshape(c, -1).cpu() / scale
        total += xs.sum(dim=1)
        squares += xs.square().sum(dim=1)
    count = images.numel() / c
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-24).sqrt()
    return mean, std


class Normalize(nn.Module):
    """Standardise images per channel: ``(x - mean) / std``, with ``x`` in ``[0, 1]``.

    uint8 inputs are read as ``x / 255`` (fused into one multiply-add); float inputs are taken to be in ``[0, 1]``
    already (e.g. corrupted images from :func:`~mixshare_layers.evaluation.corrupt`). The output is float32 (or the
    float input's dtype).

    Args:
        mean: per-channel means of the ``[0, 1]`` images, ``(C,)``.
        std: per-channel standard deviations, ``(C,)``, all positive.
        channels_last: return ``torch.channels_last`` tensors (faster convolutions on CUDA with AMP).

    Shape:
        - Input: ``(N, C, H, W)``; output: the same.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor | list[float], std: Tensor | list[float], *, channels_last: bool = False) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.shape != std_t.shape or mean_t.numel() == 0:
            raise ValueError(
                f"mean and std must have one value per channel, but got shapes {tuple(mean_t.shape)} and "
                f"{tuple(std_t.shape)}"
            )
        if not bool((std_t > 0).all()) or not bool(torch.isfinite(mean_t).all()):
            shown = f"mean {mean_t.tolist()}, std {std_t.tolist()}"
            raise ValueError(f"std must be positive and mean finite, but got {shown}")
        self.channels_last = check_bool("channels_last", channels_last)
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    @classmethod
    def from_images(cls, images: Tensor, *, channels_last: bool = False) -> Normalize:
        """The statistics of ``images`` (a training set, uint8 or float in ``[0, 1]``): :func:`channel_stats`."""
        mean, std = channel_stats(images)
        return cls(mean, std, channels_last=channels_last)

    def extra_repr(self) -> str:
        return f"channels={self.mean.numel()}, channels_last={self.channels_last}"

    def forward(self, x: Tensor) -> Tensor:
        check_ndim("x", x, 4, "(N, C, H, W)")
        if x.shape[1] != self.mean.numel():
            raise ValueError(f"x has {x.shape[1]} channels, but Normalize was built for {self.mean.numel()}")
        dtype = x.dtype if x.is_floating_point() else torch.float32
        per_unit = 255.0 if x.dtype == torch.uint8 else 1.0
        scale = (1 / (per_unit * self.std)).to(dtype).view(1, -1, 1, 1)
        shift = (-self.mean / self.std).to(dtype).view(1, -1, 1, 1)
        out = torch.addcmul(shift, x.to(dtype), scale)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out
