"""Folding: a trained ``MIMOWrapper`` as one plain module (:func:`fold`), M heads as one layer (:func:`fold_heads`)."""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_ndim
from ..adapters.split import check_core_features, check_feature_format
from ..functional.ensemble import ENSEMBLE_RULES, ensemble_probs
from ..functional.layout import _head_input
from ..functional.temperature import tempered_probs
from ..layers.encoder import MultiEncoder
from ..layers.head import MultiHead
from . import heads as head_patterns

__all__ = ["FoldedMIMO", "fold", "fold_heads"]


def _stacked_linear(head: nn.Module) -> nn.Linear | None:
    """The linear layer of a stacked head: ``nn.Linear`` or ``nn.Sequential(nn.LayerNorm | nn.RMSNorm, nn.Linear)``."""
    if isinstance(head, nn.Linear):
        return head
    if not (isinstance(head, nn.Sequential) and len(head) == 2 and isinstance(head[1], nn.Linear)):
        return None
    norm, linear = head[0], head[1]
    if not isinstance(norm, (nn.LayerNorm, nn.RMSNorm)) or tuple(norm.normalized_shape) != (linear.in_features,):
        return None
    return linear


class FoldedMIMO(nn.Module):
    """The eval-mode ensemble of a MIMO network in one pass: ``encoder -> core -> pooling -> heads``.

    Args:
        encoder: the folded encoder (a single layer, or the M copies summed).
        core: the shared core.
        head: the stacked heads: ``nn.Linear(D, M * K)`` with the heads stacked member-major (row ``i * K + k``),
            or ``nn.Sequential(norm, nn.Linear(D, M * K))`` with ``norm`` an ``nn.LayerNorm`` / ``nn.RMSNorm`` over
            D (shared by the members, see :func:`fold_heads`); or a :class:`~mixshare_layers.MultiHead` of generic
            heads (output ``(B, M, K)``).
        num_subnetworks: M.
        layout: the core's output layout (:data:`~mixshare_layers.vocabulary.FeatureLayout`).
        num_prefix_tokens: prefix tokens in front of the patch grid (tokens).
        pooling: how the heads read the features (:data:`~mixshare_layers.vocabulary.HeadPooling`): ``"avg"`` (grid
            average), ``"token"`` (first token) or ``"head"`` (the heads read the features).
        preprocess: the split's parameter-free image transform, if any.
        temperature: the temperature of each ensemble rule, ``(2,)`` in ``ENSEMBLE_RULES`` order (a buffer, used by
            :meth:`predict`); default ones.

    Attributes:
        stacked: whether ``head`` is a stacked form (its ``(B, M * K)`` output viewed as ``(B, M, K)``) rather than
            a ``MultiHead``.

    Shape:
        - Input: ``(B, C, H, W)``.
        - Output: logits ``(B, M, K)``: :meth:`predict` (or ``ensemble_probs(logits)``, uncalibrated) gives the
          ensemble prediction.

    Example:
        >>> from mixshare_layers import MIMOWrapper
        >>> from mixshare_layers.models import wide_resnet
        >>> model = MIMOWrapper(wide_resnet(10, 1, num_classes=10), num_subnetworks=2).eval()
        >>> folded = fold(model)
        >>> x = torch.randn(3, 3, 32, 32)
        >>> torch.allclose(folded(x), model(x), atol=1e-5)
        True
    """

    temperature: Tensor

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
        temperature: Tensor | None = None,
    ) -> None:
        super().__init__()
        linear = None if isinstance(head, MultiHead) else _stacked_linear(head)
        if linear is not None:
            if linear.out_features % num_subnetworks:
                raise ValueError(
                    f"the head's out_features={linear.out_features} is not a multiple of "
                    f"num_subnetworks={num_subnetworks}"
                )
            self.num_classes: int | None = linear.out_features // num_subnetworks
        elif isinstance(head, MultiHead):
            self.num_classes = head.num_classes
        else:
            raise TypeError(
                "head must be an nn.Linear, an nn.Sequential(nn.LayerNorm or nn.RMSNorm over D, nn.Linear(D, M * K)) "
                f"or a MultiHead, but got {type(head).__name__}"
            )
        self.stacked = linear is not None
        self.encoder = encoder
        self.core = core
        self.head = head
        self.num_subnetworks = num_subnetworks
        self.preprocess = preprocess
        self.layout, self.num_prefix_tokens, self.pooling = check_feature_format(layout, num_prefix_tokens, pooling)
        if temperature is None:
            temperature = torch.ones(len(ENSEMBLE_RULES), device=next((p.device for p in head.parameters()), None))
        elif not isinstance(temperature, Tensor) or temperature.shape != (len(ENSEMBLE_RULES),):
            got = tuple(temperature.shape) if isinstance(temperature, Tensor) else type(temperature).__name__
            raise ValueError(f"temperature must be a tensor of shape ({len(ENSEMBLE_RULES)},), but got {got}")
        self.register_buffer("temperature", temperature.detach().clone())

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        state_dict.setdefault(prefix + "temperature", torch.ones_like(self.temperature))  # saved uncalibrated
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        extra = "" if self.layout == "channels_first" else f", layout={self.layout!r}"
        extra += "" if self.pooling == "avg" else f", pooling={self.pooling!r}"
        return f"num_subnetworks={self.num_subnetworks}, num_classes={self.num_classes}{extra}"

    def forward(self, x: Tensor) -> Tensor:
        check_ndim("x", x, 4, "(B, C, H, W)")
        if self.preprocess is not None:
            x = self.preprocess(x)
        features = self.core(self.encoder(x))
        if self.pooling != "head":  # checked once here; the heads read features of any form with "head"
            features = check_core_features(features, self.layout, self.num_prefix_tokens, x.shape[0])
        pooled = _head_input(features, self.layout, self.pooling, self.num_prefix_tokens)
        if self.stacked:
            logits = self.head(pooled)  # (B, M * K)
            return logits.unflatten(-1, (self.num_subnetworks, -1))  # (B, M, K)
        return self.head(pooled)

    def predict(self, x: Tensor, rule: str = "prob", *, calibrated: bool = True) -> Tensor:
        """Ensemble probabilities ``(B, K)``, as ``MIMOWrapper.predict``: at the rule's temperature (the wrapper's
        ``calibrate``; ``softmax(log p_ens / T)``, read on the device only), or raw with ``calibrated=False``. Like
        ``forward`` it sets no grad mode of its own, so a module whose ``forward`` calls it exports as it is.

        Example:
            >>> from mixshare_layers import MIMOWrapper
            >>> from mixshare_layers.models import wide_resnet
            >>> model = MIMOWrapper(wide_resnet(10, 1, num_classes=10), num_subnetworks=2).eval()
            >>> x = torch.randn(3, 3, 32, 32)
            >>> torch.allclose(model.fold().predict(x, "logit"), model.predict(x, "logit"), atol=1e-5)
            True
        """
        check_choice("rule", rule, ENSEMBLE_RULES)
        logits = self(x)
        if not check_bool("calibrated", calibrated):
            return ensemble_probs(logits, rule)
        return tempered_probs(logits, rule, self.temperature[ENSEMBLE_RULES.index(cast(Any, rule))])


