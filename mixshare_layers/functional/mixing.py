"""Sampling and applying MixMo's input mixing (CutMix and linear), as pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_int, check_ndim, check_real
from ..mix_info import MixInfo
from .random import sample_dirichlet

__all__ = ["cutmix_probability", "mix", "mix_reference", "sample_mix_params"]


def cutmix_probability(cutmix_prob: float, ramp: float, progress: Tensor | float) -> Tensor:
    """MixMo's schedule for the CutMix probability.

    ``cutmix_prob`` until ``1 - ramp`` of training, then linearly down to 0 at the end (``ramp = 1/12`` in MixMo;
    ``ramp = 0`` keeps it constant). Returns a 0-dim tensor (on ``progress``'s device if it is a tensor).
    """
    p = torch.as_tensor(progress, dtype=torch.float32)
    if ramp <= 0:
        return torch.full_like(p, cutmix_prob)
    start = 1.0 - ramp
    factor = ((1.0 - p) / ramp).clamp(0.0, 1.0)
    return torch.where(p < start, torch.full_like(p, cutmix_prob), cutmix_prob * factor)


def sample_mix_params(
    batch_size: int,
    num_subnetworks: int,
    height: int,
    width: int,
    *,
    alpha: float = 2.0,
    cutmix_prob: float | Tensor = 0.5,
    shuffle_roles: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> MixInfo:
    """Draw one batch of MixMo mixes, fully vectorised and on ``device`` (no host synchronisation).

    Args:
        batch_size: B.
        num_subnetworks: M.
        height: H of the grid the boxes live on (the encoding's height).
        width: W of that grid.
        alpha: Dirichlet concentration of the mixing ratios (Beta(alpha, alpha) for M = 2); ``alpha <= 0`` gives
            exactly ``1 / M`` to every member.
        cutmix_prob: probability that this batch uses CutMix rather than linear mixing (float or 0-dim tensor).
        shuffle_roles: draw which member owns the box, once per batch (else member 0 always owns it).
        device: device of the draw.
        dtype: floating dtype of the compositions and ratios.
        generator: optional ``torch.Generator`` (on ``device``) to make the draw replayable.

    Returns:
        A :class:`MixInfo`. With CutMix the owner ``o`` gets a box of side ``floor(S * sqrt(λ_o))`` centred at a
        uniform pixel and clipped to the map, the other members share the outside in proportion to their λ, and
        ``ratios`` is recomputed from the clipped box's area. With linear mixing the box is empty and
        ``outside = ratios = λ``.
    """
    batch_size = check_int("batch_size", batch_size, minimum=0)
    m = check_int("num_subnetworks", num_subnetworks, minimum=1)
    height = check_int("height", height, minimum=1)
    width = check_int("width", width, minimum=1)
    if m == 1:
        ones = torch.ones(batch_size, 1, device=device, dtype=dtype)
        return MixInfo(
            boxes=torch.zeros(batch_size, 4, device=device, dtype=torch.long),
            inside=ones,
            outside=ones,
            ratios=ones,
            cutmix=torch.zeros((), device=device, dtype=torch.bool),
            height=height,
            width=width,
        )
    lam = sample_dirichlet(alpha, batch_size, m, device=device, dtype=torch.float32, generator=generator)
    if shuffle_roles:
        owner = torch.randint(m, (1,), device=device, generator=generator).expand(batch_size)
    else:
        owner = torch.zeros(batch_size, device=device, dtype=torch.long)
    owner_hot = F.one_hot(owner, m).to(torch.float32)  # (B, M)
    lam_owner = (lam * owner_hot).sum(dim=1)  # (B,)

    # CutMix box for the owner: side ratio sqrt(λ_o), centre uniform over the pixels, corners clipped.
    side = lam_owner.sqrt()
    cut_h = torch.floor(height * side).long()
    cut_w = torch.floor(width * side).long()
    cy = torch.randint(height, (batch_size,), device=device, generator=generator)
    cx = torch.randint(width, (batch_size,), device=device, generator=generator)
    y0 = (cy - cut_h // 2).clamp(0, height)
    y1 = (cy + cut_h // 2).clamp(0, height)
    x0 = (cx - cut_w // 2).clamp(0, width)
    x1 = (cx + cut_w // 2).clamp(0, width)
    cut_boxes = torch.stack([y0, y1, x0, x1], dim=1)
    area = ((y1 - y0) * (x1 - x0)).to(torch.float32) / (height * width)  # realised share of the owner

    # the other members share the outside linearly, in proportion to their λ
    others = lam * (1 - owner_hot)
    denom = others.sum(dim=1, keepdim=True)
    uniform_others = (1 - owner_hot) / (m - 1)
    cut_outside = torch.where(denom > 0, others / denom.clamp_min(torch.finfo(torch.float32).tiny), uniform_others)
    cut_ratios = area[:, None] * owner_hot + (1 - area[:, None]) * cut_outside

    use_cut = torch.rand((), device=device, generator=generator) < torch.as_tensor(cutmix_prob, device=device)
    boxes = torch.where(use_cut, cut_boxes, torch.zeros_like(cut_boxes))
    inside = torch.where(use_cut, owner_hot, lam)
    outside = torch.where(use_cut, cut_outside, lam)
    ratios = torch.where(use_cut, cut_ratios, lam)
    return MixInfo(
        boxes=boxes,
        inside=inside.to(dtype),
        outside=outside.to(dtype),
        ratios=ratios.to(dtype),
        cutmix=use_cut,
        height=height,
        width=width,
    )


def _check_mix_inputs(encodings: Tensor, info: MixInfo) -> None:
    check_ndim("encodings", encodings, 5, "(B, M, C, H, W)")
    b, m = encodings.shape[:2]
    if info.inside.shape != (b, m):
        raise ValueError(
            f"encodings of shape {tuple(encodings.shape)} (B={b}, M={m}) do not match the MixInfo, which describes "
            f"B={info.inside.shape[0]}, M={info.inside.shape[1]}"
        )


def mix(encodings: Tensor, info: MixInfo, scale: float | None = None) -> Tensor:
    """Apply a mix: ``scale * sum_i m_i * e_i`` with the masks of ``info`` rendered at the encodings' size.

    Args:
        encodings: ``(B, M, C, H, W)``.
        info: the mix to apply (from :func:`sample_mix_params` or a :class:`~mixshare_layers.CutMixMixer`).
        scale: defaults to M, so that the test-time plain sum and training mixes have the same scale.

    Shape:
        - Output: ``(B, C, H, W)`` in the encodings' dtype.
    """
    _check_mix_inputs(encodings, info)
    m = encodings.shape[1]
    scale = float(m) if scale is None else check_real("scale", scale)
    masks = info.masks_at(encodings.shape[-2], encodings.shape[-1], dtype=encodings.dtype)  # (B, M, H, W)
    out = encodings[:, 0] * (masks[:, 0, None] * scale)
    for i in range(1, m):
        out = torch.addcmul(out, encodings[:, i], masks[:, i, None], value=scale)
    return out


def mix_reference(encodings: Tensor, info: MixInfo, scale: float | None = None) -> Tensor:
    """Naive reference of :func:`mix` (materialises the M masked copies); for tests."""
    _check_mix_inputs(encodings, info)
    m = encodings.shape[1]
    scale = float(m) if scale is None else scale
    masks = info.masks_at(encodings.shape[-2], encodings.shape[-1], dtype=encodings.dtype)
    return scale * (masks[:, :, None] * encodings).sum(dim=1)
