"""Saving a wrapped model with its recipe, and loading it back without naming its class or building it by hand.

``save_model(path, model, builder=..., builder_kwargs=...)`` writes ``{"model": state_dict, "recipe": recipe}``
(plus any plain entries you add) with :func:`~mixshare_layers.checkpoint.save_checkpoint` (digest, atomic);
``load_model(path)`` rebuilds the model from the recipe (:class:`~mixshare_layers.checkpoint.ModelRecipe`:
allowlisted builders, plain arguments) and loads the weights strictly. ``python -m mixshare_layers.analysis CKPT``
reads such files too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .recipe import ModelRecipe, RecipeError
from .store import CheckpointError, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from ..wrapper import MIMOWrapper

__all__ = ["check_recipe", "load_model", "model_from_recipe", "save_model", "strip_state_prefixes"]

_PREFIXES = ("_orig_mod.", "module.")
_SIZE_SLACK = 4  # a backbone may hold up to this many times the wrapper's values (auxiliary heads are dropped)


def strip_state_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict without the key prefixes ``torch.compile`` (``_orig_mod.``) and ``DataParallel`` (``module.``)
    add.

    Example:
        >>> sorted(strip_state_prefixes({"module._orig_mod.heads.weight": 1, "encoder.weight": 2}))
        ['encoder.weight', 'heads.weight']
    """
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        out[key] = value
    return out


def _structure(model: nn.Module) -> list[tuple[str, str, str]]:
    """Every module's name, class and ``extra_repr`` (hyper-parameters), then every state entry's shape and dtype."""
    rows = [(name, type(m).__qualname__, m.extra_repr()) for name, m in model.named_modules()]
    rows += [(key, "tensor", f"{tuple(t.shape)} {t.dtype}") for key, t in model.state_dict().items()]
    for attr in ("layout", "num_prefix_tokens", "pooling", "preset", "num_subnetworks"):
        rows.append((f"<{attr}>", "attribute", repr(getattr(model, attr, None))))
    return rows


def check_recipe(model: MIMOWrapper, recipe: ModelRecipe) -> MIMOWrapper:
    """Check that ``recipe`` builds a model of ``model``'s structure; returns the model it built.

    Compared: every module's name, class and hyper-parameters (``extra_repr``: channels, strides, epsilons, dropout
    rates, ...), every state entry's name and shape, the wrapper's layout, pooling, preset and M. The dtype is not
    compared (a loaded model takes the checkpoint's).

    Raises:
        RecipeError: the first difference, or why the recipe cannot build anything.
    """
    built = recipe.build()
    want, got = _structure(model), _structure(built)
    want_rows = {(r[0], r[1] == "tensor"): r for r in want}
    for row in got:
        other = want_rows.pop((row[0], row[1] == "tensor"), None)
        if other is None:
            raise RecipeError(f"the recipe builds a model with {row[0]!r} ({row[1]}), which the model does not have")
        same = other[1:] == row[1:] if row[1] != "tensor" else other[2].split(" ")[0] == row[2].split(" ")[0]
        if not same:
            raise RecipeError(
                f"the recipe builds {row[0]!r} as {row[1]}({row[2]}), but the model has {other[1]}({other[2]})"
            )
    if want_rows:
        name, kind, _ = next(iter(want_rows.values()))
        raise RecipeError(f"the model has {name!r} ({kind}), which the recipe does not build")
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
    """Save a :class:`~mixshare_layers.MIMOWrapper` with the recipe that rebuilds it (digest-checked, atomic).

    The file holds ``{"model": model.state_dict(), "recipe": recipe.to_dict(), **extra}``
    (:func:`~mixshare_layers.checkpoint.save_checkpoint`), and :func:`load_model` or ``python -m
    mixshare_layers.analysis`` rebuild the model from it. Give either ``recipe`` or ``builder`` (with
    ``builder_kwargs``, ``transforms``, ``split``): the wrapper's settings (M, preset, overrides, ``pretrained``)
    are read from the model.

    Args:
        path: the checkpoint file.
        model: the wrapped model (unwrap ``DistributedDataParallel`` / ``torch.compile`` first, or not: their key
            prefixes are removed on load).
        builder: the backbone builder (allowlist in :mod:`mixshare_layers.checkpoint.recipe`), e.g.
            ``"torchvision:resnet18"``, ``"timm:resnet18"``, ``"mixshare_layers.models.wide_resnet"``, or a name
            your code registered with :func:`~mixshare_layers.checkpoint.register_builder`.
        builder_kwargs: the builder's architecture arguments (plain values; no ``weights`` / ``pretrained``).
        transforms: in-place backbone changes by name (``"mixshare_layers.models.cifar_resnet"``).
        split: for a hand-made split, its :func:`~mixshare_layers.checkpoint.describe_split`.
        recipe: the whole recipe instead of the four arguments above.
        extra: more plain entries (``"config"``, ``"epoch"``, an optimizer's state...).
        keep_previous: keep the file being replaced as ``<stem>.prev<suffix>``.
        check: build the recipe's model and compare its structure with ``model``'s (:func:`check_recipe`) before
            writing, so that a wrong recipe is refused now rather than when the file is loaded.

    Returns:
        ``Path(path)``.

    Raises:
        TypeError: ``model`` is not a ``MIMOWrapper``, or ``extra`` holds non-plain values.
        RecipeError: (a ``ValueError``) the recipe is malformed, not allowlisted, or builds another model.

    Example:
        >>> import tempfile
        >>> from mixshare_layers import MIMOWrapper
        >>> from mixshare_layers.models import wide_resnet
        >>> model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixshare")
        >>> path = save_model(f"{tempfile.mkdtemp()}/ck.pt", model, builder="mixshare_layers.models.wide_resnet",
        ...                   builder_kwargs={"depth": 10, "width": 1, "num_classes": 10}, extra={"epoch": 3})
        >>> loaded, checkpoint = load_model(path)
        >>> loaded.preset, checkpoint["epoch"], checkpoint["recipe"]["builder"]
        ('mixshare', 3, 'mixshare_layers.models.wide_resnet')
    """
    from ..wrapper import MIMOWrapper

    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner) if not isinstance(inner, MIMOWrapper) else inner
    if not isinstance(inner, MIMOWrapper):
        raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
    if recipe is None:
        if builder is None:
            raise TypeError(
                "save_model needs the backbone's builder (builder='torchvision:resnet18', builder_kwargs={...}) or "
                "recipe=ModelRecipe(...); a model that no builder makes is saved with save_checkpoint and loaded "
                "from Python"
            )
        recipe = ModelRecipe.of(inner, builder, builder_kwargs, transforms=transforms, split=split)
    elif builder is not None or builder_kwargs is not None or split is not None or tuple(transforms):
        raise TypeError("give recipe= or builder= (with builder_kwargs, transforms, split), not both")
    elif not isinstance(recipe, ModelRecipe):
        raise TypeError(f"recipe must be a ModelRecipe, but got {type(recipe).__name__}")
    entries = dict(extra or {})
    clash = sorted(k for k in ("model", "recipe") if k in entries)
    if clash:
        raise ValueError(f"extra must not hold {clash}: save_model writes them")
    if check:
        check_recipe(inner, recipe)
    state = inner.state_dict()
    return save_checkpoint(path, {"model": state, "recipe": recipe.to_dict(), **entries}, keep_previous=keep_previous)


