"""``CutMixMixer``: MixMo's mixing block with every option of the public recipe, named."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import (
    check_bool,
    check_choice,
    check_floating,
    check_ndim,
    check_num_subnetworks,
    check_real,
)
from ..functional.backend import resolve_backend
from ..functional.mixing import _check_mix_inputs, _mix, _sample_mix_params, cutmix_probability
from ..mix_info import MixInfo
from ..vocabulary import ENCODING_LAYOUTS

__all__ = ["ENCODING_LAYOUTS", "CutMixMixer"]


class CutMixMixer(nn.Module):
    """Mix M encodings into one: ``scale * sum_i m_i * e_i`` with CutMix or linear masks.

    Training draws a fresh mix per call (:meth:`make_params`) and applies it (:meth:`apply`); both steps are
    available separately so a mix can be replayed (and :meth:`forward` calls them, so replacing ``make_params``
    replays a recorded mix inside a network). Evaluation returns the plain sum of the encodings and the identity
    :class:`MixInfo` (every member covers the whole map).

    Args:
        num_subnetworks: M.
        alpha: Dirichlet concentration of the ratios λ (Beta(alpha, alpha) for M = 2); ``alpha <= 0`` gives exactly
            ``1 / M`` (with ``cutmix_prob=0`` this is MIMO's plain sum).
        cutmix_prob: probability that a batch uses CutMix; otherwise linear mixing (constant masks λ_i).
        cutmix_ramp: fraction of training at the end over which ``cutmix_prob`` falls linearly to 0 (MixMo: 1/12);
            0 keeps it constant. Driven by the ``progress`` passed to :meth:`forward`.
        shuffle_roles: draw the box owner once per batch (else member 0 always owns the box).
        scale: factor of the mix, default M (so training mixes and the test-time sum share a scale).
        layout: layout of the encodings (:data:`~mixshare_layers.vocabulary.ENCODING_LAYOUTS`):
            ``"channels_first"`` ``(B, M, C, H, W)`` or ``"channels_last"``
            ``(B, M, H, W, C)`` (an encoder whose output keeps the channels last); the masks live on the ``H x W``
            grid either way, and the mix is computed on a permuted view (no copy).
        backend: implementation of the mixing, chosen once here: ``"auto"`` (fused Triton kernel for CUDA tensors
            when triton imports, else torch), ``"torch"`` or ``"triton"``; ``None`` reads ``MIXSHARE_BACKEND``.

    Shape:
        - Input: ``(B, M, C, H, W)`` encodings (``(B, M, H, W, C)`` for ``layout="channels_last"``).
        - Output: ``(B, C, H, W)`` mixed encoding (``(B, H, W, C)``) and a :class:`MixInfo` with boxes on the
          ``H x W`` grid.

    Note:
        λ is each member's realised share: with CutMix it is recomputed from the clipped box area, so the box
        owner's mean share is about 0.306 at 32x32 with Beta(2, 2), not 0.5. For M > 2 the owner gets the box and the
        others share the outside in proportion to their λ (CutMix(owner, linear mix of the others)).

    Example:
        >>> mixer = CutMixMixer(2, alpha=2.0, cutmix_prob=1.0)
        >>> mixed, info = mixer(torch.randn(8, 2, 16, 32, 32))
        >>> mixed.shape, info.masks_at(8, 8).shape
        (torch.Size([8, 16, 32, 32]), torch.Size([8, 2, 8, 8]))
    """

    def __init__(
        self,
        num_subnetworks: int,
        *,
        alpha: float = 2.0,
        cutmix_prob: float = 0.5,
        cutmix_ramp: float = 1.0 / 12.0,
        shuffle_roles: bool = True,
        scale: float | None = None,
        layout: str = "channels_first",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.backend = resolve_backend(backend)
        self.layout = check_choice("layout", layout, ENCODING_LAYOUTS)
        self.num_subnetworks = check_num_subnetworks(num_subnetworks)
        self.alpha = check_real("alpha", alpha)
        self.cutmix_prob = check_real("cutmix_prob", cutmix_prob, low=0.0, high=1.0)
        self.cutmix_ramp = check_real("cutmix_ramp", cutmix_ramp, low=0.0, high=1.0)
        self.shuffle_roles = check_bool("shuffle_roles", shuffle_roles)
        self.scale = float(self.num_subnetworks) if scale is None else check_real("scale", scale)

    def extra_repr(self) -> str:
        return (
            f"num_subnetworks={self.num_subnetworks}, alpha={self.alpha:g}, cutmix_prob={self.cutmix_prob:g}, "
            f"cutmix_ramp={self.cutmix_ramp:.4g}, shuffle_roles={self.shuffle_roles}, scale={self.scale:g}, "
            + ("" if self.layout == "channels_first" else f"layout={self.layout!r}, ")
            + f"backend={self.backend!r}"
        )

    def current_cutmix_prob(self, progress: Tensor | float = 0.0) -> Tensor:
        """The CutMix probability at ``progress`` in [0, 1] (0-dim tensor)."""
        return cutmix_probability(self.cutmix_prob, self.cutmix_ramp, progress)

    def make_params(
        self,
        encodings: Tensor,
        progress: Tensor | float = 0.0,
        generator: torch.Generator | None = None,
    ) -> MixInfo:
        """Draw a mix for ``encodings`` ``(B, M, C, H, W)`` (only its shape, device and dtype are used)."""
        self._check(encodings)
        return self._draw(encodings, progress, generator)

    def apply(self, encodings: Tensor, info: MixInfo) -> Tensor:  # type: ignore[override]
        """Apply a given mix (deterministic)."""
        self._check(encodings)
        _check_mix_inputs(self._channels_first(encodings), info)
        return self._mix_with(encodings, info)

    def forward(
        self,
        encodings: Tensor,
        progress: Tensor | float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, MixInfo]:
        if not self.training:
            self._check(encodings)
            b, m, _, h, w = self._channels_first(encodings).shape
            info = MixInfo.identity(b, m, h, w, device=encodings.device)
            return encodings.sum(dim=1), info
        # the two public steps, each checking what it is given: a replay replaces make_params (e.g. with a recorded
        # draw), whose MixInfo apply then checks against the encodings
        info = self.make_params(encodings, progress, generator)
        return self.apply(encodings, info), info

    def _draw(self, encodings: Tensor, progress: Tensor | float, generator: torch.Generator | None) -> MixInfo:
        b, _, _, h, w = self._channels_first(encodings).shape
        # a constant probability stays a Python float (no ops); a ramped one is a tensor on the progress's device
        prob: Tensor | float = (
            self.cutmix_prob if self.cutmix_ramp <= 0 else self.current_cutmix_prob(progress).to(encodings.device)
        )
        dtype = encodings.dtype if encodings.dtype in (torch.float32, torch.float64) else torch.float32
        return _sample_mix_params(
            b,
            self.num_subnetworks,
            h,
            w,
            alpha=self.alpha,
            cutmix_prob=prob,
            shuffle_roles=self.shuffle_roles,
            device=encodings.device,
            dtype=dtype,
            generator=generator,
            backend=self.backend,
        )

    def _mix_with(self, encodings: Tensor, info: MixInfo) -> Tensor:
        mixed = _mix(self._channels_first(encodings), info, self.scale, self.backend)
        return mixed if self.layout == "channels_first" else mixed.permute(0, 2, 3, 1)

    def _channels_first(self, encodings: Tensor) -> Tensor:
        """``(B, M, C, H, W)`` view of the encodings (a permutation of a channels-last tensor's strides)."""
        return encodings if self.layout == "channels_first" else encodings.permute(0, 1, 4, 2, 3)

    def _check(self, encodings: Tensor) -> None:
        layout = "(B, M, C, H, W)" if self.layout == "channels_first" else "(B, M, H, W, C)"
        check_ndim("encodings", encodings, 5, layout, stack_dim={4: 1})
        check_floating("encodings", encodings)
        if encodings.shape[1] != self.num_subnetworks:
            raise ValueError(
                f"encodings of shape {tuple(encodings.shape)} have {encodings.shape[1]} members on dim 1, but the "
                f"mixer has num_subnetworks={self.num_subnetworks}"
            )
