"""Inference folding: a trained MIMO network as one plain feed-forward module, ready for export.

At test time a MIMO network feeds the same image to its M encoders and sums the encodings, runs the core once, pools
globally (unmixing is the identity) and applies M heads to the same pooled vector. Both ends fold:

* M convolutional (linear) encoders become one layer whose kernel (and bias) is the sum of theirs
  (:meth:`MultiEncoder.folded <mixshare_layers.MultiEncoder.folded>`, exact: the layer is linear in its weights);
  a non-linear first layer (a multi-branch stem block, a weight-standardised convolution) keeps its M copies, run on
  the image and summed;
* M linear heads become one ``nn.Linear(D, M * K)`` (:meth:`MultiHead.as_linear <mixshare_layers.MultiHead.as_linear>`),
  whose output is viewed as ``(B, M, K)``;
* M "norm + linear" heads (:func:`fold_heads`): a LayerNorm (or ``nn.RMSNorm``) over D then dropout / reshapes
  then a linear layer, as timm's ViT and ConvNeXt heads and torchvision's ConvNeXt classifier are in eval mode, become
  one LayerNorm without affine, shared by the members (they normalise the same vector), and one
  ``nn.Linear(D, M * K)`` holding each member's ``W_i diag(gamma_i)`` and ``W_i beta_i + b_i``; a BatchNorm1d with
  running statistics folds into the linear layer itself, and dropout / reshapes then a linear layer stack as linear
  heads. Each fold is checked in float64 against the heads before it is used;
* any other head (an MLP, an activation after the norm, members with different ``eps``, a head that reads the
  features itself) stays M modules applied to the same pooled vector.

The folded module runs one backbone pass, has no data-dependent control flow, and exports with ``torch.export``
and to ONNX (see ``examples/export_onnx.py``), whatever the layout of the features (maps or tokens).
"""

from .fold import FoldedMIMO, fold, fold_heads

__all__ = ["FoldedMIMO", "fold", "fold_heads"]
