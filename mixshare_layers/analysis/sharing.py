"""Feature influence and sharing rates (paper, Sec. 2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_ndim

__all__ = ["SHARING_REDUCTIONS", "classifier_influence", "encoder_influence", "sharing_rate"]

SHARING_REDUCTIONS = ("mean-ratio", "sum-ratio")


def _find(model: nn.Module, attr: str, kind: type) -> nn.Module:
    part = getattr(model, attr, None)
    if not isinstance(part, kind):
        raise TypeError(
            f"model must be a MIMOWrapper (or have a .{attr} {kind.__name__}), but got {type(model).__name__}"
        )
    return part


@torch.no_grad()
def encoder_influence(model: nn.Module) -> Tensor:
    """L1 norm of each encoder's kernel for each output channel, ``(M, C')`` (Fig. 2 and 3a).

    ``model`` is a :class:`~mixshare_layers.MIMOWrapper` or a :class:`~mixshare_layers.MultiEncoder` with
    ``nn.Conv2d`` encoders.
    """
    from ..multi_encoder import MultiEncoder

    encoder = model if isinstance(model, MultiEncoder) else _find(model, "encoder", MultiEncoder)
    kernels = encoder.kernels()  # type: ignore[operator]
    return kernels.detach().abs().flatten(2).sum(dim=2).float()


@torch.no_grad()
def classifier_influence(model: nn.Module) -> Tensor:
    """L1 norm of each head's weight column for each feature, ``(M, D)`` (Fig. 3b)."""
    from ..multi_head import MultiHead

    heads = model if isinstance(model, MultiHead) else _find(model, "heads", MultiHead)
    return heads.weight.detach().abs().sum(dim=1).float()  # type: ignore[union-attr]


def sharing_rate(influence: Tensor, reduction: str = "mean-ratio") -> Tensor:
    """How much the M subnetworks share features, in percent (0-dim tensor).

    Args:
        influence: ``(M, F)``, the influence of each of F features on each of M >= 2 subnetworks (non-negative).
        reduction: ``"mean-ratio"`` (default): the mean over features of ``min_i h_i / max_i h_i`` (features with
            no influence on any subnetwork are skipped); ``"sum-ratio"``: ``sum_f min_i h_i / sum_f max_i h_i``,
            the overlap of the histograms over their union (what the paper's figures show in orange).

    Note:
        The paper writes the rate as ``min(h0, h1) / max(h0, h1)`` without saying how features are aggregated.
        Both readings give 100 % for identical subnetworks and 0 % for disjoint ones; the per-feature mean is the
        one used in this library's tables.
    """
    check_ndim("influence", influence, 2, "(M, F)")
    check_choice("reduction", reduction, SHARING_REDUCTIONS)
    if influence.shape[0] < 2:
        raise ValueError(f"influence must describe at least 2 subnetworks, but got shape {tuple(influence.shape)}")
    h = influence.double().abs()
    low = h.min(dim=0).values
    high = h.max(dim=0).values
    if reduction == "sum-ratio":
        return 100.0 * low.sum() / high.sum().clamp_min(torch.finfo(torch.float64).tiny)
    used = high > 0
    ratios = torch.where(used, low / torch.where(used, high, 1.0), 0.0)
    return 100.0 * ratios.sum() / used.sum().clamp_min(1)
