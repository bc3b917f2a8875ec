"""``MIMOLoss``: the sum over subnetworks of (optionally ratio-weighted) cross-entropies."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._checks import check_int, check_real
from ..functional.loss import mimo_cross_entropy, rebalanced_weights
from ..mix_info import MixInfo

__all__ = ["MIMOLoss"]

AUTO = "auto"


class MIMOLoss(nn.Module):
    """``sum_k mean_b w_bk * CE(logits_bk, y_bk)`` with MixMo's weights ``w_k = M λ_k^(1/r) / sum_j λ_j^(1/r)``.

    By default the weights are the ones the model's preset trains with: a :class:`~mixshare_layers.MIMOWrapper`
    puts them in the :class:`~mixshare_layers.MixInfo` its training forward returns (``mix_info.loss_weights``, from
    the preset's ``rebalance_root``: r = 3 for MixMo, 1 for MixShare, none for MIMO), so ``MIMOLoss()(model(x), y)``
    and ``model.make_loss()(model(x), y)`` are the same loss. An explicit ``rebalance_root`` overrides the preset.

    Args:
        rebalance_root: ``"auto"`` (default): the weights the output carries; a ``MixInfo`` without them (drawn by a
            bare :class:`~mixshare_layers.CutMixMixer`) is refused rather than guessed. A number r: computed from
            the realised ratios (``1``: ``M λ_k``, MixShare; ``3``: MixMo's default). ``None``: every weight is 1.
            The weights of a sample always sum to M.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
        ignore_index: a label value to skip, e.g. ``-100``; each member's mean is then over its labelled samples
            (:func:`~mixshare_layers.functional.mimo_cross_entropy`). ``None`` (default): every target must be a
            class index, and ``-100`` is refused like any other out-of-range label.

    Shape:
        - ``output``: a :class:`~mixshare_layers.MIMOOutput` (its ``mix_info`` gives the weights) or logits
          ``(B, M, K)`` with ``info`` passed separately. Without any ``MixInfo`` (plain logits, e.g. in eval) every
          weight is 1: nothing was mixed.
        - ``targets``: ``(B, M)`` class indices, column ``i`` the label of input ``i``.
        - Output: a scalar (0 for an empty batch).

    Example:
        >>> import torch
        >>> from mixshare_layers import MIMOWrapper
        >>> from mixshare_layers.models import wide_resnet
        >>> model = MIMOWrapper(wide_resnet(10, 1, num_classes=10), num_subnetworks=2, preset="mixmo")
        >>> out, y = model(torch.randn(4, 2, 3, 32, 32)), torch.randint(10, (4, 2))
        >>> torch.equal(MIMOLoss()(out, y), MIMOLoss(rebalance_root=3.0)(out, y))  # MixMo's r = 3, from the output
        True
        >>> MIMOLoss()(torch.randn(4, 2, 10), y).shape  # plain logits: weights of 1
        torch.Size([])
    """

    def __init__(
        self,
        rebalance_root: float | str | None = AUTO,
        label_smoothing: float = 0.0,
        *,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.rebalance_root: float | str | None
        if isinstance(rebalance_root, str):
            if rebalance_root != AUTO:
                raise ValueError(f"rebalance_root must be 'auto', a number > 0 or None, but got {rebalance_root!r}")
            self.rebalance_root = AUTO
        elif rebalance_root is None:
            self.rebalance_root = None
        else:
            self.rebalance_root = check_real("rebalance_root", rebalance_root, low=0.0, low_inclusive=False)
        self.label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
        self.ignore_index = None if ignore_index is None else check_int("ignore_index", ignore_index)

    def extra_repr(self) -> str:
        root = repr(self.rebalance_root) if isinstance(self.rebalance_root, str) else self.rebalance_root
        text = f"rebalance_root={root}, label_smoothing={self.label_smoothing:g}"
        return text if self.ignore_index is None else f"{text}, ignore_index={self.ignore_index}"

    def weights(self, info: MixInfo) -> Tensor:
        """The ``(B, M)`` loss weights for a mix."""
        if not isinstance(self.rebalance_root, str):
            return rebalanced_weights(info.ratios, self.rebalance_root)
        if info.loss_weights is None:
            raise ValueError(
                "MIMOLoss(rebalance_root='auto') takes its weights from the MixInfo of a MIMOWrapper's training "
                "output, but this MixInfo carries none (drawn by a bare CutMixMixer or sample_mix_params?). Give the "
                "weighting: MIMOLoss(rebalance_root=3.0) (MixMo), 1.0 (MixShare) or None (equal weights)"
            )
        return info.loss_weights

    def forward(self, output: Any, targets: Tensor, info: MixInfo | None = None) -> Tensor:
        logits = getattr(output, "logits", output)
        if info is None:
            info = getattr(output, "mix_info", None)
        if not isinstance(logits, Tensor):
            raise TypeError(f"output must be a MIMOOutput or a (B, M, K) tensor, but got {type(output).__name__}")
        if info is not None and not isinstance(info, MixInfo):
            raise TypeError(f"info must be a MixInfo, but got {type(info).__name__}")
        weights = None
        if info is not None and self.rebalance_root is not None:
            weights = self.weights(info)
        return mimo_cross_entropy(
            logits, targets, weights, label_smoothing=self.label_smoothing, ignore_index=self.ignore_index
        )
