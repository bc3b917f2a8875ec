"""``MultiHead``: the M heads of a MIMO network, one batched ``(M, K, D)`` weight or M copies of any head module."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    check_bool,
    check_device,
    check_dtype,
    check_floating,
    check_int,
    check_num_subnetworks,
    check_tensor,
)

__all__ = ["MultiHead", "first_layer"]


def _runs_as_linear(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a subclass with its own forward)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def first_layer(head: nn.Module) -> nn.Linear | nn.Conv2d | None:
    """The first ``nn.Linear`` or ``nn.Conv2d`` of a head module, in registration order (``None`` if it has none).

    This is the layer whose weight columns read the pooled features (the "classifier" of the paper's analysis).

    Args:
        head: a head module (the head itself when it is one of those layers).

    Example:
        >>> first_layer(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2)))
        Linear(in_features=8, out_features=4, bias=True)
    """
    return next((m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)


def _last_layer(head: nn.Module) -> nn.Linear | nn.Conv2d | None:
    return next((m for m in reversed(list(head.modules())) if isinstance(m, (nn.Linear, nn.Conv2d))), None)


def _reset(module: nn.Module) -> None:
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


class _Redraw(NamedTuple):
    """How :meth:`MultiHead.reset_parameters` draws the heads: the initialiser they were built with (``None``:
    PyTorch's defaults) and, for the linear storage, a copy of the head layer it is called on, one copy per draw."""

    reinit: Callable[[nn.Module], None] | None
    template: nn.Linear | None


class MultiHead(nn.Module):
    """The M heads of a MIMO network: head ``i`` maps its pooled features to its logits.

    Two storages, one contract:

    * **linear** (``MultiHead(D, K, M)``, or :meth:`from_module` of a plain ``nn.Linear``): one ``(M, K, D)``
      weight and ``(M, K)`` bias, run as one matmul (a shared input) or one batched matmul (per-member inputs);
    * **generic** (:meth:`from_module` of any other module: a norm + linear, an MLP, a timm head, a head that pools
      a spatial map itself): M copies of the module in :attr:`members`, head ``i`` applied to its input. Every copy
      keeps the module's own forward (normalisation, dropout, batch statistics), so a copied head computes exactly
      what the original does. Heads are a small part of a network's cost, and M small, so the copies run one after
      the other; the linear storage is the batched fast path of the common case.

    Args:
        in_features: D.
        num_classes: K.
        num_subnetworks: M.
        bias: learn a bias per head.

    Shape:
        - Input: ``(B, *S)``, one input shared by every head (one matmul for linear heads), or ``(B, M, *S)``, head
          ``i`` reading row ``i``, where ``S`` is a head's input shape (``(D,)`` for pooled vectors; see
          :attr:`input_ndim`). Generic heads that read the features themselves also take a list of tensors (a
          backbone with one feature map per scale), shared by every head.
        - Output: ``(B, M, K)``.

    Example:
        >>> heads = MultiHead(64, 10, 3)
        >>> heads(torch.randn(5, 64)).shape, heads(torch.randn(5, 3, 64)).shape
        (torch.Size([5, 3, 10]), torch.Size([5, 3, 10]))
        >>> mlp = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))
        >>> generic = MultiHead.from_module(mlp, 3)
        >>> generic(torch.randn(5, 3, 64)).shape, generic.is_linear, generic.num_classes
        (torch.Size([5, 3, 10]), False, 10)
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
        self.in_features: int | None = check_int("in_features", in_features, minimum=1)
        self.num_classes: int | None = check_int("num_classes", num_classes, minimum=1)
        self.num_subnetworks = check_num_subnetworks(num_subnetworks)
        self.input_ndim = 1
        self.copy_inputs = False
        self.members: nn.ModuleList | None = None
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(self.num_subnetworks, self.num_classes, self.in_features, **kw)
        )
        if check_bool("bias", bias):
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(self.num_subnetworks, self.num_classes, **kw))
        else:
            self.register_parameter("bias", None)
        self._redraw = _Redraw(None, None)
        self.reset_parameters()

    @property
    def is_linear(self) -> bool:
        """Whether the heads are stored as one ``(M, K, D)`` weight (else :attr:`members` holds M modules)."""
        return self.members is None

    def reset_parameters(self) -> None:
        """Each head drawn again, independently, the way the heads were first drawn: with the initialiser given to
        :meth:`from_module` (``reinit``, the backbone's own: one call per head, on a copy of the head layer for the
        linear storage), else like ``nn.Linear`` (uniform with bound ``1 / sqrt(D)``) for linear heads and with each
        submodule's ``reset_parameters()`` for generic ones."""
        reinit, template = self._redraw
        if self.members is not None:
            for member in self.members:
                (reinit or _reset)(member)
            return
        weight, bias = self.weight, self.bias
        assert weight is not None and self.in_features is not None
        if reinit is None or template is None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)
            return
        with torch.no_grad():
            for i in range(self.num_subnetworks):  # one independent draw of the initialiser per head
                draw = copy.deepcopy(template)
                reinit(draw)
                weight[i].copy_(draw.weight)
                if bias is not None:
                    bias[i].copy_(draw.bias)

    def extra_repr(self) -> str:
        if self.members is not None:
            return f"num_subnetworks={self.num_subnetworks}, num_classes={self.num_classes}, generic"
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"num_subnetworks={self.num_subnetworks}, bias={self.bias is not None}"
        )

    # ---------------------------------------------------------------------------------------------------------
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
            assert heads.weight is not None
            heads.weight.copy_(linear.weight.detach().expand_as(heads.weight))
            if linear.bias is not None and heads.bias is not None:
                heads.bias.copy_(linear.bias.detach().expand_as(heads.bias))
        return heads

    @classmethod
    def from_module(
        cls,
        head: nn.Module,
        num_subnetworks: int,
        *,
        copy_weights: bool = True,
        reinit: Callable[[nn.Module], None] | None = None,
        input_ndim: int = 1,
        num_classes: int | None = None,
    ) -> MultiHead:
        """M heads with the architecture of ``head`` (any module).

        Args:
            head: the backbone's head: any module from its input (a pooled vector for ``input_ndim=1``) to logits.
            num_subnetworks: M.
            copy_weights: every head starts as a copy of ``head`` (a pretrained backbone keeps its function);
                otherwise each is re-initialised independently (``reinit``, default each submodule's
                ``reset_parameters()``).
            reinit: initialiser called on each independent copy (``copy_weights=False``), one draw per head, and
                again by :meth:`reset_parameters`: give the backbone's own scheme (how the heads start matters for
                MixMo, see docs/reproducing.md), one that redraws every parameter of the head; default
                ``nn.Linear``'s initialisation for a linear head, each submodule's ``reset_parameters()`` otherwise.
            input_ndim: dims of one head's input after the batch (1 for ``(B, D)`` vectors, 3 for ``(B, C, h, w)``
                maps, 2 for ``(B, N, C)`` tokens); it tells a shared input ``(B, *S)`` from per-member ones.
            num_classes: K; by default the output size of the head's last ``nn.Linear`` / ``nn.Conv2d``.

        A plain ``nn.Linear`` on vectors gets the linear storage (one batched matmul); anything else is generic.
        """
        if not isinstance(head, nn.Module):
            raise TypeError(f"head must be an nn.Module, but got {type(head).__name__}")
        m = check_num_subnetworks(num_subnetworks)
        input_ndim = check_int("input_ndim", input_ndim, minimum=1)
        if reinit is not None and not callable(reinit):
            raise TypeError(f"reinit must be callable or None, but got {type(reinit).__name__}")
        if _runs_as_linear(head) and input_ndim == 1:
            assert isinstance(head, nn.Linear)
            if copy_weights:
                copied = cls.from_linear(head, m)
                if reinit is not None:  # for reset_parameters()
                    copied._redraw = _Redraw(reinit, copy.deepcopy(head))
                return copied
            heads = cls(
                head.in_features,
                head.out_features,
                m,
                bias=head.bias is not None,
                device=head.weight.device,
                dtype=head.weight.dtype,
            )
            if reinit is not None:  # one independent draw of the backbone's initialiser per head
                heads._redraw = _Redraw(reinit, copy.deepcopy(head))
                heads.reset_parameters()
            return heads  # without reinit: initialised like nn.Linear
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.num_subnetworks = m
        obj.input_ndim = input_ndim
        obj.register_parameter("weight", None)
        obj.register_parameter("bias", None)
        obj.members = nn.ModuleList(copy.deepcopy(head) for _ in range(m))
        obj._redraw = _Redraw(reinit, None)
        # a head with an in-place layer (torchvision's Dropout(inplace=True) first) would write into its input, which
        # is shared with the other heads (or a view of the pooled features): each head then gets its own copy
        obj.copy_inputs = any(getattr(sub, "inplace", False) is True for sub in head.modules())
        if not copy_weights:
            obj.reset_parameters()
        first, last = first_layer(head), _last_layer(head)
        obj.in_features = None if first is None else _in_size(first)
        if num_classes is None and last is not None:
            num_classes = last.out_features if isinstance(last, nn.Linear) else last.out_channels
        obj.num_classes = None if num_classes is None else check_int("num_classes", num_classes, minimum=1)
        return obj

    def as_linear(self) -> nn.Linear:
        """One ``nn.Linear(D, M * K)`` with the heads stacked member-major (row ``i * K + k``); linear heads only."""
        if self.weight is None or self.in_features is None or self.num_classes is None:
            raise TypeError("as_linear() needs linear heads (one nn.Linear each); these heads are generic modules")
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

    def first_layer_weights(self) -> Tensor:
        """The weights of each head's first layer as ``(M, K', D)``: the columns that read the head's input.

        For linear heads it is :attr:`weight`; for generic ones, the weight of each copy's first ``nn.Linear`` or
        ``nn.Conv2d`` (a convolution's kernel flattened to ``(K', D k_h k_w / g)``), stacked.

        Raises:
            TypeError: a generic head without any ``nn.Linear`` / ``nn.Conv2d``.
        """
        if self.members is None:
            assert self.weight is not None
            return self.weight
        layers = [first_layer(member) for member in self.members]
        if any(layer is None for layer in layers):
            raise TypeError("the heads have no nn.Linear or nn.Conv2d layer, so they have no weight columns to read")
        return torch.stack([layer.weight.flatten(1) for layer in layers if layer is not None])

    # ---------------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        m = self.num_subnetworks
        if self.members is not None:
            nd = self.input_ndim
            if not isinstance(x, Tensor):  # several feature maps (a list), read by every head
                return torch.stack([member(x) for member in self.members], dim=1)
            if x.dim() == nd + 1:  # one input shared by every head
                inputs = [x.clone() if self.copy_inputs else x for _ in range(m)]
            elif x.dim() == nd + 2 and x.shape[1] == m:
                inputs = [x[:, i].clone() if self.copy_inputs else x[:, i] for i in range(m)]
            else:
                inputs = []
            if inputs:
                return torch.stack([member(v) for member, v in zip(self.members, inputs, strict=True)], dim=1)
            raise ValueError(
                f"x must have {nd + 1} dims (B, *S), shared by the heads, or {nd + 2} (B, M={m}, *S), one row per "
                f"head, but got shape {tuple(x.shape)}"
            )
        assert self.weight is not None
        _, k, d = self.weight.shape
        check_tensor("x", x, "(B, D) or (B, M, D)", stack_dim={1: 0, 2: 1})
        check_floating("x", x)
        check_device("x", x, self.weight.device, "the heads")
        check_dtype("x", x, self.weight.dtype, "the heads")
        if x.dim() == 2:
            if x.shape[1] != d:
                raise ValueError(f"x must have shape (B, D={d}), but got {tuple(x.shape)}")
            bias = None if self.bias is None else self.bias.reshape(m * k)
            return F.linear(x, self.weight.reshape(m * k, d), bias).view(x.shape[0], m, k)
        if x.dim() == 3:
            if x.shape[1] != m or x.shape[2] != d:
                raise ValueError(f"x must have shape (B, M={m}, D={d}), but got {tuple(x.shape)}")
            out = torch.bmm(x.transpose(0, 1), self.weight.transpose(1, 2))  # (M, B, K)
            if self.bias is not None:
                out = out + self.bias[:, None, :]
            return out.transpose(0, 1)
        raise ValueError(f"x must have shape (B, D) or (B, M, D), but got {tuple(x.shape)}")


def _in_size(layer: nn.Linear | nn.Conv2d) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
