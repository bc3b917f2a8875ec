"""Presets, the mix sampler, unmix pooling and the loss weights of the reference (see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# The methods of the paper's Table 1 (plus MIMO), from the paper (Sec. 3, App. B) and MixMo's defaults.
#   alpha: Dirichlet concentration of the ratios (<= 0: exactly 1/M each, MIMO's plain sum)
#   cutmix_prob / ramp: CutMix-or-linear coin per batch; the probability falls linearly to 0 over the last `ramp`
#   root: MixMo's loss rebalancing root r (None: weight 1 for every member; 1: the plain ratios M * lambda)
_MIXMO = dict(
    encoder_init="independent", alpha=2.0, cutmix_prob=0.5, ramp=1 / 12, unmix="none", fraction=0.25,
    fadeout_end=1 / 3, root=3.0, input_repetition=0.0,
)  # fmt: skip
PRESETS: dict[str, dict] = {
    "mimo": {**_MIXMO, "alpha": 0.0, "cutmix_prob": 0.0, "ramp": 0.0, "root": None},
    "mixmo": _MIXMO,
    "unmix": {**_MIXMO, "unmix": "full"},
    "unmix-aligned": {**_MIXMO, "unmix": "full", "encoder_init": "aligned"},
    "mixshare": {
        **_MIXMO, "encoder_init": "aligned", "cutmix_prob": 1.0, "ramp": 0.0, "unmix": "fadeout", "root": 1.0,
        "input_repetition": 0.1,
    },
    "mixshare-partial": {
        **_MIXMO, "encoder_init": "aligned", "cutmix_prob": 1.0, "ramp": 0.0, "unmix": "partial", "root": 1.0,
        "input_repetition": 0.1,
    },
}  # fmt: skip


@dataclass
class Mix:
    """One batch of mixes.

    Attributes:
        masks: ``(B, M, H, W)`` float64, the members' masks at the encoding resolution (they sum to 1 per pixel).
        ratios: ``(B, M)`` float64, each mask's mean (the realised λ).
        lam: ``(B, M)`` the Dirichlet draws.
        owner: the member owning the CutMix box (one per batch).
        cutmix: whether the batch uses CutMix (else linear mixing).
        boxes: ``(B, 4)`` int ``(y0, y1, x0, x1)`` of the owner's box (zeros for linear mixing).
    """

    masks: Tensor
    ratios: Tensor
    lam: np.ndarray
    owner: int
    cutmix: bool
    boxes: np.ndarray


def cutmix_probability(p: float, ramp: float, progress: float) -> float:
    """MixMo's schedule: ``p`` until ``1 - ramp`` of training, then linearly down to 0 at the end."""
    if ramp <= 0 or progress < 1 - ramp:
        return p
    return p * max(0.0, (1 - progress) / ramp)


def draw_mix(rng: np.random.Generator, batch: int, members: int, height: int, width: int, alpha: float,
             cutmix_prob: float) -> Mix:  # fmt: skip
    """Draw the mixes of one batch (MixMo's sampler), with NumPy, sample by sample."""
    lam = rng.dirichlet([alpha] * members, size=batch) if alpha > 0 else np.full((batch, members), 1 / members)
    use_cut = bool(rng.random() < cutmix_prob)  # one coin per batch
    owner = int(rng.integers(members))  # one box owner per batch
    masks = np.empty((batch, members, height, width))
    boxes = np.zeros((batch, 4), dtype=np.int64)
    for b in range(batch):
        if not use_cut:
            masks[b] = lam[b][:, None, None]  # linear mixing: constant masks
            continue
        # the owner's box: side ratio sqrt(lambda), centre a uniform pixel, corners clipped to the map
        cut_h, cut_w = int(height * math.sqrt(lam[b, owner])), int(width * math.sqrt(lam[b, owner]))
        cy, cx = rng.integers(height), rng.integers(width)
        y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
        x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
        box = np.zeros((height, width))
        box[y0:y1, x0:x1] = 1.0
        # the other members share the outside in proportion to their lambda: CutMix(owner, MixUp(others))
        others = np.delete(np.arange(members), owner)
        share = lam[b, others]
        share = share / share.sum() if share.sum() > 0 else np.full(len(others), 1 / len(others))
        for j, s in zip(others, share, strict=True):
            masks[b, j] = (1.0 - box) * s
        masks[b, owner] = box
        boxes[b] = (y0, y1, x0, x1)
    masks_t = torch.from_numpy(masks)
    return Mix(masks_t, masks_t.mean(dim=(2, 3)), lam, owner, use_cut, boxes)


def loss_weights(ratios: Tensor, root: float | None) -> Tensor:
    """MixMo's loss weights ``M λ_k^(1/r) / Σ_j λ_j^(1/r)`` (``root=None``: 1 each), ``(B, M)``."""
    if root is None:
        return torch.ones_like(ratios)
    powered = ratios ** (1.0 / root)
    return ratios.shape[1] * powered / powered.sum(dim=1, keepdim=True)


def unmix_pool(features: Tensor, masks: Tensor, mode: str, strength: float = 0.0, fraction: float = 0.25) -> Tensor:
    """One pooled vector per member, ``(B, C, h, w)`` -> ``(B, M, C)``.

    ``"none"``: the global average for every member. Otherwise the masks are averaged down to ``h x w`` (the share
    of each final cell that each member covers), faded to ``m + r (1 - m)`` in ``"fadeout"`` mode, and each member
    gets the mask-weighted average of the map; ``"partial"`` does this for the first ``ceil(fraction * C)`` channels
    and keeps the global average for the others.
    """
    b, c, h, w = features.shape
    m = masks.shape[1]
    plain = features.mean(dim=(2, 3))[:, None, :].expand(b, m, c)
    if mode == "none":
        return plain
    big_h, big_w = masks.shape[-2:]
    if big_h % h or big_w % w:
        raise ValueError(f"masks {big_h}x{big_w} do not divide into the feature maps' {h}x{w}")
    small = masks.to(features.dtype).reshape(b, m, h, big_h // h, w, big_w // w).mean(dim=(3, 5))
    if mode == "fadeout":
        small = small + strength * (1 - small)
    mass = small.sum(dim=(2, 3))  # (B, M)
    weighted = torch.einsum("bmhw,bchw->bmc", small, features)
    pooled = torch.where(mass[..., None] > 0, weighted / mass.clamp_min(1e-12)[..., None], 0.0)
    if mode == "partial":
        k = math.ceil(fraction * c)
        pooled = torch.cat([pooled[..., :k], plain[..., k:]], dim=2)
    elif mode not in ("full", "fadeout"):
        raise ValueError(f"unknown unmix mode {mode!r}")
    return pooled
