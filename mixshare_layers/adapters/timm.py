"""Longer than 450 lines: the timm adapter's six phases, each a short documented function, read best in one file.

The timm adapter: any model with timm's uniform classification API.

It relies on the API every timm classifier implements (``forward_features``, ``forward_head``,
``get_classifier``, ``num_features``, ``num_prefix_tokens``, ``patch_embed``, ``pretrained_cfg``), not on
per-family attribute names, and on no tracing. :func:`split_timm` runs six phases, one function each:

1. **probe**: ``forward_features`` and ``forward_head`` run once on a probe batch (eval mode) with forward hooks on
   every submodule, which record which modules receive the image itself and which ones the head calls;
2. **encoder**: the module that receives the image (the deepest one holding every leaf module that does: a stem's
   first convolution, a patch embedding's projection, a multi-branch stem block);
3. **core**: :class:`~mixshare_layers.adapters.surgery.SplicedCore`: ``forward_features`` itself, on a copy of the
   model whose encoder is a slot returning the (mixed) encoding, so norms, positional embeddings, class / register
   tokens and stages run exactly as in timm;
4. **layout and pooling**: the features' layout (``(B, D, h, w)``, ``(B, h, w, D)`` or tokens) and the head's
   pooling are found by trying, in order, the global average of the grid (prefix tokens excluded), the class token,
   and otherwise letting the head read the features (attention pooling, ``avgmax``...): the first one whose result
   through the head equals ``forward_head`` is kept;
5. **head**: :class:`TimmHead`, the model's own ``forward_head`` run on a shell holding only what it uses (the
   modules it calls, the model's own tensors it reads), fed with a one-cell map (or one-patch sequence) whose pooling
   is the pooled vector, which is exact (a mean of one value is that value). A head that is just its ``nn.Linear``
   classifier (no dropout, no norm) becomes that ``nn.Linear`` (the batched fast path of
   :class:`~mixshare_layers.MultiHead`);
6. **check**: the split's logits are compared with the model's on the probe batch; any difference refuses the model
   with the figures.

The split's ``reinit`` is timm's own initialisation of the model (:class:`~mixshare_layers.adapters.inits.TimmInit`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .check import check_split, default_tolerance, eval_mode, first_tensor
from .inits import TimmInit
from .split import BackboneSplit, UnsupportedBackboneError
from .surgery import Slot, SplicedCore, completing, head_shell, module_name, same_values, spliced

__all__ = ["TimmHead", "is_timm_like", "split_timm"]

HOW_TO = (
    "Give the split yourself: MIMOWrapper(split=BackboneSplit(encoder=..., core=..., classifier=..., layout=..., "
    "pooling=...), num_subnetworks=...) (docs: how-to/custom-backbone), or register an adapter for this class with "
    "mixshare_layers.adapters.register_adapter(cls, fn)."
)


def is_timm_like(model: nn.Module) -> bool:
    """Whether ``model`` has timm's classification API (``forward_features``, ``forward_head``,
    ``get_classifier``)."""
    return all(callable(getattr(model, name, None)) for name in ("forward_features", "forward_head", "get_classifier"))


@torch.no_grad()
def split_timm(model: nn.Module, *, image_size: int | tuple[int, int] | None = None) -> BackboneSplit:
    """Split a model with timm's classification API (see the module docstring for how).

    Args:
        model: a timm model (or any model with ``forward_features`` / ``forward_head`` / ``get_classifier``).
        image_size: the probe's image size; by default the patch embedding's fixed size, else the smallest of
            64, 96, 128 and the pretrained config's size that the model runs on.

    Returns:
        A :class:`BackboneSplit` whose logits equal the model's on the probe batch (checked).

    Raises:
        UnsupportedBackboneError: the reason (no classifier, an image used by several layers, a split that does
            not reproduce the model...) and the way out.

    Example:
        >>> import timm
        >>> split = split_timm(timm.create_model("resnet18d", num_classes=10))  # a deep stem: its first conv
        >>> split.encoder, split.layout, split.pooling
        (Conv2d(3, 32, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False), 'channels_first', 'avg')
        >>> vit = split_timm(timm.create_model("test_vit", num_classes=10))
        >>> vit.encoder, vit.layout, vit.num_prefix_tokens, vit.pooling
        (Conv2d(3, 64, kernel_size=(16, 16), stride=(16, 16)), 'tokens', 1, 'token')
    """
    classifier = _classifier(model)
    probe = _probe(model, image_size)
    encoder = _find_encoder(model, probe)
    shell, head_tensors = _head_shell(model, probe)
    core = _splice_core(model, probe, encoder, drop=head_tensors)
    layout, pooling, p = _find_layout_and_pooling(model, probe, shell)
    head = _build_head(classifier, probe, shell, layout, pooling, p)
    preprocess = nn.Sequential(*encoder.preprocess) if encoder.preprocess else None
    names = {"encoder": encoder.name}
    if isinstance(head, nn.Linear):  # the model's own classifier layer
        names["head"] = module_name(model, head)
    split = BackboneSplit(encoder.module, core, head, reinit=TimmInit(model, names), layout=layout,
                          num_prefix_tokens=p, pooling=pooling, preprocess=preprocess)  # fmt: skip
    return _check(model, probe, encoder, split)


# -- 1. probe ------------------------------------------------------------------------------------------------------
class _Recorder:
    """Forward pre-hooks on every submodule: which modules receive which tensor (the image first), what they return,
    and which modules run in each phase (features, head)."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules(remove_duplicate=False) if n}
        self.phase = "features"
        self.inputs: list[tuple[str, int]] = []  # (module, id of its first input) in call order (features phase)
        self.called: dict[str, list[str]] = {"features": [], "head": []}
        self.outputs: dict[str, Any] = {}
        modules = [m for n, m in model.named_modules() if n]  # the root is called by us
        self.handles = [m.register_forward_pre_hook(self._pre, with_kwargs=True) for m in modules]
        self.handles += [m.register_forward_hook(self._post) for m in modules]

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = self.names[id(module)]
        self.called[self.phase].append(name)
        first = args[0] if args else next(iter(kwargs.values()), None)
        if self.phase == "features" and isinstance(first, Tensor):
            self.inputs.append((name, id(first)))

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        name = self.names[id(module)]
        if self.phase == "features" and name not in self.outputs:
            self.outputs[name] = output

    def receivers(self, tensor: Tensor) -> list[str]:
        """The modules whose first input was ``tensor`` itself (features phase)."""
        return [name for name, ident in self.inputs if ident == id(tensor)]

    def children(self, phase: str) -> list[str]:
        """The model's direct children that ran in ``phase`` (``"features"`` or ``"head"``), in call order."""
        return list(dict.fromkeys(n.split(".")[0] for n in self.called[phase]))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Probe(NamedTuple):
    """What one recorded run of the model on a probe batch showed (eval mode)."""

    images: Tensor  # (2, C, H, W), in the model's dtype and on its device
    features: Any  # forward_features(images): a tensor, or a non-empty list of tensors (one per scale)
    expected: Tensor  # forward_head(features): the logits the split must reproduce
    recorder: _Recorder  # which modules received which tensors, and which ones each phase called


