"""``BackboneSplit``: the contract between a backbone and the MIMO wrapper."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch  # noqa: F401 - the doctests run in this module's namespace
from torch import Tensor, nn

from .._checks import check_choice, check_floating, check_int
from ..functional.layout import head_input
from ..vocabulary import ENCODING_LAYOUTS, FEATURE_LAYOUTS, HEAD_POOLINGS, FeatureLayout, HeadPooling

__all__ = ["HEAD_POOLINGS", "BackboneSplit", "UnsupportedBackboneError", "check_core_features", "check_feature_format"]

_CORE_OUTPUTS = {  # what a core must return, in words, for the error message
    "channels_first": "spatial feature maps (B, D, h, w)",
    "channels_last": "channels-last feature maps (B, h, w, D)",
    "tokens": "tokens (B, P + h w, D)",
}


class UnsupportedBackboneError(TypeError):
    """Raised when a backbone cannot be split automatically; the message gives the reason and a way out.

    Example:
        >>> from mixshare_layers.adapters import split_backbone
        >>> try:
        ...     split_backbone(nn.Sequential(nn.Linear(4, 4)))
        ... except UnsupportedBackboneError as err:
        ...     print(str(err)[:45])
        no adapter knows how to split a Sequential. G
    """


class BackboneSplit(NamedTuple):
    """The parts of a classification backbone, and how its features are laid out and pooled.

    The backbone computes ``head(pool(core(encoder(preprocess(image)))))``:

    Attributes:
        encoder: the first layer that sees the image, ``(B, C, H, W) -> `` an encoding in ``encoding_layout``
            (a conv stem's first convolution, a transformer's patch-embedding projection). It is replicated M
            times; an ``nn.Conv2d`` gets the fused :class:`~mixshare_layers.MultiEncoder`.
        core: everything after it, up to the final features before global pooling, in ``layout``: for a vision
            transformer it adds the prefix tokens and positional embeddings itself, to the (mixed) patch grid.
        classifier: the head: everything from the pooled vector ``(B, D)`` to the logits ``(B, K)`` (any module: a
            norm, dropout, an MLP, an ``nn.Linear``); with ``pooling="head"`` it reads the features themselves.
            It is replicated M times (:class:`~mixshare_layers.MultiHead`). :attr:`head` is the same module.
        reinit: optional initialiser, called on copies of the encoder (``encoder_init="independent"``) and of the
            head (the M heads, unless ``pretrained``), one independent draw per copy; ``None``: their
            ``reset_parameters()`` (PyTorch's default initialisation). Give the backbone's own scheme here: how the
            heads start matters for MixMo (docs/reproducing.md, "Differential runs").
        layout: the core's output (:data:`~mixshare_layers.vocabulary.FeatureLayout`): ``"channels_first"``
            ``(B, D, h, w)``, ``"channels_last"`` ``(B, h, w, D)`` or ``"tokens"`` ``(B, P + h w, D)``
            (:mod:`mixshare_layers.functional.layout`).
        num_prefix_tokens: ``P``: class / register / distillation tokens in front of the patch grid (tokens only).
        pooling: how the head reads the features (:data:`~mixshare_layers.vocabulary.HeadPooling`; not the
            unmixing reduction): ``"avg"``, the global average of the grid (prefix tokens left out), which unmixing
            generalises to a per-member masked average; ``"token"``, the first prefix token (a class token: no
            spatial map, so no unmixing); ``"head"``, the head takes the features as they are and pools them itself
            (attention pooling, a flattening MLP, a 1x1-conv classifier applied before the pooling): no unmixing
            either.
        encoding_layout: the encoder's output (:data:`~mixshare_layers.vocabulary.EncodingLayout`):
            ``"channels_first"`` ``(B, C', H', W')`` (convolutions) or ``"channels_last"`` ``(B, H', W', C')``.
            The inputs are mixed there, on the ``H' x W'`` grid.
        preprocess: an optional parameter-free module applied to every image before the encoder (torchvision's
            Inception ``transform_input``), shared by the members.

    Example:
        >>> from torch import nn
        >>> stem, body, fc = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Linear(8, 10)
        >>> split = BackboneSplit(encoder=stem, core=body, classifier=fc)
        >>> split.head is fc, split.layout, split.pooling
        (True, 'channels_first', 'avg')
        >>> split.logits(torch.randn(2, 3, 8, 8)).shape  # the backbone's function, through its parts
        torch.Size([2, 10])
    """

    encoder: nn.Module
    core: nn.Module
    classifier: nn.Module
    reinit: Callable[[nn.Module], None] | None = None
    layout: str = "channels_first"
    num_prefix_tokens: int = 0
    pooling: str = "avg"
    encoding_layout: str = "channels_first"
    preprocess: nn.Module | None = None

    @property
    def head(self) -> nn.Module:
        """The head module (the ``classifier`` field)."""
        return self.classifier

    @property
    def head_input_ndim(self) -> int:
        """Dims of one sample of the head's input: 1 for a pooled vector, the features' otherwise."""
        if self.pooling != "head":
            return 1
        return 2 if self.layout == "tokens" else 3

    def validate(self) -> BackboneSplit:
        """Check the fields (types, choices, their consistency); returns the split.

        Raises:
            TypeError: a part is not an ``nn.Module`` (or ``reinit`` not callable).
            ValueError: an unknown layout or pooling, or a combination that cannot work.
        """
        for name in ("encoder", "core", "classifier"):
            part = getattr(self, name)
            if not isinstance(part, nn.Module):
                raise TypeError(f"split.{name} must be an nn.Module, but got {type(part).__name__}")
        if self.reinit is not None and not callable(self.reinit):
            raise TypeError(f"split.reinit must be callable or None, but got {type(self.reinit).__name__}")
        if self.preprocess is not None and not isinstance(self.preprocess, nn.Module):
            raise TypeError(f"split.preprocess must be an nn.Module or None, but got {type(self.preprocess).__name__}")
        if self.preprocess is not None and any(True for _ in self.preprocess.parameters()):
            raise ValueError(
                "split.preprocess must be parameter-free (it is shared by the members, before their encoders); put "
                "learnable layers in the encoder"
            )
        check_feature_format(self.layout, self.num_prefix_tokens, self.pooling, prefix="split.")
        check_choice("split.encoding_layout", self.encoding_layout, ENCODING_LAYOUTS)
        return self

    def pool(self, features: Tensor) -> Tensor:
        """The head's input from the core's features, as the backbone computes it (eval; no unmixing).

        ``"avg"``: the grid average ``(B, D)``; ``"token"``: the first token ``(B, D)``; ``"head"``: the features
        (:func:`~mixshare_layers.functional.layout.head_input`).
        """
        return head_input(features, self.layout, self.pooling, num_prefix_tokens=self.num_prefix_tokens)

    def features(self, images: Tensor) -> Tensor:
        """The core's features of a batch of images ``(B, C, H, W)`` (one encoder, no mixing)."""
        x = images if self.preprocess is None else self.preprocess(images)
        return self.core(self.encoder(x))

    def logits(self, images: Tensor) -> Tensor:
        """The backbone's logits through its parts: ``head(pool(core(encoder(preprocess(images)))))``."""
        return self.classifier(self.pool(self.features(images)))


def check_feature_format(
    layout: object, num_prefix_tokens: object, pooling: object, *, prefix: str = ""
) -> tuple[FeatureLayout, int, HeadPooling]:
    """Check how features are laid out and read (each word, and that they fit together); returns them.

    Args:
        layout: one of :data:`~mixshare_layers.vocabulary.FEATURE_LAYOUTS`.
        num_prefix_tokens: ``P >= 0``; more than 0 only for ``"tokens"``.
        pooling: one of :data:`~mixshare_layers.vocabulary.HEAD_POOLINGS`; ``"token"`` needs tokens and ``P >= 1``.
        prefix: put before the names in messages (``"split."`` for a :class:`BackboneSplit`'s fields).

    Example:
        >>> check_feature_format("tokens", 1, "token")
        ('tokens', 1, 'token')
    """
    lay = check_choice(f"{prefix}layout", layout, FEATURE_LAYOUTS)
    pool = check_choice(f"{prefix}pooling", pooling, HEAD_POOLINGS)
    p = check_int(f"{prefix}num_prefix_tokens", num_prefix_tokens, minimum=0)
    if p and lay != "tokens":
        raise ValueError(f"{prefix}num_prefix_tokens={p} is for layout='tokens', but {prefix}layout={lay!r}")
    if pool == "token" and (lay != "tokens" or p < 1):
        raise ValueError(
            f"{prefix}pooling='token' reads the first prefix token: it needs layout='tokens' and num_prefix_tokens "
            f">= 1, but got layout={lay!r}, num_prefix_tokens={p}"
        )
    return lay, p, pool


def check_core_features(features: object, layout: str, num_prefix_tokens: int, batch_size: int) -> Tensor:
    """Check what a core returned for a batch of ``batch_size``: floating features in ``layout`` (a token sequence
    with at least one patch token after its ``num_prefix_tokens``); returns them.

    This is where a wrapped (or folded) network checks its features, once: what reads them afterwards (unmixing,
    the pooling of the heads' input) takes them as they are. ``layout`` and ``num_prefix_tokens`` are trusted
    (checked when the network was built, :func:`check_feature_format`).

    Raises:
        ValueError: not a tensor, or not of the layout's rank, batch size or number of tokens.
        TypeError: an integer tensor.

    Example:
        >>> check_core_features(torch.zeros(2, 1 + 4, 8), "tokens", 1, 2).shape
        torch.Size([2, 5, 8])
    """
    rank = 3 if layout == "tokens" else 4
    if (
        not isinstance(features, Tensor)
        or features.dim() != rank
        or features.shape[0] != batch_size
        or (layout == "tokens" and features.shape[1] <= num_prefix_tokens)
    ):
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        tokens = f" with P = {num_prefix_tokens} and h w >= 1" if layout == "tokens" else ""
        raise ValueError(
            f"the core must return {_CORE_OUTPUTS[layout]}{tokens} (before global pooling) for the batch of "
            f"{batch_size}, but returned {shape}"
        )
    return check_floating("features", features)


def _describe(module: nn.Module) -> str:
    return type(module).__name__


def no_unmixing_reason(split: BackboneSplit, backbone_name: str) -> str | None:
    """Why the features of ``split`` cannot be unmixed (``None`` when they can: ``pooling="avg"``)."""
    if split.pooling == "avg":
        return None
    if split.pooling == "token":
        return (
            f"{backbone_name} pools its features with its class token: the head reads one token, which attends to "
            "every patch, so there is no spatial map to filter through the members' masks"
        )
    return (
        f"{backbone_name}'s head ({_describe(split.classifier)}) reads the features itself (attention pooling, "
        "several feature maps, a flattened map, or a classifier applied before the pooling), so there is no "
        "average-pooled vector to replace by the members' masked averages"
    )
