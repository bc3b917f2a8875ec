"""Feature layouts: channels-first maps, channels-last maps and token sequences, seen as ``(B, C, h, w)`` views.

A backbone's features come in one of three layouts:

* ``"channels_first"``: maps ``(B, C, h, w)`` (torchvision and most timm CNNs);
* ``"channels_last"``: maps ``(B, h, w, C)`` (timm Swin stages, torchvision Swin's last stage);
* ``"tokens"``: sequences ``(B, P + h w, C)``: ``P`` prefix tokens (class / register / distillation tokens) followed
  by the ``h x w`` patch grid, row-major.

Every masked op of the library works on ``(B, C, h, w)`` maps of any strides, so a layout is only a way of viewing a
tensor: :func:`as_maps` returns the grid as a ``(B, C, h, w)`` *view* (a permutation of the strides, never a copy),
:func:`grid_mean` the global average of the grid (prefix tokens left out), and :func:`head_input` what a backbone's
head reads (:data:`~mixshare_layers.vocabulary.HeadPooling`). The patch grid of a token sequence has no shape of its
own; :func:`token_grid` recovers it from the number of patches and the aspect ratio of the grid the mix was drawn on
(the encoder's output).

The public functions check their arguments; the layers, which have checked the features once on entry, call the
unchecked forms (``_as_maps``, ``_grid_mean``, ``_head_input``).
"""

from __future__ import annotations

import math

from torch import Tensor

from .._checks import check_choice, check_int, check_ndim
from ..vocabulary import ENCODING_LAYOUTS, FEATURE_LAYOUTS, HEAD_POOLINGS

__all__ = ["FEATURE_LAYOUTS", "as_maps", "check_features", "from_maps", "grid_mean", "head_input", "token_grid"]

_SHAPES = {"channels_first": "(B, C, h, w)", "channels_last": "(B, h, w, C)", "tokens": "(B, N, C)"}


def check_features(name: str, features: object, layout: str) -> Tensor:
    """Check that ``features`` is a tensor with the number of dims of ``layout``; returns it.

    Raises:
        ValueError: an unknown layout, or a tensor of another rank (the message names ``name`` and the shape).
        TypeError: ``features`` is not a tensor.

    Example:
        >>> import torch
        >>> check_features("features", torch.zeros(2, 5, 8), "tokens").shape
        torch.Size([2, 5, 8])
    """
    check_choice("layout", layout, FEATURE_LAYOUTS)
    return check_ndim(name, features, 3 if layout == "tokens" else 4, _SHAPES[layout])