def _classifier(model: nn.Module) -> nn.Module | tuple[nn.Module, ...]:
    """``model.get_classifier()`` (a tuple of two for a distilled model), once the model is known to have timm's API
    and a classifier with parameters.

    Raises:
        UnsupportedBackboneError: no timm API, or no classifier (a model created with ``num_classes=0``).
    """
    name = type(model).__name__
    if not is_timm_like(model):
        raise UnsupportedBackboneError(
            f"{name} does not have timm's forward_features / forward_head / get_classifier API. " + HOW_TO
        )
    classifier = model.get_classifier()  # type: ignore[operator]
    classifiers = classifier if isinstance(classifier, (tuple, list)) else (classifier,)  # distilled: two heads
    modules = all(isinstance(c, nn.Module) for c in classifiers)
    if not modules or not any(True for c in classifiers for _ in c.parameters()):
        raise UnsupportedBackboneError(
            f"{name} has no classifier (get_classifier() returns {type(classifier).__name__}: a model created with "
            "num_classes=0 returns features): each member needs its own classifier. Create the model with "
            "num_classes=K, e.g. timm.create_model(name, num_classes=10), or model.reset_classifier(10)."
        )
    return classifier


def _probe(model: nn.Module, image_size: int | tuple[int, int] | None) -> _Probe:
    """Run ``forward_features`` then ``forward_head``, recorded, on ``image_size`` or else on the first of
    :func:`_probe_sizes` the model takes.

    Raises:
        UnsupportedBackboneError: the model runs on none of the sizes, or its features are not tensors.
    """
    name = type(model).__name__
    device, dtype = _device_dtype(model)
    channels = _image_channels(model)
    sizes = [image_size if isinstance(image_size, tuple) else (image_size, image_size)] if image_size else None
    errors = []
    for size in sizes or _probe_sizes(model):
        images = torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        recorder = _Recorder(model)
        try:
            with eval_mode(model):
                features = model.forward_features(images)  # type: ignore[operator]
                recorder.phase = "head"
                expected = first_tensor(model.forward_head(features))  # type: ignore[operator]
        except Exception as exc:  # a size a model refuses fails in many ways
            errors.append(f"{size[0]}x{size[1]}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        finally:
            recorder.remove()
        several = isinstance(features, (list, tuple)) and len(features) > 0
        if not (isinstance(features, Tensor) or (several and all(isinstance(f, Tensor) for f in features))):
            raise UnsupportedBackboneError(
                f"{name}.forward_features returns a {type(features).__name__}, not tensors of features. " + HOW_TO
            )
        return _Probe(images, features, expected, recorder)
    raise UnsupportedBackboneError(
        f"{name}.forward_features runs on none of the probe sizes ({'; '.join(errors)}); pass the size it "
        "takes: split=lambda m: split_timm(m, image_size=...). " + HOW_TO
    )


def _image_channels(model: nn.Module) -> int:
    """The channels of the images the model takes: ``in_chans``, else its first convolution's, else the config's."""
    chans = getattr(model, "in_chans", None)
    if isinstance(chans, int) and chans > 0:
        return chans
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None:
        return conv.in_channels
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[0]) if size else 3


