"""CIFAR-100 from torchvision's files, as whole uint8 tensors (batches are then cut and augmented on the device)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["load_cifar100"]


def load_cifar100(root: str | os.PathLike[str], *, download: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-100 (Krizhevsky 2009) from torchvision's on-disk format, ``root/cifar-100-python/{train,test,meta}``.

    Needs torchvision (``pip install "mixshare-layers[examples]"``), which checks every file against the md5 sums
    it publishes before reading it.

    Args:
        root: the folder that holds ``cifar-100-python/``.
        download: download the files into ``root`` when they are missing.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: ``(50000, 3, 32, 32)`` and ``(10000, 3, 32, 32)``
        uint8 images, int64 labels of the 100 fine classes.

    Raises:
        FileNotFoundError: the files are missing (without ``download``) or fail the md5 check.
        ImportError: torchvision is not installed.
    """
    try:
        from torchvision.datasets import CIFAR100
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'load_cifar100 needs torchvision, an optional extra: pip install "mixshare-layers[examples]"'
        ) from exc
    folder = Path(root) / CIFAR100.base_folder
    missing = f"CIFAR-100 not found in {os.fspath(root)!r} (expected {folder}/{{train,test,meta}})"
    present = all((folder / name).is_file() for name in ("train", "test", "meta"))
    if not present and not download:
        raise FileNotFoundError(missing)
    try:
        sets = [CIFAR100(os.fspath(root), train=train, download=download and not present) for train in (True, False)]
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(f"{missing}: {exc}") from exc
    out: list[Tensor] = []
    for ds in sets:  # (N, 32, 32, 3) HWC -> (N, 3, 32, 32)
        out += [
            torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
            torch.as_tensor(ds.targets, dtype=torch.int64),
        ]
    return out[0], out[1], out[2], out[3]
