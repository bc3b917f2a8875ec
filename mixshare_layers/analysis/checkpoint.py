"""Rebuilding the wrapped model of a checkpoint for analysis: any backbone from its recipe, or a CIFAR WRN from its
config.

Accepted contents (a ``dict``, read with :func:`mixshare_layers.checkpoint.load_checkpoint`):

* ``{"model": state_dict, "recipe": {...}, ...}``, as :func:`~mixshare_layers.checkpoint.save_model` writes: the
  recipe (:class:`~mixshare_layers.checkpoint.ModelRecipe`) rebuilds any wrapped backbone;
* ``{"model": state_dict, "config": {...}}``, a wrapped CIFAR WRN: ``config`` holds ``depth``, ``width``,
  ``method`` (a preset name; ``preset`` is accepted too), optionally ``num_classes`` and ``num_subnetworks`` (read
  from the heads' weight when absent), ``in_channels``, ``overrides`` (a dict of :class:`~mixshare_layers.MIMOConfig`
  fields) and MIMOConfig fields themselves (a value other than ``None`` overrides the preset's). ``"model_state"`` /
  ``"state_dict"`` are accepted in place of ``"model"``, ``"args"`` in place of ``"config"``.

State dict keys may carry the prefixes of ``torch.compile`` (``_orig_mod.``) or ``DataParallel`` (``module.``);
they are removed. An encoder kernel stored 5-D, ``(M, C', C, k, k)``, is read as the member-major
``(M * C', C, k, k)`` it is.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_checkpoint, model_from_recipe, strip_state_prefixes
from ..checkpoint.model import NO_RECIPE_HINT
from ..models import wide_resnet
from ..presets import MIMOConfig
from ..wrapper import MIMOWrapper

__all__ = ["CHECKPOINT_CONFIG_KEYS", "load_wrn_checkpoint", "model_from_checkpoint"]

CHECKPOINT_CONFIG_KEYS = ("depth", "width", "num_classes", "method", "num_subnetworks")
_STATE_KEYS = ("model", "model_state", "state_dict", "model_state_dict")
_CONFIG_KEYS = ("config", "args", "hparams")


def _config(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    config: object = next((checkpoint[k] for k in _CONFIG_KEYS if k in checkpoint), {})
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "__dict__"):  # an argparse.Namespace, in memory
        return dict(vars(config))
    raise TypeError(f"the checkpoint's config must be a dict, but got {type(config).__name__}")


def model_from_checkpoint(
    checkpoint: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> tuple[MIMOWrapper, dict[str, Any]]:
    """Rebuild the :class:`~mixshare_layers.MIMOWrapper` of a loaded checkpoint dict (format: module docstring).

    Args:
        checkpoint: the loaded dict.
        config: the settings when the checkpoint holds none; a config inside the checkpoint wins.

    Returns:
        ``(model, config)``: the model in eval mode with the checkpoint's weights (strict loading), and the config
        completed with ``num_classes`` and ``num_subnetworks`` (from a recipe, also ``method`` and ``builder``).

    Example:
        >>> net = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixshare")
        >>> cfg = {"depth": 10, "width": 1, "num_classes": 10, "method": "mixshare", "num_subnetworks": 2}
        >>> model_from_checkpoint({"model": net.state_dict(), "config": cfg})[0].preset
        'mixshare'
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict, but got {type(checkpoint).__name__}")
    cfg = {**(config or {}), **_config(checkpoint)}
    if "recipe" in checkpoint:
        model = model_from_recipe(checkpoint)
        recipe = checkpoint["recipe"]
        cfg.setdefault("method", model.preset)
        cfg.setdefault("num_subnetworks", model.num_subnetworks)
        if model.num_classes is not None:
            cfg.setdefault("num_classes", model.num_classes)
        cfg.setdefault("builder", recipe.get("builder") if isinstance(recipe, Mapping) else None)
        return model, cfg
    state_key = next((k for k in _STATE_KEYS if k in checkpoint), None)
    if state_key is None or not cfg:
        names = sorted(map(str, checkpoint))
        shown = str(names[:8])[:-1] + (f", ... ({len(names)} keys)]" if len(names) > 8 else "]")
        raise ValueError(
            "checkpoint must be a dict with the model's state_dict under 'model' and a 'recipe' (see "
            "mixshare_layers.checkpoint.save_model) or, for a wrapped CIFAR WRN, its settings under 'config' (keys "
            f"{', '.join(CHECKPOINT_CONFIG_KEYS)}), but it has keys {shown}"
        )
    state = checkpoint[state_key]
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint[{state_key!r}] must be a state_dict, but got {type(state).__name__}")
    state = strip_state_prefixes(state)
    cfg.setdefault("method", cfg.get("preset"))
    missing = [k for k in ("depth", "width", "method") if cfg.get(k) is None]
    if missing:
        raise ValueError(
            f"the checkpoint records no recipe (how to rebuild its model) and its config lacks {missing}, which a "
            f"wrapped CIFAR WRN's has ({', '.join(CHECKPOINT_CONFIG_KEYS)}; got keys {sorted(cfg)}): {NO_RECIPE_HINT}"
        )
    heads = state.get("heads.weight")
    if isinstance(heads, torch.Tensor) and heads.dim() == 3:  # (M, K, D)
        cfg.setdefault("num_subnetworks", int(heads.shape[0]))
        cfg.setdefault("num_classes", int(heads.shape[1]))
    elif cfg["method"] == "single" or "fc.weight" in state:
        raise ValueError(
            f"the checkpoint holds a plain network (method {cfg['method']!r}), not a MIMO model: there are no "
            "subnetworks to analyse"
        )
    missing = [k for k in ("num_classes", "num_subnetworks") if k not in cfg]
    if missing:
        raise ValueError(f"the checkpoint's config lacks {missing} and its state_dict has no 'heads.weight'")
    overrides = {f.name: cfg[f.name] for f in dataclasses.fields(MIMOConfig) if cfg.get(f.name) is not None}
    if not isinstance(cfg.get("overrides") or {}, Mapping):
        raise TypeError(f"config['overrides'] must be a dict of MIMOConfig fields, but got {cfg['overrides']!r}")
    overrides.update(cfg.get("overrides") or {})
    sizes = (int(cfg["depth"]), int(cfg["width"]), int(cfg["num_classes"]), int(cfg.get("in_channels", 3)))
    model = MIMOWrapper(wide_resnet(*sizes), int(cfg["num_subnetworks"]), preset=str(cfg["method"]), **overrides)
    expected = model.state_dict()
    for key in ("encoder.weight", "encoder.bias"):  # a fused encoder stored (M, C', ...): member-major (M * C', ...)
        value, want = state.get(key), expected.get(key)
        if isinstance(value, torch.Tensor) and want is not None and value.shape != want.shape:
            state[key] = value.reshape(want.shape) if value.numel() == want.numel() else value
    model.load_state_dict(state)
    return model.eval(), cfg


