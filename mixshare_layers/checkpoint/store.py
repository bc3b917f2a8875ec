"""Saving and loading checkpoint files: plain values only, never an unpickled object, a digest checked on load.

File format (version :data:`FORMAT_VERSION`): the zip archive that ``torch.save`` writes, holding the dict
``{"format": FORMAT, "format_version": FORMAT_VERSION, **entries}``, where every value is a tensor, a ``str``,
``bytes``, ``int``, ``float``, ``complex``, ``bool``, ``None``, a ``torch.dtype`` / ``torch.device``, or a ``dict``
(``str`` / ``int`` keys), ``list`` or ``tuple`` of those. The archive's comment (the last bytes of the file) holds
``mixshare_layers:sha256-4mib:<hex>``, a digest of every byte before it: the SHA-256 of the concatenated SHA-256s of
its consecutive 4 MiB blocks (so that blocks hash on several threads), with the archive's two comment-length bytes
counted as zeros (they must hold the comment's length, 92). One flipped, lost or added byte anywhere in the file is
detected before anything is unpickled. ``torch.load(path, weights_only=True)`` reads such a file as usual (zip
readers ignore the comment).

Loading (:func:`load_checkpoint`) always passes ``weights_only=True`` to ``torch.load`` and never retries without
it. That is enforced, not assumed:

* torch < 2.6 is refused: its weights-only unpickler can be bypassed (CVE-2025-32434), and before 2.6 the
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` variable had other rules. From 2.6 on an explicit ``weights_only=True`` is
  never overridden by that variable (it only changes calls that leave ``weights_only`` out); torch >= 2.10 also fixes
  memory-safety bugs of that unpickler on crafted files (CVE-2026-24747), so use it for files from other people.
* only zip-format files are read (``torch.save``'s format since torch 1.6); the older pickle-stream format is
  refused (convert it, see :mod:`mixshare_layers.checkpoint.convert`);
* what comes out must be plain values as above: a class that some code in the process allow-listed with
  ``torch.serialization.add_safe_globals`` is refused all the same.

A file that needs more than that is refused with a :class:`CheckpointError` whose one-line message says why and how
to convert it if you trust it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import shutil
import stat
import struct
from collections import OrderedDict, deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import torch

from .files import FILE_MODE, fsync_dir, temp_path_in

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MIN_TORCH_VERSION",
    "CheckpointError",
    "CheckpointNotFoundError",
    "load_checkpoint",
    "plain_value_problem",
    "previous_checkpoint_path",
    "save_checkpoint",
    "verify_checkpoint",
]

FORMAT = "mixshare_layers.checkpoint"
FORMAT_VERSION = 1
MIN_TORCH_VERSION = (2, 6)
RESERVED_KEYS = ("format", "format_version")

_TAG = b"mixshare_layers:sha256-4mib:"
_TRAILER_SIZE = len(_TAG) + 64
_EOCD_SIG = b"PK\x05\x06"  # zip "end of central directory" record: 22 bytes, then the archive comment
_EOCD_SIZE = 22
_BLOCK = 4 << 20  # digest block
_ZIP_MAGIC = b"PK\x03\x04"
_TRUE = ("1", "y", "yes", "true")  # what torch.load counts as a set TORCH_FORCE_* variable
_LEAF_TYPES = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)
_SEQUENCE_TYPES = (list, tuple, torch.Size)
_MAPPING_TYPES = (dict, OrderedDict)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_MAX_DEPTH = 100
DOCS_HINT = "docs: how-to 'Checkpoints'"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used. The message is one line: the file, the reason, what to do.

    Attributes:
        path: the file, as given.
        reason: what is wrong with it.
        hint: what to do about it (may be empty).
        damaged: True when the file's bytes are bad (empty, truncated, digest mismatch, not readable as an
            archive): an intact earlier copy is the remedy.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, hint: str = "", *, damaged: bool = False) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        self.hint = hint
        self.damaged = damaged
        super().__init__(f"checkpoint {self.path}: {reason}" + (f"; {hint}" if hint else ""))

    def __str__(self) -> str:  # OSError's __str__ (the not-found subclass) would format errno fields
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (multiprocessing) with its three arguments
        return (_rebuild_error, (type(self), self.path, self.reason, self.hint, self.damaged))


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError``)."""


