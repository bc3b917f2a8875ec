"""Splitting a backbone into encoder / core / head, for any torchvision or timm classifier and your own.

A MIMO network needs three parts of a classification backbone (a :class:`BackboneSplit`):

* ``encoder``: the first layer that sees the image (a conv stem's first convolution, a transformer's
  patch-embedding projection), replicated M times;
* ``core``: everything after it, up to the final features before global pooling, shared; its output is laid out as
  channels-first maps ``(B, D, h, w)``, channels-last maps ``(B, h, w, D)`` or tokens ``(B, P + h w, D)``;
* ``head``: everything from the pooled vector to the logits (any module), replicated M times.

:func:`split_backbone` finds the split: a model's own ``mimo_split()``, then adapters you registered with
:func:`register_adapter`, then the built-in ones: every classification model of ``torchvision.models``
(:mod:`mixshare_layers.adapters.torchvision`), any model with timm's classification API
(:mod:`mixshare_layers.adapters.timm`). Each built-in split is checked against the backbone's own logits on a probe
batch (:func:`check_split`), so a wrapped backbone with ``pretrained=True`` starts as exactly the backbone.
Anything else: pass ``split=BackboneSplit(...)`` (or a function of the backbone returning one) to
:class:`~mixshare_layers.MIMOWrapper`.
"""

from .check import check_split, probe_images
from .registry import AdapterHandle, register_adapter, split_backbone
from .split import HEAD_POOLINGS, BackboneSplit, UnsupportedBackboneError
from .timm import split_timm
from .torchvision import split_torchvision

__all__ = [
    "HEAD_POOLINGS",
    "AdapterHandle",
    "BackboneSplit",
    "UnsupportedBackboneError",
    "check_split",
    "probe_images",
    "register_adapter",
    "split_backbone",
    "split_timm",
    "split_torchvision",
]
