"""Converting, once and on purpose, a checkpoint that :func:`~mixshare_layers.checkpoint.load_checkpoint` refuses.

:func:`convert_checkpoint` (command line: ``python -m mixshare_layers.checkpoint convert SRC DST``) rewrites a file
into the plain format of :mod:`mixshare_layers.checkpoint.store`, with its digest:

* by default nothing runs: the file is read with ``weights_only=True`` plus a fixed list of data-only classes
  (:func:`data_only_globals`: ``argparse.Namespace``, ``types.SimpleNamespace``, ``pathlib`` paths, numpy arrays,
  scalars and dtypes), which become dicts, strings, tensors and Python numbers;
* ``trusted=True`` (``--trusted``) unpickles the file completely, which runs any code it holds: only for a file you
  made yourself or whose source you trust. Modules and optimisers found in it are stored as their ``state_dict()``.

This is the only place in the package that may unpickle arbitrary objects, and only when asked to by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import os
import pathlib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .store import (
    FORMAT,
    RESERVED_KEYS,
    CheckpointError,
    _load_error,
    _open,
    _require_safe_loading,
    _type_name,
    save_checkpoint,
)

__all__ = ["convert_checkpoint", "data_only_globals", "to_plain"]

_NUMPY_NAMES = ("_reconstruct", "scalar")  # in numpy.core.multiarray (numpy 1) / numpy._core.multiarray (numpy 2)
_PATH_CLASSES = (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath)


def _data_only_objects() -> list[Any]:
    """The classes / functions the safe conversion lets the weights-only unpickler call (``(obj, name)`` pairs)."""
    objects: list[Any] = [argparse.Namespace, types.SimpleNamespace, *_PATH_CLASSES]
    try:
        import numpy as np
    except ImportError:  # numpy is optional for torch
        return objects
    core = getattr(np, "_core", None)
    multiarray = getattr(core, "multiarray", None) if core is not None else None
    if multiarray is None:  # numpy 1
        multiarray = importlib.import_module("numpy.core.multiarray")
    for name in _NUMPY_NAMES:  # a file names the module of the numpy that wrote it: accept both spellings
        target = getattr(multiarray, name)
        objects += [(target, f"numpy.core.multiarray.{name}"), (target, f"numpy._core.multiarray.{name}")]
    objects += [np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype
    if dtypes is not None:
        for attr in dir(dtypes):
            cls = getattr(dtypes, attr)
            if isinstance(cls, type) and attr.endswith("DType") and attr != "ObjectDType":
                objects.append((cls, f"numpy.dtypes.{attr}"))
    return objects


def data_only_globals() -> frozenset[str]:
    """The names of the classes the safe conversion accepts (e.g. ``"argparse.Namespace"``).

    Example:
        >>> "argparse.Namespace" in data_only_globals()
        True
    """
    names = set()
    for item in _data_only_objects():
        if isinstance(item, tuple):
            names.add(item[1])
        else:
            names.add(f"{item.__module__}.{item.__qualname__}")
    return frozenset(names)


def to_plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` rebuilt from plain values only: Namespaces and dataclasses become dicts, numpy arrays tensors, ...

    Conversions: ``argparse.Namespace`` / ``types.SimpleNamespace`` / dataclass instances / named tuples -> ``dict``;
    ``pathlib`` paths -> ``str``; enum members -> their value; sets -> sorted lists; numpy arrays -> tensors; numpy
    scalars -> Python numbers; tensor subclasses -> tensors; ``nn.Module`` / optimisers -> their ``state_dict()``.

    Args:
        value: a loaded checkpoint or part of one.
        where: how to name ``value`` in errors.

    Raises:
        TypeError: something with no plain form (the message names where it is).

    Example:
        >>> import argparse
        >>> to_plain({"args": argparse.Namespace(lr=0.1, tags={"b", "a"})})
        {'args': {'lr': 0.1, 'tags': ['a', 'b']}}
    """
    if isinstance(value, torch.Tensor):
        return value if type(value) in (torch.Tensor, torch.nn.Parameter) else value.as_subclass(torch.Tensor)
    if type(value) in (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device):
        return value
    if isinstance(value, enum.Enum):
        return to_plain(value.value, where)
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, sub in value.items():
            plain_key = to_plain(key, f"{where} key {key!r}")
            if type(plain_key) not in (str, int):
                raise TypeError(f"{where} has the key {key!r} of type {_type_name(key)}: keys must be str or int")
            out[plain_key] = to_plain(sub, f"{where}[{key!r}]")
        return out
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a named tuple
        return to_plain(dict(value._asdict()), where)
    if isinstance(value, torch.Size):
        return torch.Size(value)
    if isinstance(value, (list, tuple)):
        items = [to_plain(sub, f"{where}[{i}]") for i, sub in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (set, frozenset)):
        items = [to_plain(sub, f"{where} item") for sub in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(value, (argparse.Namespace, types.SimpleNamespace)):
        return to_plain(dict(vars(value)), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, (torch.nn.Module, torch.optim.Optimizer)):
        return to_plain(value.state_dict(), where)
    numpy_value = _from_numpy(value, where)
    if numpy_value is not _NOT_NUMPY:
        return numpy_value
    raise TypeError(f"{where} has type {_type_name(value)}, which has no plain form: convert it by hand")


_NOT_NUMPY = object()


def _from_numpy(value: Any, where: str) -> Any:
    module = type(value).__module__
    if not module.startswith("numpy"):
        return _NOT_NUMPY
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"{where} is a numpy array of Python objects, which has no plain form")
        return torch.from_numpy(np.ascontiguousarray(value)).clone()
    if isinstance(value, np.generic):
        return to_plain(value.item(), where)
    if isinstance(value, np.dtype):
        return str(value)
    return _NOT_NUMPY


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    trusted: bool = False,
    overwrite: bool = False,
    log: Callable[[str], object] | None = None,
) -> Path:
    """Rewrite the checkpoint ``src`` as ``dst`` in the plain format, with its digest.

    ``dst`` is written by :func:`~mixshare_layers.checkpoint.store.save_checkpoint`.

    Args:
        src: the file to convert (it is not changed).
        dst: the new file.
        trusted: unpickle ``src`` completely, running whatever code it holds. Only for files you trust.
        overwrite: replace ``dst`` if it exists (refused otherwise).
        log: called with a line describing each conversion made (e.g. ``print``).

    Returns:
        ``Path(dst)``.

    Raises:
        CheckpointError: ``src`` cannot be read, or (without ``trusted``) stores objects other than data.
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        TypeError: something in ``src`` has no plain form.
        ValueError: ``src`` and ``dst`` are the same file.
    """
    src_p, dst_p = os.fspath(src), Path(dst)
    _require_safe_loading(src_p)
    fh, _ = _open(src_p)
    if dst_p.exists():
        if os.path.samefile(src_p, dst_p):
            fh.close()
            raise ValueError(f"convert into a new file: {dst_p} is the file being converted")
        if not overwrite:
            fh.close()
            raise FileExistsError(f"{dst_p} exists: choose another name (or overwrite=True / --overwrite)")
    with fh:
        try:
            if trusted:
                obj = torch.load(fh, map_location="cpu", weights_only=False)  # asked for by name: see docstring
            else:
                with torch.serialization.safe_globals(_data_only_objects()):
                    obj = torch.load(fh, map_location="cpu", weights_only=True)
        except Exception as err:
            error = _load_error(src_p, err, fh)
            if trusted or "refused" not in error.reason:
                raise error from None
            raise CheckpointError(
                src_p,
                error.reason.replace(", able to run code,", ""),
                "if you made this file yourself or trust its source, add --trusted (trusted=True), which runs "
                "what it holds",
            ) from None
    if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise TypeError(f"{src_p} holds a {_type_name(obj)}: a checkpoint is a dict of named entries")
    plain = to_plain(obj)
    if plain.get("format") == FORMAT:
        plain = {k: v for k, v in plain.items() if k not in RESERVED_KEYS}
    for key in RESERVED_KEYS:  # another program's own format marker: kept under another name
        if key in plain:
            plain[f"source_{key}"] = plain.pop(key)
            if log is not None:
                log(f"{key!r} renamed 'source_{key}'")
    return save_checkpoint(dst_p, plain)  # replaces dst atomically
