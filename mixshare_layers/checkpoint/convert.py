"""Converting a file that stores data objects (``argparse.Namespace``, numpy values, paths): read with
``weights_only=True`` plus those classes, so no code runs. If you trust a file that stores other objects, convert it
in your own code: ``save_checkpoint(new, to_plain(torch.load(old, weights_only=False)))``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import pathlib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .store import _PLAIN, FORMAT, RESERVED_KEYS, _load_error, _open, _require_safe_loading, _type_name, save_checkpoint

__all__ = ["convert_checkpoint", "to_plain"]


def _data_only_objects() -> list[Any]:
    """What the safe conversion lets the unpickler build: classes, and ``(function, name)`` pairs of numpy's."""
    objects: list[Any] = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, pathlib.WindowsPath]
    objects += [pathlib.PurePosixPath, pathlib.PureWindowsPath]
    try:
        import numpy as np
    except ImportError:  # numpy is optional for torch
        return objects
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None)  # numpy 2; numpy 1 has numpy.core
    multiarray = multiarray or importlib.import_module("numpy.core.multiarray")
    for name in ("_reconstruct", "scalar"):  # a file names the module of the numpy that wrote it: both spellings
        objects += [(getattr(multiarray, name), f"numpy.{core}.multiarray.{name}") for core in ("core", "_core")]
    for name, cls in vars(getattr(np, "dtypes", types.SimpleNamespace())).items():  # numpy >= 1.25: a class per dtype
        if isinstance(cls, type) and name.endswith("DType") and name != "ObjectDType":
            objects.append((cls, f"numpy.dtypes.{name}"))
    return [*objects, np.ndarray, np.dtype]


def to_plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` made of plain values (a TypeError names what has none): Namespaces and dataclasses as dicts, modules
    and optimisers as their ``state_dict()``, numpy arrays as tensors, numpy scalars as Python numbers, paths as
    strings, sets as sorted lists (``{"args": Namespace(a={"y", "x"})}`` becomes ``{"args": {"a": ["x", "y"]}}``)."""
    if type(value) in (*_PLAIN, torch.Size):
        return value
    if isinstance(value, (argparse.Namespace, types.SimpleNamespace)):
        value = dict(vars(value))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif isinstance(value, (nn.Module, torch.optim.Optimizer)):
        value = value.state_dict()
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, dict):
        out = {to_plain(k, f"{where} key {k!r}"): to_plain(v, f"{where}[{k!r}]") for k, v in value.items()}
        bad = [k for k in out if type(k) not in (str, int)]
        if bad:
            raise TypeError(f"{where} has the key {bad[0]!r} of type {_type_name(bad[0])}: keys are str or int")
        return out
    if isinstance(value, (list, tuple)):
        items = [to_plain(sub, f"{where}[{i}]") for i, sub in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (set, frozenset)):
        items = [to_plain(sub, f"{where} item") for sub in value]
        with contextlib.suppress(TypeError):
            items.sort()
        return items
    if type(value).__module__.split(".")[0] == "numpy":
        import numpy as np
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise TypeError(f"{where} is a numpy array of Python objects, which has no plain form")
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value)).clone()
        if isinstance(value, np.generic):
            return to_plain(value.item(), where)
        if isinstance(value, np.dtype):
            return str(value)
    raise TypeError(f"{where} has type {_type_name(value)}, which has no plain form: convert it by hand")


def convert_checkpoint(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False,
    log: Callable[[str], object] | None = None,
) -> Path:  # fmt: skip
    """Rewrite the file ``src`` as the checkpoint ``dst`` (:func:`to_plain` values, a digest; ``dst`` replaced only
    with ``overwrite``). Another program's ``format`` entries become ``source_format...`` (``log``: a line each)."""
    src_p, dst_p = os.fspath(src), Path(dst)
    _require_safe_loading(src_p)
    fh, _ = _open(src_p)
    with fh:
        if dst_p.exists() and os.path.samefile(src_p, dst_p):
            raise ValueError(f"convert into a new file: {dst_p} is the file being converted")
        if dst_p.exists() and not overwrite:
            raise FileExistsError(f"{dst_p} exists: choose another name (or overwrite=True / --overwrite)")
        try:
            with torch.serialization.safe_globals(_data_only_objects()):
                obj = torch.load(fh, map_location="cpu", weights_only=True)
        except Exception as err:
            raise _load_error(src_p, err, fh) from None
    plain = to_plain(obj)
    if not isinstance(plain, dict):
        raise TypeError(f"{src_p} holds a {_type_name(obj)}: a checkpoint is a dict of named entries")
    if plain.get("format") == FORMAT:
        plain = {k: v for k, v in plain.items() if k not in RESERVED_KEYS}
    for key in RESERVED_KEYS:  # another program's (or an older script's) format marker, kept under another name
        if key in plain:
            plain[f"source_{key}"] = plain.pop(key)
            if log is not None:
                log(f"{key!r} renamed 'source_{key}'")
    return save_checkpoint(dst_p, plain)
