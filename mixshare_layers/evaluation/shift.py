"""Distribution shift: CIFAR-C-like corruptions of image batches, on the images' device, deterministic from a seed.

Eight families from Hendrycks & Dietterich (ICLR 2019), each at severities 1 to 5 with the parameters of their
CIFAR-10-C / CIFAR-100-C generator (:data:`SEVERITY_PARAMETERS`):

- ``gaussian_noise``: ``x + N(0, s^2)`` per pixel and channel
- ``shot_noise``: ``Poisson(c x) / c`` per pixel and channel (photon noise, exact Poisson counts)
- ``impulse_noise``: salt and pepper: each value set to 0 or 1 (equally likely) with probability ``a``
- ``gaussian_blur``: Gaussian filter of standard deviation ``s`` pixels (``nearest`` edges, radius 4 s)
- ``pixelate``: box down-sampling to ``int(size * f)`` pixels, then box up-sampling (PIL's ``BOX``)
- ``jpeg_compression``: JPEG at quality ``q``: YCbCr, 4:2:0 chroma, 8x8 DCT quantised with the standard tables
- ``contrast``: ``(x - mean) * c + mean`` with the per-image, per-channel mean
- ``brightness``: the HSV value ``V`` raised by ``b`` (clipped at 1), hue and saturation kept

Conventions:

- Images are ``(B, C, H, W)`` floats in ``[0, 1]`` (before any normalisation) and come back in ``[0, 1]``, same
  dtype and device. ``jpeg_compression`` works in 8 bits (it rounds to 256 levels, as an encoder does); the other
  families keep full precision.
- Randomness comes from a counter-based hash of ``(seed, family, severity, index, position)``: image ``index[b]``
  gets the same corruption whatever the batch it sits in, its batch size and the device (CPU and CUDA give the same
  draws). Pass each image's position in the evaluation set as ``index`` (default ``0 .. B - 1``).
- Differences from the CIFAR-C files: noise is not quantised to 8 bits afterwards, the random streams differ, and
  ``jpeg_compression`` is this library's codec (floating-point DCT; within about two grey levels of libjpeg's on
  average, against about fifteen for the compression itself), so numbers are comparable in kind with published
  CIFAR-C results, not identical to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_ndim

__all__ = ["CORRUPTIONS", "SEVERITIES", "SEVERITY_PARAMETERS", "Corruption", "corrupt"]

#: The severities, mildest first.
SEVERITIES = (1, 2, 3, 4, 5)

#: Severity ``s`` of family ``f`` uses ``SEVERITY_PARAMETERS[f][s - 1]`` (the CIFAR-C generator's values).
SEVERITY_PARAMETERS: Mapping[str, tuple[float, ...]] = MappingProxyType(
    {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # standard deviation
        "shot_noise": (500.0, 250.0, 100.0, 75.0, 50.0),  # photons for a value of 1
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of values replaced
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # standard deviation in pixels
        "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # resolution factor
        "jpeg_compression": (80.0, 65.0, 58.0, 50.0, 40.0),  # quality
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
    }
)

#: The corruption families, in the order of :data:`SEVERITY_PARAMETERS`.
CORRUPTIONS = tuple(SEVERITY_PARAMETERS)

# ------------------------------------------------------------------------------------------------------------------
# counter-based random numbers: 32-bit integer hashing in int64 tensors, identical on every device
# ------------------------------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2^32`` for ``x`` in ``[0, 2^32)`` and ``c < 2^32``, without int64 overflow: ``c < 2^31`` keeps
    the product below ``2^63``; otherwise ``x * 2^31 mod 2^32`` is ``(x & 1) << 31``."""
    if c < 2**31:
        return (x * c) & _M32
    return (x * (c - 2**31) + ((x & 1) << 31)) & _M32


