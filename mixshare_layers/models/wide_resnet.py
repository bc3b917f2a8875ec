"""CIFAR Wide ResNets as in MixMo's code, and a CIFAR stem for torchvision ResNets."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..adapters import BackboneSplit
from ..layers.encoder import reset_all_parameters

__all__ = [
    "WRN_INITS",
    "WideResNet",
    "cifar_resnet",
    "mixmo_init_",
    "torch_he_heads_init_",
    "torch_init_",
    "truncated_he_normal_",
    "wide_resnet",
]

# std of a standard normal truncated to [-2, 2]; dividing by it keeps He's variance after truncation
_TRUNC_STD = 0.87962566103423978


def truncated_he_normal_(weight: Tensor) -> Tensor:
    """He-normal initialisation truncated at two standard deviations (Keras ``he_normal``), in place.

    Args:
        weight: a weight whose fan-in is ``weight[0].numel()`` (conv ``(C_out, C_in, k, k)`` or linear ``(out, in)``).

    Returns:
        ``weight``, filled.

    Example:
        >>> import torch
        >>> w = truncated_he_normal_(torch.empty(64, 16, 3, 3))
        >>> bool(w.abs().max() <= 2 * (2 / 144) ** 0.5 / 0.8796)
        True
    """
    fan_in = weight[0].numel()
    std = math.sqrt(2.0 / fan_in) / _TRUNC_STD
    return nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std)


def mixmo_init_(module: nn.Module) -> None:
    """MixMo's WRN initialisation, in place: truncated He-normal (fan-in) weights for every convolution *and linear
    layer*, zero biases, BatchNorm scale 1 and shift 0; any other layer with parameters (the LayerNorm of a norm +
    linear head) gets its ``reset_parameters()``, so a module is redrawn entirely.

    Compared with PyTorch's defaults (:func:`torch_init_`), its weights are about 2.45 times larger (standard
    deviation ``sqrt(2 / fan_in)`` against ``1 / sqrt(3 fan_in)``) and its biases start at zero; docs/reproducing.md
    ("Initialisation") measures both.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Conv2d, nn.Linear)):
            truncated_he_normal_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.BatchNorm2d):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif callable(reset := getattr(sub, "reset_parameters", None)) and any(True for _ in sub.parameters(False)):
            reset()  # any other layer with parameters (a head's LayerNorm) as PyTorch constructs it


def torch_init_(module: nn.Module) -> None:
    """PyTorch's default initialisation, in place: ``reset_parameters()`` of every submodule that has one
    (convolutions and linear layers: Kaiming-uniform with ``a = sqrt(5)``, uniform biases; BatchNorm 1 and 0).

    The WRN's default until the heads were measured apart (:func:`torch_he_heads_init_`): against
    :func:`mixmo_init_` on the differential harness's hard task (WRN-10-1, M = 2, 1500 steps, 5 seeds) it gives
    MixMo an ensemble accuracy of 88.9 ± 0.7 % and members of 82.9 ± 0.8 %, against 86.4 ± 0.8 % and 79.6 ± 1.4 %,
    and the better ensemble for every other preset too (docs/reproducing.md, "Initialisation").
    """
    reset_all_parameters(module)


def torch_he_heads_init_(module: nn.Module) -> None:
    """The WRN's default, in place: PyTorch's defaults (:func:`torch_init_`) for the convolutions and BatchNorm,
    then MixMo's truncated He-normal (fan-in) weights and zero biases for every linear layer (the classifier, and so
    a wrapper's M heads).

    Chosen by measurement (docs/reproducing.md, "Initialisation"): on the differential harness's hard task
    (WRN-10-1, M = 2, 1500 steps, 5 seeds, paired by seed) it beats PyTorch's defaults everywhere by the ensemble's
    accuracy: MixMo +2.1 ± 0.8 points (members +4.7), unmixing +3.1 ± 0.8, unmixing with aligned encoders
    +0.6 ± 0.1, partial MixShare +0.4 ± 0.1, and ties MIMO (-0.3 ± 1.0) and MixShare (+0.1 ± 0.3, its members
    0.8 points weaker). Measured with it: PyTorch's smaller convolution weights take larger relative steps, and
    the larger heads send larger gradients into the core early (its relative step at step 150: 0.016 against
    0.012 with PyTorch's heads).
    """
    torch_init_(module)
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            truncated_he_normal_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