def _rebuild_error(cls: type[CheckpointError], path: str, reason: str, hint: str, damaged: bool) -> CheckpointError:
    return cls(path, reason, hint, damaged=damaged)


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------
def previous_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save_checkpoint` keeps the previous file: ``run/checkpoint.pt`` -> ``run/checkpoint.prev.pt``.

    Example:
        >>> previous_checkpoint_path("run/checkpoint.pt").as_posix()
        'run/checkpoint.prev.pt'
    """
    p = Path(path)
    return p.with_name(f"{p.stem}.prev{p.suffix}")


def _torch_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _env_set(name: str) -> bool:
    return os.getenv(name, "0").lower() in _TRUE


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + " ...") if len(text) > 300 else text


def _type_name(value: object) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def plain_value_problem(value: object, where: str = "checkpoint") -> str | None:
    """What keeps ``value`` from being stored in a checkpoint, or None if it is made of plain values only.

    Plain: tensors (not subclasses), ``str``, ``bytes``, ``int``, ``float``, ``complex``, ``bool``, ``None``,
    ``torch.dtype``, ``torch.device``, and ``dict`` (``str`` or ``int`` keys), ``list`` and ``tuple`` of those; exact
    types, so a numpy scalar (a ``float`` subclass) or an enum member is not plain.

    Args:
        value: what to check.
        where: how to name ``value`` in the answer.

    Returns:
        None, or e.g. ``"checkpoint['config'] has type argparse.Namespace"``.

    Example:
        >>> import argparse, torch
        >>> plain_value_problem({"model": {"w": torch.ones(2)}, "epoch": 3}) is None
        True
        >>> plain_value_problem({"config": argparse.Namespace(lr=0.1)})
        "checkpoint['config'] has type argparse.Namespace"
    """
    stack: list[tuple[object, str, int]] = [(value, where, 0)]
    while stack:
        item, name, depth = stack.pop()
        kind = type(item)
        if kind in _TENSOR_TYPES or kind in _LEAF_TYPES:
            continue
        if depth >= _MAX_DEPTH:
            return f"{name} is nested more than {_MAX_DEPTH} levels deep (a container that holds itself?)"
        if isinstance(item, dict) and kind in _MAPPING_TYPES:
            for key, sub in item.items():
                if type(key) not in (str, int):
                    return f"{name} has the key {key!r} of type {_type_name(key)} (keys must be str or int)"
                stack.append((sub, f"{name}[{key!r}]", depth + 1))
        elif isinstance(item, (list, tuple)) and kind in _SEQUENCE_TYPES:
            stack.extend((sub, f"{name}[{i}]", depth + 1) for i, sub in enumerate(item))
        else:
            return f"{name} has type {_type_name(item)}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# the digest in the archive comment
# ----------------------------------------------------------------------------------------------------------------
def _block_digest(data: Any) -> bytes:
    return hashlib.sha256(data).digest()  # releases the GIL: blocks hash in parallel on the pool's threads


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _digest_of_prefix(fh: IO[bytes], length: int) -> str:
    """The digest of the file's first ``length`` bytes, its last two (the comment length) counted as zeros."""
    top = hashlib.sha256()
    fh.seek(0)
    with ThreadPoolExecutor(_workers() if length > _BLOCK else 1) as pool:  # threads start on the first submit
        pending: deque[Future[bytes]] = deque()
        for start in range(0, length, _BLOCK):
            want = min(_BLOCK, length - start)
            block = fh.read(want)
            if len(block) != want:
                raise EOFError("the file got shorter while it was read")
            if start + want > length - 2:  # the block holds (some of) the comment-length bytes
                patched = bytearray(block)
                for offset in (length - 2, length - 1):
                    if start <= offset < start + want:
                        patched[offset - start] = 0
                block = bytes(patched)
            if length <= _BLOCK:  # one block: no thread
                top.update(_block_digest(block))
                continue
            pending.append(pool.submit(_block_digest, block))
            while len(pending) > 2 * _workers():  # bounded memory: a few blocks in flight
                top.update(pending.popleft().result())
        while pending:
            top.update(pending.popleft().result())
    return top.hexdigest()


def _stored_digest(fh: IO[bytes], size: int) -> str | None:
    """The digest in the file's last bytes, or None when the file carries none."""
    if size < _EOCD_SIZE + _TRAILER_SIZE:
        return None
    fh.seek(size - _TRAILER_SIZE)
    trailer = fh.read(_TRAILER_SIZE)
    if not trailer.startswith(_TAG):
        return None
    return trailer[len(_TAG) :].decode("ascii", errors="replace")


class _HashingWriter:
    """Writes to ``fh`` and hashes what it writes on a pool of threads, while the bytes are being written.

    Whole blocks of a large write are hashed in place (the write waits for their digests before it returns, so the
    caller's buffer is never read afterwards); a block that straddles writes is gathered in a copy. ``end`` keeps
    the last 22 bytes written (the archive's end record).
    """

    def __init__(self, fh: IO[bytes], pool: ThreadPoolExecutor) -> None:
        self.fh = fh
        self.pool = pool
        self.partial = bytearray()
        self.digests: list[Future[bytes]] = []
        self.size = 0
        self.end = b""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        pos = 0
        if self.partial:
            pos = min(_BLOCK - len(self.partial), n)
            self.partial += view[:pos]
            if len(self.partial) == _BLOCK:
                self.digests.append(self.pool.submit(_block_digest, bytes(self.partial)))
                self.partial = bytearray()
        in_place = []
        while n - pos >= _BLOCK:
            in_place.append(self.pool.submit(_block_digest, view[pos : pos + _BLOCK]))
            pos += _BLOCK
        self.digests.extend(in_place)
        self.partial += view[pos:]
        try:
            self.fh.write(view)  # while the pool hashes
        finally:  # the caller's buffer must outlive every read of it, even when the write fails
            for future in in_place:
                future.exception()
        self.size += n
        self.end = (self.end + bytes(view[-_EOCD_SIZE:]))[-_EOCD_SIZE:]
        return n

    def flush(self) -> None:
        self.fh.flush()

    def hexdigest(self) -> str:
        """The digest of everything written (in blocks of 4 MiB)."""
        top = hashlib.sha256()
        for future in self.digests:
            top.update(future.result())
        if self.partial:
            top.update(_block_digest(bytes(self.partial)))
        return top.hexdigest()


def _save_with_digest(payload: dict[str, Any], fh: IO[bytes]) -> str:
    """``torch.save(payload)`` into ``fh`` as a zip archive whose comment is the digest of all bytes before it.

    The digest is computed while the bytes are written; torch writes no comment, so the two comment-length bytes it
    hashes are zeros, as the digest counts them. Then they get the comment's length and the comment is appended.
    """
    with ThreadPoolExecutor(_workers()) as pool:
        writer = _HashingWriter(fh, pool)
        torch.save(payload, writer)  # type: ignore[arg-type]  # torch only calls write() and flush()
        end = writer.end
        if len(end) != _EOCD_SIZE or end[:4] != _EOCD_SIG or end[20:22] != b"\0\0":
            raise RuntimeError("torch.save wrote an archive without the expected end record: cannot add the digest")
        digest = writer.hexdigest()
    fh.seek(writer.size - 2)
    fh.write(struct.pack("<H", _TRAILER_SIZE))  # the comment's length
    fh.write(_TAG + digest.encode("ascii"))
    return digest


def _check_digest(fh: IO[bytes], size: int, path: str) -> bool:
    """True if the file carries a digest and it matches; False if it carries none; CheckpointError if it differs."""
    stored = _stored_digest(fh, size)
    if stored is None:
        return False
    length = size - _TRAILER_SIZE
    fh.seek(length - 2)
    actual = _digest_of_prefix(fh, length) if fh.read(2) == struct.pack("<H", _TRAILER_SIZE) else "wrong length"
    if actual != stored:
        raise CheckpointError(
            path,
            f"is damaged: its bytes do not match the SHA-256 digest written with it ({size} bytes; a changed, lost "
            "or added byte)",
            _fallback_hint(path),
            damaged=True,
        )
    return True


def _fallback_hint(path: str) -> str:
    prev = previous_checkpoint_path(path)
    try:
        usable = prev.is_file() and not os.path.samefile(prev, path)
    except OSError:
        usable = False
    if usable:
        return f"the previous checkpoint {prev} is kept next to it: use that file instead"
    return "use an earlier copy of it (nothing was loaded from this one)"


# ----------------------------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike[str], checkpoint: Mapping[str, Any], *, keep_previous: bool = False
) -> Path:
    """Write ``checkpoint`` to ``path`` with a SHA-256 digest, atomically, verified before it replaces the old file.

    The file is written under a temporary name next to ``path``, flushed to disk, read back and checked against its
    digest, and only then renamed onto ``path``: a crash at any moment leaves the old file or the new one, complete.
    With ``keep_previous``, the file ``path`` held (if its digest verifies) becomes
    :func:`previous_checkpoint_path` first (a hard link where the file system has them, else a copy), so that there
    is always an intact earlier checkpoint to fall back on; ``path`` itself exists at every moment.

    Args:
        path: the checkpoint file (missing folders are created).
        checkpoint: the entries, made of plain values only (see :func:`plain_value_problem`): e.g.
            ``{"model": model.state_dict(), "config": {...}, "epoch": 3}``. The keys ``"format"`` and
            ``"format_version"`` are added by this function.
        keep_previous: keep the file being replaced as ``<stem>.prev<suffix>``.

    Returns:
        ``Path(path)``.

    Raises:
        TypeError: a value is not plain (the message names it, e.g. ``checkpoint['config'] has type
            argparse.Namespace``: store ``vars(namespace)`` instead).
        ValueError: ``checkpoint`` uses a reserved key.

    Example:
        >>> import tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> path = save_checkpoint(f"{folder}/ck.pt", {"model": {"w": torch.ones(2)}, "epoch": 1})
        >>> load_checkpoint(path)["epoch"], verify_checkpoint(path)
        (1, True)
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict of named entries, but got {_type_name(checkpoint)}")
    clash = [k for k in RESERVED_KEYS if k in checkpoint]
    if clash:
        raise ValueError(f"checkpoint must not hold the keys {clash}: save_checkpoint writes them")
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **checkpoint}
    problem = plain_value_problem(payload)
    if problem is not None:
        raise TypeError(
            f"{problem}, but a checkpoint holds tensors, numbers, strings, None and dicts / lists / tuples of them "
            "only, so that it loads without running code (store vars(obj) for a Namespace, .tolist() or a tensor "
            "for numpy values, state_dict() for a module)"
        )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_path_in(target)
    try:
        with os.fdopen(fd, "wb") as fh:
            _save_with_digest(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb") as fh:  # read back what reached the file system
            if not _check_digest(fh, os.fstat(fh.fileno()).st_size, tmp):
                raise OSError(f"{tmp}: the digest written with the checkpoint is missing when read back")
        if keep_previous and target.is_file() and _verifies(target):
            _keep_as_previous(target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)
    _WRITTEN[os.path.realpath(target)] = _identity(target)
    return target


# files this process wrote and verified, by real path: (device, inode, size, mtime); a file found unchanged when it
# is about to become the previous one is not hashed again
_WRITTEN: dict[str, tuple[int, int, int, int]] = {}


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _verifies(path: Path) -> bool:
    try:
        if _WRITTEN.get(os.path.realpath(path)) == _identity(path):
            return True
        return verify_checkpoint(path)
    except (CheckpointError, OSError):
        return False  # a damaged file is replaced, never kept as the fallback


def _keep_as_previous(current: Path) -> None:
    prev = previous_checkpoint_path(current)
    fd, tmp = temp_path_in(prev)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(current, tmp)  # same bytes, no copy; `current` is replaced by a rename, never changed in place
        except OSError:  # no hard links on this file system
            shutil.copyfile(current, tmp)
        os.replace(tmp, prev)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------
def _open(path: str) -> tuple[IO[bytes], int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        hint = "check the path" + ("" if not os.path.islink(path) else " (it is a link to a missing file)")
        raise CheckpointNotFoundError(path, "does not exist", hint) from None
    except OSError as err:
        raise CheckpointError(path, f"cannot be read ({err.strerror or _one_line(err)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(path, "is a folder, not a file", "give the checkpoint file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(path, "is not a regular file", "give a checkpoint file")
    try:
        fh = open(path, "rb")
    except OSError as err:
        raise CheckpointError(
            path, f"cannot be read ({err.strerror or _one_line(err)})", "check the file's permissions"
        ) from None
    return fh, st.st_size


def _require_safe_loading(path: str) -> None:
    version = _torch_version()
    if version < MIN_TORCH_VERSION:
        need = ".".join(map(str, MIN_TORCH_VERSION))
        raise CheckpointError(
            path,
            f"not loaded: torch {torch.__version__} cannot load a file without the risk of running code from it "
            f"(its weights_only=True can be bypassed, CVE-2025-32434)",
            f"upgrade to torch >= {need} (>= 2.10 for files from other people)",
        )
    if _env_set("TORCH_FORCE_WEIGHTS_ONLY_LOAD") and _env_set("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        raise CheckpointError(
            path,
            "not loaded: TORCH_FORCE_WEIGHTS_ONLY_LOAD and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD are both set, which torch "
            "refuses",
            "unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD (checkpoints are always loaded with weights_only=True)",
        )


def _unsafe_globals(fh: IO[bytes]) -> list[str]:
    """The Python names the file's pickle would call or import (read from its opcodes; nothing is executed)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        fh.seek(0)
        return sorted(set(finder(fh)))
    except Exception:  # a damaged archive: the caller reports the load error instead
        return []


def _refused_objects_error(path: str, names: list[str]) -> CheckpointError:
    from .convert import data_only_globals  # convert imports this module

    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    if set(names) <= data_only_globals():
        hint = (
            f"they are plain data: convert the file once (no code runs) with `python -m mixshare_layers.checkpoint "
            f"convert {path} NEW.pt` ({DOCS_HINT})"
        )
    else:
        hint = (
            "only if you made this file yourself or trust its source, convert it once with `python -m "
            f"mixshare_layers.checkpoint convert --trusted {path} NEW.pt`, which runs what it holds ({DOCS_HINT})"
        )
    return CheckpointError(
        path,
        f"refused: it stores Python objects ({shown}) that only a full unpickle, able to run code, would rebuild",
        hint,
    )


