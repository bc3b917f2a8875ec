"""A built-in, offline, seeded image classification dataset shaped like CIFAR."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._checks import check_int, check_real

__all__ = ["SyntheticImageDataset"]


def _class_templates(num_classes: int, channels: int, size: int, generator: torch.Generator) -> Tensor:
    """One zero-mean texture per class: a sum of oriented gratings times a smooth blob, per channel."""
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, size, dtype=torch.float64),
        torch.linspace(-1, 1, size, dtype=torch.float64),
        indexing="ij",
    )
    templates = torch.zeros(num_classes, channels, size, size, dtype=torch.float64)
    for _ in range(3):  # three gratings per class
        theta = torch.rand(num_classes, 1, 1, 1, generator=generator, dtype=torch.float64) * math.pi
        freq = 1.5 + 3.0 * torch.rand(num_classes, 1, 1, 1, generator=generator, dtype=torch.float64)
        phase = 2 * math.pi * torch.rand(num_classes, channels, 1, 1, generator=generator, dtype=torch.float64)
        amp = torch.randn(num_classes, channels, 1, 1, generator=generator, dtype=torch.float64)
        arg = math.pi * freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase
        templates += amp * torch.sin(arg)
    cy, cx = torch.rand(2, num_classes, 1, 1, 1, generator=generator, dtype=torch.float64) - 0.5
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.35)
    templates = templates * (0.4 + blob)
    templates -= templates.mean(dim=(2, 3), keepdim=True)  # no class is told apart by its mean colour
    return templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)


def _clutter_textures(n: int, channels: int, size: int, generator: torch.Generator) -> Tensor:
    """One random texture per sample, unrelated to any class: three oriented gratings per channel, unit std."""
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, size, dtype=torch.float64),
        torch.linspace(-1, 1, size, dtype=torch.float64),
        indexing="ij",
    )
    out = torch.zeros(n, channels, size, size, dtype=torch.float64)
    for _ in range(3):
        theta = torch.rand(n, 1, 1, 1, generator=generator, dtype=torch.float64) * math.pi
        freq = 1.5 + 3.0 * torch.rand(n, 1, 1, 1, generator=generator, dtype=torch.float64)
        phase = 2 * math.pi * torch.rand(n, channels, 1, 1, generator=generator, dtype=torch.float64)
        amp = torch.randn(n, channels, 1, 1, generator=generator, dtype=torch.float64)
        out += amp * torch.sin(math.pi * freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    out -= out.mean(dim=(2, 3), keepdim=True)
    return out / out.flatten(1).std(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


class SyntheticImageDataset(Dataset):
    """Seeded, learnable images that need spatial features: class textures under shifts, flips, contrast and noise.

    Every class owns a zero-mean texture (oriented gratings modulated by a blob, independent per channel); a sample
    is its class texture circularly shifted by up to ``size / 8`` pixels, maybe flipped horizontally, with a random
    contrast and brightness and Gaussian pixel noise. Class means are equal, so a model must look at spatial
    structure. The same ``seed`` gives the same templates for both splits; ``train`` picks independent samples.

    Harder variants (both off by default, which gives exactly the images of earlier versions): ``object_size < 1``
    shows the class texture only inside a square window of side ``round(object_size * S)`` at a uniformly drawn
    position (a small object), and ``clutter > 0`` fills the background with a random texture of that relative
    amplitude, drawn per sample and unrelated to any class (three random gratings per channel, like a class
    texture but not one). With a full-size object the clutter is added on top of the texture. More classes
    (``num_classes``) and more ``noise`` make the task harder too.

    Args:
        num_samples: number of images.
        num_classes: K (classes are balanced).
        image_size: S, images are ``S x S``.
        channels: C.
        train: training split (else test split, other samples of the same classes).
        seed: everything is derived from it.
        noise: standard deviation of the pixel noise, relative to the texture's.
        object_size: side of the square window showing the class texture, as a fraction of S, in (0, 1].
        clutter: amplitude of the random background texture, relative to the class texture's, >= 0.
        transform: optional callable applied to the ``(C, S, S)`` uint8 tensor in ``__getitem__``.

    Attributes:
        data: ``(N, C, S, S)`` uint8 images.
        targets: ``(N,)`` int64 labels.

    Shape:
        - ``dataset[i]``: a ``(C, S, S)`` float32 image in [0, 1] (or ``transform(uint8 image)``) and an int label.

    Example:
        >>> ds = SyntheticImageDataset(100, num_classes=10)
        >>> image, label = ds[0]
        >>> image.shape, image.dtype, ds.data.dtype
        (torch.Size([3, 32, 32]), torch.float32, torch.uint8)
        >>> hard = SyntheticImageDataset(100, num_classes=40, object_size=0.5, clutter=0.7)
        >>> hard.data.shape, hard.num_classes
        (torch.Size([100, 3, 32, 32]), 40)
    """

    def __init__(
        self,
        num_samples: int = 10000,
        num_classes: int = 10,
        image_size: int = 32,
        channels: int = 3,
        *,
        train: bool = True,
        seed: int = 0,
        noise: float = 2.5,
        object_size: float = 1.0,
        clutter: float = 0.0,
        transform: Callable[[Tensor], object] | None = None,
    ) -> None:
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.image_size = check_int("image_size", image_size, minimum=4)
        self.channels = check_int("channels", channels, minimum=1)
        self.seed = check_int("seed", seed)
        self.noise = check_real("noise", noise, low=0.0)
        self.object_size = check_real("object_size", object_size, low=0.0, high=1.0, low_inclusive=False)
        self.clutter = check_real("clutter", clutter, low=0.0)
        self.train = bool(train)
        self.transform = transform
        self.classes = [f"class_{k}" for k in range(self.num_classes)]
        g = torch.Generator().manual_seed(self.seed)
        templates = _class_templates(self.num_classes, self.channels, self.image_size, g)
        g_split = torch.Generator().manual_seed(self.seed * 2 + (1 if self.train else 2) + 10_000)
        n, s = self.num_samples, self.image_size
        targets = torch.arange(n) % self.num_classes
        targets = targets[torch.randperm(n, generator=g_split)]
        images = templates[targets]
        shift = s // 8
        dy = torch.randint(-shift, shift + 1, (n,), generator=g_split)
        dx = torch.randint(-shift, shift + 1, (n,), generator=g_split)
        rows = (torch.arange(s).view(1, s) - dy.view(n, 1)) % s  # (N, S)
        cols = (torch.arange(s).view(1, s) - dx.view(n, 1)) % s
        images = images.gather(2, rows.view(n, 1, s, 1).expand(n, self.channels, s, s))
        images = images.gather(3, cols.view(n, 1, 1, s).expand(n, self.channels, s, s))
        flip = torch.rand(n, generator=g_split) < 0.5
        images = torch.where(flip.view(n, 1, 1, 1), images.flip(-1), images)
        if self.object_size < 1.0 or self.clutter > 0.0:
            images = self._place_on_clutter(images)
        contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g_split, dtype=torch.float64)
        brightness = 0.3 * torch.randn(n, self.channels, 1, 1, generator=g_split, dtype=torch.float64)
        images = images * contrast + brightness
        images = images + self.noise * torch.randn(images.shape, generator=g_split, dtype=torch.float64)
        scale = 40.0 / math.sqrt(1.0 + self.noise**2)  # about 40 grey levels of total std, little clipping
        self.data = (128 + scale * images).round().clamp(0, 255).to(torch.uint8)
        self.targets = targets

    def _place_on_clutter(self, images: Tensor) -> Tensor:
        """Window the class textures (``object_size``) and add the background clutter, from a generator of its own.

        The draws of the default images are left untouched, so ``object_size=1, clutter=0`` reproduces them.
        """
        n, c, s, _ = images.shape
        g = torch.Generator().manual_seed(self.seed * 2 + (1 if self.train else 2) + 20_000)
        background = self.clutter * _clutter_textures(n, c, s, g) if self.clutter > 0 else torch.zeros_like(images)
        if self.object_size >= 1.0:
            return images + background
        side = min(s, max(1, round(self.object_size * s)))
        y0 = torch.randint(0, s - side + 1, (n, 1), generator=g)
        x0 = torch.randint(0, s - side + 1, (n, 1), generator=g)
        pos = torch.arange(s).view(1, s)
        in_y = (pos >= y0) & (pos < y0 + side)  # (N, S)
        in_x = (pos >= x0) & (pos < x0 + side)
        window = (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1)  # (N, 1, S, S)
        return torch.where(window, images, background)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = self.data[index]
        out: object = image.float().div_(255) if self.transform is None else self.transform(image)
        return out, int(self.targets[index])

    def __repr__(self) -> str:
        return (
            f"SyntheticImageDataset(num_samples={self.num_samples}, num_classes={self.num_classes}, "
            f"image_size={self.image_size}, channels={self.channels}, train={self.train}, seed={self.seed}"
            + (f", object_size={self.object_size:g}" if self.object_size < 1.0 else "")
            + (f", clutter={self.clutter:g})" if self.clutter > 0.0 else ")")
        )