def _hash32(x: Tensor) -> Tensor:
    """An invertible mixing of 32-bit values (the "lowbias32" constants), elementwise on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash_int(value: int) -> int:
    return int(_hash32(torch.tensor([value & _M32], dtype=torch.int64))[0])


class _Stream:
    """Uniform draws for a batch: ``uniform(draw)`` is ``(B, N)`` float64 in ``(0, 1)``, a function of
    ``(key, index[b], n, draw)`` only; ``uniform(draw, flat)`` gives the same values at the flat positions ``flat``
    of the ``(B, N)`` array, computing only those."""

    def __init__(self, key: int, index: Tensor, numel: int) -> None:
        self.numel = numel
        self.image_keys = _hash32((_hash32(index & _M32) ^ key) + (index >> 32) & _M32)  # (B,)
        self.counters = _hash32(torch.arange(numel, device=index.device, dtype=torch.int64))  # (N,)

    def uniform(self, draw: int, flat: Tensor | None = None) -> Tensor:
        base = _hash32((self.image_keys + _hash_int(draw + 0x51ED27)) & _M32)
        if flat is None:
            mixed = base.unsqueeze(1) ^ self.counters.unsqueeze(0)
        else:
            mixed = base[flat // self.numel] ^ self.counters[flat % self.numel]
        return (_hash32(mixed).double() + 0.5) / 2.0**32

    def normal(self, draw: int, flat: Tensor | None = None) -> Tensor:
        """Standard normal draws (Box-Muller on draws ``draw`` and ``draw + 1``)."""
        u1, u2 = self.uniform(draw, flat), self.uniform(draw + 1, flat)
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def _stream_key(seed: int, corruption: str, severity: int) -> int:
    key = _hash_int(seed & _M32) ^ _hash_int((seed >> 32) + 0x3C6EF372)
    key = _hash_int(key ^ (CORRUPTIONS.index(corruption) + 1) * 0x1000193)
    return _hash_int(key ^ severity * 0x9E3779B9)


# ------------------------------------------------------------------------------------------------------------------
# the families
# ------------------------------------------------------------------------------------------------------------------
def _gaussian_noise(x: Tensor, sigma: float, stream: _Stream) -> Tensor:
    noise = stream.normal(0).view_as(x).to(x.dtype)
    return x + sigma * noise


def _poisson(lam: Tensor, stream: _Stream) -> Tensor:
    """Exact Poisson counts (float64) for the rates ``lam`` ``(B, N)``: inversion below a rate of 10, Hörmann's
    transformed rejection with squeeze (PTRS, as in NumPy) above."""
    flat_lam = lam.reshape(-1)
    out = torch.zeros_like(flat_lam)
    small = torch.nonzero(flat_lam < 10.0).squeeze(1)
    # inversion: X = #{j >= 0 : P(X <= j) < u}; P(Poisson(10) > 60) < 1e-20, so 60 terms are exact in float64
    u = stream.uniform(0, small)
    rate = flat_lam[small]
    term = torch.exp(-rate)
    cdf = term.clone()
    count = (cdf < u).double()
    for j in range(1, 61):
        term = term * rate / j
        cdf = cdf + term
        count += (cdf < u).double()
    out[small] = count
    # PTRS accepts over 85 % of the draws of a round; only the pending values draw again. The chance that a value is
    # still pending after 24 rounds is below 1e-19; it would take a rounded normal draw
    pending = torch.nonzero(flat_lam >= 10.0).squeeze(1)
    for r in range(24):
        if pending.numel() == 0:
            break
        rate = flat_lam[pending]
        slam, loglam = rate.sqrt(), rate.log()
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        log_inv_alpha = torch.log(1.1239 + 1.1328 / (b - 3.4))
        vr = 0.9277 - 3.6224 / (b - 2.0)
        uu = stream.uniform(100 + 2 * r, pending) - 0.5
        v = stream.uniform(101 + 2 * r, pending)
        us = 0.5 - uu.abs()
        k = torch.floor((2.0 * a / us + b) * uu + rate + 0.43)
        quick = (us >= 0.07) & (v <= vr)
        bound = -rate + k * loglam - torch.lgamma(k + 1.0)
        squeeze_ok = (k >= 0) & ~((us < 0.013) & (v > us))
        take = quick | (squeeze_ok & (v.log() + log_inv_alpha - torch.log(a / (us * us) + b) <= bound))
        out[pending[take]] = k[take]
        pending = pending[~take]
    if pending.numel():  # pragma: no cover - probability below 1e-19 per value
        rate = flat_lam[pending]
        out[pending] = torch.round(rate + rate.sqrt() * stream.normal(200, pending)).clamp_min(0.0)
    return out.view_as(lam)


def _shot_noise(x: Tensor, photons: float, stream: _Stream) -> Tensor:
    lam = (x.double().clamp(0.0, 1.0) * photons).flatten(1)
    return (_poisson(lam, stream) / photons).view_as(x).to(x.dtype)


def _impulse_noise(x: Tensor, amount: float, stream: _Stream) -> Tensor:
    hit = (stream.uniform(0) < amount).view_as(x)
    salt = (stream.uniform(1) < 0.5).view_as(x)
    return torch.where(hit, salt.to(x.dtype), x)


def _gaussian_kernel(sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    radius = int(4.0 * sigma + 0.5)  # scipy.ndimage's truncate=4
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(device=device, dtype=dtype)


def _gaussian_blur(x: Tensor, sigma: float, stream: _Stream) -> Tensor:
    b, c, h, w = x.shape
    k = _gaussian_kernel(sigma, x.device, x.dtype)
    r = (k.numel() - 1) // 2
    y = x.reshape(b * c, 1, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return y.view(b, c, h, w)


def _box_weights(size_in: int, size_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(size_out, size_in)`` resampling matrix of PIL's ``BOX`` filter: output pixel ``i`` averages the input
    pixels whose centres fall in its footprint ``((i + 0.5) s - s / 2, (i + 0.5) s + s / 2]``, ``s = in / out``
    (at least one pixel wide when up-sampling)."""
    scale = size_in / size_out
    support = 0.5 * max(scale, 1.0)
    centre = (torch.arange(size_out, dtype=torch.float64) + 0.5) * scale  # (out,)
    pos = torch.arange(size_in, dtype=torch.float64) + 0.5  # input pixel centres
    offset = (pos.view(1, -1) - centre.view(-1, 1)) / max(scale, 1.0)
    weights = ((offset > -0.5) & (offset <= 0.5)).double()
    # PIL only looks at pixels int(centre - support + 0.5) .. int(centre + support + 0.5) - 1
    first = (centre - support + 0.5).floor().clamp_min(0).view(-1, 1)
    last = (centre + support + 0.5).floor().clamp_max(size_in).view(-1, 1)
    j = torch.arange(size_in, dtype=torch.float64).view(1, -1)
    weights = weights * ((j >= first) & (j < last)).double()
    return (weights / weights.sum(dim=1, keepdim=True)).to(device=device, dtype=dtype)