def _probe_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """Candidate probe sizes: the patch embedding's fixed size, else a small one, then the pretrained config's."""
    sizes: list[tuple[int, int]] = []
    for module in [getattr(model, "patch_embed", None), *model.modules()]:  # a patch embedding's fixed size first
        img = getattr(module, "img_size", None)
        if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(v, int) for v in img):
            sizes.append((int(img[0]), int(img[1])))
            break
    cfg = getattr(model, "pretrained_cfg", None) or {}
    cfg = cfg if isinstance(cfg, dict) else {}
    size = cfg.get("input_size")
    default = [(int(size[1]), int(size[2]))] if size and len(size) == 3 else []
    small = [(64, 64), (96, 96), (128, 128), (160, 160)]
    if cfg.get("fixed_input_size", False):
        sizes += default + small
    else:
        sizes += small + default
    sizes += [(224, 224), (256, 256), (384, 384)]
    return list(dict.fromkeys(sizes))


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's first floating-point parameter (the probe batch's)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


# -- 2. encoder ----------------------------------------------------------------------------------------------------
class _Encoder(NamedTuple):
    """The layer the members replicate."""

    name: str  # its qualified name in the model
    module: nn.Module
    preprocess: list[nn.Module]  # the parameter-free layers run on the image before it (shared by the members)
    stride: tuple[int, int]  # (s_h, s_w): the probe image's size over the encoding's


