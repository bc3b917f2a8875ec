"""Inference folding: a trained MIMO network as one plain feed-forward module, ready for export.

At test time a MIMO network feeds the same image to its M encoders and sums the encodings, runs the core once, pools
globally (unmixing is the identity) and applies M heads to the same pooled vector. Both ends are linear, so they fold
exactly:

* the M convolutional encoders become one convolution whose kernel (and bias) is the sum of theirs
  (:meth:`MultiEncoder.folded_conv <mixshare_layers.MultiEncoder.folded_conv>`);
* the M heads become one ``nn.Linear(D, M * K)`` (:meth:`MultiHead.as_linear <mixshare_layers.MultiHead.as_linear>`),
  whose output is viewed as ``(B, M, K)``.

The folded module costs one backbone pass plus a classifier with ``M * K`` outputs, has no data-dependent control
flow, and exports with ``torch.export`` and to ONNX (see ``examples/export_onnx.py``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ._checks import check_ndim

__all__ = ["FoldedMIMO", "fold"]


class FoldedMIMO(nn.Module):
    """The eval-mode ensemble of a MIMO network in one pass: ``conv -> core -> global average pool -> linear``.

    Args:
        encoder: the folded encoder (a single convolution).
        core: the shared core, returning spatial feature maps ``(B, D, h, w)``.
        head: ``nn.Linear(D, M * K)`` with the heads stacked member-major (row ``i * K + k``).
        num_subnetworks: M.

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

    def __init__(self, encoder: nn.Module, core: nn.Module, head: nn.Linear, num_subnetworks: int) -> None:
        super().__init__()
        if head.out_features % num_subnetworks:
            raise ValueError(
                f"head.out_features={head.out_features} is not a multiple of num_subnetworks={num_subnetworks}"
            )
        self.encoder = encoder
        self.core = core
        self.head = head
        self.num_subnetworks = num_subnetworks
        self.num_classes = head.out_features // num_subnetworks

    def extra_repr(self) -> str:
        return f"num_subnetworks={self.num_subnetworks}, num_classes={self.num_classes}"

    def forward(self, x: Tensor) -> Tensor:
        check_ndim("x", x, 4, "(B, C, H, W)")
        features = self.core(self.encoder(x))  # (B, D, h, w)
        logits = self.head(features.mean(dim=(2, 3)))  # (B, M * K)
        return logits.unflatten(-1, (self.num_subnetworks, self.num_classes))  # (B, M, K)


@torch.no_grad()
def fold(model: nn.Module) -> FoldedMIMO:
    """Fold a :class:`~mixshare_layers.MIMOWrapper` into a :class:`FoldedMIMO` (also ``model.fold()``).

    The result is an independent copy (the model is not modified) in eval mode, on the model's device and dtype.
    Its output equals ``model.eval()(x)`` up to float rounding (the summed kernel is summed once instead of per call).

    Args:
        model: a ``MIMOWrapper`` whose encoders are zero-padded ``nn.Conv2d`` layers.

    Raises:
        TypeError: ``model`` is not a ``MIMOWrapper``, or its encoders are not linear (a generic encoder, e.g. a
            conv followed by a norm or an activation: the sum of M non-linear encoders is not one layer).
    """
    from .wrapper import MIMOWrapper

    if not isinstance(model, MIMOWrapper):
        raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
    encoder = model.encoder.folded_conv()  # raises TypeError for non-linear encoders
    head = model.heads.as_linear()
    core = copy.deepcopy(model.core)
    folded = FoldedMIMO(encoder, core, head, model.num_subnetworks)
    return folded.eval()
