"""Checkpoint files that load without running code, carry a digest, and keep the previous good one.

The rule, for every entry point of the package and its examples: a checkpoint holds tensors and plain values only
(numbers, strings, ``None``, dicts / lists / tuples of them), so ``torch.load(..., weights_only=True)`` always
suffices; files are loaded that way and never with ``weights_only=False``, whatever the environment says
(``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) and never on a torch too old to enforce it. A file that needs more is
refused with a one-line :class:`CheckpointError` that says how to convert it once if you trust it
(:func:`convert_checkpoint`, ``python -m mixshare_layers.checkpoint convert``).

* :func:`save_checkpoint` / :func:`load_checkpoint`: the format of :mod:`mixshare_layers.checkpoint.store` (a
  ``torch.save`` zip archive with a SHA-256 digest of the whole file in its comment, a format version);
* :func:`verify_checkpoint`: check a file's digest without loading it;
* :func:`convert_checkpoint` / :func:`to_plain`: rewrite a file that stores Python objects;
* ``python -m mixshare_layers.checkpoint verify FILE...`` / ``convert [--trusted] SRC DST``.

Example:
    >>> import tempfile, torch
    >>> from mixshare_layers.checkpoint import load_checkpoint, save_checkpoint
    >>> path = save_checkpoint(f"{tempfile.mkdtemp()}/ck.pt", {"model": {"w": torch.zeros(3)}, "epoch": 2})
    >>> ck = load_checkpoint(path)
    >>> ck["epoch"], ck["model"]["w"].shape
    (2, torch.Size([3]))
"""

from .convert import convert_checkpoint, data_only_globals, to_plain
from .store import (
    FORMAT,
    FORMAT_VERSION,
    MIN_TORCH_VERSION,
    CheckpointError,
    CheckpointNotFoundError,
    load_checkpoint,
    plain_value_problem,
    previous_checkpoint_path,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MIN_TORCH_VERSION",
    "CheckpointError",
    "CheckpointNotFoundError",
    "convert_checkpoint",
    "data_only_globals",
    "load_checkpoint",
    "plain_value_problem",
    "previous_checkpoint_path",
    "save_checkpoint",
    "to_plain",
    "verify_checkpoint",
]