def _values(state: Mapping[str, Any]) -> int:
    return sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))


def _size_problem(recipe: ModelRecipe, state: Mapping[str, Any]) -> str | None:
    """Why the recipe's backbone is far larger than the checkpoint (a file must not make us allocate more than it
    holds), from a build on the meta device (no memory); None when it fits or cannot be built there."""
    try:
        with torch.device("meta"):
            backbone = recipe.build_backbone()
    except Exception:  # some builders read values while building (e.g. .item()): build for real instead
        return None
    built = sum(p.numel() for p in backbone.parameters())
    held = _values(state)
    if built > _SIZE_SLACK * held + 1_000_000:
        return (
            f"its recipe builds a backbone of {built:,} parameters but the checkpoint holds {held:,} values: the "
            "recipe does not describe these weights"
        )
    return None


def model_from_recipe(checkpoint: Mapping[str, Any], *, map_location: Any = None) -> MIMOWrapper:
    """Rebuild the model of a loaded checkpoint dict that holds ``"model"`` and ``"recipe"`` (strict loading).

    The model is returned in eval mode, in the dtype of the checkpoint's floating-point tensors when they all share
    one, on ``map_location`` (default: where the tensors are).

    Raises:
        RecipeError: no recipe, a malformed or refused one, or one that does not rebuild these weights.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict, but got {type(checkpoint).__name__}")
    if "recipe" not in checkpoint:
        raise RecipeError("the checkpoint records no recipe (how to rebuild its model)")
    recipe = ModelRecipe.from_dict(checkpoint["recipe"])
    state = checkpoint.get("model")
    if not isinstance(state, Mapping):
        raise RecipeError(f"the checkpoint's 'model' must be a state_dict, but got {type(state).__name__}")
    state = strip_state_prefixes(state)
    problem = _size_problem(recipe, state)
    if problem is not None:
        raise RecipeError(problem)
    model = recipe.build()
    dtypes = {t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtype=dtypes.pop())
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing / unexpected keys, shape mismatches
        text = " ".join(str(err).split())
        raise RecipeError(
            f"the recipe ({recipe.builder}) builds a model these weights do not fit: "
            f"{text if len(text) <= 400 else text[:400] + ' ...'}"
        ) from None
    devices = {t.device for t in state.values() if isinstance(t, torch.Tensor)}
    target = map_location if map_location is not None else (devices.pop() if len(devices) == 1 else None)
    if target is not None:
        model = model.to(target)
    return model.eval()


def load_model(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[MIMOWrapper, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_model` (or any checkpoint with a ``"recipe"``) and rebuild its model.

    The file is read with :func:`~mixshare_layers.checkpoint.load_checkpoint` (``weights_only=True`` only, digest
    checked); the model is built from the recipe's allowlisted builder (never from code named in the file) and
    its weights are loaded strictly.

    Args:
        path: the checkpoint file.
        map_location: where the tensors (and the model) go.

    Returns:
        ``(model, checkpoint)``: the model in eval mode, and the loaded dict (``"model"``, ``"recipe"``, the extras).

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointError: (a ``ValueError``) the file cannot be loaded safely, records no recipe, or its recipe does
            not rebuild its weights; the message is one line naming the file and what to do.
    """
    p = os.fspath(path)
    checkpoint = load_checkpoint(p, map_location=map_location)
    if "recipe" not in checkpoint:
        raise CheckpointError(p, "records no recipe (how to rebuild its model)", NO_RECIPE_HINT)
    try:
        model = model_from_recipe(checkpoint, map_location=map_location)
    except (RecipeError, TypeError) as err:
        raise CheckpointError(p, f"cannot rebuild its model: {err}") from None
    return model, checkpoint


NO_RECIPE_HINT = (
    "save it with mixshare_layers.checkpoint.save_model(path, model, builder=..., builder_kwargs=...) (a hand-made "
    "split: split=describe_split(backbone, split)); or load it from Python: build the same MIMOWrapper, then "
    "model.load_state_dict(load_checkpoint(path)['model'])"
)