def _find_encoder(model: nn.Module, probe: _Probe) -> _Encoder:
    """The first layer with parameters that sees the image, and the parameter-free ones before it.

    A parameter-free first layer (TResNet's space-to-depth) is part of the input: it goes to the preprocess, and the
    layer that receives its output is looked for next.

    Raises:
        UnsupportedBackboneError: no single layer takes the image, or the encoder's output is not a ``(B, C, H, W)``
            map.
    """
    preprocess: list[nn.Module] = []
    seen = probe.images
    while True:
        name = _first_layer(model, probe.recorder.receivers(seen))
        encoder = model.get_submodule(name)
        encoding = probe.recorder.outputs.get(name)
        if any(True for _ in encoder.parameters()) or not isinstance(encoding, Tensor) or len(preprocess) >= 8:
            break
        preprocess.append(encoder)
        seen = encoding
    if not isinstance(encoding, Tensor) or encoding.dim() != 4:
        got = tuple(encoding.shape) if isinstance(encoding, Tensor) else type(encoding).__name__
        raise UnsupportedBackboneError(
            f"{type(model).__name__}'s first layer ({name}: {type(encoder).__name__}) returns {got}, not a "
            "(B, C, H, W) map to mix. " + HOW_TO
        )
    (h, w), (eh, ew) = probe.images.shape[-2:], encoding.shape[-2:]
    return _Encoder(name, encoder, preprocess, (max(1, round(h / eh)), max(1, round(w / ew))))


def _first_layer(model: nn.Module, receivers: list[str]) -> str:
    """The deepest module receiving the image that holds every leaf receiving it."""
    receivers = list(dict.fromkeys(receivers))
    if not receivers:
        raise UnsupportedBackboneError(
            f"no module of {type(model).__name__} receives the image itself in forward_features (it is transformed "
            "by tensor operations first, e.g. padded or unfolded), so there is no first layer to replicate. " + HOW_TO
        )
    receiving = set(receivers)
    leaves = [n for n in receiving if not any(o != n and o.startswith(n + ".") for o in receiving)]
    # a parameter-free leaf that passes the image on unchanged (an identity, a dropout) is not a layer
    learnable = [n for n in leaves if any(True for _ in model.get_submodule(n).parameters())]
    leaves = learnable or leaves
    common: list[str] = []
    for names in zip(*(leaf.split(".") for leaf in leaves), strict=False):  # the leading names every leaf shares
        if len(set(names)) > 1:
            break
        common.append(names[0])
    while common and ".".join(common) not in receiving:
        common = common[:-1]
    if not common:
        raise UnsupportedBackboneError(
            f"the image feeds several layers of {type(model).__name__} ({', '.join(sorted(leaves))}) with no common "
            "module taking it, so there is no single first layer to replicate. " + HOW_TO
        )
    return ".".join(common)


# -- 3. core -------------------------------------------------------------------------------------------------------
def _splice_core(model: nn.Module, probe: _Probe, encoder: _Encoder, drop: Iterable[str] = ()) -> SplicedCore:
    """``forward_features`` from the encoding on: a copy of the model (sharing its modules) in which the encoder is
    a :class:`~mixshare_layers.adapters.surgery.Slot` and the preprocess layers (the members' inputs went through
    them already) and the children only the head calls (they live in the heads) are identities. ``drop`` names
    parameters / buffers of the model itself the copy leaves out (the head's: :func:`_head_shell`).
    """
    replacements: dict[str, nn.Module] = {encoder.name: Slot()}
    for module in encoder.preprocess:
        replacements[module_name(model, module)] = nn.Identity()
    feature_children = set(probe.recorder.children("features"))
    for child in probe.recorder.children("head"):
        if child not in feature_children and child != encoder.name.split(".")[0]:
            replacements[child] = nn.Identity()
    channels = probe.images.shape[1]
    return SplicedCore(spliced(model, replacements, drop=drop), encoder.name, "forward_features", channels,
                       encoder.stride)  # fmt: skip


