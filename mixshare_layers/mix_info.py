"""``MixInfo``: the compact, replayable description of one mixing draw.

Conventions (used everywhere in the library):

* Layouts are batch-first: encodings ``(B, M, C, H, W)``, per-member quantities ``(B, M)``.
* A mix is described by one axis-aligned box per sample, at the encoding resolution ``(height, width)``, and two
  compositions: ``inside[b, i]`` is the weight of member ``i`` on the pixels inside the box, ``outside[b, i]`` its
  weight outside. The mask of member ``i`` is therefore

      m_i(p) = cov(p) * inside[b, i] + (1 - cov(p)) * outside[b, i]

  where ``cov(p)`` is the fraction of cell ``p`` covered by the box (0 or 1 at the native resolution).

* CutMix (M = 2): ``inside`` is one-hot on the box owner, ``outside`` one-hot on the other member. For M > 2 the
  others share the outside linearly (CutMix(owner, MixUp(others))). Linear mixing: an empty box and ``outside = λ``.
  In training every row of ``inside`` and ``outside`` sums to 1, so the masks sum to 1 at every pixel.
* ``ratios[b, i]`` is λ: the member's realised share, i.e. the mean of its mask over the map (after box clipping).
* The identity info (eval) has an empty box and ``inside = outside = 1``: every member covers the whole map, so
  unmixing leaves the features untouched.
* ``cutmix`` is a 0-dim bool tensor saying whether the batch used CutMix (``False``: linear mixing).

Masks can be rendered at any resolution with exact area coverage: a cell of an ``h x w`` grid gets the fraction of
its area that the box covers, so the mean of every mask at any resolution equals its mean at the native resolution.
Coverage is separable, ``cov(y, x) = cov_y(y) * cov_x(x)``, which is what lets the fused ops avoid materialising
masks at all.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_int

__all__ = ["MixInfo", "check_mix_info", "interval_coverage"]


def interval_coverage(lo: Tensor, hi: Tensor, native: int, target: int, dtype: torch.dtype) -> Tensor:
    """Fraction of each of ``target`` equal cells of ``[0, native)`` covered by ``[lo, hi)``.

    Args:
        lo: integer start of the interval, in native pixels, shape ``(B,)``.
        hi: integer end (exclusive), shape ``(B,)``.
        native: the length the interval is expressed in (the encoding's H or W).
        target: the number of cells of the output grid.
        dtype: floating dtype of the result.

    Shape:
        - Output: ``(B, target)``, values in [0, 1].

    Note:
        Cell ``j`` spans ``[j * native / target, (j + 1) * native / target)``. The computation is done in integers
        scaled by ``target`` so it is exact, and ``sum_j cov[j] * native / target == hi - lo``.

    Example:
        >>> interval_coverage(torch.tensor([2]), torch.tensor([7]), native=8, target=4, dtype=torch.float32)
        tensor([[0.0000, 1.0000, 1.0000, 0.5000]])
    """
    j = torch.arange(target, device=lo.device, dtype=torch.long)
    if target == native:  # the native grid: each cell is in or out (same values, a third of the ops)
        return ((j >= lo.unsqueeze(1)) & (j < hi.unsqueeze(1))).to(dtype)
    cell_lo = (j * native).unsqueeze(0)  # (1, target), in units of 1/target native pixels
    cell_hi = cell_lo + native
    box_lo = (lo.long() * target).unsqueeze(1)  # (B, 1)
    box_hi = (hi.long() * target).unsqueeze(1)
    overlap = (torch.minimum(box_hi, cell_hi) - torch.maximum(box_lo, cell_lo)).clamp_min(0)
    return overlap.to(dtype) / native


class MixInfo(NamedTuple):
    """What one mixing draw did, compact enough to replay and to render masks at any resolution.

    Attributes:
        boxes: ``(B, 4)`` int64 ``(y0, y1, x0, x1)``, half-open, in pixels of the ``height x width`` grid.
        inside: ``(B, M)`` composition of the members inside the box.
        outside: ``(B, M)`` composition outside the box.
        ratios: ``(B, M)`` realised share λ of each member (the mean of its mask).
        cutmix: 0-dim bool tensor, whether CutMix was used for this batch (else linear mixing).
        height: height of the grid the boxes are expressed in (the encoding's H).
        width: width of that grid.
        loss_weights: ``(B, M)`` loss weights of the recipe of the model that drew the mix, or ``None``.
            :class:`~mixshare_layers.MIMOWrapper` sets them in training from its preset's ``rebalance_root``
            (:func:`~mixshare_layers.functional.rebalanced_weights` of ``ratios``), so that
            :class:`~mixshare_layers.MIMOLoss` weights the loss as the preset says; a bare
            :class:`~mixshare_layers.CutMixMixer` leaves them ``None``.

    Shape:
        - :meth:`masks_at` renders ``(B, M, h, w)`` masks at any grid; :meth:`coverage_at` gives the separable
          ``(B, h)`` and ``(B, w)`` box coverages.

    Example:
        >>> info = MixInfo(
        ...     boxes=torch.tensor([[2, 7, 3, 8]]), inside=torch.tensor([[1.0, 0.0]]),
        ...     outside=torch.tensor([[0.0, 1.0]]), ratios=torch.tensor([[25 / 64, 39 / 64]]),
        ...     cutmix=torch.tensor(True), height=8, width=8,
        ... )
        >>> info.masks_at(4, 4)[0, 0]  # the box owner's mask on a 4x4 grid: exact area coverage
        tensor([[0.0000, 0.0000, 0.0000, 0.0000],
                [0.0000, 0.5000, 1.0000, 1.0000],
                [0.0000, 0.5000, 1.0000, 1.0000],
                [0.0000, 0.2500, 0.5000, 0.5000]])
        >>> info.masks_at(4, 4).mean(dim=(2, 3))  # equals ratios at every resolution
        tensor([[0.3906, 0.6094]])
    """

    boxes: Tensor
    inside: Tensor
    outside: Tensor
    ratios: Tensor
    cutmix: Tensor
    height: int
    width: int
    loss_weights: Tensor | None = None

    # -- constructors ------------------------------------------------------------------------------------------
    @classmethod
    def identity(
        cls,
        batch_size: int,
        num_subnetworks: int,
        height: int,
        width: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> MixInfo:
        """The eval-time info: every member covers the whole map (masks of ones, unmixing is the identity)."""
        batch_size = check_int("batch_size", batch_size, minimum=0)
        num_subnetworks = check_int("num_subnetworks", num_subnetworks, minimum=1)
        height = check_int("height", height, minimum=1)
        width = check_int("width", width, minimum=1)
        ones = torch.ones(batch_size, num_subnetworks, device=device, dtype=dtype)
        return cls(
            boxes=torch.zeros(batch_size, 4, device=device, dtype=torch.long),
            inside=ones,
            outside=ones,
            ratios=ones,
            cutmix=torch.zeros((), device=device, dtype=torch.bool),
            height=height,
            width=width,
        )

    # -- properties --------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.inside.shape[0]

    @property
    def num_subnetworks(self) -> int:
        return self.inside.shape[1]

    def box_area(self) -> Tensor:
        """Box area as a fraction of the map, shape ``(B,)``."""
        y0, y1, x0, x1 = self.boxes.unbind(1)
        area = (y1 - y0).clamp_min(0) * (x1 - x0).clamp_min(0)
        return area.to(self.ratios.dtype) / (self.height * self.width)

    # -- rendering ---------------------------------------------------------------------------------------------
    def coverage_at(self, h: int, w: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Separable box coverage at an ``h x w`` grid: ``(cov_y (B, h), cov_x (B, w))``."""
        h = check_int("h", h, minimum=1)
        w = check_int("w", w, minimum=1)
        dtype = self.ratios.dtype if dtype is None else dtype
        y0, y1, x0, x1 = self.boxes.unbind(1)
        cov_y = interval_coverage(y0, y1, self.height, h, dtype)
        cov_x = interval_coverage(x0, x1, self.width, w, dtype)
        return cov_y, cov_x

    def masks_at(self, h: int | None = None, w: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Render every member's mask on an ``h x w`` grid (default: the native grid).

        Shape:
            - Output: ``(B, M, h, w)``. In training the masks sum to 1 at every cell; each mask's mean equals
              ``ratios`` exactly, whatever the resolution.
        """
        h = self.height if h is None else h
        w = self.width if w is None else w
        cov_y, cov_x = self.coverage_at(h, w, dtype)
        cov = cov_y[:, None, :, None] * cov_x[:, None, None, :]  # (B, 1, h, w)
        inside = self.inside.to(cov.dtype)[:, :, None, None]
        outside = self.outside.to(cov.dtype)[:, :, None, None]
        return cov * inside + (1 - cov) * outside

    # -- transforms --------------------------------------------------------------------------------------------
    def faded(self, strength: Tensor | float) -> MixInfo:
        """Masks ``m + r (1 - m)``: ``r = 0`` keeps the masks, ``r = 1`` gives the identity (all ones).

        ``strength`` is a float or a 0-dim tensor (kept on device, no sync).
        """
        if isinstance(strength, Tensor):
            r: Tensor | float = strength.to(dtype=self.inside.dtype, device=self.inside.device)
        else:
            r = float(strength)  # a Python number: no host-to-device copy
        return self._replace(inside=self.inside + r * (1 - self.inside), outside=self.outside + r * (1 - self.outside))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MixInfo:
        """Move the tensors (float ones also cast to ``dtype`` if given)."""
        return self._replace(
            boxes=self.boxes.to(device),
            inside=self.inside.to(device=device, dtype=dtype),
            outside=self.outside.to(device=device, dtype=dtype),
            ratios=self.ratios.to(device=device, dtype=dtype),
            cutmix=self.cutmix.to(device),
            loss_weights=None if self.loss_weights is None else self.loss_weights.to(device=device, dtype=dtype),
        )

    def index_select(self, index: Tensor) -> MixInfo:
        """Keep the samples at ``index`` (e.g. to split a batch)."""
        return self._replace(
            boxes=self.boxes[index],
            inside=self.inside[index],
            outside=self.outside[index],
            ratios=self.ratios[index],
            loss_weights=None if self.loss_weights is None else self.loss_weights[index],
        )


def check_mix_info(name: str, info: object) -> MixInfo:
    """Check that ``info`` is a :class:`MixInfo` (e.g. not the ``(logits, info)`` pair); returns it."""
    if not isinstance(info, MixInfo):
        raise TypeError(f"{name} must be a MixInfo (the mix_info of a training output), but got {type(info).__name__}")
    return info
