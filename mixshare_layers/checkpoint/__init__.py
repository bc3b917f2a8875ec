"""Checkpoint files that load without running code, carry a digest, and keep the previous good one.

A checkpoint holds tensors and plain values only and is only ever loaded with ``torch.load(..., weights_only=True)``
(:mod:`~mixshare_layers.checkpoint.store`, :mod:`~mixshare_layers.checkpoint.convert`); a wrapped model is saved with
the recipe that rebuilds it (:mod:`~mixshare_layers.checkpoint.model`). ``python -m mixshare_layers.checkpoint``."""

from .convert import convert_checkpoint, to_plain  # noqa: I001  (grouped, not one name a line)
from .model import (RECIPE_FORMAT, RECIPE_VERSION, WRN_BUILDER, BuilderHandle, ModelRecipe, RecipeError,
                    builder_names, check_recipe, describe_split, load_model, model_from_recipe, register_builder,
                    resolve_builder, save_model, strip_state_prefixes)
from .runs import (CHECKPOINT_NAME, RunError, check_run_folder, restore_training, resume_run, rng_state,
                   save_run_checkpoint)
from .store import (FORMAT, FORMAT_VERSION, MIN_TORCH_VERSION, CheckpointError, CheckpointNotFoundError,
                    load_checkpoint, plain_value_problem, previous_checkpoint_path, save_checkpoint, verify_checkpoint)

__all__ = ["CHECKPOINT_NAME", "FORMAT", "FORMAT_VERSION", "MIN_TORCH_VERSION", "RECIPE_FORMAT", "RECIPE_VERSION",
           "WRN_BUILDER", "BuilderHandle", "CheckpointError", "CheckpointNotFoundError", "ModelRecipe", "RecipeError",
           "RunError", "builder_names", "check_recipe", "check_run_folder", "convert_checkpoint", "describe_split",
           "load_checkpoint", "load_model", "model_from_recipe", "plain_value_problem", "previous_checkpoint_path",
           "register_builder", "resolve_builder", "restore_training", "resume_run", "rng_state", "save_checkpoint",
           "save_model", "save_run_checkpoint", "strip_state_prefixes", "to_plain", "verify_checkpoint"]  # fmt: skip
