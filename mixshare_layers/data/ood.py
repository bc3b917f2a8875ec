"""Out-of-distribution sets: classes the model never saw (offline, synthetic) and SVHN (through torchvision)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .._checks import check_choice, check_int
from .synthetic import SyntheticImageDataset

__all__ = ["load_svhn", "synthetic_ood_dataset"]


def synthetic_ood_dataset(
    reference: SyntheticImageDataset, num_samples: int | None = None, *, seed: int | None = None
) -> SyntheticImageDataset:
    """A synthetic OOD set for a model trained on ``reference``: the same kind of images, other classes.

    The images have the reference's size, channels, number of classes, noise, object size and clutter, but their
    class textures come from another seed, so none of them is a class the model was trained on (a *semantic* shift,
    the "near-OOD" setting, like CIFAR-10 against CIFAR-100); the labels it carries are the new classes' and mean
    nothing to the model.

    Args:
        reference: the training (or test) set of the model.
        num_samples: images in the OOD set (default: as many as ``reference``).
        seed: the OOD set's seed (default: ``reference.seed + 1_000_003``); must differ from the reference's.

    Example:
        >>> train = SyntheticImageDataset(200, num_classes=10, seed=0)
        >>> ood = synthetic_ood_dataset(train, 50)
        >>> ood.data.shape, ood.seed != train.seed
        (torch.Size([50, 3, 32, 32]), True)
    """
    if not isinstance(reference, SyntheticImageDataset):
        raise TypeError(f"reference must be a SyntheticImageDataset, but got {type(reference).__name__}")
    n = reference.num_samples if num_samples is None else check_int("num_samples", num_samples, minimum=1)
    ood_seed = reference.seed + 1_000_003 if seed is None else check_int("seed", seed, minimum=0)
    if ood_seed == reference.seed:
        raise ValueError(f"seed must differ from the reference's seed {reference.seed}, or the classes are the same")
    return SyntheticImageDataset(
        n,
        num_classes=reference.num_classes,
        image_size=reference.image_size,
        channels=reference.channels,
        train=False,
        seed=ood_seed,
        noise=reference.noise,
        object_size=reference.object_size,
        clutter=reference.clutter,
        transform=reference.transform,
    )


def load_svhn(root: str | os.PathLike[str], split: str = "test", *, download: bool = False) -> tuple[Tensor, Tensor]:
    """SVHN (Netzer et al. 2011) as uint8 tensors, the usual far-OOD set for CIFAR models.

    Needs torchvision (``pip install "mixshare-layers[examples]"``) and, to read the ``.mat`` files, scipy.

    Args:
        root: folder holding (or to receive) ``{split}_32x32.mat``.
        split: ``"train"``, ``"test"`` or ``"extra"``.
        download: download the file into ``root`` when it is missing.

    Returns:
        ``(images, labels)``: ``(N, 3, 32, 32)`` uint8 and ``(N,)`` int64 digits 0-9.
    """
    check_choice("split", split, ("train", "test", "extra"))
    try:
        from torchvision.datasets import SVHN
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'load_svhn needs torchvision, an optional extra: pip install "mixshare-layers[examples]"'
        ) from exc
    try:
        ds = SVHN(os.fspath(root), split=split, download=download)
    except RuntimeError as exc:
        if download:
            raise
        raise FileNotFoundError(
            f"SVHN's {split}_32x32.mat is missing or corrupted in {os.fspath(root)!r}: pass download=True "
            "(or place the file there)"
        ) from exc
    return torch.from_numpy(ds.data.copy()), torch.as_tensor(ds.labels, dtype=torch.int64)