#: the named initialisations of :class:`WideResNet` (``init=``)
WRN_INITS: dict[str, Callable[[nn.Module], None]] = {
    "torch-he-heads": torch_he_heads_init_,
    "torch": torch_init_,
    "mixmo": mixmo_init_,
}


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False) if stride != 1 or in_planes != planes else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 images (Zagoruyko & Komodakis), pre-activation, no dropout, no biases.

    Widths 16 / 16w / 32w / 64w, strides 1 / 2 / 2, ``(depth - 4) / 6`` blocks per stage, final BN-ReLU, global
    average pooling and a linear classifier.

    Args:
        depth: 6n + 4 (28 in the paper).
        width: widening factor w (2 in the paper).
        num_classes: K.
        in_channels: image channels.
        init: the initialisation, ``"torch-he-heads"`` (the default: PyTorch's defaults with He-normal linear
            layers, :func:`torch_he_heads_init_`, which gives the measurement), ``"torch"`` (PyTorch's defaults
            everywhere: :func:`torch_init_`), ``"mixmo"`` (MixMo's code: :func:`mixmo_init_`), or a function of the
            module; it is also the split's ``reinit``, which draws a wrapper's independent encoder copies and its M
            heads.

    Shape:
        - Input: ``(B, in_channels, 32, 32)`` (any size divisible by 4 works).
        - Output: logits ``(B, K)``; :meth:`forward_features` gives ``(B, 64 * width, 8, 8)`` for 32x32 inputs.

    Example:
        >>> import torch
        >>> net = WideResNet(depth=10, width=1, num_classes=10)
        >>> net(torch.randn(2, 3, 32, 32)).shape, net.forward_features(torch.randn(2, 3, 32, 32)).shape
        (torch.Size([2, 10]), torch.Size([2, 64, 8, 8]))
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 2,
        num_classes: int = 100,
        in_channels: int = 3,
        *,
        init: str | Callable[[nn.Module], None] = "torch-he-heads",
    ) -> None:
        super().__init__()
        if isinstance(init, str):
            self.initializer = WRN_INITS[check_choice("init", init, WRN_INITS)]
        elif callable(init):
            self.initializer = init
        else:
            raise TypeError(f"init must be one of {sorted(WRN_INITS)} or a callable, but got {type(init).__name__}")
        self.init = init if isinstance(init, str) else getattr(init, "__name__", "custom")
        depth = check_int("depth", depth, minimum=10)
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 (e.g. 10, 16, 22, 28, 40), but got {depth}")
        width = check_int("width", width, minimum=1)
        num_classes = check_int("num_classes", num_classes, minimum=1)
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.depth, self.width = depth, width
        self.conv1 = nn.Conv2d(check_int("in_channels", in_channels, minimum=1), widths[0], 3, padding=1, bias=False)
        stages = []
        in_planes = widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2), strict=True):
            blocks = []
            for i in range(n):
                blocks.append(PreActBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_features = in_planes
        self.initializer(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Final feature maps ``(B, 64w, 8, 8)`` for 32x32 inputs."""
        x = self.conv1(x)
        return self._trunk(x)

    def _trunk(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.relu(self.bn(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x).mean(dim=(2, 3)))

    def mimo_split(self) -> BackboneSplit:
        """Encoder = first conv, core = the three stages and the final BN-ReLU, classifier = ``fc``.

        ``reinit`` is this network's initialiser (``init``), so that a :class:`~mixshare_layers.MIMOWrapper` gives
        its independent encoders and its M heads the same initialisation as the rest of the network.
        """
        core = nn.Sequential(self.layer1, self.layer2, self.layer3, self.bn, self.relu)
        return BackboneSplit(encoder=self.conv1, core=core, classifier=self.fc, reinit=self.initializer)


def wide_resnet(
    depth: int = 28,
    width: int = 2,
    num_classes: int = 100,
    in_channels: int = 3,
    *,
    init: str | Callable[[nn.Module], None] = "torch-he-heads",
) -> WideResNet:
    """MixMo's CIFAR WRN-depth-width (see :class:`WideResNet`).

    Args:
        depth: 6n + 4 (28 in the paper).
        width: widening factor w (2 in the paper).
        num_classes: K.
        in_channels: image channels.
        init: ``"torch-he-heads"`` (the default, :func:`torch_he_heads_init_`: PyTorch's defaults, He-normal
            linear layers), ``"torch"`` (PyTorch's defaults, :func:`torch_init_`), ``"mixmo"`` (MixMo's truncated
            He-normal everywhere, :func:`mixmo_init_`, the paper's code) or your own function of the module, also
            used for the M encoder copies and heads.

    Example:
        >>> net = wide_resnet(28, 2, num_classes=100)
        >>> sum(p.numel() for p in net.parameters())
        1479220
    """
    return WideResNet(depth, width, num_classes, in_channels, init=init)


def cifar_resnet(model: nn.Module) -> nn.Module:
    """Give a torchvision ResNet a CIFAR stem in place: 3x3 stride-1 ``conv1`` and no max-pool. Returns the model.

    Args:
        model: a torchvision-style ResNet (attributes ``conv1`` and ``maxpool``).

    Shape:
        - The returned model keeps 32x32 inputs at 32x32 after its stem (final maps ``4x4`` for a ResNet).

    Example:
        >>> import torchvision
        >>> net = cifar_resnet(torchvision.models.resnet18(num_classes=10))
        >>> net.conv1, net.maxpool
        (Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False), Identity())
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise TypeError(f"model must be a torchvision-style ResNet with conv1 and maxpool, got {type(model).__name__}")
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        3,
        stride=1,
        padding=1,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = new
    model.maxpool = nn.Identity()
    return model
