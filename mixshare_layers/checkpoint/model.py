"""A wrapped model in a checkpoint, with the recipe that rebuilds it from an allowlist of builders and plain values.

A checkpoint is untrusted data, so a recipe never names code to import: its ``builder`` is ``WRN_BUILDER``,
``"torchvision:<name>"`` (a classification model), ``"timm:<name>"`` (of ``timm.list_models()``, or ``<name>.<tag>``)
or a name registered in this process (:func:`register_builder`). Its arguments are plain values, never ones that load
weights (``weights``, ``pretrained`` ...): the checkpoint holds them."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import BackboneSplit, UnsupportedBackboneError
from ..models import cifar_resnet, wide_resnet
from ..presets import get_preset
from ..wrapper import MIMOWrapper
from .store import CheckpointError, _one_line, load_checkpoint, plain_value_problem, save_checkpoint

__all__ = ["RECIPE_FORMAT", "RECIPE_VERSION", "WRN_BUILDER", "BuilderHandle", "ModelRecipe", "RecipeError",
           "builder_names", "check_recipe", "describe_split", "load_model", "model_from_recipe", "register_builder",
           "resolve_builder", "save_model", "strip_state_prefixes"]  # fmt: skip

RECIPE_FORMAT = "mixshare_layers.recipe"
RECIPE_VERSION = 1
WRN_BUILDER = "mixshare_layers.models.wide_resnet"
_LOADING = ("weights", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args",
            "checkpoint_path", "cache_dir", "progress", "device", "dtype")  # they load weights or place the model
_NAME = re.compile(r"\S{1,200}")
_PARTS = ("encoder", "core", "classifier", "preprocess")
_FIELDS = ("layout", "num_prefix_tokens", "pooling", "encoding_layout")
_KEYS = ("builder", "builder_kwargs", "transforms", "num_subnetworks", "preset", "overrides", "pretrained", "split")
_TRANSFORMS: dict[str, Callable[[nn.Module], nn.Module]] = {"mixshare_layers.models.cifar_resnet": cifar_resnet}
_USER_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


class RecipeError(ValueError):
    """A recipe that is malformed, names a builder outside the allowlist, or does not build its model."""


def _builder_kwargs(kwargs: object) -> dict[str, Any]:
    """``kwargs``, its keys identifiers and its values plain (as in a checkpoint), without the loading arguments."""
    if not isinstance(kwargs, Mapping):
        raise RecipeError(f"builder_kwargs must be a dict of keyword arguments, but got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("__"):
            raise RecipeError(f"builder_kwargs has the key {key!r}: keys must be Python identifiers")
        if key in _LOADING and value is not None and value is not False:  # their defaults are not recorded
            raise RecipeError(f"builder_kwargs[{key!r}]={value!r} would load or download weights: the file has them")
        if (problem := plain_value_problem(value, f"builder_kwargs[{key!r}]")) is not None:
            raise RecipeError(f"{problem}, but builder arguments are plain values: register a builder that makes it")
    return {key: value for key, value in kwargs.items() if key not in _LOADING}


@dataclasses.dataclass(eq=False)
class BuilderHandle:
    """What :func:`register_builder` returns: :meth:`remove` unregisters the builder."""

    name: str
    builder: Callable[..., nn.Module]

    def remove(self) -> None:
        """Unregister the builder (a no-op if it was removed or replaced since)."""
        if _USER_BUILDERS.get(self.name) is self.builder:
            del _USER_BUILDERS[self.name]


def register_builder(name: str, builder: Callable[..., nn.Module], *, replace: bool = False) -> BuilderHandle:
    """Let recipes name ``builder`` (plain keyword arguments -> backbone) as ``name`` (e.g. ``"myproject.net"``)
    in this process; an existing name is replaced only with ``replace``. ``remove()`` the handle to undo it."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name must be a non-empty string without whitespace (at most 200 characters), got {name!r}")
    if name.startswith(("mixshare_layers.", "torchvision:", "timm:")):
        raise ValueError(f"name {name!r} starts with a prefix of the library's builders: pick a name of your own")
    if not callable(builder):
        raise TypeError(f"builder must be a function returning an nn.Module, but got {type(builder).__name__}")
    if name in _USER_BUILDERS and not replace:
        raise ValueError(f"a builder is already registered as {name!r}: pass replace=True to replace it")
    _USER_BUILDERS[name] = builder
    return BuilderHandle(name, builder)


def builder_names() -> list[str]:
    """The builder names recipes may use here: the library's, the families' patterns, the registered ones."""
    return [WRN_BUILDER, "torchvision:<name>", "timm:<name>", *sorted(_USER_BUILDERS)]


