"""Backbones used in the paper's experiments."""

from .wide_resnet import WideResNet, cifar_resnet, truncated_he_normal_, wide_resnet

__all__ = ["WideResNet", "cifar_resnet", "truncated_he_normal_", "wide_resnet"]
