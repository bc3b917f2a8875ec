"""Backbones used in the paper's experiments."""

from .wide_resnet import (
    WRN_INITS,
    WideResNet,
    cifar_resnet,
    mixmo_init_,
    torch_he_heads_init_,
    torch_init_,
    truncated_he_normal_,
    wide_resnet,
)

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
