"""``MIMOBatcher``: turn an ordinary batch into M-input training rows, on device."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import (
    check_choice,
    check_device,
    check_int,
    check_ndim,
    check_num_subnetworks,
    check_real,
    check_tensor,
)
from ..functional.random import generator_kwargs
from ..vocabulary import AUGMENT_TARGETS, AugmentTarget

__all__ = ["MIMOBatcher"]


class MIMOBatcher:
    """Build MIMO training rows from a batch: batch repetition, per-member shuffles, input repetition.

    The batch is repeated ``batch_repetition`` times, then every subnetwork gets its own random permutation of the
    repeated batch, so row ``r`` holds M different images. A share ``input_repetition`` of the rows (rounded to the
    nearest count) gets the same image in every subnetwork (MIMO's input repetition; MixShare uses 10 %); as in
    MIMO's code, those rows are chosen so that every subnetwork still sees each image exactly ``batch_repetition``
    times.

    ``augment`` says where ``transform`` runs. ``"copies"`` augments the ``B * b`` repeated copies before the
    shuffles: every member draws from one augmented set, and an input-repetition row gives every member the same
    augmented image, the situation of test time that input repetition rehearses. ``"inputs"`` augments the
    ``B * b * M`` member inputs after the shuffles, each on its own, as MixMo's code and ``tests/reference`` do: an
    input-repetition row then carries one image under M different augmentations (M times the transform's cost).
    docs/reproducing.md ("Batching: where the augmentation runs") gives what each trains.

    Args:
        num_subnetworks: M.
        batch_repetition: b, how many times each image appears per subnetwork.
        input_repetition: share of rows whose M inputs are one image, in [0, 1].
        transform: optional batched augmentation, called once per batch on ``(N, C, H, W)`` images: the
            ``(B * b, C, H, W)`` repeated batch, or the ``(B * b * M, C, H, W)`` member inputs.
        augment: what ``transform`` augments, one of :data:`~mixshare_layers.vocabulary.AUGMENT_TARGETS`:
            ``"copies"`` (the repeated batch, before the shuffles) or ``"inputs"`` (every member's input, after).
        generator: optional ``torch.Generator`` on the data's device.

    Shape:
        - Input: ``x (B, C, H, W)`` of any dtype (e.g. uint8 pixels that ``transform`` converts), ``y (B,)`` integer
          class indices on ``x``'s device (float labels are refused).
        - Output: ``(B * b, M, C, H, W)`` and ``(B * b, M)``.

    Example:
        >>> batcher = MIMOBatcher(2, batch_repetition=2)
        >>> xs, ys = batcher(torch.randn(8, 3, 32, 32), torch.arange(8))
        >>> xs.shape, ys.shape
        (torch.Size([16, 2, 3, 32, 32]), torch.Size([16, 2]))
    """

    def __init__(
        self,
        num_subnetworks: int,
        batch_repetition: int = 1,
        input_repetition: float = 0.0,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        augment: AugmentTarget = "copies",
        generator: torch.Generator | None = None,
    ) -> None:
        self.num_subnetworks = check_num_subnetworks(num_subnetworks)
        self.batch_repetition = check_int("batch_repetition", batch_repetition, minimum=1)
        self.input_repetition = check_real("input_repetition", input_repetition, low=0.0, high=1.0)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, but got {type(transform).__name__}")
        self.transform = transform
        self.augment = check_choice("augment", augment, AUGMENT_TARGETS)
        self.generator = generator

    def __repr__(self) -> str:
        return (
            f"MIMOBatcher(num_subnetworks={self.num_subnetworks}, batch_repetition={self.batch_repetition}, "
            f"input_repetition={self.input_repetition:g}"
            + (f", augment={self.augment!r})" if self.augment != "copies" else ")")
        )

    def indices(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """Row indices ``(B * b, M)`` into the repeated batch (``repeated[j] = batch[j % B]``)."""
        batch_size = check_int("batch_size", batch_size, minimum=0)
        n = batch_size * self.batch_repetition
        m = self.num_subnetworks
        data_device = torch.device("cpu" if device is None else device)
        if self.generator is not None and self.generator.device.type != data_device.type:
            raise ValueError(
                f"the batcher's generator is on {self.generator.device} but the data is on {data_device}; give a "
                f"torch.Generator(device={str(data_device)!r})"
            )
        rng = generator_kwargs(self.generator)
        main = torch.rand(n, device=device, **rng).argsort()  # one permutation of the repeated batch
        num_rep = round(self.input_repetition * n) if m > 1 else 0
        num_shuffled = n - num_rep
        # each member reorders the first n - num_rep entries on its own; the last num_rep entries are shared, so
        # those rows hold one image in every member while every member still sees each image b times
        keys = torch.rand(m, num_shuffled, device=device, **rng).argsort(dim=1)
        per_member = torch.cat([main[keys], main[num_shuffled:].expand(m, -1)], dim=1)  # (M, n)
        rows = torch.rand(n, device=device, **rng).argsort()  # spread the repeated rows over the batch
        return per_member[:, rows].T.contiguous()  # (n, M)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        check_ndim("x", x, 4, "(B, C, H, W)")
        check_tensor("y", y, "(B,)", stack_dim={0: 0})
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape (B,) = ({x.shape[0]},) to match x, but got {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(
                f"y must hold integer class indices, but got dtype {y.dtype}; the rows pair every image with its "
                "label, so soft or one-hot labels are not supported (one-hot: y.argmax(-1))"
            )
        check_device("y", y, x.device, "x")
        b = x.shape[0]
        base = torch.arange(b, device=x.device).repeat(self.batch_repetition)  # (B * b,)
        repeated = x[base]
        if self.transform is not None and self.augment == "copies":
            repeated = self.transform(repeated)
        idx = self.indices(b, x.device)  # (B * b, M)
        rows = repeated[idx]  # (B * b, M, C, H, W)
        if self.transform is not None and self.augment == "inputs":
            rows = self.transform(rows.flatten(0, 1)).unflatten(0, idx.shape)
        return rows, y[base][idx]
