"""Feature influence and sharing rates (paper, Sec. 2, Fig. 2, 3 and 5).

The paper measures how much the M subnetworks of a MIMO network use the same features through *influence
histograms*: for every feature f (a channel of the mixing space, or an input of the classifiers) and every
subnetwork i a non-negative number ``h_i(f)``:

* input block (:func:`encoder_influence`): ``h_i(c)`` = L1 norm of encoder i's kernel producing channel c (a conv
  stem's first convolution, a vision transformer's patch-embedding projection);
* output block (:func:`classifier_influence`): ``h_i(d)`` = L1 norm of column d of the weight matrix of head i's
  first layer (the classifier itself for a linear head; the first linear layer of an MLP head).

:func:`sharing_rate` turns an ``(M, F)`` influence table into one number in percent, and :func:`sharing_rates`
computes both quantities of a model at once.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_ndim

__all__ = [
    "SHARING_REDUCTIONS",
    "classifier_influence",
    "encoder_influence",
    "feature_sharing",
    "sharing_rate",
    "sharing_rates",
]

SHARING_REDUCTIONS = ("mean-ratio", "sum-ratio")
_M = TypeVar("_M", bound=nn.Module)


def _find(model: nn.Module, attr: str, kind: type[_M]) -> _M:
    part = getattr(model, attr, None)
    if not isinstance(part, kind):
        raise TypeError(
            f"model must be a MIMOWrapper (or have a .{attr} {kind.__name__}), but got {type(model).__name__}"
        )
    return part


@torch.no_grad()
def encoder_influence(model: nn.Module) -> Tensor:
    """L1 norm of each encoder's kernel for each output channel (the input block of Fig. 2 and 3a).

    Args:
        model: a :class:`~mixshare_layers.MIMOWrapper` or a :class:`~mixshare_layers.MultiEncoder` whose encoders are
            convolutions (fused, or generic copies such as reflect-padded or weight-standardised convolutions) or
            hold one (a multi-branch stem block: its first ``nn.Conv2d`` / ``nn.Linear`` is read).

    Returns:
        ``(M, C')`` float32 tensor: entry ``(i, c)`` is ``sum |w_i[c, ...]|`` over encoder i's kernel of output
        channel c (biases are not counted).

    Example:
        >>> from mixshare_layers import MultiEncoder
        >>> enc = MultiEncoder(nn.Conv2d(3, 16, 3, padding=1), 2, init="aligned")
        >>> h = encoder_influence(enc)
        >>> h.shape, bool((h[0] == h[1]).all())
        (torch.Size([2, 16]), True)
    """
    from ..layers.encoder import MultiEncoder
    from ..layers.head import first_layer

    encoder = model if isinstance(model, MultiEncoder) else _find(model, "encoder", MultiEncoder)
    if encoder.fused:
        kernels = encoder.kernels()  # (M, C', C/g, k, k)
    else:
        copies = list(encoder.encoders or ())
        layers = [first_layer(c) for c in copies]
        if not all(isinstance(layer, (nn.Conv2d, nn.Linear)) for layer in layers):
            kinds = sorted({type(c).__name__ for c in copies})
            raise TypeError(
                "encoder_influence needs encoders with an nn.Conv2d or nn.Linear (a kernel per output channel), but "
                f"the encoders are {', '.join(kinds)}"
            )
        kernels = torch.stack([layer.weight for layer in layers if layer is not None])
    return kernels.detach().abs().flatten(2).sum(dim=2).float()


@torch.no_grad()
def classifier_influence(model: nn.Module) -> Tensor:
    """L1 norm of each head's weight column for each feature (the output block of Fig. 2 and 3b).

    Args:
        model: a :class:`~mixshare_layers.MIMOWrapper` or a :class:`~mixshare_layers.MultiHead`. For a head that is
            more than a linear layer (a norm + linear, an MLP) the first ``nn.Linear`` / ``nn.Conv2d`` of each head is
            read: the layer whose columns take the pooled features
            (:meth:`~mixshare_layers.MultiHead.first_layer_weights`).

    Returns:
        ``(M, D)`` float32 tensor: entry ``(i, d)`` is ``sum_k |W_i[k, d]|`` (biases are not counted).

    Example:
        >>> from mixshare_layers import MultiHead
        >>> classifier_influence(MultiHead(64, 10, 3)).shape
        torch.Size([3, 64])
    """
    from ..layers.head import MultiHead

    heads = model if isinstance(model, MultiHead) else _find(model, "heads", MultiHead)
    return heads.first_layer_weights().detach().abs().sum(dim=1).float()


def _check_influence(influence: object) -> Tensor:
    h = check_ndim("influence", influence, 2, "(M, F)")
    if h.shape[0] < 2:
        raise ValueError(
            f"influence must describe at least 2 subnetworks (shape (M, F) with M >= 2), but got shape {tuple(h.shape)}"
        )
    if h.shape[1] < 1:
        raise ValueError(f"influence must describe at least 1 feature, but got shape {tuple(h.shape)}")
    if h.is_floating_point() and not bool(torch.isfinite(h).all()):
        raise ValueError("influence must be finite, but it contains NaN or infinite values")
    return h


def feature_sharing(influence: Tensor) -> Tensor:
    """Per-feature sharing ``min_i h_i(f) / max_i h_i(f)`` in [0, 1], ``(F,)`` float64.

    Features used by no subnetwork (``max_i h_i(f) = 0``) get NaN: they are neither shared nor private.

    Args:
        influence: ``(M, F)`` non-negative influence of F features on M >= 2 subnetworks (absolute values are taken).

    Example:
        >>> feature_sharing(torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))
        tensor([0.5000, 1.0000,    nan], dtype=torch.float64)
    """
    h = _check_influence(influence).double().abs()
    low, high = h.min(dim=0).values, h.max(dim=0).values
    return torch.where(high > 0, low / torch.where(high > 0, high, 1.0), float("nan"))


def sharing_rate(influence: Tensor, reduction: str = "mean-ratio") -> Tensor:
    """How much the M subnetworks share features, in percent (0-dim float64 tensor).

    The paper (Sec. 2) approximates the sharing rate of two subnetworks by "the ratio of min(h0, h1) / max(h0, h1)"
    of their influence histograms, without saying how features are aggregated. Both natural readings are offered,
    for any M >= 2 (``min`` and ``max`` over the M subnetworks):

    * ``"mean-ratio"`` (default): ``100 * mean_f [min_i h_i(f) / max_i h_i(f)]``, the per-feature ratio averaged
      over the features; features with ``max_i h_i(f) = 0`` (used by nobody) are left out of the mean.
    * ``"sum-ratio"``: ``100 * sum_f min_i h_i(f) / sum_f max_i h_i(f)``, the area of the histograms' overlap (the
      orange bars of the paper's figures) over the area of their union (a weighted Jaccard index). It is the mean of
      the per-feature ratios weighted by ``max_i h_i(f)``, so weakly used features count little.

    Both are 100 for identical histograms, 0 when every feature is used by one subnetwork only, and equal whenever
    all features have the same ratio; they are invariant to scaling all influences. They differ when the ratio
    correlates with the strength of a feature: "mean-ratio" gives a weak or dead feature (whose small L1 norms are
    often similar in every subnetwork) as much weight as a strong one. Which one the paper used cannot be told from
    its numbers: MixMo's ~5 % and the unmixed models' ~99 % are both extremes where the two coincide (every feature
    private, resp. every feature shared to the same degree). The paper's wording (a ratio of the *histograms*) and
    its figures (overlap area in orange) read most literally as "sum-ratio"; "mean-ratio" is the per-feature reading
    that the issue text and this library's tables use by default; ``docs/reproducing.md`` reports both.

    Args:
        influence: ``(M, F)``, the influence of each of F features on each of M >= 2 subnetworks (absolute values
            are taken).
        reduction: ``"mean-ratio"`` or ``"sum-ratio"`` (see above).

    Returns:
        0-dim float64 tensor in [0, 100] (0 when no feature is used by any subnetwork).

    Example:
        >>> h = torch.tensor([[4.0, 1.0, 0.0], [1.0, 1.0, 3.0]])
        >>> round(float(sharing_rate(h)), 2), round(float(sharing_rate(h, "sum-ratio")), 2)
        (41.67, 25.0)
    """
    h = _check_influence(influence)
    check_choice("reduction", reduction, SHARING_REDUCTIONS)
    h = h.double().abs()
    low = h.min(dim=0).values
    high = h.max(dim=0).values
    if reduction == "sum-ratio":
        return 100.0 * low.sum() / high.sum().clamp_min(torch.finfo(torch.float64).tiny)
    used = high > 0
    ratios = torch.where(used, low / torch.where(used, high, 1.0), 0.0)
    return 100.0 * ratios.sum() / used.sum().clamp_min(1)


def sharing_rates(model: nn.Module) -> dict[str, float]:
    """Encoder and classifier sharing rates of a MIMO model, both reductions, in percent.

    Args:
        model: a :class:`~mixshare_layers.MIMOWrapper` with M >= 2 (the encoder entries are left out when its
            encoders are not convolutions).

    Returns:
        ``{"classifier": ..., "classifier_sum_ratio": ..., "encoder": ..., "encoder_sum_ratio": ...}``, where the
        unsuffixed entries use the default ``"mean-ratio"`` reduction (``"classifier"`` is Table 1's column).

    Example:
        >>> from mixshare_layers import MIMOWrapper
        >>> from mixshare_layers.models import wide_resnet
        >>> rates = sharing_rates(MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixshare"))
        >>> rates["encoder"]
        100.0
    """
    out: dict[str, float] = {}
    clf = classifier_influence(model)
    out["classifier"] = float(sharing_rate(clf, "mean-ratio"))
    out["classifier_sum_ratio"] = float(sharing_rate(clf, "sum-ratio"))
    try:
        enc = encoder_influence(model)
    except TypeError:
        return out
    out["encoder"] = float(sharing_rate(enc, "mean-ratio"))
    out["encoder_sum_ratio"] = float(sharing_rate(enc, "sum-ratio"))
    return out