def _load_error(path: str, err: BaseException, fh: IO[bytes]) -> CheckpointError:
    full = " ".join(str(err).split())
    text = _one_line(err).split(". ")[0]  # torch's zip errors go on with generic advice
    if isinstance(err, pickle.UnpicklingError):
        names = _unsafe_globals(fh)
        if names or "was not an allowed global" in full or "Unsupported global" in full:
            return _refused_objects_error(path, names or ["unknown"])
    if "TorchScript" in full:
        return CheckpointError(path, "is a TorchScript archive (torch.jit.save), not a checkpoint", "torch.jit.load it")
    return CheckpointError(
        path,
        f"cannot be read as a checkpoint, it is truncated or damaged ({type(err).__name__}: {text})",
        _fallback_hint(path),
        damaged=True,
    )


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: Any = "cpu", require_digest: bool = False
) -> dict[str, Any]:
    """Load a checkpoint file safely: ``torch.load(..., weights_only=True)``, never more, digest checked first.

    Files written by :func:`save_checkpoint` have their digest verified before anything is unpickled and are
    returned as they were given (without the ``format`` keys). Other files (a ``dict`` saved with ``torch.save``)
    load too when they hold plain values only, unverified; ``require_digest=True`` refuses them.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load`` (default: every tensor on the CPU).
        require_digest: refuse a file that carries no digest.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointNotFoundError: no such file (a ``FileNotFoundError`` too).
        CheckpointError: anything else: a folder, an unreadable, empty, truncated or damaged file (digest mismatch),
            a file that stores Python objects (refused: it could run code; the message says how to convert a
            trusted one), the old non-zip ``torch.save`` format, a newer format version, not a dict, torch < 2.6.

    Example:
        >>> import tempfile, torch
        >>> path = save_checkpoint(f"{tempfile.mkdtemp()}/ck.pt", {"config": {"depth": 10}, "step": 7})
        >>> load_checkpoint(path)
        {'config': {'depth': 10}, 'step': 7}
    """
    p = os.fspath(path)
    _require_safe_loading(p)
    fh, size = _open(p)
    with fh:
        if size == 0:
            raise CheckpointError(p, "is empty (0 bytes): its writing never finished", _fallback_hint(p), damaged=True)
        head = fh.read(4)
        if head != _ZIP_MAGIC:
            if head[:1] == b"\x80":
                raise CheckpointError(
                    p,
                    "is a pickle stream (torch.save's format before torch 1.6, or pickle.dump), which is not read",
                    f"convert it once with `python -m mixshare_layers.checkpoint convert {p} NEW.pt` ({DOCS_HINT})",
                )
            raise CheckpointError(
                p, "is not a checkpoint: it is not a zip archive as torch.save writes", _fallback_hint(p), damaged=True
            )
        verified = _check_digest(fh, size, p)
        if require_digest and not verified:
            raise CheckpointError(
                p,
                "carries no integrity digest (it was not written by mixshare_layers.checkpoint.save_checkpoint)",
                f"convert it once with `python -m mixshare_layers.checkpoint convert {p} NEW.pt`",
            )
        fh.seek(0)
        try:
            obj = torch.load(fh, map_location=map_location, weights_only=True)
        except Exception as err:  # zip, pickle, storage and EOF errors come in many types
            raise _load_error(p, err, fh) from None
    if not isinstance(obj, dict):
        raise CheckpointError(p, f"holds a {_type_name(obj)}, not a dict of named entries", "give a checkpoint file")
    problem = plain_value_problem(obj)
    if problem is not None:  # only possible for classes allow-listed with torch.serialization.add_safe_globals
        raise CheckpointError(p, f"refused: {problem}, not a plain value", f"convert the file ({DOCS_HINT})")
    if obj.get("format") != FORMAT:
        return obj
    version = obj.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(p, f"has an invalid format_version {version!r}", _fallback_hint(p), damaged=True)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            p,
            f"was written in format version {version} by a newer mixshare_layers; this one reads up to version "
            f"{FORMAT_VERSION}",
            "upgrade mixshare_layers",
        )
    if not verified:
        raise CheckpointError(
            p, "is damaged: it was written with a digest that is no longer there (its end was cut or changed)",
            _fallback_hint(p), damaged=True,
        )  # fmt: skip
    return {k: v for k, v in obj.items() if k not in RESERVED_KEYS}


def verify_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Check a checkpoint file's digest without unpickling anything.

    Args:
        path: the checkpoint file.

    Returns:
        True when the file carries a digest and every byte matches it; False when it carries none (a file not
        written by :func:`save_checkpoint`: nothing can be said).

    Raises:
        CheckpointError: the digest does not match (the file is damaged), or the file cannot be read (missing, a
            folder, no permission, empty).
    """
    p = os.fspath(path)
    fh, size = _open(p)
    with fh:
        if size == 0:
            raise CheckpointError(p, "is empty (0 bytes): its writing never finished", _fallback_hint(p), damaged=True)
        return _check_digest(fh, size, p)
