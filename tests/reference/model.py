"""MixMo's CIFAR Wide ResNet as an M-input M-output network, in plain PyTorch (reference; see the package docstring).

Architecture (MixMo's CIFAR WRN): the first 3x3 convolution (3 -> 16) is the encoder, one per member; the core
is three stages of pre-activation basic blocks (widths 16w / 32w / 64w, strides 1 / 2 / 2, (depth - 4) / 6 blocks
each, a 1x1 shortcut convolution on the pre-activated input when the shape changes, no biases, no dropout) and a
final BN-ReLU; each member has its own linear head on the pooled features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mixing import unmix_pool


def truncated_he_normal(weight: Tensor) -> Tensor:
    """He-normal with fan-in, truncated at two standard deviations and rescaled so the variance stays 2 / fan_in.

    Values outside [-2, 2] standard deviations are redrawn until none is left (rejection sampling).
    """
    fan_in = weight[0].numel()
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]
    with torch.no_grad():
        z = torch.randn_like(weight)
        bad = z.abs() > 2
        while bad.any():
            z[bad] = torch.randn(int(bad.sum()), dtype=z.dtype, device=z.device)
            bad = z.abs() > 2
        weight.copy_(z * std)
    return weight


class Block(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        # registration order: bn1, conv1, bn2, conv2, shortcut (tests map weights by this order)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + skip


class ReferenceMIMO(nn.Module):
    """M encoders, a shared WRN core, M heads.

    Args:
        num_classes: K.
        num_members: M.
        depth: 6n + 4.
        width: widening factor.
        encoder_init: ``"independent"`` (each encoder its own draw) or ``"aligned"`` (every encoder a copy of the
            first one).
        init: ``"mixmo"`` (truncated He-normal for convolutions and heads), ``"torch"`` (the modules as PyTorch
            builds them), ``"torch-convs"`` (PyTorch's convolutions, He-normal heads) or ``"torch-heads"``
            (He-normal convolutions, PyTorch's heads).
    """

    INITS = ("mixmo", "torch", "torch-convs", "torch-heads")

    def __init__(
        self,
        num_classes: int,
        num_members: int = 2,
        depth: int = 16,
        width: int = 1,
        encoder_init: str = "independent",
        init: str = "mixmo",
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 or encoder_init not in ("independent", "aligned") or init not in self.INITS:
            raise ValueError(f"bad depth {depth}, encoder_init {encoder_init!r} or init {init!r}")
        self.num_members = num_members
        n = (depth - 4) // 6
        self.encoders = nn.ModuleList(nn.Conv2d(3, 16, 3, 1, 1, bias=False) for _ in range(num_members))
        stages, cin = [], 16
        for cout, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            blocks = [Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.core = nn.Sequential(*stages, nn.BatchNorm2d(cin), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(cin, num_classes) for _ in range(num_members))
        # MixMo's initialisation: truncated He-normal for every convolution and linear layer, zero biases,
        # BatchNorm scale 1 and shift 0 (the modules start with PyTorch's defaults: "torch" keeps them)
        he = {"mixmo": (nn.Conv2d, nn.Linear), "torch": (), "torch-convs": (nn.Linear,), "torch-heads": (nn.Conv2d,)}
        for mod in self.modules():
            if isinstance(mod, he[init]):
                truncated_he_normal(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        if encoder_init == "aligned":
            with torch.no_grad():
                for enc in self.encoders[1:]:
                    enc.weight.copy_(self.encoders[0].weight)

    def forward_train(
        self, x: Tensor, masks: Tensor, *, unmix: str = "none", strength: float = 0.0, fraction: float = 0.25
    ) -> Tensor:
        """Training forward.

        Args:
            x: ``(B, M, 3, H, W)``, input ``i`` of row ``b`` goes to encoder ``i``.
            masks: ``(B, M, H, W)`` mixing masks at the encoding resolution (they sum to 1 over M).
            unmix: ``"none"`` (MixMo), ``"full"``, ``"partial"`` or ``"fadeout"``.
            strength: fadeout strength r (masks m + r (1 - m)).
            fraction: share of the final channels unmixed in ``"partial"`` mode.

        Returns:
            Logits ``(B, M, K)``.
        """
        m = self.num_members
        mixed = sum(masks[:, i, None] * self.encoders[i](x[:, i]) for i in range(m))
        features = self.core(m * mixed)  # the factor M: at test time the encodings are summed
        pooled = unmix_pool(features, masks, unmix, strength, fraction)  # (B, M, D)
        return torch.stack([self.heads[i](pooled[:, i]) for i in range(m)], dim=1)

    def forward_eval(self, x: Tensor) -> Tensor:
        """Test forward: the same image through every encoder, encodings summed, one core pass. ``(B, M, K)``."""
        features = self.core(sum(enc(x) for enc in self.encoders))
        pooled = features.mean(dim=(2, 3))
        return torch.stack([head(pooled) for head in self.heads], dim=1)
