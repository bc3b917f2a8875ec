"""``MIMOLoss``: the sum over subnetworks of (optionally ratio-weighted) cross-entropies."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ._checks import check_real
from .functional.loss import mimo_cross_entropy, rebalanced_weights
from .mix_info import MixInfo

__all__ = ["MIMOLoss"]


class MIMOLoss(nn.Module):
    """``sum_k mean_b w_bk * CE(logits_bk, y_bk)`` with MixMo's weights ``w_k = M λ_k^(1/r) / sum_j λ_j^(1/r)``.

    Args:
        rebalance_root: r. ``None``: every weight is 1; ``1``: ``M λ_k`` (MixShare keeps the plain ratios);
            ``3``: MixMo's default. The weights of a sample always sum to M.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.

    Shape:
        - ``output``: a :class:`~mixshare_layers.MIMOOutput` (its ``mix_info`` gives λ) or logits ``(B, M, K)``
          with ``info`` passed separately (no ``info``: weights of 1).
        - ``targets``: ``(B, M)`` class indices, column ``i`` the label of input ``i``.
        - Output: a scalar.

    Example:
        >>> import torch
        >>> MIMOLoss()(torch.randn(4, 2, 10), torch.randint(10, (4, 2))).shape
        torch.Size([])
    """

    def __init__(self, rebalance_root: float | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.rebalance_root = (
            None
            if rebalance_root is None
            else check_real("rebalance_root", rebalance_root, low=0.0, low_inclusive=False)
        )
        self.label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)

    def extra_repr(self) -> str:
        return f"rebalance_root={self.rebalance_root}, label_smoothing={self.label_smoothing:g}"

    def weights(self, info: MixInfo) -> Tensor:
        """The ``(B, M)`` loss weights for a mix."""
        return rebalanced_weights(info.ratios, self.rebalance_root)

    def forward(self, output: Any, targets: Tensor, info: MixInfo | None = None) -> Tensor:
        logits = getattr(output, "logits", output)
        if info is None:
            info = getattr(output, "mix_info", None)
        if not isinstance(logits, Tensor):
            raise TypeError(f"output must be a MIMOOutput or a (B, M, K) tensor, but got {type(output).__name__}")
        weights = None
        if info is not None and self.rebalance_root is not None:
            weights = self.weights(info)
        return mimo_cross_entropy(logits, targets, weights, label_smoothing=self.label_smoothing)
