"""``MultiEncoder``: the M input encoders of a MIMO network."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_images, check_num_subnetworks, check_real
from ..vocabulary import ENCODER_INITS

__all__ = ["ENCODER_INITS", "MultiEncoder", "reset_all_parameters"]

# How the M fused encoders run in training on CUDA: "grouped" (one grouped convolution), "dense" (one convolution
# with a block-diagonal kernel) or "split" (M plain convolutions, stacked; always used on the CPU). All three compute
# the same thing; benchmarks/run.py --encoder-paths compares them on a GPU.
CUDA_TRAIN_PATH = "grouped"
CUDA_TRAIN_PATHS = ("grouped", "dense", "split")


def reset_all_parameters(module: nn.Module) -> None:
    """Call ``reset_parameters()`` on every submodule that has one (PyTorch's default initialisation).

    Args:
        module: the module to re-initialise in place (itself included).

    Example:
        >>> conv = nn.Conv2d(3, 8, 3)
        >>> before = conv.weight.clone()
        >>> reset_all_parameters(conv)
        >>> torch.equal(before, conv.weight)
        False
    """
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def _runs_as(module: nn.Module, base: type, methods: tuple[str, ...]) -> bool:
    """Whether ``module`` computes exactly what ``base`` does (a subclass that overrides none of ``methods``)."""
    return all(getattr(type(module), name) is getattr(base, name) for name in methods)


def _input_channels(template: nn.Module) -> int | None:
    """The image channels a template takes: a convolution's, or that of the first layer of a ``Sequential`` stem."""
    while isinstance(template, nn.Sequential) and len(template) > 0:
        template = template[0]
    return template.in_channels if isinstance(template, nn.Conv2d) else None


def _linear_in_parameters(module: nn.Module) -> bool:
    """Whether the output of ``module`` is linear in its parameters: the sum of the outputs of copies with weights
    ``w_i`` is the output of one copy with weight ``sum w_i``.

    True for a plain ``nn.Conv2d`` (any padding mode) or ``nn.Linear``, and for timm's ``Conv2dSame`` (TensorFlow
    "same" padding computed from the input size, then a plain convolution). A subclass with its own computation
    (timm's ``StdConv2d`` standardises its weight) is not.
    """
    if isinstance(module, nn.Conv2d) and _runs_as(module, nn.Conv2d, ("forward", "_conv_forward")):
        return True
    if isinstance(module, nn.Linear) and _runs_as(module, nn.Linear, ("forward",)):
        return True
    timm_layers = sys.modules.get("timm.layers")  # timm's class only matters if timm is already imported
    same = getattr(timm_layers, "Conv2dSame", None)
    return same is not None and type(module) is same


class _EncoderSum(nn.Module):
    """The test-time sum of M encoder copies that no single copy can compute (non-linear encoders), scaled."""

    def __init__(self, encoders: nn.ModuleList, scale: float) -> None:
        super().__init__()
        self.encoders = encoders
        self.scale = scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"

    def forward(self, x: Tensor) -> Tensor:
        out = self.encoders[0](x)
        for enc in self.encoders[1:]:
            out = out + enc(x)
        return out if self.scale == 1.0 else out * self.scale


class MultiEncoder(nn.Module):
    """M encoders with the same architecture, one per subnetwork.

    When the template is an ``nn.Conv2d`` (zero padding), the M kernels are one ``(M * C_out, C_in / g, k, k)``
    parameter (:meth:`kernels` views it as ``(M, C_out, C_in / g, k, k)``): training runs them as one grouped
    convolution over the M inputs (on CUDA; on the CPU as M plain convolutions, which oneDNN runs faster), and test
    time runs a single convolution with the summed kernel (the sum of the M encodings of one image, computed once).
    Any other template (an ``nn.Conv2d`` subclass with its own ``forward``, such as timm's ``Conv2dSame`` or
    ``StdConv2d``, a reflect-padded convolution, a multi-branch stem block) is deep-copied M times and run member by
    member.

    Args:
        template: the module to replicate (a backbone's first convolution, typically).
        num_subnetworks: M.
        init: ``"independent"`` re-initialises every copy (with ``reinit``, default: each submodule's
            ``reset_parameters()``); ``"aligned"`` gives every copy the template's weights; ``"colinear"`` gives
            copy ``i`` the template's weights times a scalar ``s_i ~ Uniform(colinear_range)`` (linear templates only).
        preserve_sum: scale aligned/colinear copies so that their scalars sum to 1 (aligned: ``1 / M`` each): the
            test-time sum of the encoders then equals the template, which keeps a pretrained backbone's function.
            Templates linear in their parameters (:attr:`is_linear`) get their parameters scaled; any other
            template (aligned only) keeps its parameters and has each copy's output scaled by ``1 / M``
            (:attr:`output_scale`), which is exact whatever the module computes.
        reinit: initialiser called on each copy for ``init="independent"``.
        colinear_range: ``(low, high)`` of the uniform distribution of the colinear scalars.
        generator: optional ``torch.Generator`` for the colinear scalars.

    Shape:
        - Training input: ``(B, M, C, H, W)`` -> ``(B, M, C', H', W')``, encoder ``i`` applied to input ``i``.
        - Test input: ``(B, C, H, W)`` -> ``(B, C', H', W')``, the *sum* over encoders of the encodings of the
          same image.

    Example:
        >>> enc = MultiEncoder(nn.Conv2d(3, 16, 3, padding=1), 2, init="aligned")
        >>> enc(torch.randn(4, 2, 3, 8, 8)).shape
        torch.Size([4, 2, 16, 8, 8])
        >>> enc(torch.randn(4, 3, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
    """

    def __init__(
        self,
        template: nn.Module,
        num_subnetworks: int,
        *,
        init: str = "independent",
        preserve_sum: bool = False,
        reinit: Callable[[nn.Module], None] | None = None,
        colinear_range: tuple[float, float] = (0.5, 1.5),
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(template, nn.Module):
            raise TypeError(f"template must be an nn.Module, but got {type(template).__name__}")
        self.num_subnetworks = check_num_subnetworks(num_subnetworks)
        self.init = check_choice("init", init, ENCODER_INITS)
        self.preserve_sum = check_bool("preserve_sum", preserve_sum)
        low, high = colinear_range
        check_real("colinear_range[0]", low, low=0.0, low_inclusive=False)
        check_real("colinear_range[1]", high, low=low)
        self.colinear_range = (float(low), float(high))
        m = self.num_subnetworks
        # a subclass that changes the computation (timm's Conv2dSame pads in forward, StdConv2d standardises its
        # weight) is neither fused nor treated as linear: it is replicated and run as the module it is
        plain_conv = isinstance(template, nn.Conv2d) and _runs_as(template, nn.Conv2d, ("forward", "_conv_forward"))
        self.fused = plain_conv and template.padding_mode == "zeros"
        self.input_channels = _input_channels(template)  # for the input check (None: unknown)
        linear = _linear_in_parameters(template)
        self.linear = linear
        if init == "colinear" and not linear:
            raise TypeError(
                "init='colinear' needs a linear template (a plain nn.Conv2d or nn.Linear, not a subclass with its own "
                f"forward), but got {type(template).__name__}"
            )
        # a template that is not linear in its parameters keeps them: its copies' outputs are scaled instead
        self.output_scale = 1.0 / m if preserve_sum and not linear and init == "aligned" else 1.0

        copies = [copy.deepcopy(template) for _ in range(m)]
        if init == "independent":
            for c in copies:
                (reinit or reset_all_parameters)(c)
        else:
            if init == "aligned":
                scales = torch.ones(m, dtype=torch.float64)
            else:
                scales = torch.empty(m, dtype=torch.float64).uniform_(low, high, generator=generator)
            if preserve_sum:
                scales = scales / scales.sum()
            if init == "colinear" or (preserve_sum and linear):
                with torch.no_grad():
                    for c, s in zip(copies, scales.tolist(), strict=True):
                        for p in c.parameters():
                            p.mul_(s)

        if self.fused:
            conv = template
            assert isinstance(conv, nn.Conv2d)
            self.out_channels = conv.out_channels
            self.in_channels = conv.in_channels
            self.kernel_size = conv.kernel_size
            self.stride = conv.stride
            self.padding = conv.padding
            self.dilation = conv.dilation
            self.groups = conv.groups
            # stored member-major as one 4-D (M * C', C / g, k, k) kernel, so that the grouped convolution needs no
            # reshape and `module.to(memory_format=torch.channels_last)` works; kernels() gives the (M, C', ...) view
            self.weight = nn.Parameter(torch.cat([c.weight.detach() for c in copies]))  # type: ignore[operator]
            if conv.bias is not None:
                self.bias: nn.Parameter | None = nn.Parameter(
                    torch.stack([c.bias.detach() for c in copies])  # type: ignore[operator]
                )
            else:
                self.register_parameter("bias", None)
            self.encoders = None
        else:
            self.encoders = nn.ModuleList(copies)

    # ---------------------------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        kind = (
            f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride})"
            if self.fused
            else "generic"
        )
        return f"num_subnetworks={self.num_subnetworks}, init={self.init!r}, preserve_sum={self.preserve_sum}, {kind}"

    @property
    def is_linear(self) -> bool:
        """Whether the encoders are linear in their parameters, so that their test-time sum is one copy of the
        template with the summed parameters (:meth:`folded`)."""
        return self.linear

    def folded(self) -> nn.Module:
        """One module computing the test-time sum of the M encoders (a copy, in eval mode).

        A linear template folds exactly into one copy of itself with the summed parameters: one ``nn.Conv2d``
        (:meth:`folded_conv`) for the fused encoders, one copy of the template otherwise (a reflect-padded
        convolution, timm's ``Conv2dSame``, an ``nn.Linear``). Any other template keeps its M copies, run on the same
        input and summed (and scaled by :attr:`output_scale`): exact, at M times the first layer's cost.
        """
        if self.fused:
            return self.folded_conv().eval()
        assert self.encoders is not None
        if self.linear:
            single = copy.deepcopy(self.encoders[0])
            with torch.no_grad():
                for name, param in single.named_parameters():
                    param.copy_(torch.stack([c.get_parameter(name) for c in self.encoders]).sum(dim=0))
            return single.eval()
        return _EncoderSum(copy.deepcopy(self.encoders), self.output_scale).eval()

    def kernels(self) -> Tensor:
        """The kernels as an ``(M, C', C / g, k, k)`` view of :attr:`weight` (fused encoders only).

        :attr:`weight` itself is stored as ``(M * C', C / g, k, k)``, member-major: rows ``i * C'`` to
        ``(i + 1) * C' - 1`` are encoder ``i``.
        """
        if not self.fused:
            raise TypeError("kernels() is only defined for nn.Conv2d encoders (this MultiEncoder is generic)")
        return self.weight.view(self.num_subnetworks, self.out_channels, *self.weight.shape[1:])

    def folded_conv(self) -> nn.Conv2d:
        """A single ``nn.Conv2d`` computing the test-time sum of the M encoders (exact: convolution is linear)."""
        if not self.fused:
            if self.linear and self.encoders is not None and isinstance(self.encoders[0], nn.Conv2d):
                return self.folded()  # type: ignore[return-value]
            raise TypeError(
                "the encoders cannot be folded into one convolution: they are not convolutions linear in their "
                "weights, so the sum of their outputs is not a single convolution (folded() keeps the M copies)"
            )
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,  # type: ignore[arg-type]
            stride=self.stride,  # type: ignore[arg-type]
            padding=self.padding,  # type: ignore[arg-type]
            dilation=self.dilation,  # type: ignore[arg-type]
            groups=self.groups,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.kernels().sum(dim=0))
            if self.bias is not None:
                conv.bias.copy_(self.bias.sum(dim=0))  # type: ignore[union-attr]
        return conv

    # ---------------------------------------------------------------------------------------------------------
    @staticmethod
    def _train_path(device: torch.device) -> str:
        """Which of :data:`CUDA_TRAIN_PATHS` runs the fused training convolution on ``device``."""
        return CUDA_TRAIN_PATH if device.type == "cuda" else "split"

    def check_input(self, x: object, name: str = "x") -> Tensor:
        """Check images for these encoders: a floating tensor ``(B, C, H, W)`` or ``(B, M, C, H, W)`` with the
        template's channel count, on the encoders' device and in their dtype (any floating dtype under autocast).

        Raises ``TypeError`` / ``ValueError`` naming ``name``; reads only metadata (no device synchronisation).
        """
        param = self.weight if self.fused else next(self.encoders.parameters(), None)  # type: ignore[union-attr]
        return check_images(
            name,
            x,
            layout="(B, C, H, W) or (B, M, C, H, W)",
            ndims=(4, 5),
            channels=self.input_channels,
            dtype=param.dtype if param is not None and param.is_floating_point() else None,
            device=None if param is None else param.device,
            owner="the encoder",
        )

    def forward(self, x: Tensor) -> Tensor:
        m = self.num_subnetworks
        self.check_input(x)
        if x.dim() == 5:
            if x.shape[1] != m:
                raise ValueError(
                    f"input of shape {tuple(x.shape)} has {x.shape[1]} members on dim 1, but the MultiEncoder has "
                    f"num_subnetworks={m}; expected (B, M={m}, C, H, W)"
                )
            b = x.shape[0]
            path = self._train_path(x.device)
            if self.fused and path == "split":
                # On the CPU, M plain convolutions beat one grouped convolution (oneDNN's grouped kernels are slow
                # for the few channels of a first layer: 4.9 ms vs 16.4 ms forward + backward for WRN's 3->16 conv
                # at B = 64, M = 2; see docs/benchmarks.md).
                kernels = self.kernels()
                return torch.stack(
                    [
                        F.conv2d(
                            x[:, i],
                            kernels[i],
                            None if self.bias is None else self.bias[i],
                            self.stride,
                            self.padding,
                            self.dilation,
                            self.groups,
                        )
                        for i in range(m)
                    ],
                    dim=1,
                )
            if self.fused:
                weight: Tensor = self.weight
                groups = m * self.groups
                if path == "dense" and self.groups == 1:
                    # one dense convolution with the block-diagonal (M C', M C, k, k) kernel: M times the
                    # multiply-adds of the grouped one, but cuDNN's dense kernels are faster for a few input channels
                    eye = torch.eye(m, device=weight.device, dtype=weight.dtype)
                    k = self.kernels()  # (M, C', C, k, k)
                    weight = (k[:, :, None] * eye[:, None, :, None, None, None]).reshape(
                        m * self.out_channels, m * k.shape[2], *k.shape[3:]
                    )
                    groups = 1
                out = F.conv2d(
                    x.reshape(b, m * x.shape[2], x.shape[3], x.shape[4]),
                    weight,
                    None if self.bias is None else self.bias.reshape(-1),
                    self.stride,
                    self.padding,
                    self.dilation,
                    groups,
                )
                return out.view(b, m, self.out_channels, out.shape[-2], out.shape[-1])
            assert self.encoders is not None
            out = torch.stack([enc(x[:, i]) for i, enc in enumerate(self.encoders)], dim=1)
            return out if self.output_scale == 1.0 else out * self.output_scale
        if self.fused:
            bias = None if self.bias is None else self.bias.sum(dim=0)
            return F.conv2d(x, self.kernels().sum(dim=0), bias, self.stride, self.padding, self.dilation, self.groups)
        assert self.encoders is not None
        out = self.encoders[0](x)
        for enc in self.encoders[1:]:
            out = out + enc(x)
        return out if self.output_scale == 1.0 else out * self.output_scale
