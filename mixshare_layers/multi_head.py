"""``MultiHead``: the M linear classifiers of a MIMO network as one batched parameter."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_int, check_num_subnetworks

__all__ = ["MultiHead"]


class MultiHead(nn.Module):
    """M linear heads stored as one ``(M, K, D)`` weight (and ``(M, K)`` bias).

    Args:
        in_features: D.
        num_classes: K.
        num_subnetworks: M.
        bias: learn a bias per head.

    Shape:
        - Input: ``(B, D)`` (one feature vector shared by every head: one matmul) or ``(B, M, D)`` (head ``i`` reads
          row ``i``: one batched matmul).
        - Output: ``(B, M, K)``.

    Example:
        >>> heads = MultiHead(64, 10, 3)
        >>> heads(torch.randn(5, 64)).shape, heads(torch.randn(5, 3, 64)).shape
        (torch.Size([5, 3, 10]), torch.Size([5, 3, 10]))
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_subnetworks: int,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.num_subnetworks = check_num_subnetworks(num_subnetworks)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.num_subnetworks, self.num_classes, self.in_features, **kw))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(self.num_subnetworks, self.num_classes, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each head initialised like ``nn.Linear`` (uniform with bound ``1 / sqrt(D)``), independently."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"num_subnetworks={self.num_subnetworks}, bias={self.bias is not None}"
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_subnetworks: int) -> MultiHead:
        """Copy a (pretrained) classifier into every head."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, but got {type(linear).__name__}")
        heads = cls(
            linear.in_features,
            linear.out_features,
            num_subnetworks,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            heads.weight.copy_(linear.weight.detach().expand_as(heads.weight))
            if linear.bias is not None and heads.bias is not None:
                heads.bias.copy_(linear.bias.detach().expand_as(heads.bias))
        return heads

    @classmethod
    def from_initializer(
        cls, linear: nn.Linear, num_subnetworks: int, reinit: Callable[[nn.Module], None]
    ) -> MultiHead:
        """M heads shaped like ``linear``, each drawn independently by ``reinit`` (called on a fresh copy of it).

        ``linear`` itself is left untouched; only its shape, bias, device and dtype are used.

        Example:
            >>> def he(m):
            ...     nn.init.kaiming_normal_(m.weight)
            ...     nn.init.zeros_(m.bias)
            >>> heads = MultiHead.from_initializer(nn.Linear(64, 10), 3, he)
            >>> bool(heads.bias.eq(0).all()), bool((heads.weight[0] != heads.weight[1]).any())
            (True, True)
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, but got {type(linear).__name__}")
        if not callable(reinit):
            raise TypeError(f"reinit must be callable, but got {type(reinit).__name__}")
        heads = cls(
            linear.in_features,
            linear.out_features,
            num_subnetworks,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            for i in range(heads.num_subnetworks):
                draw = copy.deepcopy(linear)
                reinit(draw)
                heads.weight[i].copy_(draw.weight)
                if heads.bias is not None and draw.bias is not None:
                    heads.bias[i].copy_(draw.bias)
        return heads

    def as_linear(self) -> nn.Linear:
        """One ``nn.Linear(D, M * K)`` with the heads stacked member-major (row ``i * K + k``)."""
        lin = nn.Linear(
            self.in_features,
            self.num_subnetworks * self.num_classes,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.weight.reshape(-1, self.in_features))
            if self.bias is not None:
                lin.bias.copy_(self.bias.reshape(-1))
        return lin

    def forward(self, x: Tensor) -> Tensor:
        m, k, d = self.weight.shape
        if x.dim() == 2:
            if x.shape[1] != d:
                raise ValueError(f"input must have shape (B, D={d}), but got {tuple(x.shape)}")
            bias = None if self.bias is None else self.bias.reshape(m * k)
            return F.linear(x, self.weight.reshape(m * k, d), bias).view(x.shape[0], m, k)
        if x.dim() == 3:
            if x.shape[1] != m or x.shape[2] != d:
                raise ValueError(f"input must have shape (B, M={m}, D={d}), but got {tuple(x.shape)}")
            out = torch.bmm(x.transpose(0, 1), self.weight.transpose(1, 2))  # (M, B, K)
            if self.bias is not None:
                out = out + self.bias[:, None, :]
            return out.transpose(0, 1)
        raise ValueError(f"input must have shape (B, D) or (B, M, D), but got {tuple(x.shape)}")
