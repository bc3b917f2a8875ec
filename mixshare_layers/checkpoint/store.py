"""Checkpoint files: plain values only, loaded with ``weights_only=True`` and never more, a digest checked first.

A file is the zip archive ``torch.save`` writes of ``{"format": FORMAT, "format_version": FORMAT_VERSION, **entries}``
ending with its comment ``mixshare_layers:sha256-file:<hex>``: the SHA-256 of every byte before it, the comment's
length counted as zeros (version 1: ``...:sha256-4mib:<hex>``, the SHA-256 of the SHA-256s of 4 MiB blocks)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import shutil
import stat
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from ..files import FILE_MODE, fsync_dir, temp_path_in

__all__ = ["FORMAT", "FORMAT_VERSION", "MIN_TORCH_VERSION", "CheckpointError", "CheckpointNotFoundError",
           "load_checkpoint", "plain_value_problem", "previous_checkpoint_path", "save_checkpoint",
           "verify_checkpoint"]  # fmt: skip

FORMAT = "mixshare_layers.checkpoint"
FORMAT_VERSION = 2
MIN_TORCH_VERSION = (2, 6)
RESERVED_KEYS = ("format", "format_version")
CONVERT = "python -m mixshare_layers.checkpoint convert"
_TAG, _TREE_TAG = b"mixshare_layers:sha256-file:", b"mixshare_layers:sha256-4mib:"  # format versions 2 and 1
_TRAILER_SIZE, _BLOCK = len(_TAG) + 64, 4 << 20  # the archive comment; the read size (version 1's block)
_PLAIN = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Tensor, nn.Parameter)
_TRUE = ("1", "y", "yes", "true")  # what torch counts as a set TORCH_FORCE_* variable


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line: the file, ``reason``, ``hint`` (what to do).
    ``damaged``: the file's bytes are bad (empty, truncated, digest mismatch), so an earlier copy is the remedy."""

    def __init__(self, path: str | os.PathLike[str], reason: str, hint: str = "", *, damaged: bool = False) -> None:
        self.path, self.reason, self.hint, self.damaged = os.fspath(path), reason, hint, damaged
        super().__init__(f"checkpoint {self.path}: {reason}" + (f"; {hint}" if hint else ""))

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (DataLoader workers) intact
        return (type(self), (self.path, self.reason, self.hint), {"damaged": self.damaged})


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError``)."""


def _damaged(path: str, reason: str) -> CheckpointError:
    prev, hint = previous_checkpoint_path(path), "use an earlier copy of it (nothing was loaded from this one)"
    if prev.is_file():
        hint = f"the previous checkpoint {prev} is kept next to it: use that file instead"
    return CheckpointError(path, reason, hint, damaged=True)


def previous_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """Where ``save_checkpoint(..., keep_previous=True)`` keeps the file it replaces: ``ck.pt`` -> ``ck.prev.pt``."""
    return Path(path).with_name(f"{Path(path).stem}.prev{Path(path).suffix}")


def _intact(path: str | os.PathLike[str]) -> bool:  # a file whose digest verifies (False: missing, none, damaged)
    try:
        return Path(path).is_file() and verify_checkpoint(path)
    except (CheckpointError, OSError):
        return False


def _type_name(value: object) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:300] + " ..."


def plain_value_problem(value: object, where: str = "checkpoint") -> str | None:
    """Why ``value`` is not plain (e.g. ``"checkpoint['config'] has type argparse.Namespace"``), or None if it is.

    Plain, with exactly these types: tensors, ``str``, ``bytes``, ``int``, ``float``, ``complex``, ``bool``,
    ``None``, ``torch.dtype``, ``torch.device``, and dicts (``str`` or ``int`` keys), lists and tuples of them."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, name, depth = stack.pop()
        if type(item) in (dict, OrderedDict):
            bad = [key for key in item if type(key) not in (str, int)]
            if bad:
                return f"{name} has the key {bad[0]!r} of type {_type_name(bad[0])} (keys must be str or int)"
            stack.extend((sub, f"{name}[{key!r}]", depth + 1) for key, sub in item.items())
        elif type(item) in (list, tuple, torch.Size):
            stack.extend((sub, f"{name}[{i}]", depth + 1) for i, sub in enumerate(item))
        elif type(item) not in _PLAIN:
            return f"{name} has type {_type_name(item)}"
        if depth > 100:
            return f"{name} is nested more than 100 levels deep (a container that holds itself?)"
    return None