# -- 4. layout and pooling -----------------------------------------------------------------------------------------
def _find_layout_and_pooling(model: nn.Module, probe: _Probe, shell: nn.Module) -> tuple[str, str, int]:
    """``(layout, pooling, num_prefix_tokens)``: the first hypothesis whose pooled features, through the model's own
    ``forward_head`` (on ``shell``), give the probe's logits; else the head reads the features (``"head"``)."""
    candidates, fallback = _layout_candidates(model, probe.features)
    with eval_mode(shell):
        for layout, pooling, p in candidates:
            try:
                got = TimmHead(shell, pooling, layout, p)(_pool(probe.features, layout, pooling, p))
            except Exception:  # a hypothesis the head cannot run on is simply not the right one
                continue
            if same_values(got, probe.expected, default_tolerance(probe.images.dtype)):
                return layout, pooling, p
    return fallback


def _layout_candidates(model: nn.Module, features: Any) -> tuple[list[tuple[str, str, int]], tuple[str, str, int]]:
    """The ``(layout, pooling, P)`` hypotheses for these features, likeliest first, and the ``pooling="head"`` one
    kept when none holds.

    Raises:
        UnsupportedBackboneError: a single feature tensor that is neither a map nor tokens.
    """
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if isinstance(features, (list, tuple)):  # several feature maps (one per scale, CoaT): the head reads them
        tokens = features[0].dim() == 3
        return [], ("tokens", "head", num_prefix) if tokens else ("channels_first", "head", 0)
    if features.dim() == 4:
        d = getattr(model, "num_features", None)
        last_first = features.shape[-1] == d and features.shape[1] != d
        orders = ["channels_last", "channels_first"] if last_first else ["channels_first", "channels_last"]
        return [(layout, "avg", 0) for layout in orders], (orders[0], "head", 0)
    if features.dim() == 3:
        candidates = [("tokens", "avg", num_prefix)] + ([("tokens", "token", num_prefix)] if num_prefix else [])
        return candidates, ("tokens", "head", num_prefix)
    raise UnsupportedBackboneError(
        f"{type(model).__name__}.forward_features returns features of shape {tuple(features.shape)}; the library "
        "reads maps (B, D, h, w) / (B, h, w, D) or tokens (B, N, D). " + HOW_TO
    )


def _pool(features: Tensor, layout: str, pooling: str, num_prefix_tokens: int) -> Tensor:
    """``features`` pooled as a split with this layout and pooling pools them (the combination validated first)."""
    parts = nn.Identity(), nn.Identity(), nn.Identity()
    split = BackboneSplit(*parts, layout=layout, num_prefix_tokens=num_prefix_tokens, pooling=pooling)
    return split.validate().pool(features)


# -- 5. head -------------------------------------------------------------------------------------------------------
class TimmHead(nn.Module):
    """A timm model's head as a module of the pooled vector (or of the features, for ``pooling="head"``).

    Args:
        shell: an instance of the model's class holding only the modules ``forward_head`` uses.
        pooling: ``"avg"``, ``"token"`` or ``"head"`` (see :class:`~mixshare_layers.BackboneSplit`).
        layout: the features' layout.
        num_prefix_tokens: ``P`` (tokens).

    Shape:
        - Input: ``(B, D)`` pooled vectors (the features for ``pooling="head"``); output: logits ``(B, K)``.
    """

    def __init__(self, shell: nn.Module, pooling: str, layout: str, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.model = shell
        self.pooling = pooling
        self.layout = layout
        self.num_prefix_tokens = num_prefix_tokens

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, layout={self.layout!r}, num_prefix_tokens={self.num_prefix_tokens}"

    def features_of(self, pooled: Tensor) -> Tensor:
        """Features whose pooling (by the model's own head) is ``pooled``: one cell, or one patch after the prefix."""
        if self.pooling == "head":
            return pooled
        if self.layout == "channels_first":
            return pooled[:, :, None, None]
        if self.layout == "channels_last":
            return pooled[:, None, None, :]
        tokens = pooled[:, None, :]
        if self.pooling == "token":  # the class token first, then the other prefix tokens and one patch
            return torch.cat([tokens, tokens.new_zeros(tokens.shape[0], self.num_prefix_tokens, tokens.shape[2])], 1)
        prefix = tokens.new_zeros(tokens.shape[0], self.num_prefix_tokens, tokens.shape[2])
        return torch.cat([prefix, tokens], dim=1) if self.num_prefix_tokens else tokens

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.features_of(x))  # type: ignore[operator]