def token_grid(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """The ``(h, w)`` patch grid of ``num_patches`` tokens whose grid has the aspect ratio of ``height x width``.

    The patch grid is the mix grid itself (a ViT: one token per cell of the patch embedding), or a uniformly
    downsampled copy of it (a pooling transformer such as PiT): ``h / w = height / width`` and ``h w = num_patches``.

    Args:
        num_patches: number of patch tokens (prefix tokens excluded).
        height: height of the grid the mix was drawn on.
        width: its width.

    Raises:
        ValueError: no integer grid with that aspect ratio holds ``num_patches`` tokens.

    Example:
        >>> token_grid(196, 14, 14), token_grid(49, 14, 14), token_grid(8, 4, 8)
        ((14, 14), (7, 7), (2, 4))
    """
    num_patches = check_int("num_patches", num_patches, minimum=1)
    if num_patches == height * width:
        return height, width
    h = round(math.sqrt(num_patches * height / width))
    if h < 1 or num_patches % h or h * width != (num_patches // h) * height:
        raise ValueError(
            f"cannot lay {num_patches} patch tokens on a grid with the aspect ratio of the {height}x{width} mix grid; "
            "the tokens after the prefix must be a row-major patch grid (check num_prefix_tokens)"
        )
    return h, num_patches // h


def as_maps(
    features: Tensor, layout: str, *, num_prefix_tokens: int = 0, grid: tuple[int, int] | None = None
) -> Tensor:
    """The grid of ``features`` as a ``(B, C, h, w)`` view (no copy), prefix tokens left out.

    Args:
        features: ``(B, C, h, w)``, ``(B, h, w, C)`` or ``(B, P + h w, C)``, as ``layout`` says.
        layout: one of :data:`~mixshare_layers.vocabulary.FEATURE_LAYOUTS`.
        num_prefix_tokens: ``P`` (tokens only).
        grid: ``(h, w)`` of the patch grid (tokens only; see :func:`token_grid`).

    Shape:
        - Output: ``(B, C, h, w)``, sharing ``features``' storage (strides permuted).

    Example:
        >>> import torch
        >>> tokens = torch.randn(2, 1 + 6, 5)  # a class token and a 2x3 patch grid of 5 channels
        >>> maps = as_maps(tokens, "tokens", num_prefix_tokens=1, grid=(2, 3))
        >>> maps.shape, maps.data_ptr() == tokens[:, 1:].data_ptr()
        (torch.Size([2, 5, 2, 3]), True)
        >>> bool((maps[:, :, 1, 2] == tokens[:, 6]).all())  # patch (1, 2) is token 1 + 1 * 3 + 2
        True
    """
    check_features("features", features, layout)
    if layout != "tokens":
        return _as_maps(features, layout)
    n = features.shape[1]
    p = check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
    if grid is None:
        raise ValueError("grid=(h, w) is needed to view tokens as maps")
    h, w = grid
    if p + h * w != n:
        raise ValueError(
            f"features of shape {tuple(features.shape)} hold {n} tokens, but num_prefix_tokens={p} and a {h}x{w} "
            f"patch grid make {p + h * w}"
        )
    return _as_maps(features, layout, p, grid)


def _as_maps(features: Tensor, layout: str, num_prefix_tokens: int = 0, grid: tuple[int, int] = (0, 0)) -> Tensor:
    """:func:`as_maps` of arguments already checked (``grid`` fits the tokens after the prefix)."""
    if layout == "channels_first":
        return features
    if layout == "channels_last":
        return features.permute(0, 3, 1, 2)
    return features[:, num_prefix_tokens:].unflatten(1, grid).permute(0, 3, 1, 2)


def from_maps(maps: Tensor, layout: str) -> Tensor:
    """The inverse of :func:`as_maps` for map layouts: ``(B, C, h, w)`` back to ``layout`` (a view).

    Args:
        maps: ``(B, C, h, w)``.
        layout: ``"channels_first"`` or ``"channels_last"`` (a token sequence is rebuilt by the backbone itself).

    Example:
        >>> import torch
        >>> x = torch.randn(2, 4, 3, 5)
        >>> from_maps(as_maps(x, "channels_last"), "channels_last").data_ptr() == x.data_ptr()
        True
    """
    check_ndim("maps", maps, 4, "(B, C, h, w)")
    check_choice("layout", layout, ENCODING_LAYOUTS)
    return maps if layout == "channels_first" else maps.permute(0, 2, 3, 1)


def grid_mean(features: Tensor, layout: str, *, num_prefix_tokens: int = 0) -> Tensor:
    """Global average of the grid: ``(B, C)`` (prefix tokens left out).

    Args:
        features: ``(B, C, h, w)``, ``(B, h, w, C)`` or ``(B, P + h w, C)``, as ``layout`` says.
        layout: one of :data:`~mixshare_layers.vocabulary.FEATURE_LAYOUTS`.
        num_prefix_tokens: ``P`` (tokens only).

    Example:
        >>> import torch
        >>> tokens = torch.cat([torch.full((1, 1, 2), 9.0), torch.ones(1, 4, 2)], dim=1)
        >>> grid_mean(tokens, "tokens", num_prefix_tokens=1)
        tensor([[1., 1.]])
    """
    check_features("features", features, layout)
    p = check_int("num_prefix_tokens", num_prefix_tokens, minimum=0) if layout == "tokens" else 0
    if layout == "tokens" and features.shape[1] <= p:
        raise ValueError(f"features of shape {tuple(features.shape)} have no patch token after their {p} prefix tokens")
    return _grid_mean(features, layout, p)


def _grid_mean(features: Tensor, layout: str, num_prefix_tokens: int = 0) -> Tensor:
    """:func:`grid_mean` of arguments already checked."""
    if layout == "channels_first":
        return features.mean(dim=(2, 3))
    if layout == "channels_last":
        return features.mean(dim=(1, 2))
    return features[:, num_prefix_tokens:].mean(dim=1)


def head_input(features: Tensor, layout: str, pooling: str = "avg", *, num_prefix_tokens: int = 0) -> Tensor:
    """What a backbone's head reads from the core's features (in eval, where nothing is unmixed).

    Args:
        features: ``(B, C, h, w)``, ``(B, h, w, C)`` or ``(B, P + h w, C)``, as ``layout`` says; with
            ``pooling="head"``, anything the head reads (even a list of maps).
        layout: one of :data:`~mixshare_layers.vocabulary.FEATURE_LAYOUTS`.
        pooling: one of :data:`~mixshare_layers.vocabulary.HEAD_POOLINGS`: ``"avg"``, the grid average ``(B, C)``
            (prefix tokens left out); ``"token"``, the first token ``(B, C)``; ``"head"``, the features themselves.
        num_prefix_tokens: ``P`` (tokens only).

    Example:
        >>> import torch
        >>> tokens = torch.cat([torch.full((1, 1, 2), 9.0), torch.ones(1, 4, 2)], dim=1)
        >>> head_input(tokens, "tokens", "token", num_prefix_tokens=1)  # the class token
        tensor([[9., 9.]])
        >>> head_input(tokens, "tokens", "avg", num_prefix_tokens=1)  # the average of the patch tokens
        tensor([[1., 1.]])
    """
    check_choice("pooling", pooling, HEAD_POOLINGS)
    if pooling == "head":
        check_choice("layout", layout, FEATURE_LAYOUTS)
        return features
    if pooling == "token":
        check_features("features", features, layout)
        if layout != "tokens" or features.shape[1] < 1:
            raise ValueError(
                f"pooling='token' reads the first token of a token sequence, but got layout={layout!r} and features "
                f"of shape {tuple(features.shape)}"
            )
        return features[:, 0]
    return grid_mean(features, layout, num_prefix_tokens=num_prefix_tokens)


def _head_input(features: Tensor, layout: str, pooling: str, num_prefix_tokens: int = 0) -> Tensor:
    """:func:`head_input` of arguments already checked."""
    if pooling == "head":
        return features
    if pooling == "token":
        return features[:, 0]
    return _grid_mean(features, layout, num_prefix_tokens)
