"""mixshare_layers.data.load_cifar100: torchvision's CIFAR-100 files as uint8 tensors (fabricated files here)."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch

from mixshare_layers.data import load_cifar100


def _fake_cifar100(root: Path, n_train: int, n_test: int) -> dict[str, str]:
    """A tiny CIFAR-100 in torchvision's on-disk format (Python 3 pickles load as the real Python 2 ones do)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name, n in (("train", n_train), ("test", n_test)):
        data = torch.randint(0, 256, (n, 3072), dtype=torch.uint8, generator=g).numpy()  # rows: R, G, B planes
        entry = {"filenames": [f"{i}.png" for i in range(n)], "fine_labels": (torch.arange(n) % 100).tolist(),
                 "coarse_labels": (torch.arange(n) % 20).tolist(), "data": data, "batch_label": name}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("train", "test", "meta")}


def test_load_cifar100_reads_torchvision_files_as_uint8(tmp_path: Path, monkeypatch) -> None:
    torchvision = pytest.importorskip("torchvision")
    md5 = _fake_cifar100(tmp_path, 12, 5)
    cls = torchvision.datasets.CIFAR100  # torchvision checks the files against these sums: make them the fakes'
    monkeypatch.setattr(cls, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(cls, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["meta"]})
    train_x, train_y, test_x, test_y = load_cifar100(tmp_path)
    assert train_x.shape == (12, 3, 32, 32) and test_x.shape == (5, 3, 32, 32) and train_x.dtype == torch.uint8
    assert train_y.tolist() == list(range(12)) and test_y.dtype == torch.int64
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes())["data"]
    assert torch.equal(train_x[3, 1].flatten(), torch.from_numpy(raw[3, 1024:2048]))  # the green plane of image 3
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"changed")  # fails the md5 check
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100 not found in .*: .*corrupted"):
        load_cifar100(tmp_path)


def test_load_cifar100_missing_files_say_where(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100 not found in .*empty.* \(expected .*cifar-100-python/"):
        load_cifar100(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
