"""Data for training and testing MIMO networks: a built-in offline dataset, CIFAR-100, OOD sets, on-device batch
transforms."""

from .cifar import load_cifar100
from .ood import load_svhn, synthetic_ood_dataset
from .synthetic import SyntheticImageDataset
from .transforms import Normalize, RandomCropFlip, channel_stats, random_crop_flip

__all__ = [
    "Normalize",
    "RandomCropFlip",
    "SyntheticImageDataset",
    "channel_stats",
    "load_cifar100",
    "load_svhn",
    "random_crop_flip",
    "synthetic_ood_dataset",
]
