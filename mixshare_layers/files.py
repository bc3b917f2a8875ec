"""Files written in one step: a temporary file in the target's folder, fsync, ``os.replace``, fsync of the folder.

Every file the package and its examples write goes through :func:`atomic_write` (text, JSON and figures through
its three short forms), so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FILE_MODE",
    "atomic_write",
    "folder_problem",
    "fsync_dir",
    "save_figure",
    "temp_path_in",
    "write_json",
    "write_text",
]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file (mkstemp makes it 0o600)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder
            os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_in(target: Path) -> tuple[int, str]:
    """A new empty temporary file next to ``target`` (hidden, named after it): ``(fd, path)``."""
    return tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then move it onto ``path`` in one step.

    A crash or an exception inside ``write`` leaves ``path`` as it was (absent or the old content), never
    half-written; the temporary file is removed. Missing parent folders are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_path_in(target)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)
    return target


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` as UTF-8, atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike[str], obj: object) -> Path:
    """Write ``obj`` as indented JSON (keys in their order), atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_figure(fig: Any, path: str | os.PathLike[str], formats: tuple[str, ...] | list[str] = ("png",)) -> list[Path]:
    """Save a matplotlib figure as ``<path>.<fmt>`` for each format, atomically; returns the files written.

    SVG files are written without a date, so the same figure gives the same bytes.
    """
    stem = Path(path)
    written = []
    for fmt in formats:
        metadata = {"Date": None} if fmt == "svg" else None

        def save(fh: IO[bytes], fmt: str = fmt, metadata: dict[str, None] | None = metadata) -> None:
            fig.savefig(fh, format=fmt, metadata=metadata)

        written.append(atomic_write(stem.with_name(f"{stem.name}.{fmt}"), save))
    return written


def folder_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the folder ``path`` cannot be created or written to, or None if it can; leaves nothing on disk.

    The nearest existing ancestor must be a folder in which a new entry can be made (tried with a temporary folder,
    removed at once: permission bits alone do not tell, e.g. for root or a read-only mount).
    """
    target = Path(path)
    probe = target
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder" if probe == target else f"it is under {probe}, which is a file"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=probe))
    except OSError as err:
        return f"nothing can be created in {probe} ({err.strerror or err})"
    return None