def load_wrn_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[MIMOWrapper, dict[str, Any]]:
    """Load a checkpoint file safely and rebuild its model (:func:`model_from_checkpoint`).

    The file is read with :func:`mixshare_layers.checkpoint.load_checkpoint`: digest checked, ``weights_only=True``
    only.

    Returns:
        ``(model, config)`` as :func:`model_from_checkpoint`.

    Raises:
        CheckpointNotFoundError: no such file (a ``FileNotFoundError``).
        CheckpointError: (a ``ValueError``) the file cannot be loaded safely, its recipe does not rebuild its weights
            (or names a builder outside the allowlist), or it has no recipe and is not a wrapped WRN's with its
            config; the message is one line naming the file and what to do.
    """
    p = os.fspath(path)
    checkpoint = load_checkpoint(p, map_location=map_location)
    has_recipe = "recipe" in checkpoint
    if not has_recipe and not any(k in checkpoint for k in _CONFIG_KEYS) and any(k in checkpoint for k in _STATE_KEYS):
        raise CheckpointError(p, "records no recipe (how to rebuild its model) and no config", NO_RECIPE_HINT)
    try:
        return model_from_checkpoint(checkpoint)
    except (TypeError, ValueError, RuntimeError) as err:  # RuntimeError: load_state_dict's mismatches, long
        text = " ".join(str(err).split())
        text = text[:400] + " ..." if isinstance(err, RuntimeError) and len(text) > 400 else text
        what = "cannot rebuild its model from its recipe" if has_recipe else "does not rebuild a wrapped WRN"
        raise CheckpointError(p, f"{what}: {text}") from None