def _resize_box(x: Tensor, height: int, width: int) -> Tensor:
    wh = _box_weights(x.shape[-2], height, x.device, x.dtype)
    ww = _box_weights(x.shape[-1], width, x.device, x.dtype)
    return torch.einsum("ih,bchw,jw->bcij", wh, x, ww)


def _pixelate(x: Tensor, factor: float, stream: _Stream) -> Tensor:
    h, w = x.shape[-2:]
    small = _resize_box(x, max(1, int(h * factor)), max(1, int(w * factor)))
    return _resize_box(small, h, w)


def _contrast(x: Tensor, factor: float, stream: _Stream) -> Tensor:
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _brightness(x: Tensor, amount: float, stream: _Stream) -> Tensor:
    # HSV: every channel is V (1 - S g(H)) with V the channel maximum, so raising V to V' and keeping H and S scales
    # the pixel by V' / V; a black pixel (V = 0, S = 0 by convention) becomes grey V'
    value = x.amax(dim=1, keepdim=True)
    raised = (value + amount).clamp(max=1.0)
    scaled = x * (raised / value.clamp_min(torch.finfo(x.dtype).tiny))
    return torch.where(value > 0, scaled, raised.expand_as(x))


# JPEG (ITU-T T.81 Annex K.1 tables, IJG quality scaling)
_JPEG_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_JPEG_CHROMA = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8,) * 4,
)


def _jpeg_table(base: tuple[tuple[int, ...], ...], quality: float) -> Tensor:
    q = int(quality)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    table = torch.tensor(base, dtype=torch.float64)
    return ((table * scale + 50) // 100).clamp(1, 255)


def _dct_matrix() -> Tensor:
    n = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * n.view(1, 8) + 1) * n.view(8, 1) * math.pi / 16) * math.sqrt(2 / 8)
    d[0] = math.sqrt(1 / 8)
    return d  # orthonormal DCT-II: coefficients = D @ block @ D.T


def _jpeg_plane(plane: Tensor, table: Tensor, dct: Tensor) -> Tensor:
    """Quantise one ``(B, H, W)`` plane (level-shifted, sizes multiples of 8) through the 8x8 block DCT."""
    b, h, w = plane.shape
    blocks = plane.reshape(b, h // 8, 8, w // 8, 8).transpose(2, 3)  # (B, h/8, w/8, 8, 8)
    coef = dct @ blocks @ dct.T
    coef = torch.round(coef / table) * table
    return (dct.T @ coef @ dct).transpose(2, 3).reshape(b, h, w)


def _jpeg(x: Tensor, quality: float, stream: _Stream) -> Tensor:
    _, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"jpeg_compression needs 1 or 3 channels, but the images have shape {tuple(x.shape)}")
    dev = x.device
    dct = _dct_matrix().to(dev)
    luma_q, chroma_q = _jpeg_table(_JPEG_LUMA, quality).to(dev), _jpeg_table(_JPEG_CHROMA, quality).to(dev)
    pixels = torch.round(x.double().clamp(0, 1) * 255)  # the encoder reads 8-bit pixels
    ph, pw = -h % 16, -w % 16  # whole 16x16 macro-blocks, edges replicated as libjpeg does
    pixels = F.pad(pixels, (0, pw, 0, ph), mode="replicate")
    if c == 1:
        out = _jpeg_plane(pixels[:, 0] - 128, luma_q, dct) + 128
        return (torch.round(out).clamp(0, 255)[:, None, :h, :w] / 255).to(x.dtype)
    r, g, bl = pixels.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168735892 * r - 0.331264108 * g + 0.5 * bl + 128
    cr = 0.5 * r - 0.418687589 * g - 0.081312411 * bl + 128
    y = _jpeg_plane(y - 128, luma_q, dct) + 128
    chroma = F.avg_pool2d(torch.stack([cb, cr], dim=1), 2)  # 4:2:0 subsampling
    chroma = torch.stack([_jpeg_plane(p - 128, chroma_q, dct) + 128 for p in chroma.unbind(1)], dim=1)
    # the decoder's "fancy" up-sampling weighs the nearest chroma samples 9/16, 3/16, 3/16, 1/16: bilinear
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    cb, cr = chroma[:, 0] - 128, chroma[:, 1] - 128
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb], dim=1)
    return (torch.round(rgb).clamp(0, 255)[:, :, :h, :w] / 255).to(x.dtype)