def _head_shell(model: nn.Module, probe: _Probe) -> tuple[nn.Module, list[str]]:
    """The shell ``forward_head`` runs on (:func:`~mixshare_layers.adapters.surgery.head_shell`: the children the
    probe saw the head call), completed by one run of the head with what it reads from the model itself
    (:func:`~mixshare_layers.adapters.surgery.completing`: EfficientViM's weights of its per-scale heads); and the
    names of the parameters and buffers of the model itself it took.

    Raises:
        UnsupportedBackboneError: the head calls no module of the model.
    """
    children = probe.recorder.children("head")
    if not children:
        raise UnsupportedBackboneError(f"{type(model).__name__}.forward_head calls no module of the model. " + HOW_TO)
    shell = head_shell(model, children)
    try:
        with completing(shell, model), eval_mode(shell):
            shell.forward_head(probe.features)  # type: ignore[operator]
    except Exception:  # the head may fail on the features as they are: the layout trials and the check tell
        pass
    taken = [*shell.named_parameters(recurse=False), *shell.named_buffers(recurse=False)]
    return shell, [name for name, _ in taken]


def _build_head(
    classifier: nn.Module | tuple[nn.Module, ...], probe: _Probe, shell: nn.Module, layout: str, pooling: str, p: int
) -> nn.Module:
    """The split's head: :class:`TimmHead` on ``shell``, or the model's ``nn.Linear`` classifier itself when the head
    is just that layer (the same logits from the pooled vector, in training mode too: no dropout, no norm)."""
    head = TimmHead(shell, pooling, layout, p)
    linear = isinstance(classifier, nn.Linear) and type(classifier).forward is nn.Linear.forward
    if pooling == "head" or not linear:
        return head
    assert isinstance(classifier, nn.Linear)
    pooled = _pool(probe.features, layout, pooling, p)
    tolerance = default_tolerance(probe.images.dtype) / 10
    with eval_mode(classifier, shell):
        plain = classifier.in_features == pooled.shape[-1]
        plain = plain and same_values(classifier(pooled), probe.expected, tolerance)
    return classifier if plain and _train_eval_agree(head, pooled) else head


def _train_eval_agree(head: nn.Module, pooled: Tensor) -> bool:
    """Whether a head computes the same in training mode (no dropout, no batch statistics) on ``pooled``."""
    trial = copy.deepcopy(head)
    devices = [pooled.device] if pooled.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        trial.eval()
        expected = trial(pooled)
        trial.train()
        return same_values(trial(pooled), expected, tolerance=0.0) and same_values(trial(pooled), expected, 0.0)


# -- 6. check ------------------------------------------------------------------------------------------------------
def _check(model: nn.Module, probe: _Probe, encoder: _Encoder, split: BackboneSplit) -> BackboneSplit:
    """``split`` once its logits are checked against the model's on the probe batch. A core that lacks a tensor of
    the model itself (one the head reads too, left out of it) gets a copy keeping the model's tensors, checked again.

    Raises:
        UnsupportedBackboneError: the logits differ (with the figures), or the core cannot run without the image.
    """
    try:
        try:
            check_split(model, split, probe.images)
        except AttributeError:  # the features read a tensor the head reads too: the core keeps it
            split = split._replace(core=_splice_core(model, probe, encoder))
            check_split(model, split, probe.images)
    except Exception as exc:  # a mismatch (ValueError), or a core that cannot run without the image itself
        raise UnsupportedBackboneError(
            f"{type(model).__name__}: {exc} (its forward_features uses the image elsewhere than through "
            f"{encoder.name}, e.g. resized for a second branch, or its forward is not "
            "forward_head(forward_features(x))). " + HOW_TO
        ) from exc
    return split
