"""Datasets shipped with the library."""

from .ood import load_svhn, synthetic_ood_dataset
from .synthetic import SyntheticImageDataset

__all__ = ["SyntheticImageDataset", "load_svhn", "synthetic_ood_dataset"]