_FAMILIES: dict[str, Callable[[Tensor, float, _Stream], Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg,
    "contrast": _contrast,
    "brightness": _brightness,
}


def corrupt(
    images: Tensor,
    corruption: str,
    severity: int,
    *,
    seed: int = 0,
    index: Tensor | None = None,
) -> Tensor:
    """Apply one corruption at one severity to a batch of images (on their device).

    Args:
        images: floats in ``[0, 1]`` (before normalisation).
        corruption: one of :data:`CORRUPTIONS`.
        severity: 1 (mildest) to 5.
        seed: a non-negative integer; with ``index``, it fixes every random draw.
        index: ``(B,)`` integer position of each image in its dataset (default ``0 .. B - 1``): an image's corruption
            depends on ``(seed, corruption, severity, index)`` only, not on the batch or the device.

    Returns:
        The corrupted images, clipped to ``[0, 1]``, same shape, dtype and device.

    Shape:
        - ``images``: ``(B, C, H, W)``; output: the same.

    Example:
        >>> x = torch.rand(4, 3, 32, 32)
        >>> y = corrupt(x, "gaussian_noise", 3, seed=0)
        >>> y.shape, bool(y.min() >= 0 and y.max() <= 1)
        (torch.Size([4, 3, 32, 32]), True)
        >>> torch.equal(corrupt(x[2:], "gaussian_noise", 3, index=torch.tensor([2, 3])), y[2:])
        True
    """
    check_ndim("images", images, 4, "(B, C, H, W)")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], but got dtype {images.dtype} (divide uint8 by 255)")
    check_choice("corruption", corruption, CORRUPTIONS)
    severity = check_int("severity", severity, minimum=1)
    if severity > len(SEVERITIES):
        raise ValueError(f"severity must be in 1..{len(SEVERITIES)}, but got {severity}")
    seed = check_int("seed", seed, minimum=0)
    b = images.shape[0]
    if index is None:
        index = torch.arange(b, device=images.device)
    else:
        if not isinstance(index, Tensor) or index.shape != (b,):
            shape = tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__
            raise ValueError(f"index must be a tensor of shape (B,) = ({b},), but got {shape}")
        if index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(f"index must hold integers, but got dtype {index.dtype}")
        index = index.to(device=images.device, dtype=torch.int64)
    if b == 0:
        return images.clone()
    stream = _Stream(_stream_key(seed, corruption, severity), index, images[0].numel())
    parameter = SEVERITY_PARAMETERS[corruption][severity - 1]
    return _FAMILIES[corruption](images, parameter, stream).clamp(0.0, 1.0)


class Corruption(nn.Module):
    """:func:`corrupt` as a module: one family at one severity, with a fixed seed.

    Args:
        corruption: one of :data:`CORRUPTIONS`.
        severity: 1 to 5.
        seed: fixes the random draws, with each image's ``index``.

    Shape:
        - Input: ``(B, C, H, W)`` in ``[0, 1]`` (and optionally ``index`` ``(B,)``); output: the same shape.

    Example:
        >>> blur = Corruption("gaussian_blur", 5)
        >>> blur(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, corruption: str, severity: int, *, seed: int = 0) -> None:
        super().__init__()
        self.corruption = check_choice("corruption", corruption, CORRUPTIONS)
        self.severity = check_int("severity", severity, minimum=1)
        if self.severity > len(SEVERITIES):
            raise ValueError(f"severity must be in 1..{len(SEVERITIES)}, but got {severity}")
        self.seed = check_int("seed", seed, minimum=0)

    def extra_repr(self) -> str:
        return f"{self.corruption!r}, {self.severity}, seed={self.seed}"

    def forward(self, images: Tensor, index: Tensor | None = None) -> Tensor:
        return corrupt(images, self.corruption, self.severity, seed=self.seed, index=index)
