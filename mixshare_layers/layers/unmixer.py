"""``Unmixer``: MixShare's unmixing of the final feature maps (full, partial or fadeout)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_device, check_floating, check_fraction, check_int
from ..functional.backend import resolve_backend
from ..functional.layout import _as_maps, _grid_mean, check_features, token_grid
from ..functional.unmixing import _global_pool, _unmix_pool
from ..mix_info import MixInfo, check_mix_info
from ..vocabulary import FEATURE_LAYOUTS, UNMIX_MODES, UNMIX_REDUCTIONS

__all__ = ["POOLINGS", "UNMIX_MODES", "Unmixer"]

POOLINGS = UNMIX_REDUCTIONS  # the older name of the reductions of the ``pooling`` argument


class Unmixer(nn.Module):
    """Filter the final feature maps with each member's input-mixing mask, then pool: one vector per subnetwork.

    Args:
        mode: ``"none"`` (MixMo: one global average shared by every head), ``"full"`` (every channel unmixed),
            ``"partial"`` (the first ``ceil(fraction * C)`` channels unmixed, the rest shared) or ``"fadeout"``
            (masks ``m + r (1 - m)`` with ``r = min(1, progress / fadeout_end)``: full unmixing at the start, none from
            ``fadeout_end`` on; the paper fades out by epoch 100 of 300, ``fadeout_end = 1/3``).
        fraction: share of channels unmixed in ``"partial"`` mode, in (0, 1].
        fadeout_end: training progress in (0, 1] at which fadeout reaches no unmixing.
        pooling: how a member's masked features are reduced to a vector, one of
            :data:`~mixshare_layers.vocabulary.UNMIX_REDUCTIONS` (not the head's pooling of a backbone split):
            ``"mean"`` divides each member's masked sum by its mask mass (a masked *average*; a member covering the
            whole map gets the global average, so training and test scales agree; default). ``"sum"`` divides by
            ``h * w`` (the mask-filtered map followed by a plain global average pool).
        layout: layout of the features, one of :data:`~mixshare_layers.vocabulary.FEATURE_LAYOUTS`:
            ``"channels_first"`` ``(B, C, h, w)``, ``"channels_last"`` ``(B, h, w, C)`` or ``"tokens"``
            ``(B, P + h w, C)``. The grid is pooled through a strided ``(B, C, h, w)`` view (no copy); prefix tokens
            take no part in the pooling. Inside a :class:`~mixshare_layers.MIMOWrapper` this module is where the
            layout and ``num_prefix_tokens`` are kept.
        num_prefix_tokens: ``P``, the class / register / distillation tokens before the patch grid (tokens only).
        backend: implementation of the masked pooling, chosen once here: ``"auto"`` (fused Triton kernel for CUDA
            tensors when triton imports, else torch), ``"torch"`` or ``"triton"``; ``None`` reads
            ``MIXSHARE_BACKEND``.

    Shape:
        - Input: features ``(B, C, h, w)`` (or the ``layout``'s shape) and the :class:`MixInfo` of the batch (masks
          are brought to ``h x w`` by exact area coverage; a token grid's ``h x w`` has the aspect ratio of the mix
          grid, see :func:`~mixshare_layers.functional.layout.token_grid`).
        - Output: ``(B, M, C)``. In eval mode every subnetwork gets the plain global average of the grid.

    Note:
        :meth:`forward` checks its arguments (``check_inputs=False`` skips that, for a caller that has checked the
        features, the batch and the :class:`MixInfo` already, as :class:`~mixshare_layers.MIMOWrapper` does).

    Example:
        >>> from mixshare_layers import CutMixMixer
        >>> _, info = CutMixMixer(2, cutmix_prob=1.0)(torch.randn(4, 2, 16, 32, 32))
        >>> Unmixer("fadeout")(torch.randn(4, 64, 8, 8), info, progress=0.1).shape
        torch.Size([4, 2, 64])
    """

    def __init__(
        self,
        mode: str = "full",
        *,
        fraction: float = 0.25,
        fadeout_end: float = 1.0 / 3.0,
        pooling: str = "mean",
        layout: str = "channels_first",
        num_prefix_tokens: int = 0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.backend = resolve_backend(backend)
        self.layout = check_choice("layout", layout, FEATURE_LAYOUTS)
        self.num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
        if self.num_prefix_tokens and self.layout != "tokens":
            raise ValueError(f"num_prefix_tokens={self.num_prefix_tokens} is for layout='tokens', not {layout!r}")
        self.mode = check_choice("mode", mode, UNMIX_MODES)
        self.fraction = check_fraction("fraction", fraction)
        self.fadeout_end = check_fraction("fadeout_end", fadeout_end)
        self.pooling = check_choice("pooling", pooling, UNMIX_REDUCTIONS)
        self._warned_1x1 = False

    def extra_repr(self) -> str:
        parts = [f"mode={self.mode!r}"]
        if self.mode == "partial":
            parts.append(f"fraction={self.fraction:g}")
        if self.mode == "fadeout":
            parts.append(f"fadeout_end={self.fadeout_end:.4g}")
        parts.append(f"pooling={self.pooling!r}")
        if self.layout != "channels_first":
            parts.append(f"layout={self.layout!r}")
        if self.num_prefix_tokens:
            parts.append(f"num_prefix_tokens={self.num_prefix_tokens}")
        parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    def num_unmixed(self, channels: int) -> int:
        """How many channels are unmixed for a map with ``channels`` channels."""
        if self.mode == "partial":
            return math.ceil(self.fraction * channels)
        return 0 if self.mode == "none" else channels

    def strength(self, progress: Tensor | float) -> Tensor:
        """The fadeout strength ``r = min(1, progress / fadeout_end)`` (0 outside fadeout mode)."""
        p = torch.as_tensor(progress, dtype=torch.float32)
        if self.mode != "fadeout":
            return torch.zeros_like(p)
        return (p / self.fadeout_end).clamp(0.0, 1.0)

    def forward(
        self, features: Tensor, info: MixInfo, progress: Tensor | float = 0.0, *, check_inputs: bool = True
    ) -> Tensor:
        p = self.num_prefix_tokens
        if check_inputs:
            self._check(features, info)
        m = info.inside.shape[1]
        if self.layout == "channels_first":
            maps = features
        elif not self.training or self.mode == "none":  # no grid needed: the global average of the grid
            return _grid_mean(features, self.layout, p).unsqueeze(1).expand(-1, m, -1)
        else:
            grid = token_grid(features.shape[1] - p, info.height, info.width) if self.layout == "tokens" else (0, 0)
            maps = _as_maps(features, self.layout, p, grid)  # (B, C, h, w) view, no copy
        if not self.training or self.mode == "none":
            return _global_pool(maps, m)
        h, w = maps.shape[-2:]
        if h == 1 and w == 1 and not self._warned_1x1 and not torch.compiler.is_compiling():
            warnings.warn(
                "Unmixer got 1x1 feature maps: every mask is a constant there, so unmixing has no effect. Unmix "
                "before the global pooling (on the core's last spatial feature maps).",
                stacklevel=4,  # the caller of the module (past nn.Module.__call__ and _call_impl)
            )
            self._warned_1x1 = True
        return _unmix_pool(
            maps,
            info,
            strength=self.strength(progress).to(features.device) if self.mode == "fadeout" else 0.0,
            num_unmixed=self.num_unmixed(maps.shape[1]) if self.mode == "partial" else None,
            normalize=self.pooling == "mean",
            backend=self.backend,
        )

    def _check(self, features: object, info: object) -> None:
        """The features in this module's layout (a patch token at least), floating, from the batch ``info``
        describes."""
        features = check_features("features", features, self.layout)
        check_floating("features", features)
        p = self.num_prefix_tokens
        if self.layout == "tokens" and features.shape[1] <= p:
            shape = tuple(features.shape)
            raise ValueError(f"features of shape {shape} have no patch token after their {p} prefix tokens")
        info = check_mix_info("info", info)
        check_device("features", features, info.inside.device, "the MixInfo")
        if features.shape[0] != info.inside.shape[0]:
            raise ValueError(
                f"features have batch size {features.shape[0]} (shape {tuple(features.shape)}) but the MixInfo "
                f"describes {info.inside.shape[0]} samples"
            )
