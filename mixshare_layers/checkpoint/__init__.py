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
* :func:`save_model` / :func:`load_model`: a wrapped model with the :class:`ModelRecipe` that rebuilds it (builders
  from an allowlist, :func:`register_builder` for your own, :func:`describe_split` for a hand-made split);
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
from .model import check_recipe, load_model, model_from_recipe, save_model, strip_state_prefixes
from .recipe import (
    RECIPE_FORMAT,
    RECIPE_VERSION,
    WRN_BUILDER,
    BuilderHandle,
    ModelRecipe,
    RecipeError,
    builder_names,
    describe_split,
    register_builder,
    resolve_builder,
)
from .runs import (
    CHECKPOINT_NAME,
    RunError,
    check_run_folder,
    restore_training,
    resume_run,
    rng_state,
    save_run_checkpoint,
)
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
    "CHECKPOINT_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "MIN_TORCH_VERSION",
    "RECIPE_FORMAT",
    "RECIPE_VERSION",
    "WRN_BUILDER",
    "BuilderHandle",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ModelRecipe",
    "RecipeError",
    "RunError",
    "builder_names",
    "check_recipe",
    "check_run_folder",
    "convert_checkpoint",
    "data_only_globals",
    "describe_split",
    "load_checkpoint",
    "load_model",
    "model_from_recipe",
    "plain_value_problem",
    "previous_checkpoint_path",
    "register_builder",
    "resolve_builder",
    "restore_training",
    "resume_run",
    "rng_state",
    "save_checkpoint",
    "save_model",
    "save_run_checkpoint",
    "strip_state_prefixes",
    "to_plain",
    "verify_checkpoint",
]
