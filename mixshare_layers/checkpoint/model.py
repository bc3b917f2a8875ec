"""A wrapped model saved with the recipe that rebuilds it, and loaded back without naming its class."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..wrapper import MIMOWrapper
from .recipe import ModelRecipe, RecipeError
from .store import CheckpointError, _one_line, load_checkpoint, save_checkpoint

__all__ = ["check_recipe", "load_model", "model_from_recipe", "save_model", "strip_state_prefixes"]

NO_RECIPE_HINT = (
    "save it with mixshare_layers.checkpoint.save_model(path, model, builder=..., builder_kwargs=...), or build the "
    "same MIMOWrapper in Python, then model.load_state_dict(load_checkpoint(path)['model'])"
)


def strip_state_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without the key prefixes of ``torch.compile`` (``_orig_mod.``) and ``DataParallel`` (``module.``)."""
    out = {}
    for key, value in state.items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _structure(model: nn.Module) -> dict[tuple[str, bool], str]:
    rows = {(name, False): f"{type(m).__qualname__}({m.extra_repr()})" for name, m in model.named_modules()}
    rows.update({(key, True): f"tensor{tuple(t.shape)}" for key, t in model.state_dict().items()})
    for attr in ("layout", "num_prefix_tokens", "pooling", "preset", "num_subnetworks"):
        rows[(f"<{attr}>", False)] = f"attribute({getattr(model, attr, None)!r})"
    return rows


def check_recipe(model: MIMOWrapper, recipe: ModelRecipe) -> MIMOWrapper:
    """The model ``recipe`` builds, after checking it has ``model``'s modules (classes, ``extra_repr``), state shapes,
    layout, pooling, preset and M; a :class:`RecipeError` names the first difference."""
    built = recipe.build()
    want, got = _structure(model), _structure(built)
    diff = next((key for key in {**want, **got} if want.get(key) != got.get(key)), None)
    if diff is not None:
        has, builds = want.get(diff, "nothing"), got.get(diff, "nothing")
        raise RecipeError(f"the recipe builds {diff[0]!r} as {builds}, but the model has {has}")
    return built


def save_model(
    path: str | os.PathLike[str], model: nn.Module, *, builder: str | None = None,
    builder_kwargs: Mapping[str, Any] | None = None, transforms: Sequence[str] = (),
    split: Mapping[str, Any] | None = None, recipe: ModelRecipe | None = None, extra: Mapping[str, Any] | None = None,
    keep_previous: bool = False, check: bool = True,
) -> Path:  # fmt: skip
    """Save a :class:`~mixshare_layers.MIMOWrapper` (a ``torch.compile`` or DDP shell is removed) as ``{"model":
    state_dict, "recipe": recipe.to_dict(), **extra}``: ``recipe``, or ``ModelRecipe.of(model, builder, ...)``. With
    ``check``, :func:`check_recipe` first, so that a wrong recipe is refused now rather than when the file is loaded.
    """
    inner = getattr(model, "_orig_mod", model)
    inner = inner if isinstance(inner, MIMOWrapper) else getattr(inner, "module", inner)
    if not isinstance(inner, MIMOWrapper):
        raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
    if recipe is None:
        if builder is None:
            raise TypeError(
                "save_model needs the backbone's builder (builder='torchvision:resnet18', builder_kwargs={...}) or "
                "recipe=ModelRecipe(...); save a model no builder makes with save_checkpoint"
            )
        recipe = ModelRecipe.of(inner, builder, builder_kwargs, transforms=transforms, split=split)
    elif builder is not None or builder_kwargs is not None or split is not None or transforms:
        raise TypeError("give recipe= or builder= (with builder_kwargs, transforms, split), not both")
    elif not isinstance(recipe, ModelRecipe):
        raise TypeError(f"recipe must be a ModelRecipe, but got {type(recipe).__name__}")
    clash = sorted({"model", "recipe"} & set(extra or {}))
    if clash:
        raise ValueError(f"extra must not hold {clash}: save_model writes them")
    if check:
        check_recipe(inner, recipe)
    entries = {"model": inner.state_dict(), "recipe": recipe.to_dict(), **(extra or {})}
    return save_checkpoint(path, entries, keep_previous=keep_previous)


def model_from_recipe(checkpoint: Mapping[str, Any], *, map_location: Any = None) -> MIMOWrapper:
    """The model of a loaded checkpoint dict with ``"model"`` and ``"recipe"``, weights loaded strictly (else a
    RecipeError): eval mode, the tensors' dtype if they share one, on ``map_location`` (default: the tensors')."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict, but got {type(checkpoint).__name__}")
    if "recipe" not in checkpoint or not isinstance(checkpoint.get("model"), Mapping):
        raise RecipeError("the checkpoint records no recipe (how to rebuild its model) or no state_dict under 'model'")
    recipe = ModelRecipe.from_dict(checkpoint["recipe"])
    state = strip_state_prefixes(checkpoint["model"])
    tensors = [t for t in state.values() if isinstance(t, torch.Tensor)]
    try:  # a file must not make us allocate far more than it holds: the backbone is first sized on the meta device
        with torch.device("meta"):
            size = sum(p.numel() for p in recipe.build_backbone().parameters())
    except Exception:  # builders that read values while they build (.item()) are built for real
        size = 0
    held = sum(t.numel() for t in tensors)
    if size > 4 * held + 1_000_000:  # a backbone may hold more than the wrapper keeps (auxiliary heads)
        raise RecipeError(f"its recipe builds a backbone of {size:,} parameters but the checkpoint holds {held:,}")
    model = recipe.build()
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    model = model.to(dtype=dtypes.pop()) if len(dtypes) == 1 else model
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing or unexpected keys, shapes
        raise RecipeError(f"the recipe builds a model these weights do not fit: {_one_line(err)}") from None
    devices = {t.device for t in tensors}
    target = map_location if map_location is not None else (devices.pop() if len(devices) == 1 else None)
    return (model if target is None else model.to(target)).eval()


def load_model(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> tuple[MIMOWrapper, dict[str, Any]]:
    """``(model, checkpoint)`` of a file with a recipe (:func:`save_model`'s), read by
    :func:`~mixshare_layers.checkpoint.load_checkpoint`, or a one-line ``CheckpointError`` that says what to do."""
    p = os.fspath(path)
    checkpoint = load_checkpoint(p, map_location=map_location)
    if "recipe" not in checkpoint:
        raise CheckpointError(p, "records no recipe (how to rebuild its model)", NO_RECIPE_HINT)
    try:
        return model_from_recipe(checkpoint, map_location=map_location), checkpoint
    except (RecipeError, TypeError) as err:
        raise CheckpointError(p, f"cannot rebuild its model from its recipe: {err}") from None
