"""Datasets shipped with the library."""

from .synthetic import SyntheticImageDataset

__all__ = ["SyntheticImageDataset"]