@torch.no_grad()
def fold(model: nn.Module) -> FoldedMIMO:
    """Fold a :class:`~mixshare_layers.MIMOWrapper` into a :class:`FoldedMIMO` (also ``model.fold()``).

    The result is an independent copy (the model is not modified) in eval mode, on the model's device and dtype.
    It keeps the model's temperatures (``MIMOWrapper.calibrate``) for its :meth:`~FoldedMIMO.predict`.
    Its output equals ``model.eval()(x)`` up to float rounding (the summed kernel is summed once instead of per call,
    the norm + linear heads' affine is folded into one linear layer, see :func:`fold_heads`).

    Args:
        model: a ``MIMOWrapper``.

    Raises:
        TypeError: ``model`` is not a ``MIMOWrapper``.
    """
    # a MIMOWrapper, recognised by its parts (this module is below the wrapper: it must not import it)
    encoders, heads = getattr(model, "encoder", None), getattr(model, "heads", None)
    if not (isinstance(encoders, MultiEncoder) and isinstance(heads, MultiHead)):
        raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
    wrapper: Any = model  # its other attributes, read by name
    # linear heads and norm + linear heads fold into one (norm and) linear layer; other heads stay as they are
    stacked = fold_heads(heads) if heads.is_linear or wrapper.pooling != "head" else None
    head: nn.Module = copy.deepcopy(heads) if stacked is None else stacked
    folded = FoldedMIMO(
        encoders.folded(),
        copy.deepcopy(wrapper.core),
        head,
        wrapper.num_subnetworks,
        layout=wrapper.layout,
        num_prefix_tokens=wrapper.num_prefix_tokens,
        pooling=wrapper.pooling,
        preprocess=copy.deepcopy(wrapper.preprocess),
        temperature=getattr(wrapper, "temperature", None),
    )
    return folded.eval()


