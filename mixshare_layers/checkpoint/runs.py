"""A training run's folder: a checkpoint after every epoch, the verified one before it kept, resuming from either.

:func:`save_run_checkpoint` rewrites ``RUN/checkpoint.pt``, :func:`resume_run` loads what ``--resume`` names (the
folder or one file) with its config, :func:`restore_training` puts the states and generators back. Problems are
one-line :class:`RunError` that say what to do (for a damaged file, the command that resumes from the previous one).

Example:
    >>> import tempfile, torch
    >>> run = Path(tempfile.mkdtemp()) / "run"
    >>> _ = save_run_checkpoint(run, {"config": {"lr": 0.1}, "epoch": 1, "model": {"w": torch.zeros(2)}})
    >>> path, checkpoint, config, verified = resume_run(run, required=("epoch", "model"))
    >>> path.name, checkpoint["epoch"], config, verified
    ('checkpoint.pt', 1, {'lr': 0.1}, True)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from ..files import folder_problem
from .store import CheckpointError, _intact, _one_line, load_checkpoint, previous_checkpoint_path, save_checkpoint

__all__ = ["CHECKPOINT_NAME", "RunError", "check_run_folder", "restore_training", "resume_run", "rng_state",
           "save_run_checkpoint"]  # fmt: skip

CHECKPOINT_NAME = "checkpoint.pt"
_PREVIOUS, _CONFIG = previous_checkpoint_path(CHECKPOINT_NAME).name, "config.json"  # checkpoint.prev.pt


class RunError(ValueError):
    """A run folder or checkpoint a script cannot go on from; the message is one line that says what to do."""


def check_run_folder(
    run_dir: str | os.PathLike[str], *, new: bool, resume_command: str = "--resume", option: str = ""
) -> None:
    """Refuse, leaving nothing on disk, a run folder that cannot be written or, for a ``new`` run, holds one (the
    message, after ``option``, says how to continue it: ``resume_command``, e.g. ``"python train.py --resume"``)."""
    run, start = Path(run_dir), f"{option}: " if option else ""
    if (problem := folder_problem(run)) is not None:
        raise RunError(f"{start}cannot write the run folder {run}: {problem}")
    if new and any((run / name).exists() for name in (CHECKPOINT_NAME, _PREVIOUS)):
        raise RunError(f"{start}{run} already holds a run: continue it with {resume_command} {run}, or pick another")


def _load(path: Path, resume_command: str) -> tuple[Path, dict[str, Any], bool]:
    """The file that ``--resume path`` names, loaded, and whether its digest verified; else a RunError."""
    file = path / CHECKPOINT_NAME if path.is_dir() else path
    if os.path.lexists(file):  # a dangling link gets the loader's message
        try:
            return file, load_checkpoint(file), _intact(file)  # it loaded: its digest matched, or it has none
        except CheckpointError as err:
            hint, prev = err.hint, previous_checkpoint_path(err.path)
            if err.damaged and prev.is_file() and not os.path.samefile(prev, err.path) and _intact(prev):
                hint = f"the previous checkpoint {prev} is intact: resume from it with {resume_command} {prev}"
            raise RunError(f"checkpoint {err.path}: {err.reason}" + (f"; {hint}" if hint else "")) from None
    if not path.is_dir():
        raise RunError(f"{path} does not exist: give a run folder or a checkpoint file")
    if (path / _PREVIOUS).is_file():
        raise RunError(f"{path}: the folder has no {CHECKPOINT_NAME}, only {_PREVIOUS} (the one before): resume from "
                       f"it with {resume_command} {path / _PREVIOUS}")  # fmt: skip
    if (path / _CONFIG).is_file():
        raise RunError(f"{path}: the run has a {_CONFIG} but no {CHECKPOINT_NAME}: it stopped before finishing its "
                       "first epoch, so there is nothing to resume; start it again or delete the folder")  # fmt: skip
    raise RunError(f"{path}: not a run folder (no {CHECKPOINT_NAME}, no {_CONFIG})")


def _config(checkpoint: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    if isinstance(checkpoint.get("config"), dict):
        return dict(checkpoint["config"])
    path = folder / _CONFIG  # a checkpoint written before checkpoints held their config
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"the checkpoint holds no config (written by an older version) and {path} is missing") from None
    except (OSError, ValueError) as err:
        raise RunError(f"{path} cannot be read ({_one_line(err)})") from None
    if not isinstance(config, dict):
        raise RunError(f"{path} does not hold a config (a JSON object)")
    return config


def resume_run(
    source: str | os.PathLike[str], *, required: Sequence[str] = (), resume_command: str = "--resume", option: str = ""
) -> tuple[Path, dict[str, Any], dict[str, Any], bool]:
    """What ``--resume source`` continues from: ``(file, checkpoint, config, verified)``.

    ``source`` is a run folder (its ``checkpoint.pt``) or exactly the file to use; the config is the checkpoint's (or
    for older checkpoints the folder's ``config.json``); ``verified`` is False for a file without a digest.

    Raises:
        RunError: (beginning with ``option``) the file is missing, unusable, lacks a ``required`` entry, or would
            overwrite another intact ``checkpoint.pt``; a damaged one's ends ``{resume_command} PREV`` (PREV intact)."""
    try:
        path, checkpoint, verified = _load(Path(source), resume_command)
        missing = [key for key in required if key not in checkpoint]
        if missing:
            raise RunError(f"checkpoint {path} is not a training checkpoint of this run: it lacks {', '.join(missing)}")
        target = path.parent / CHECKPOINT_NAME
        if target.exists() and not os.path.samefile(target, path) and _intact(target):
            raise RunError(f"{path}: the run folder already holds {target}, which continuing from {path.name} would "
                           f"overwrite: resume from the folder, or move {path.name} into a folder of its own (with a "
                           f"copy of {_CONFIG})")  # fmt: skip
        return path, checkpoint, _config(checkpoint, path.parent), verified
    except RunError as err:
        raise RunError(f"{option}: {err}" if option else str(err)) from None