def _digest(fh: IO[bytes], length: int, tree: bool = False) -> bytes:
    """The hex SHA-256 of the file's first ``length`` bytes, the last two (the comment's length) counted as zeros."""
    top, buf = hashlib.sha256(), memoryview(bytearray(_BLOCK))
    fh.seek(0)
    for start in range(0, length, _BLOCK):
        n = fh.readinto(buf[: min(_BLOCK, length - start)])  # type: ignore[attr-defined]
        for i in range(max(start, length - 2), start + n):
            buf[i - start] = 0
        top.update(hashlib.sha256(buf[:n]).digest() if tree else buf[:n])  # tree: format version 1
    return top.hexdigest().encode()


def _check_digest(fh: IO[bytes], size: int, path: str) -> bool:
    """True if the file carries a digest and it matches; False if it carries none; CheckpointError if it differs."""
    fh.seek(max(0, size - _TRAILER_SIZE - 2))
    trailer = fh.read()
    tag = trailer[2 : 2 + len(_TAG)]
    if size < 22 + _TRAILER_SIZE or tag not in (_TAG, _TREE_TAG):
        return False
    stored, length = trailer[2 + len(_TAG) :], size - _TRAILER_SIZE
    if trailer[:2] != _TRAILER_SIZE.to_bytes(2, "little") or _digest(fh, length, tag == _TREE_TAG) != stored:
        reason = f"({size} bytes; a changed, lost or added byte)"
        raise _damaged(path, f"is damaged: its bytes do not match the SHA-256 digest written with it {reason}")
    return True


