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
    "save it with mixshare_layers.checkpoint.save_model(path, model, builder=..., builder_kwargs=...) (a hand-made "
    "split: split=describe_split(backbone, split)); or load it from Python: build the same MIMOWrapper, then "
    "model.load_state_dict(load_checkpoint(path)['model'])"
)


def strip_state_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without the key prefixes of ``torch.compile`` (``_orig_mod.``) and ``DataParallel`` (``module.``).

    Example:
        >>> sorted(strip_state_prefixes({"module._orig_mod.heads.weight": 1, "encoder.weight": 2}))
        ['encoder.weight', 'heads.weight']
    """
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
    """Check that ``recipe`` builds a model of ``model``'s structure and return that model.

    Compared: every module's class and hyper-parameters (``extra_repr``), every state entry's shape (not its
    dtype), the wrapper's layout, pooling, preset and M. Raises a :class:`RecipeError` at the first difference.
    """
    built = recipe.build()
    want, got = _structure(model), _structure(built)
    for key, row in got.items():
        if key not in want:
            raise RecipeError(f"the recipe builds a model with {key[0]!r} ({row}), which the model does not have")
        if want[key] != row:
            raise RecipeError(f"the recipe builds {key[0]!r} as {row}, but the model has {want[key]}")
    missing = next((k for k in want if k not in got), None)
    if missing is not None:
        raise RecipeError(f"the model has {missing[0]!r} ({want[missing]}), which the recipe does not build")
    return built


def save_model(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    builder: str | None = None,
    builder_kwargs: Mapping[str, Any] | None = None,
    transforms: Sequence[str] = (),
    split: Mapping[str, Any] | None = None,
    recipe: ModelRecipe | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_previous: bool = False,
    check: bool = True,
) -> Path:
    """Save a :class:`~mixshare_layers.MIMOWrapper` with the recipe that rebuilds it: ``{"model": state_dict,
    "recipe": recipe.to_dict(), **extra}``, by :func:`~mixshare_layers.checkpoint.save_checkpoint`.

    Args:
        path: the checkpoint file.
        model: the wrapped model (a ``torch.compile`` or ``DistributedDataParallel`` shell is removed).
        builder: the backbone's builder, e.g. ``"torchvision:resnet18"`` (allowlist:
            :mod:`~mixshare_layers.checkpoint.recipe`); the wrapper's own settings are read from ``model``.
        builder_kwargs: its architecture arguments (plain values; no ``weights`` / ``pretrained``).
        transforms: in-place backbone changes by name (``"mixshare_layers.models.cifar_resnet"``).
        split: a hand-made split's :func:`~mixshare_layers.checkpoint.describe_split`.
        recipe: the whole :class:`ModelRecipe`, instead of the four arguments above.
        extra: more plain entries (``"config"``, ``"epoch"``, an optimizer's state ...).
        keep_previous: keep the file being replaced as ``<stem>.prev<suffix>``.
        check: first compare the recipe's model with ``model`` (:func:`check_recipe`): a wrong recipe is refused
            now, not when the file is loaded.

    Example:
        >>> import tempfile
        >>> from mixshare_layers.models import wide_resnet
        >>> model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixshare")
        >>> path = save_model(f"{tempfile.mkdtemp()}/ck.pt", model, builder="mixshare_layers.models.wide_resnet",
        ...                   builder_kwargs={"depth": 10, "width": 1, "num_classes": 10}, extra={"epoch": 3})
        >>> load_model(path)[1]["epoch"]
        3
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
    """Rebuild the model of a loaded checkpoint dict that holds ``"model"`` and ``"recipe"`` (strict loading).

    The model comes in eval mode, in the dtype of the checkpoint's floating-point tensors when they share one, on
    ``map_location`` (default: where the tensors are). Raises a :class:`RecipeError` when there is no recipe, or it
    is malformed, refused, or does not rebuild these weights.
    """
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


def load_model(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[MIMOWrapper, dict[str, Any]]:
    """Load a checkpoint that holds a recipe (:func:`save_model`'s): ``(model in eval mode, the loaded dict)``.

    The file is read by :func:`~mixshare_layers.checkpoint.load_checkpoint`; the model is built by the recipe's
    allowlisted builder and its weights are loaded strictly. Raises a one-line ``CheckpointError`` naming the file
    when it cannot be loaded safely, records no recipe, or its recipe does not rebuild its weights.
    """
    p = os.fspath(path)
    checkpoint = load_checkpoint(p, map_location=map_location)
    if "recipe" not in checkpoint:
        raise CheckpointError(p, "records no recipe (how to rebuild its model)", NO_RECIPE_HINT)
    try:
        return model_from_recipe(checkpoint, map_location=map_location), checkpoint
    except (RecipeError, TypeError) as err:
        raise CheckpointError(p, f"cannot rebuild its model from its recipe: {err}") from None