def resolve_builder(name: str) -> Callable[..., nn.Module]:
    """The function a recipe's ``builder`` names, from the allowlist only (module docstring); else RecipeError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RecipeError(f"the builder must be a name without whitespace (at most 200 characters), got {name!r}")
    if name == WRN_BUILDER or name in _USER_BUILDERS:
        return wide_resnet if name == WRN_BUILDER else _USER_BUILDERS[name]
    family, _, arch = name.partition(":")
    if name.startswith("mixshare_layers."):
        raise RecipeError(f"builder {name!r} is not one of the library's ({WRN_BUILDER})")
    if family not in ("torchvision", "timm"):
        hint = f"call mixshare_layers.checkpoint.register_builder({name!r}, your_function) before loading it"
        raise RecipeError(f"builder {name!r} is not registered in this process (files name no code to run): {hint}")
    try:
        lib = importlib.import_module(family)
    except ImportError:
        raise RecipeError(f"builder {name} needs {family}: pip install {family}") from None
    if family == "torchvision":
        known = arch in lib.models.list_models(module=lib.models)
        build = functools.partial(lib.models.get_model, arch, weights=None)
    else:  # a tagged name is one of the pretrained configurations
        tag = re.fullmatch(r"\w+(\.\w+)?", arch, re.ASCII)
        known = tag is not None and arch in lib.list_models(pretrained=tag.group(1) is not None)
        build = functools.partial(lib.create_model, arch, pretrained=False)
    if not known:
        what = "a classification model of this torchvision" if family == "torchvision" else "a model of this timm"
        raise RecipeError(f"builder {name}: {arch!r} is not {what} (no Hub or folder sources)")
    return build


def describe_split(backbone: nn.Module, split: BackboneSplit) -> dict[str, Any]:
    """A plain description of a hand-made ``split`` of ``backbone``, from which a recipe rebuilds it: each part (a
    submodule or an ``nn.Sequential`` of submodules) as its path(s) in ``named_modules()``, and the split's fields."""
    if not isinstance(backbone, nn.Module) or not isinstance(split, BackboneSplit):
        raise TypeError(f"describe_split takes an nn.Module and a BackboneSplit, not {type(backbone)}, {type(split)}")
    split.validate()
    paths = {id(module): name for name, module in backbone.named_modules() if name}

    def path_of(part: str) -> str | list[str] | None:
        module = getattr(split, part)
        if module is None or id(module) in paths:
            return None if module is None else paths[id(module)]
        if type(module) is nn.Sequential and len(module) > 0 and all(id(m) in paths for m in module):
            return [paths[id(m)] for m in module]
        what = f"split.{part} ({type(module).__name__}) is not a module of the backbone nor an nn.Sequential of its"
        raise RecipeError(f"{what} modules: use the backbone's own modules, or save with save_checkpoint instead")

    return {**{part: path_of(part) for part in _PARTS}, **{f: getattr(split, f) for f in _FIELDS}}