def save_checkpoint(
    path: str | os.PathLike[str], checkpoint: Mapping[str, Any], *, keep_previous: bool = False
) -> Path:
    """Write ``checkpoint`` (plain values: :func:`plain_value_problem`, else TypeError) to ``path``, with its digest.

    The file is written next to ``path``, its digest appended, flushed, then renamed onto ``path``: a crash leaves
    the old file or the new one, complete. With ``keep_previous``, the file being replaced, if its digest verifies,
    becomes :func:`previous_checkpoint_path` first (a hard link, or a copy): an intact earlier file always exists."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict of named entries, but got {_type_name(checkpoint)}")
    if any(k in checkpoint for k in RESERVED_KEYS):
        raise ValueError(f"checkpoint must not hold the keys {list(RESERVED_KEYS)}: save_checkpoint writes them")
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **checkpoint}
    if (problem := plain_value_problem(payload)) is not None:
        store = "store vars(obj) for a Namespace, .tolist() or a tensor for numpy values, state_dict() for a module"
        raise TypeError(f"{problem}, but a checkpoint holds plain values only, so that it loads safely: {store}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_path_in(target)
    try:
        with os.fdopen(fd, "w+b") as fh:
            torch.save(payload, fh)
            size = fh.seek(-22, os.SEEK_END) + 22
            end = fh.read()
            if end[:4] != b"PK\x05\x06" or end[-2:] != b"\0\0":  # the zip end record, without a comment yet
                raise RuntimeError("torch.save wrote an archive without the expected end record: cannot add the digest")
            digest = _digest(fh, size)
            fh.seek(size - 2)
            fh.write(_TRAILER_SIZE.to_bytes(2, "little") + _TAG + digest)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        if keep_previous and _intact(target):  # a damaged file is replaced, never kept as the fallback
            try:
                os.link(target, f"{tmp}.prev")  # same bytes, no copy: `target` is only ever replaced by a rename
            except OSError:  # no hard links on this file system
                shutil.copyfile(target, f"{tmp}.prev")
            os.replace(f"{tmp}.prev", previous_checkpoint_path(target))
        os.replace(tmp, target)
    except BaseException:
        for leftover in (tmp, f"{tmp}.prev"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        raise
    fsync_dir(target.parent)
    return target


def _open(path: str) -> tuple[IO[bytes], int]:  # the file open for reading and its size, or a CheckpointError
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(path, "is a folder, not a file" if stat.S_ISDIR(st.st_mode) else "is not a file")
        if st.st_size == 0:
            raise _damaged(path, "is empty (0 bytes): its writing never finished")
        return open(path, "rb"), st.st_size
    except FileNotFoundError:
        link = " (it is a link to a missing file)" if os.path.islink(path) else ""
        raise CheckpointNotFoundError(path, "does not exist", "check the path" + link) from None
    except OSError as err:
        reason = f"cannot be read ({err.strerror or _one_line(err)})"
        raise CheckpointError(path, reason, "check the file's permissions") from None


def _require_safe_loading(path: str) -> None:
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < MIN_TORCH_VERSION:
        reason = f"not loaded: torch {torch.__version__} cannot load a file without the risk of running code from it"
        raise CheckpointError(path, reason, "upgrade to torch >= 2.6 (>= 2.10 for files from other people)")
    if all(os.getenv(f"TORCH_FORCE_{v}WEIGHTS_ONLY_LOAD", "").lower() in _TRUE for v in ("", "NO_")):
        reason = "not loaded: TORCH_FORCE_WEIGHTS_ONLY_LOAD and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD are both set"
        raise CheckpointError(path, reason, "unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


def _load_error(path: str, err: Exception, fh: IO[bytes]) -> CheckpointError:  # for what torch.load raised
    text, names = _one_line(err), []
    if isinstance(err, pickle.UnpicklingError):
        with contextlib.suppress(Exception):  # the names the pickle would import, read from its opcodes
            fh.seek(0)
            names = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(fh)))
        names = names or (["unknown"] if "allowed global" in text or "Unsupported global" in text else [])
    if "TorchScript" in text:
        return CheckpointError(path, "is a TorchScript archive (torch.jit.save), not a checkpoint", "torch.jit.load it")
    if not names:  # torch's zip errors go on with generic advice after the first sentence
        return _damaged(path, f"is truncated or damaged ({type(err).__name__}: {text.split('. ')[0]})")
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    hint = f"they are plain data: convert the file once (no code runs) with `{CONVERT} {path} NEW.pt`"
    if not all(n.startswith(("argparse.Namespace", "types.SimpleNamespace", "pathlib.", "numpy.")) for n in names):
        hint = "only if you trust its source, convert it in Python: save_checkpoint(NEW, to_plain(torch.load(PATH, "
        hint += "weights_only=False))), which runs its code"
    reason = f"refused: it stores Python objects ({shown}) that only a full unpickle, able to run code, would rebuild"
    return CheckpointError(path, reason, hint)


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: Any = "cpu", require_digest: bool = False
) -> dict[str, Any]:
    """Load a checkpoint file safely: its digest checked, then ``torch.load(..., weights_only=True)``, never more.

    A file of :func:`save_checkpoint` comes back as it was given; a dict of plain values with no ``format`` entry
    (another program's weights) loads too, unverified, unless ``require_digest``. Anything else raises a one-line
    :class:`CheckpointError` (:class:`CheckpointNotFoundError` for a missing file) that says what to do."""
    p = os.fspath(path)
    _require_safe_loading(p)
    fh, size = _open(p)
    with fh:
        head = fh.read(4)
        if head[:1] == b"\x80":
            reason = "is a pickle stream (torch.save's format before torch 1.6, or pickle.dump), which is not read"
            raise CheckpointError(p, reason, f"convert it once with `{CONVERT} {p} NEW.pt`")
        if head != b"PK\x03\x04":
            raise _damaged(p, "is not a checkpoint: it is not a zip archive as torch.save writes")
        verified = _check_digest(fh, size, p)
        if require_digest and not verified:
            reason = "carries no integrity digest (it was not written by mixshare_layers.checkpoint)"
            raise CheckpointError(p, reason, f"convert it once with `{CONVERT} {p} NEW.pt`")
        fh.seek(0)
        try:
            obj = torch.load(fh, map_location=map_location, weights_only=True)
        except Exception as err:  # zip, pickle, storage and EOF errors come in many types
            raise _load_error(p, err, fh) from None
    if not isinstance(obj, dict):
        raise CheckpointError(p, f"holds a {_type_name(obj)}, not a dict of named entries", "give a checkpoint file")
    if (problem := plain_value_problem(obj)) is not None:  # only classes given to torch's add_safe_globals get here
        raise CheckpointError(p, f"refused: {problem}, not a plain value", f"convert it once with `{CONVERT}`")
    if "format" not in obj:
        return obj
    if obj["format"] != FORMAT:
        reason = f"has the format tag {obj['format']!r}, not {FORMAT!r}: another program's file, or an older script's"
        hint = f"if it holds plain weights, convert it once with `{CONVERT} {p} NEW.pt` (the tag becomes source_format)"
        raise CheckpointError(p, reason, hint)
    version = obj.get("format_version")
    if type(version) is not int or version < 1:
        raise _damaged(p, f"has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        reason = f"was written in format version {version} by a newer mixshare_layers (this one reads up to"
        raise CheckpointError(p, f"{reason} {FORMAT_VERSION})", "upgrade mixshare_layers")
    if not verified:
        raise _damaged(p, "is damaged: it was written with a digest that is no longer there (its end was cut)")
    return {k: v for k, v in obj.items() if k not in RESERVED_KEYS}


def verify_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Check a file's digest, unpickling nothing: True if it matches, False if it has none, else a CheckpointError."""
    fh, size = _open(os.fspath(path))
    with fh:
        return _check_digest(fh, size, os.fspath(path))
