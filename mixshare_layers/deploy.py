"""Inference folding: a trained MIMO network as one plain feed-forward module, ready for export.

At test time a MIMO network feeds the same image to its M encoders and sums the encodings, runs the core once, pools
globally (unmixing is the identity) and applies M heads to the same pooled vector. Both ends fold:

* M convolutional (linear) encoders become one layer whose kernel (and bias) is the sum of theirs
  (:meth:`MultiEncoder.folded <mixshare_layers.MultiEncoder.folded>`, exact: the layer is linear in its weights);
  a non-linear first layer (a multi-branch stem block, a weight-standardised convolution) keeps its M copies, run on
  the image and summed;
* M linear heads become one ``nn.Linear(D, M * K)`` (:meth:`MultiHead.as_linear <mixshare_layers.MultiHead.as_linear>`),
  whose output is viewed as ``(B, M, K)``; other heads (an MLP, a norm + linear, a timm head) stay M modules applied
  to the same pooled vector.

The folded module runs one backbone pass, has no data-dependent control flow, and exports with ``torch.export``
and to ONNX (see ``examples/export_onnx.py``), whatever the layout of the features (maps or tokens).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ._checks import check_ndim
from .adapters import BackboneSplit
from .multi_head import MultiHead

__all__ = ["FoldedMIMO", "fold"]


class FoldedMIMO(nn.Module):
    """The eval-mode ensemble of a MIMO network in one pass: ``encoder -> core -> pooling -> heads``.

    Args:
        encoder: the folded encoder (a single layer, or the M copies summed).
        core: the shared core.
        head: ``nn.Linear(D, M * K)`` with the heads stacked member-major (row ``i * K + k``), or a
            :class:`~mixshare_layers.MultiHead` of generic heads (output ``(B, M, K)``).
        num_subnetworks: M.
        layout: the core's output layout (``"channels_first"``, ``"channels_last"``, ``"tokens"``).
        num_prefix_tokens: prefix tokens in front of the patch grid (tokens).
        pooling: ``"avg"`` (grid average), ``"token"`` (first token) or ``"head"`` (the heads read the features).
        preprocess: the split's parameter-free image transform, if any.

    Shape:
        - Input: ``(B, C, H, W)``.
        - Output: logits ``(B, M, K)``: ``ensemble_probs(logits)`` gives the ensemble prediction.

    Example:
        >>> from mixshare_layers import MIMOWrapper
        >>> from mixshare_layers.models import wide_resnet
        >>> model = MIMOWrapper(wide_resnet(10, 1, num_classes=10), num_subnetworks=2).eval()
        >>> folded = fold(model)
        >>> x = torch.randn(3, 3, 32, 32)
        >>> torch.allclose(folded(x), model(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        encoder: nn.Module,
        core: nn.Module,
        head: nn.Module,
        num_subnetworks: int,
        *,
        layout: str = "channels_first",
        num_prefix_tokens: int = 0,
        pooling: str = "avg",
        preprocess: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if isinstance(head, nn.Linear):
            if head.out_features % num_subnetworks:
                raise ValueError(
                    f"head.out_features={head.out_features} is not a multiple of num_subnetworks={num_subnetworks}"
                )
            self.num_classes: int | None = head.out_features // num_subnetworks
        elif isinstance(head, MultiHead):
            self.num_classes = head.num_classes
        else:
            raise TypeError(f"head must be an nn.Linear or a MultiHead, but got {type(head).__name__}")
        self.encoder = encoder
        self.core = core
        self.head = head
        self.num_subnetworks = num_subnetworks
        self.preprocess = preprocess
        # validated like a split (the encoder and head fields are only placeholders here)
        self._split = BackboneSplit(
            nn.Identity(), nn.Identity(), nn.Identity(), layout=layout, num_prefix_tokens=num_prefix_tokens,
            pooling=pooling,
        ).validate()  # fmt: skip
        self.layout, self.num_prefix_tokens, self.pooling = layout, num_prefix_tokens, pooling

    def extra_repr(self) -> str:
        extra = "" if self.layout == "channels_first" else f", layout={self.layout!r}"
        extra += "" if self.pooling == "avg" else f", pooling={self.pooling!r}"
        return f"num_subnetworks={self.num_subnetworks}, num_classes={self.num_classes}{extra}"

    def forward(self, x: Tensor) -> Tensor:
        check_ndim("x", x, 4, "(B, C, H, W)")
        if self.preprocess is not None:
            x = self.preprocess(x)
        features = self.core(self.encoder(x))
        if self.layout == "channels_first" and self.pooling == "avg":
            pooled = features.mean(dim=(2, 3))
        else:
            pooled = self._split.pool(features)
        if isinstance(self.head, nn.Linear):
            logits = self.head(pooled)  # (B, M * K)
            return logits.unflatten(-1, (self.num_subnetworks, -1))  # (B, M, K)
        return self.head(pooled)


@torch.no_grad()
def fold(model: nn.Module) -> FoldedMIMO:
    """Fold a :class:`~mixshare_layers.MIMOWrapper` into a :class:`FoldedMIMO` (also ``model.fold()``).

    The result is an independent copy (the model is not modified) in eval mode, on the model's device and dtype.
    Its output equals ``model.eval()(x)`` up to float rounding (the summed kernel is summed once instead of per call).

    Args:
        model: a ``MIMOWrapper``.

    Raises:
        TypeError: ``model`` is not a ``MIMOWrapper``.
    """
    from .wrapper import MIMOWrapper

    if not isinstance(model, MIMOWrapper):
        raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
    encoder = model.encoder.folded()
    head: nn.Module = model.heads.as_linear() if model.heads.is_linear else copy.deepcopy(model.heads)
    folded = FoldedMIMO(
        encoder,
        copy.deepcopy(model.core),
        head,
        model.num_subnetworks,
        layout=model.layout,
        num_prefix_tokens=model.num_prefix_tokens,
        pooling=model.pooling,
        preprocess=copy.deepcopy(model.preprocess),
    )
    return folded.eval()