def _split_from(backbone: nn.Module, description: Mapping[str, Any]) -> BackboneSplit:
    """The split a description names; its fields are checked by the wrapper that takes it."""
    modules = dict(backbone.named_modules())  # the module tree only: no attribute named by the file is read

    def part(name: str) -> Any:
        value = description.get(name)
        paths = value if isinstance(value, list) and value else [value]
        missing = [p for p in paths if not isinstance(p, str) or p not in modules or not p]
        if missing and not (name == "preprocess" and value is None):
            raise RecipeError(f"recipe split[{name!r}] names {missing}, which the built backbone does not have")
        return nn.Sequential(*(modules[p] for p in paths)) if isinstance(value, list) else modules.get(value)

    return BackboneSplit(**{p: part(p) for p in _PARTS}, **{f: description[f] for f in _FIELDS if f in description})


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """How to build a :class:`~mixshare_layers.MIMOWrapper` again: ``builder(**builder_kwargs)``, changed in place by
    ``transforms`` (``"mixshare_layers.models.cifar_resnet"``), split as the adapters find or as :func:`describe_split`
    recorded, wrapped with the other fields (``overrides``: MIMOConfig fields that differ from the preset's).

    Example:
        >>> recipe = ModelRecipe(WRN_BUILDER, {"depth": 10, "width": 1, "num_classes": 10}, num_subnetworks=3)
        >>> recipe.build().num_subnetworks, ModelRecipe.from_dict(recipe.to_dict()) == recipe
        (3, True)
    """

    builder: str
    builder_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_subnetworks: int = 2
    preset: str = "mixshare"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pretrained: bool = False
    transforms: Sequence[str] = ()
    split: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:  # the builder, the wrapper's settings and the split are checked when built
        transforms = tuple(self.transforms) if isinstance(self.transforms, (list, tuple)) else (None,)
        if any(t not in _TRANSFORMS for t in transforms):
            raise RecipeError(f"recipe transforms must be a list of {sorted(_TRANSFORMS)}, but got {self.transforms!r}")
        if not isinstance(self.overrides, Mapping) or not isinstance(self.split, (Mapping, type(None))):
            raise RecipeError(f"recipe overrides and split must be dicts: {self.overrides!r:.40}, {self.split!r:.40}")
        object.__setattr__(self, "builder_kwargs", _builder_kwargs(self.builder_kwargs))
        object.__setattr__(self, "overrides", dict(self.overrides))
        object.__setattr__(self, "transforms", transforms)
        object.__setattr__(self, "split", None if self.split is None else dict(self.split))

    @classmethod
    def of(
        cls, model: MIMOWrapper, builder: str, builder_kwargs: Mapping[str, Any] | None = None, *,
        transforms: Sequence[str] = (), split: Mapping[str, Any] | None = None,
    ) -> ModelRecipe:  # fmt: skip
        """The recipe of ``model``: the builder you name, and the wrapper's settings read from the model."""
        if not isinstance(model, MIMOWrapper):
            raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
        config, default = dataclasses.asdict(model.config), dataclasses.asdict(get_preset(model.preset))
        overrides = {k: v for k, v in config.items() if v != default[k]}
        kwargs = dict(builder_kwargs or {})
        return cls(builder, kwargs, model.num_subnetworks, model.preset, overrides, model.pretrained, transforms, split)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain values (what a checkpoint stores under ``"recipe"``)."""
        fields = dataclasses.asdict(self)
        return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, **fields, "transforms": list(self.transforms)}

    @classmethod
    def from_dict(cls, data: object) -> ModelRecipe:
        """Read a recipe stored by :meth:`to_dict`, checking its format, version, keys and fields (RecipeError)."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"the recipe must be a dict, but got {type(data).__name__}")
        if data.get("format") != RECIPE_FORMAT:
            raise RecipeError(f"the recipe's format is {data.get('format')!r}, not {RECIPE_FORMAT!r}")
        version = data.get("version")
        if type(version) is not int or version < 1:
            raise RecipeError(f"the recipe's version must be a positive int, but got {version!r}")
        if version > RECIPE_VERSION:
            raise RecipeError(f"the recipe has version {version}, written by a newer mixshare_layers: upgrade it")
        unknown = sorted(str(k) for k in data if k not in ("format", "version", *_KEYS))
        if unknown or "builder" not in data:
            raise RecipeError(f"the recipe has unknown keys {unknown} or no builder (keys: {', '.join(_KEYS)})")
        return cls(**{k: data[k] for k in _KEYS if k in data})

    def build_backbone(self) -> nn.Module:
        """The backbone: the builder called with ``builder_kwargs``, then ``transforms`` (RecipeError if it fails)."""
        build = resolve_builder(self.builder)
        try:
            backbone = build(**self.builder_kwargs)
            for name in self.transforms:
                backbone = _TRANSFORMS[name](backbone)
        except Exception as err:  # builders refuse arguments in many ways (TypeError, ValueError, assert)
            failed = f"builder {self.builder} (transforms {list(self.transforms)}) failed with the arguments"
            raise RecipeError(f"{failed} {dict(self.builder_kwargs)}: {type(err).__name__}: {_one_line(err)}") from None
        if not isinstance(backbone, nn.Module):
            raise RecipeError(f"builder {self.builder} returned a {type(backbone).__name__}, not an nn.Module")
        return backbone

    def build(self, *, backend: str | None = None) -> MIMOWrapper:
        """The wrapped model, freshly initialised (training mode, CPU), or a RecipeError; ``backend``: the wrapper's."""
        backbone = self.build_backbone()
        split = None if self.split is None else _split_from(backbone, self.split)
        settings: dict[str, Any] = {"preset": self.preset, "split": split, "pretrained": self.pretrained}
        try:
            return MIMOWrapper(backbone, self.num_subnetworks, backend=backend, **settings, **self.overrides)
        except (UnsupportedBackboneError, TypeError, ValueError) as err:
            reason = f"the backbone of {self.builder} cannot be wrapped as recorded: {_one_line(err)}"
            raise RecipeError(reason) from None


NO_RECIPE_HINT = (
    "save it with mixshare_layers.checkpoint.save_model(path, model, builder=..., builder_kwargs=...), or build the "
    "same MIMOWrapper in Python, then model.load_state_dict(load_checkpoint(path)['model'])"
)


def strip_state_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without the key prefixes of ``torch.compile`` (``_orig_mod.``) and ``DataParallel`` (``module.``)."""
    return {re.sub(r"^(_orig_mod\.|module\.)+", "", key): value for key, value in state.items()}


def _structure(model: nn.Module) -> dict[tuple[str, bool], str]:
    rows = {(name, False): f"{type(m).__qualname__}({m.extra_repr()})" for name, m in model.named_modules()}
    rows.update({(key, True): f"tensor{tuple(t.shape)}" for key, t in model.state_dict().items()})
    attrs = ("layout", "num_prefix_tokens", "pooling", "preset", "num_subnetworks")
    return rows | {(f"<{a}>", False): f"attribute({getattr(model, a, None)!r})" for a in attrs}


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
    ``check``, :func:`check_recipe` first, so that a wrong recipe is refused now rather than when the file is loaded."""
    inner = getattr(model, "_orig_mod", model)
    inner = inner if isinstance(inner, MIMOWrapper) else getattr(inner, "module", inner)
    if not isinstance(inner, MIMOWrapper):
        raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
    if recipe is None:
        if builder is None:
            hint = "builder='torchvision:resnet18', builder_kwargs={...}) or recipe=ModelRecipe(...)"
            raise TypeError(f"save_model needs the backbone's builder ({hint}; else use save_checkpoint")
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
    RecipeError), in eval mode, on ``map_location`` (default: where the tensors are)."""
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