@torch.no_grad()
def fold_heads(heads: nn.Module) -> nn.Module | None:
    """M heads reading one shared pooled vector as one stacked module, or ``None`` if they do not fold.

    Linear heads are :meth:`MultiHead.as_linear <mixshare_layers.MultiHead.as_linear>`. Generic ones (M modules)
    are recognised and folded as follows.

    A head folds when, in eval mode, it is ``[norm ->] Linear(D, K)`` on a pooled vector of size D, up to dropouts
    and reshapes (a view to ``(B, D, 1, 1)`` and a flatten back), with ``norm`` an affine LayerNorm over D
    (``nn.LayerNorm`` or a subclass: timm's ``LayerNorm`` / ``LayerNorm2d``, torchvision's ``LayerNorm2d``), an
    ``nn.RMSNorm`` over D or an ``nn.BatchNorm1d`` with running statistics, the same ``eps`` in every member. The
    head is traced with ``torch.fx`` (an MLP, an activation, arithmetic, a parameter read by the head's own code, a
    data-dependent branch: not recognised), then the stacked module is built in float64 and compared with the heads in
    float64 on random vectors: it is returned only if it agrees to ``1e-10`` relative.

    Args:
        heads: a :class:`~mixshare_layers.MultiHead`.

    Returns:
        In eval mode, on the heads' device and dtype, rows member-major (``i * K + k``): ``nn.Linear(D, M * K)`` for
        linear heads;
        ``nn.Sequential(norm, nn.Linear(D, M * K))`` for LayerNorm / RMSNorm heads, with ``norm`` the same
        normalisation without affine (one for all members) and member ``i``'s rows ``W_i diag(gamma_i)``, bias
        ``W_i beta_i + b_i``; ``nn.Linear(D, M * K)`` for BatchNorm1d heads (``W_i diag(s_i)``, ``W_i t_i + b_i``
        with the BatchNorm's eval-mode ``x * s_i + t_i``) and heads without norm; ``None`` for any other heads (and
        for heads that read features rather than pooled vectors, ``input_ndim > 1``).

    Raises:
        TypeError: ``heads`` is not a ``MultiHead``.

    Example:
        >>> head = nn.Sequential(nn.LayerNorm(16), nn.Dropout(0.1), nn.Linear(16, 5))
        >>> fold_heads(MultiHead.from_module(head, 3))
        Sequential(
          (0): LayerNorm((16,), eps=1e-05, elementwise_affine=False, bias=False)
          (1): Linear(in_features=16, out_features=15, bias=True)
        )
        >>> fold_heads(MultiHead.from_module(nn.Sequential(nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5)), 3)) is None
        True
    """
    if not isinstance(heads, MultiHead):
        raise TypeError(f"heads must be a MultiHead, but got {type(heads).__name__}")
    if heads.members is None:
        return heads.as_linear()
    if heads.input_ndim != 1:
        return None
    tensors = head_patterns.tensors(heads.members)
    if not tensors or len({(t.device, t.dtype) for t in tensors}) != 1:
        return None  # a mix of devices / dtypes: which one would the folded module take?
    device, dtype = tensors[0].device, tensors[0].dtype
    reference = copy.deepcopy(heads).to(device="cpu", dtype=torch.float64).eval()
    assert reference.members is not None
    patterns = [head_patterns.match(member) for member in reference.members]
    if any(p is None for p in patterns):
        return None
    matched = [p for p in patterns if p is not None]
    folded = head_patterns.stacked(matched)
    if folded is None:
        return None
    d, k = matched[0].linear.in_features, matched[0].linear.out_features
    if not head_patterns.agrees(folded.eval(), reference, d, k, heads.num_subnetworks):
        return None
    return folded.to(device=device, dtype=dtype).eval()
