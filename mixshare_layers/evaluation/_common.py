"""Shared helpers of :mod:`mixshare_layers.evaluation`: accumulation dtype, input checks, gathering across ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import check_ndim


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS has not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def check_scores(name: str, scores: object) -> Tensor:
    """A 1-D floating tensor (possibly empty)."""
    t = check_ndim(name, scores, 1, "(N,)")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, but got dtype {t.dtype}")
    return t


def check_targets(probs: Tensor, targets: object) -> Tensor:
    """``targets`` ``(B,)`` integer labels matching ``probs`` ``(B, K)``."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor of shape (B,), but got {type(targets).__name__}")
    if targets.shape != (probs.shape[0],):
        raise ValueError(
            f"targets must have shape (B,) = ({probs.shape[0]},) to match probs of shape {tuple(probs.shape)}, "
            f"but got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer class indices, but got dtype {targets.dtype}")
    return targets.to(probs.device)


def distributed_world(group: Any = None) -> int:
    """The number of processes of ``group``, 1 when no process group is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def all_gather_cat(tensor: Tensor, group: Any = None) -> Tensor:
    """Concatenate along dim 0 the tensors of every process of ``group`` (rank order; sizes may differ).

    Returns ``tensor`` itself when no process group is initialised.
    """
    import torch.distributed as dist

    if distributed_world(group) == 1:
        return tensor
    world = dist.get_world_size(group)
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])
