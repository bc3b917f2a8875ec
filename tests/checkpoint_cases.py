"""Damaged, refused and foreign checkpoint files for the tests of every entry point that loads one.

``make_case(name, good, target, marker)`` writes the file (or folder) ``target`` for one case, derived from the good
checkpoint ``good`` (a file written by :func:`mixshare_layers.checkpoint.save_checkpoint`); ``CASES`` maps each case
to a regex the one-line error must match.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
from pathlib import Path

import torch

from mixshare_layers.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, save_checkpoint, store


class CodeRunner:
    """Unpickling this runs code: it creates ``marker`` (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def code_running_checkpoint(path: Path, marker: Path, **entries: object) -> Path:
    """A checkpoint that looks like a training checkpoint but whose model entry runs code when unpickled."""
    torch.save({**entries, "model": {"weight": CodeRunner(marker)}}, path)
    return path


def _flip_tensor_byte(data: bytes, checkpoint: dict) -> bytes:
    """``data`` with one bit flipped in the middle of the largest tensor's bytes."""
    tensors = [t for t in checkpoint["model"].values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    largest = max(tensors, key=lambda t: t.numel())
    raw = largest.contiguous().numpy().tobytes()
    at = data.index(raw) + len(raw) // 2
    out = bytearray(data)
    out[at] ^= 0x04
    return bytes(out)


CASES = {
    "empty": r"is empty \(0 bytes\)",
    "truncated": "truncated or damaged",
    "random_bytes": "not a zip archive",
    "flipped_tensor_byte": "do not match the SHA-256 digest",
    "digest_cut_off": "truncated or damaged|digest that is no longer there",
    "code_running_pickle": r"refused: it stores Python objects \(builtins\.exec\)",
    "namespace_config": r"refused: it stores Python objects \(argparse\.Namespace\)",
    "pickle_stream": "pickle stream",
    "newer_format_version": f"format version {FORMAT_VERSION + 1} by a newer mixshare_layers",
    "foreign_format": r"has the format tag 'something\.else', not 'mixshare_layers\.checkpoint'",
    "not_a_dict": "holds a list, not a dict",
    "a_folder": "is a folder, not a file",
    "missing_model": "lacks|no 'model'|state_dict under 'model'",
}


def make_case(name: str, good: Path, target: Path, marker: Path) -> None:
    data = good.read_bytes()
    good_checkpoint = load_checkpoint(good)  # read before `target` (possibly `good` itself) is replaced
    if target.exists():
        target.unlink()
    if name == "empty":
        target.write_bytes(b"")
    elif name == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif name == "random_bytes":
        target.write_bytes(os.urandom(len(data) // 4))
    elif name == "flipped_tensor_byte":
        target.write_bytes(_flip_tensor_byte(data, good_checkpoint))
    elif name == "digest_cut_off":
        target.write_bytes(data[: -store._TRAILER_SIZE])
    elif name == "code_running_pickle":
        code_running_checkpoint(target, marker, epoch=1)
    elif name == "namespace_config":
        checkpoint = dict(good_checkpoint)
        checkpoint["config"] = argparse.Namespace(**checkpoint.get("config", {"depth": 10}))
        torch.save(checkpoint, target)
    elif name == "pickle_stream":
        target.write_bytes(pickle.dumps({"model": {}}))
    elif name == "newer_format_version":
        torch.save({**good_checkpoint, "format": FORMAT, "format_version": FORMAT_VERSION + 1}, target)
    elif name == "foreign_format":  # the library's keys under another program's tag
        torch.save({**good_checkpoint, "format": "something.else", "format_version": FORMAT_VERSION}, target)
    elif name == "not_a_dict":
        torch.save(list(good_checkpoint["model"].values()), target)
    elif name == "a_folder":
        target.mkdir()
    elif name == "missing_model":
        checkpoint = dict(good_checkpoint)
        del checkpoint["model"]
        save_checkpoint(target, checkpoint)
    else:
        raise KeyError(name)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
