"""Model recipes: how a checkpoint rebuilds its wrapped model, through an allowlist of builders and plain arguments.

A :class:`ModelRecipe` says how to build a :class:`~mixshare_layers.MIMOWrapper` again: which backbone builder,
with which keyword arguments, wrapped how (``num_subnetworks``, ``preset``, preset overrides, ``pretrained``), split
how (automatically, or by a saved description of a hand-made split, :func:`describe_split`). It is made of plain
values only, so it travels inside a checkpoint (:func:`~mixshare_layers.checkpoint.save_model`) and a checkpoint
rebuilds its own model (:func:`~mixshare_layers.checkpoint.load_model`, ``python -m mixshare_layers.analysis``).

A checkpoint is untrusted data, so a recipe never names code to import or call. Its ``builder`` is looked up in an
allowlist:

* ``"mixshare_layers.models.wide_resnet"``: the library's CIFAR WRN (arguments ``depth``, ``width``,
  ``num_classes``, ``in_channels``);
* ``"torchvision:<name>"``: ``torchvision.models.get_model(name, **kwargs)`` for a ``name`` of
  ``torchvision.models.list_models(module=torchvision.models)`` (the classification builders);
* ``"timm:<name>"``: ``timm.create_model(name, **kwargs)`` for a ``name`` of ``timm.list_models()`` (or
  ``<name>.<tag>`` of ``timm.list_models(pretrained=True)``; Hugging Face Hub and local-folder sources are refused);
* the names your own code registered with :func:`register_builder` in this process (never from a file).

Its arguments are plain values (``int``, ``float``, ``str``, ``bool``, ``None``, lists of those), and arguments that
would load or download anything (``weights``, ``pretrained``, ``checkpoint_path``, ``pretrained_cfg``, ``cache_dir``,
...) are refused: the weights come from the checkpoint. ``transforms`` names in-place backbone changes from an
allowlist too (``"mixshare_layers.models.cifar_resnet"``: a torchvision ResNet with a CIFAR stem).

Example:
    >>> recipe = ModelRecipe("mixshare_layers.models.wide_resnet", {"depth": 10, "width": 1, "num_classes": 10},
    ...                      num_subnetworks=2, preset="mixshare")
    >>> model = recipe.build()
    >>> type(model).__name__, model.num_subnetworks, model.num_classes
    ('MIMOWrapper', 2, 10)
    >>> ModelRecipe.from_dict(recipe.to_dict()) == recipe
    True
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from .._checks import check_bool, check_choice, check_int, check_num_subnetworks

if TYPE_CHECKING:
    from ..adapters import BackboneSplit
    from ..wrapper import MIMOWrapper

__all__ = [
    "RECIPE_FORMAT",
    "RECIPE_VERSION",
    "WRN_BUILDER",
    "BuilderHandle",
    "ModelRecipe",
    "RecipeError",
    "builder_names",
    "describe_split",
    "register_builder",
    "resolve_builder",
]

RECIPE_FORMAT = "mixshare_layers.recipe"
RECIPE_VERSION = 1
WRN_BUILDER = "mixshare_layers.models.wide_resnet"
CIFAR_RESNET = "mixshare_layers.models.cifar_resnet"
TORCHVISION_PREFIX, TIMM_PREFIX = "torchvision:", "timm:"
_RESERVED_PREFIXES = ("mixshare_layers.", TORCHVISION_PREFIX, TIMM_PREFIX)
# arguments that load or download something, or place the model: the checkpoint holds the weights, the loader the device
_LOADING_ARGUMENTS = (
    "weights",
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "pretrained_model_args",
    "checkpoint_path",
    "cache_dir",
    "progress",
    "device",
    "dtype",
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODULE_PATH = re.compile(r"(?!__)[A-Za-z0-9_]+(\.(?!__)[A-Za-z0-9_]+)*")  # names in named_modules(), no dunders
_TIMM_NAME = re.compile(r"([A-Za-z0-9_]+)(\.[A-Za-z0-9_]+)?")
_BUILDER_NAME = re.compile(r"[^\s]{1,200}")
_MAX_LIST = 4096  # elements of one argument's list, nested lists counted
_SPLIT_PARTS = ("encoder", "core", "classifier", "preprocess")
_SPLIT_KEYS = (*_SPLIT_PARTS, "layout", "num_prefix_tokens", "pooling", "encoding_layout")
_RECIPE_KEYS = (
    "format",
    "version",
    "builder",
    "builder_kwargs",
    "transforms",
    "num_subnetworks",
    "preset",
    "overrides",
    "pretrained",
    "split",
)

Builder = Callable[..., nn.Module]


class RecipeError(ValueError):
    """A recipe that is malformed, names a builder outside the allowlist, or does not build its model."""


# ----------------------------------------------------------------------------------------------------------------
# plain values
# ----------------------------------------------------------------------------------------------------------------
def _plain_argument(value: object, where: str, budget: list[int], depth: int = 0) -> object:
    """``value`` with tuples turned into lists, after checking it is an int/float/str/bool/None or a list of those."""
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise RecipeError(f"{where} must be finite, but got {value!r}")
        return value
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple) and depth < 4:  # not subclasses
        budget[0] -= len(value)
        if budget[0] < 0:
            raise RecipeError(f"{where}: lists of more than {_MAX_LIST} values are not builder arguments")
        return [_plain_argument(v, f"{where}[{i}]", budget, depth + 1) for i, v in enumerate(value)]
    cls = type(value)
    kind = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    raise RecipeError(
        f"{where} has type {kind}, but builder arguments are plain values (int, float, str, bool, None, lists of "
        "those); objects such as layers or functions cannot be recorded: register a builder that makes them "
        "(mixshare_layers.checkpoint.register_builder)"
    )


def _plain_kwargs(kwargs: object, where: str, *, refuse_loading: bool) -> dict[str, Any]:
    if not isinstance(kwargs, Mapping):
        raise RecipeError(f"{where} must be a dict of keyword arguments, but got {type(kwargs).__name__}")
    out: dict[str, Any] = {}
    budget = [_MAX_LIST]
    for key, value in kwargs.items():
        if not isinstance(key, str) or not _NAME.fullmatch(key) or key.startswith("__"):
            raise RecipeError(f"{where} has the key {key!r}: keys must be Python identifiers")
        if refuse_loading and key in _LOADING_ARGUMENTS:
            if value is None or value is False:  # the default: nothing to load, nothing to record
                continue
            raise RecipeError(
                f"{where}[{key!r}]={value!r} would load or download weights (or place the model), but a recipe "
                "describes the architecture only: the checkpoint holds the weights. Leave it out (give the "
                "architecture arguments such weights imply, e.g. num_classes=..., transform_input=True)"
            )
        out[key] = _plain_argument(value, f"{where}[{key!r}]", budget)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the allowlist of builders
# ----------------------------------------------------------------------------------------------------------------
def _wide_resnet(**kwargs: Any) -> nn.Module:
    from ..models import wide_resnet

    try:
        inspect.signature(wide_resnet).bind(**kwargs)
    except TypeError as err:
        raise RecipeError(f"{WRN_BUILDER}: {err} (arguments: depth, width, num_classes, in_channels)") from None
    return wide_resnet(**kwargs)


def _cifar_resnet(model: nn.Module) -> nn.Module:
    from ..models import cifar_resnet

    return cifar_resnet(model)


_LIBRARY_BUILDERS: dict[str, Builder] = {WRN_BUILDER: _wide_resnet}
_TRANSFORMS: dict[str, Callable[[nn.Module], nn.Module]] = {CIFAR_RESNET: _cifar_resnet}
_USER_BUILDERS: dict[str, Builder] = {}


@dataclass(eq=False)
class BuilderHandle:
    """What :func:`register_builder` returns: :meth:`remove` unregisters the builder."""

    name: str
    builder: Builder

    def remove(self) -> None:
        """Unregister the builder (a no-op if it was removed or replaced since)."""
        if _USER_BUILDERS.get(self.name) is self.builder:
            del _USER_BUILDERS[self.name]


def register_builder(name: str, builder: Builder, *, replace: bool = False) -> BuilderHandle:
    """Let recipes name your own backbone builder (in your code, in this process: never from a checkpoint).

    A checkpoint whose recipe names ``name`` rebuilds its backbone as ``builder(**builder_kwargs)`` once this has
    run; without it, loading says which name to register.

    Args:
        name: the name recipes use, e.g. ``"myproject.resnet"``: no whitespace, at most 200 characters, not
            starting with ``"mixshare_layers."``, ``"torchvision:"`` or ``"timm:"`` (the library's families).
        builder: a function of plain keyword arguments returning the backbone (an ``nn.Module``).
        replace: replace a builder registered under the same name (else that is refused).

    Returns:
        A handle; ``handle.remove()`` unregisters the builder.

    Example:
        >>> from torch import nn
        >>> handle = register_builder("docs.tiny", lambda classes=10: nn.Sequential(nn.Conv2d(3, classes, 3)))
        >>> "docs.tiny" in builder_names()
        True
        >>> handle.remove()
    """
    if not isinstance(name, str) or not _BUILDER_NAME.fullmatch(name):
        raise ValueError(f"name must be a non-empty string without whitespace (at most 200 characters), got {name!r}")
    if name.startswith(_RESERVED_PREFIXES):
        raise ValueError(
            f"name {name!r} starts with a prefix of the library's builders ({', '.join(_RESERVED_PREFIXES)}): pick "
            "a name of your own, e.g. 'myproject.resnet'"
        )
    if not callable(builder):
        raise TypeError(f"builder must be a function returning an nn.Module, but got {type(builder).__name__}")
    if name in _USER_BUILDERS and not replace:
        raise ValueError(f"a builder is already registered as {name!r}: pass replace=True to replace it")
    _USER_BUILDERS[name] = builder
    return BuilderHandle(name, builder)


def builder_names() -> list[str]:
    """The builder names recipes may use here: the library's, the families' patterns, and the registered ones."""
    return [*_LIBRARY_BUILDERS, f"{TORCHVISION_PREFIX}<name>", f"{TIMM_PREFIX}<name>", *sorted(_USER_BUILDERS)]


def _torchvision_builder(arch: str) -> Builder:
    try:
        import torchvision
    except ImportError as exc:
        raise RecipeError(
            f'builder {TORCHVISION_PREFIX}{arch} needs torchvision: pip install "mixshare-layers[torchvision]"'
        ) from exc
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise RecipeError(
            f"builder {TORCHVISION_PREFIX}{arch}: {arch!r} is not a classification model of this torchvision "
            f"{torchvision.__version__} (torchvision.models.list_models(module=torchvision.models))"
        )

    def build(**kwargs: Any) -> nn.Module:
        return torchvision.models.get_model(arch, weights=None, **kwargs)

    return build


def _timm_builder(name: str) -> Builder:
    try:
        import timm
    except ImportError as exc:
        raise RecipeError(f'builder {TIMM_PREFIX}{name} needs timm: pip install "mixshare-layers[timm]"') from exc
    match = _TIMM_NAME.fullmatch(name)
    known = match is not None and (
        name in timm.list_models() if match.group(2) is None else name in timm.list_models(pretrained=True)
    )
    if not known:
        raise RecipeError(
            f"builder {TIMM_PREFIX}{name}: {name!r} is not a model of this timm {timm.__version__} "
            "(timm.list_models(), or <name>.<tag> of timm.list_models(pretrained=True); hub and folder sources "
            "are not rebuilt from a checkpoint)"
        )

    def build(**kwargs: Any) -> nn.Module:
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def resolve_builder(name: str) -> Builder:
    """The builder function a recipe's ``builder`` names, from the allowlist only (module docstring).

    Raises:
        RecipeError: the name is not in the allowlist (the message says how to register your own), or its family's
            package is not installed.
    """
    if not isinstance(name, str) or not _BUILDER_NAME.fullmatch(name):
        raise RecipeError(f"the builder must be a name without whitespace (at most 200 characters), got {name!r}")
    if name in _LIBRARY_BUILDERS:
        return _LIBRARY_BUILDERS[name]
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_builder(name[len(TORCHVISION_PREFIX) :])
    if name.startswith(TIMM_PREFIX):
        return _timm_builder(name[len(TIMM_PREFIX) :])
    if name in _USER_BUILDERS:
        return _USER_BUILDERS[name]
    if name.startswith("mixshare_layers."):
        raise RecipeError(f"builder {name!r} is not one of the library's ({', '.join(_LIBRARY_BUILDERS)})")
    raise RecipeError(
        f"builder {name!r} is not registered in this process: a checkpoint never names code to run, so call "
        f"mixshare_layers.checkpoint.register_builder({name!r}, your_function) in your own code before loading it "
        "(from Python; the command line knows the library's, torchvision's and timm's builders only)"
    )


# ----------------------------------------------------------------------------------------------------------------
# split descriptions
# ----------------------------------------------------------------------------------------------------------------
def describe_split(backbone: nn.Module, split: BackboneSplit) -> dict[str, Any]:
    """A plain description of a hand-made split of ``backbone``, from which a recipe rebuilds it.

    Each part (encoder, core, classifier, preprocess) must be a submodule of ``backbone`` or an ``nn.Sequential`` of
    its submodules (as ``BackboneSplit(encoder=net.stem, core=nn.Sequential(net.body, net.neck),
    classifier=net.fc)``); it is recorded as its path in ``backbone.named_modules()`` (or the list of paths). The
    split's ``reinit`` is not recorded: it only initialises independent encoder copies, and a rebuilt model takes
    its weights from the checkpoint.

    Args:
        backbone: the network the split was made from (built as the recipe builds it).
        split: the :class:`~mixshare_layers.BackboneSplit` passed to :class:`~mixshare_layers.MIMOWrapper`.

    Returns:
        ``{"encoder", "core", "classifier", "preprocess", "layout", "num_prefix_tokens", "pooling",
        "encoding_layout"}``: paths (a string, a list of strings, or ``None`` for no preprocess) and the split's
        plain fields.

    Raises:
        RecipeError: a part is not made of the backbone's own modules (the message says how to save it anyway).

    Example:
        >>> from torch import nn
        >>> from mixshare_layers import BackboneSplit
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Linear(8, 4))
        >>> split = BackboneSplit(encoder=net[0], core=nn.Sequential(net[1], net[2]), classifier=net[3])
        >>> d = describe_split(net, split)
        >>> d["encoder"], d["core"], d["classifier"], d["pooling"]
        ('0', ['1', '2'], '3', 'avg')
    """
    from ..adapters import BackboneSplit

    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, but got {type(backbone).__name__}")
    if not isinstance(split, BackboneSplit):
        raise TypeError(f"split must be a BackboneSplit, but got {type(split).__name__}")
    split.validate()
    paths = {id(module): name for name, module in backbone.named_modules() if name}

    def describe(part: str, module: nn.Module | None) -> str | list[str] | None:
        if module is None:
            return None
        if id(module) in paths:
            return paths[id(module)]
        if type(module) is nn.Sequential and len(module) > 0 and all(id(m) in paths for m in module):
            return [paths[id(m)] for m in module]
        raise RecipeError(
            f"split.{part} ({type(module).__name__}) is not a module of the backbone nor an nn.Sequential of its "
            "modules, so a recipe cannot rebuild it: build the split from the backbone's own modules, or register "
            "a builder whose backbone has a mimo_split() method (or an adapter, "
            "mixshare_layers.adapters.register_adapter) returning it; else save with "
            "mixshare_layers.checkpoint.save_checkpoint and load it from Python (build the same MIMOWrapper, then "
            "model.load_state_dict(load_checkpoint(path)['model']))"
        )

    return {
        "encoder": describe("encoder", split.encoder),
        "core": describe("core", split.core),
        "classifier": describe("classifier", split.classifier),
        "preprocess": describe("preprocess", split.preprocess),
        "layout": split.layout,
        "num_prefix_tokens": int(split.num_prefix_tokens),
        "pooling": split.pooling,
        "encoding_layout": split.encoding_layout,
    }


def _check_split_description(split: object) -> dict[str, Any]:
    from ..adapters.split import HEAD_POOLINGS
    from ..functional.layout import FEATURE_LAYOUTS
    from ..layers.mixer import ENCODING_LAYOUTS

    if not isinstance(split, Mapping):
        raise RecipeError(f"recipe split must be a dict (describe_split's), but got {type(split).__name__}")
    unknown = sorted(str(k) for k in split if k not in _SPLIT_KEYS)
    missing = [k for k in ("encoder", "core", "classifier") if k not in split]
    if unknown or missing:
        raise RecipeError(f"recipe split must have the keys {list(_SPLIT_KEYS)}; unknown {unknown}, missing {missing}")
    out: dict[str, Any] = {}
    for part in _SPLIT_PARTS:
        value = split.get(part)
        if value is None and part == "preprocess":
            out[part] = None
            continue
        items = value if isinstance(value, list) and value and len(value) <= _MAX_LIST else [value]
        for item in items:
            if not isinstance(item, str) or not _MODULE_PATH.fullmatch(item) or len(item) > 1000:
                raise RecipeError(
                    f"recipe split[{part!r}] must be a module path such as 'layer1.0.conv1' (or a list of them), "
                    f"but got {value!r}"
                )
        out[part] = list(value) if isinstance(value, list) else value
    try:
        out["layout"] = check_choice("split layout", split.get("layout", "channels_first"), FEATURE_LAYOUTS)
        out["pooling"] = check_choice("split pooling", split.get("pooling", "avg"), HEAD_POOLINGS)
        out["encoding_layout"] = check_choice(
            "split encoding_layout", split.get("encoding_layout", "channels_first"), ENCODING_LAYOUTS
        )
        out["num_prefix_tokens"] = check_int("split num_prefix_tokens", split.get("num_prefix_tokens", 0), minimum=0)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe {err}") from None
    return out


def _split_from_description(backbone: nn.Module, description: Mapping[str, Any]) -> BackboneSplit:
    from ..adapters import BackboneSplit

    modules = dict(backbone.named_modules())  # only the module tree is walked: no attribute of the file is read

    def part(name: str) -> nn.Module | None:
        value = description[name]
        if value is None:
            return None
        paths = value if isinstance(value, list) else [value]
        missing = [p for p in paths if p not in modules or not p]
        if missing:
            sample = ", ".join(list(n for n in modules if n)[:6])
            raise RecipeError(
                f"recipe split[{name!r}] names {missing}, which the built backbone does not have (its modules: "
                f"{sample}, ...)"
            )
        return modules[paths[0]] if isinstance(value, str) else nn.Sequential(*(modules[p] for p in paths))

    encoder, core, classifier = part("encoder"), part("core"), part("classifier")
    assert encoder is not None and core is not None and classifier is not None
    return BackboneSplit(
        encoder=encoder,
        core=core,
        classifier=classifier,
        layout=description["layout"],
        num_prefix_tokens=description["num_prefix_tokens"],
        pooling=description["pooling"],
        encoding_layout=description["encoding_layout"],
        preprocess=part("preprocess"),
    )


# ----------------------------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRecipe:
    """How to build a :class:`~mixshare_layers.MIMOWrapper` again (plain values; allowlisted builders only).

    Attributes:
        builder: the backbone builder's name (module docstring: the allowlist).
        builder_kwargs: its keyword arguments, plain values; nothing that loads weights.
        transforms: in-place changes applied to the built backbone, by name (``"mixshare_layers.models.cifar_resnet"``).
        num_subnetworks: M.
        preset: the wrapper's preset.
        overrides: the :class:`~mixshare_layers.MIMOConfig` fields that differ from the preset's.
        pretrained: the wrapper's ``pretrained`` (it scales the encoders of some backbones; no weights are loaded).
        split: ``None`` (the split :func:`~mixshare_layers.adapters.split_backbone` finds) or a hand-made split's
            :func:`describe_split`.

    Raises:
        RecipeError: (a ``ValueError``) a field is malformed; the message names it.
    """

    builder: str
    builder_kwargs: Mapping[str, Any] = field(default_factory=dict)
    num_subnetworks: int = 2
    preset: str = "mixshare"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    transforms: Sequence[str] = ()
    split: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        from ..presets import PRESETS, get_preset

        if not isinstance(self.builder, str) or not _BUILDER_NAME.fullmatch(self.builder):
            raise RecipeError(f"recipe builder must be a name without whitespace, got {self.builder!r}")
        kwargs = _plain_kwargs(self.builder_kwargs, "builder_kwargs", refuse_loading=True)
        transforms = list(self.transforms) if isinstance(self.transforms, (list, tuple)) else None
        if transforms is None or any(t not in _TRANSFORMS for t in transforms):
            raise RecipeError(f"recipe transforms must be a list of {sorted(_TRANSFORMS)}, but got {self.transforms!r}")
        try:
            m = check_num_subnetworks(self.num_subnetworks)
            check_choice("preset", self.preset, PRESETS)
            pretrained = check_bool("pretrained", self.pretrained)
        except (TypeError, ValueError) as err:
            raise RecipeError(f"recipe {err}") from None
        overrides = _plain_kwargs(self.overrides, "overrides", refuse_loading=False)
        try:
            get_preset(self.preset, **overrides)
        except (TypeError, ValueError) as err:
            raise RecipeError(f"recipe overrides: {err}") from None
        split = None if self.split is None else _check_split_description(self.split)
        object.__setattr__(self, "builder_kwargs", kwargs)
        object.__setattr__(self, "num_subnetworks", m)
        object.__setattr__(self, "overrides", overrides)
        object.__setattr__(self, "pretrained", pretrained)
        object.__setattr__(self, "transforms", tuple(transforms))
        object.__setattr__(self, "split", split)

    # -----------------------------------------------------------------------------------------------------------
    @classmethod
    def of(
        cls,
        model: MIMOWrapper,
        builder: str,
        builder_kwargs: Mapping[str, Any] | None = None,
        *,
        transforms: Sequence[str] = (),
        split: Mapping[str, Any] | None = None,
    ) -> ModelRecipe:
        """The recipe of ``model``: the builder you name, and the wrapper's own settings (M, preset, overrides,
        ``pretrained``) read from the model.

        Example:
            >>> from mixshare_layers import MIMOWrapper
            >>> from mixshare_layers.models import wide_resnet
            >>> net = MIMOWrapper(wide_resnet(10, 1, 10), 3, preset="mixmo", alpha=1.0)
            >>> r = ModelRecipe.of(net, WRN_BUILDER, {"depth": 10, "width": 1, "num_classes": 10})
            >>> r.num_subnetworks, r.preset, r.overrides
            (3, 'mixmo', {'alpha': 1.0})
        """
        from ..presets import get_preset
        from ..wrapper import MIMOWrapper

        if not isinstance(model, MIMOWrapper):
            raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
        default = get_preset(model.preset)
        overrides = {
            f.name: getattr(model.config, f.name)
            for f in dataclasses.fields(model.config)
            if getattr(model.config, f.name) != getattr(default, f.name)
        }
        return cls(
            builder,
            dict(builder_kwargs or {}),
            num_subnetworks=model.num_subnetworks,
            preset=model.preset,
            overrides=overrides,
            pretrained=model.pretrained,
            transforms=tuple(transforms),
            split=split,
        )

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain values (what a checkpoint stores under ``"recipe"``)."""
        return {
            "format": RECIPE_FORMAT,
            "version": RECIPE_VERSION,
            "builder": self.builder,
            "builder_kwargs": dict(self.builder_kwargs),
            "transforms": list(self.transforms),
            "num_subnetworks": self.num_subnetworks,
            "preset": self.preset,
            "overrides": dict(self.overrides),
            "pretrained": self.pretrained,
            "split": None if self.split is None else dict(self.split),
        }

    @classmethod
    def from_dict(cls, data: object) -> ModelRecipe:
        """Read a recipe stored by :meth:`to_dict` (checked: unknown keys, versions, every field).

        Raises:
            RecipeError: not a recipe of a version this library reads, or a malformed field.
        """
        if not isinstance(data, Mapping):
            raise RecipeError(f"the recipe must be a dict, but got {type(data).__name__}")
        if data.get("format") != RECIPE_FORMAT:
            raise RecipeError(f"the recipe's format is {data.get('format')!r}, not {RECIPE_FORMAT!r}")
        version = data.get("version")
        if type(version) is not int or version < 1:
            raise RecipeError(f"the recipe's version must be a positive int, but got {version!r}")
        if version > RECIPE_VERSION:
            raise RecipeError(
                f"the recipe has version {version}, written by a newer mixshare_layers (this one reads up to "
                f"{RECIPE_VERSION}): upgrade mixshare_layers"
            )
        unknown = sorted(str(k) for k in data if k not in _RECIPE_KEYS)
        if unknown:
            raise RecipeError(f"the recipe has unknown keys {unknown} (known: {', '.join(_RECIPE_KEYS)})")
        if "builder" not in data:
            raise RecipeError("the recipe names no builder")
        fields = {k: data[k] for k in _RECIPE_KEYS[2:] if k in data}
        transforms = fields.pop("transforms", [])
        fields["transforms"] = tuple(transforms) if isinstance(transforms, list) else transforms
        return cls(**fields)

    # -----------------------------------------------------------------------------------------------------------
    def build_backbone(self) -> nn.Module:
        """The backbone: the builder called with ``builder_kwargs``, then ``transforms``.

        Raises:
            RecipeError: the builder is not allowed, refuses the arguments, or returns no ``nn.Module``.
        """
        build = resolve_builder(self.builder)
        try:
            backbone = build(**self.builder_kwargs)
        except RecipeError:
            raise
        except Exception as err:  # a builder refuses arguments in many ways (TypeError, ValueError, asserts)
            text = " ".join(str(err).split())[:300]
            raise RecipeError(
                f"builder {self.builder} failed with the arguments {self.builder_kwargs}: {type(err).__name__}: {text}"
            ) from None
        if not isinstance(backbone, nn.Module):
            raise RecipeError(f"builder {self.builder} returned a {type(backbone).__name__}, not an nn.Module")
        for name in self.transforms:
            try:
                backbone = _TRANSFORMS[name](backbone)
            except (TypeError, ValueError) as err:
                raise RecipeError(f"transform {name} cannot change the backbone of {self.builder}: {err}") from None
        return backbone

    def build(self, *, backend: str | None = None) -> MIMOWrapper:
        """The wrapped model, freshly initialised (in training mode, on the CPU).

        Args:
            backend: the wrapper's ``backend`` (not part of the recipe: where to run, not what to compute).

        Raises:
            RecipeError: the backbone cannot be built, split or wrapped with these settings.
        """
        from ..adapters import UnsupportedBackboneError
        from ..wrapper import MIMOWrapper

        backbone = self.build_backbone()
        split = None if self.split is None else _split_from_description(backbone, self.split)
        try:
            return MIMOWrapper(
                backbone,
                self.num_subnetworks,
                preset=self.preset,
                split=split,
                pretrained=self.pretrained,
                backend=backend,
                **self.overrides,
            )
        except (UnsupportedBackboneError, TypeError, ValueError) as err:
            text = " ".join(str(err).split())[:400]
            raise RecipeError(f"the backbone of {self.builder} cannot be wrapped as recorded: {text}") from None