def _process() -> tuple[int, int]:  # (rank, world size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """This process's random state: the global torch generator's (``"torch"``) and each of ``generators``."""
    return {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in generators.items()}}


def restore_training(
    checkpoint: Mapping[str, Any], parts: Mapping[str, Any], generators: Mapping[str, torch.Generator], source: str = ""
) -> bool:
    """Load ``checkpoint[name]`` into each of ``parts`` (a model, an optimizer...; empty states skipped) and this
    process's ``checkpoint["rng"][rank]`` into the generators; False (generators left as seeded) when another number
    of processes, or other generators, saved it. RunError, beginning with ``source``, when a state does not fit."""
    for name, part in parts.items():
        try:
            if checkpoint[name]:
                part.load_state_dict(checkpoint[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            what = f"{source or 'the checkpoint'} does not fit the {name} it is loaded into"
            raise RunError(f"{what} ({_one_line(err)})") from None
    rank, world = _process()
    states = checkpoint["rng"]
    if len(states) != world or not {"torch", *generators} <= set(states[rank]):  # other processes, or generators
        return False
    for name, g in {"torch": torch.default_generator, **generators}.items():  # "torch": torch.set_rng_state's
        g.set_state(states[rank][name])
    return True


def save_run_checkpoint(
    run_dir: str | os.PathLike[str], state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> Path:
    """Write ``RUN/checkpoint.pt``: ``state`` and ``"rng"``, the :func:`rng_state` of every process (rank order).

    The file it replaces stays as ``checkpoint.prev.pt`` if its digest verifies; a killed save's temporary files are
    removed. In a ``torch.distributed`` run every process calls it with the same weights; process 0 writes, all wait.
    RunError, nothing written, when a float tensor of ``state["model"]`` is not finite."""
    run, (rank, world) = Path(run_dir), _process()
    floats = {k: t for k, t in state.get("model", {}).items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    bad = [k for k, t in floats.items() if not bool(t.isfinite().all())]
    if bad:
        raise RunError(f"{run / CHECKPOINT_NAME} not written: {bad[0]!r} holds values that are not finite (diverged)")
    rngs: list[Any] = [rng_state(generators or {})] * world
    if world > 1:
        torch.distributed.all_gather_object(rngs, rngs[rank])
    if rank == 0:
        for stale in run.glob(".checkpoint*.tmp"):
            stale.unlink(missing_ok=True)
        save_checkpoint(run / CHECKPOINT_NAME, {**state, "rng": rngs}, keep_previous=True)
    if world > 1:
        torch.distributed.barrier()
    return run / CHECKPOINT_NAME
