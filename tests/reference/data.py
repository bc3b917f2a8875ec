"""Batching of the reference: batch repetition, a permutation per member, input repetition, augmentation per input."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def make_rows(rng: np.random.Generator, indices: np.ndarray, members: int, repetition: int,
              input_repetition: float = 0.0) -> np.ndarray:  # fmt: skip
    """Dataset indices ``(n, M)`` of one training batch, ``n = len(indices) * repetition``.

    Batch repetition repeats every index ``repetition`` times; member 0 gets a random permutation of the repeated
    list and every other member its own permutation of it, except on ``round(input_repetition * n)`` rows drawn at
    random, where every member gets member 0's image (MIMO's input repetition). Each member therefore sees each
    image exactly ``repetition`` times.
    """
    repeated = np.repeat(np.asarray(indices), repetition)
    n = len(repeated)
    rows = np.empty((n, members), dtype=np.int64)
    rows[:, 0] = repeated[rng.permutation(n)]
    shared = np.zeros(n, dtype=bool)
    shared[rng.choice(n, size=round(input_repetition * n), replace=False)] = True
    free = np.flatnonzero(~shared)
    for i in range(1, members):
        rows[shared, i] = rows[shared, 0]
        rows[free, i] = rows[free, 0][rng.permutation(len(free))]
    return rows


def augment_crop_flip(rng: np.random.Generator, images: Tensor, padding: int = 4) -> Tensor:
    """Random crop (zero padding ``padding``) and horizontal flip, drawn independently for every image.

    ``images``: ``(N, C, H, W)`` (uint8 here) -> same shape and dtype.
    """
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    out = torch.empty_like(images)
    dy = rng.integers(0, 2 * padding + 1, size=n)
    dx = rng.integers(0, 2 * padding + 1, size=n)
    flip = rng.random(n) < 0.5
    for k in range(n):
        crop = padded[k, :, dy[k] : dy[k] + h, dx[k] : dx[k] + w]
        out[k] = crop.flip(-1) if flip[k] else crop
    return out
