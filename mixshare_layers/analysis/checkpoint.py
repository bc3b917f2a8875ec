"""Rebuilding a wrapped CIFAR WRN from a training checkpoint (the example script's, or a plain dict).

Accepted contents (a ``dict``):

* ``{"model": state_dict, "config": {...}}``: ``config`` holds ``depth``, ``width``, ``method`` (a preset name;
  ``preset`` is accepted too), ``num_classes`` and ``num_subnetworks`` (these two are read from the heads' weight
  when absent), and optionally ``overrides`` (a dict of :class:`~mixshare_layers.MIMOConfig` fields) and
  ``in_channels``. ``"model_state"`` / ``"state_dict"`` are accepted in place of ``"model"`` and ``"args"`` in
  place of ``"config"``. examples/cifar100_wrn.py's ``checkpoint.pt`` is of this kind (its ``config`` is the run's
  resolved settings: MIMOConfig fields with a value other than ``None`` are the preset overrides).
* a ``checkpoint.pt`` of examples/cifar100_wrn.py from before checkpoints held their config: ``{"model":
  state_dict, "epoch": ..., ...}``; :func:`load_wrn_checkpoint` then reads the ``config.json`` of the same folder.

Files are read with :func:`mixshare_layers.checkpoint.load_checkpoint`: ``weights_only=True`` only, digest checked.
A file whose config is stored as an ``argparse.Namespace`` (or anything but plain values) is refused; convert it
once with ``python -m mixshare_layers.checkpoint convert OLD.pt NEW.pt`` (no code runs). In memory,
:func:`model_from_checkpoint` still accepts a Namespace config.

State dict keys may carry the prefixes that ``torch.compile`` (``_orig_mod.``) or ``DataParallel`` (``module.``)
add; they are removed. Fused encoder kernels saved in the older ``(M, C', C, k, k)`` layout are reshaped to the
current member-major ``(M * C', C, k, k)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..wrapper import MIMOWrapper

__all__ = ["CHECKPOINT_CONFIG_KEYS", "load_wrn_checkpoint", "model_from_checkpoint"]

CHECKPOINT_CONFIG_KEYS = ("depth", "width", "num_classes", "method", "num_subnetworks")
_REQUIRED_KEYS = ("depth", "width", "method")
_STATE_KEYS = ("model", "model_state", "state_dict", "model_state_dict")
_CONFIG_KEYS = ("config", "args", "hparams")
_PREFIXES = ("_orig_mod.", "module.")


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
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


def _as_dict(config: object) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "__dict__"):  # an argparse.Namespace or a dataclass instance
        return dict(vars(config))
    raise TypeError(
        f"the checkpoint's config must be a dict (or an argparse Namespace), but got {type(config).__name__}"
    )


def model_from_checkpoint(
    checkpoint: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> tuple[MIMOWrapper, dict[str, Any]]:
    """Rebuild the :class:`~mixshare_layers.MIMOWrapper` of a loaded checkpoint dict (format: module docstring).

    Args:
        checkpoint: the dict returned by ``torch.load``.
        config: the settings when the checkpoint holds none (e.g. the run's ``config.json``); a config inside the
            checkpoint wins.

    Returns:
        ``(model, config)``: the model in eval mode with the checkpoint's weights (strict loading), and the config
        dict completed with ``num_classes`` and ``num_subnetworks``.

    Example:
        >>> from mixshare_layers import MIMOWrapper
        >>> from mixshare_layers.models import wide_resnet
        >>> net = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixshare")
        >>> cfg = {"depth": 10, "width": 1, "num_classes": 10, "method": "mixshare", "num_subnetworks": 2}
        >>> model, _ = model_from_checkpoint({"model": net.state_dict(), "config": cfg})
        >>> model.preset
        'mixshare'
    """
    from ..models import wide_resnet
    from ..presets import MIMOConfig

    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict, but got {type(checkpoint).__name__}")
    state_key = next((k for k in _STATE_KEYS if k in checkpoint), None)
    config_key = next((k for k in _CONFIG_KEYS if k in checkpoint), None)
    if state_key is None or (config_key is None and config is None):
        raise ValueError(
            "checkpoint must be a dict with the model's state_dict under 'model' and the settings to rebuild it "
            f"under 'config' (keys {', '.join(CHECKPOINT_CONFIG_KEYS)}), or come with a config.json in its folder, "
            f"but it has keys {sorted(checkpoint)}"
        )
    state = checkpoint[state_key]
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint[{state_key!r}] must be a state_dict, but got {type(state).__name__}")
    state = _strip_prefixes(state)
    cfg = _as_dict(checkpoint[config_key] if config_key is not None else config)
    if "method" not in cfg and "preset" in cfg:
        cfg["method"] = cfg["preset"]
    missing = [k for k in _REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ValueError(
            f"the checkpoint's config lacks {missing}; needed: {', '.join(CHECKPOINT_CONFIG_KEYS)} "
            f"(got keys {sorted(cfg)})"
        )
    heads = state.get("heads.weight")
    if isinstance(heads, torch.Tensor) and heads.dim() == 3:  # (M, K, D)
        cfg.setdefault("num_subnetworks", int(heads.shape[0]))
        cfg.setdefault("num_classes", int(heads.shape[1]))
    elif cfg.get("method") == "single" or "fc.weight" in state:
        raise ValueError(
            f"the checkpoint holds a plain network (method {cfg.get('method')!r}), not a MIMO model: there are no "
            "subnetworks to analyse"
        )
    missing = [k for k in ("num_classes", "num_subnetworks") if k not in cfg]
    if missing:
        raise ValueError(f"the checkpoint's config lacks {missing} and its state_dict has no 'heads.weight'")
    overrides = {f.name: cfg[f.name] for f in dataclasses.fields(MIMOConfig) if cfg.get(f.name) is not None}
    extra = cfg.get("overrides") or {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"config['overrides'] must be a dict of MIMOConfig fields, but got {type(extra).__name__}")
    overrides.update(extra)
    backbone = wide_resnet(
        int(cfg["depth"]), int(cfg["width"]), int(cfg["num_classes"]), int(cfg.get("in_channels", 3))
    )
    model = MIMOWrapper(backbone, int(cfg["num_subnetworks"]), preset=str(cfg["method"]), **overrides)
    expected = model.state_dict()
    for key in ("encoder.weight", "encoder.bias"):  # checkpoints from before the fused kernel was stored 4-D
        value, want = state.get(key), expected.get(key)
        if isinstance(value, torch.Tensor) and want is not None and value.shape != want.shape:
            if value.numel() == want.numel() and value.shape[0] == int(cfg["num_subnetworks"]):
                state[key] = value.reshape(want.shape)  # (M, C', ...) member-major == (M * C', ...)
    model.load_state_dict(state)
    model.eval()
    return model, cfg


def load_wrn_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[MIMOWrapper, dict[str, Any]]:
    """Load a checkpoint file safely and rebuild its model (see :func:`model_from_checkpoint`).

    The file is read with :func:`mixshare_layers.checkpoint.load_checkpoint` (``weights_only=True``, never more;
    the digest of files written by :func:`~mixshare_layers.checkpoint.save_checkpoint` is verified). A checkpoint
    without settings (examples/cifar100_wrn.py's ``checkpoint.pt`` from before checkpoints held their config) takes
    them from the ``config.json`` next to it.

    Args:
        path: the checkpoint file.
        map_location: where the tensors are loaded.

    Returns:
        ``(model, config)`` as :func:`model_from_checkpoint`.

    Raises:
        CheckpointNotFoundError: no such file (a ``FileNotFoundError``).
        CheckpointError: (a ``ValueError``) the file cannot be loaded safely (damaged, stores Python objects, ...) or
            does not describe a wrapped WRN; the message is one line naming the file.
    """
    from ..checkpoint import CheckpointError, load_checkpoint

    p = os.fspath(path)
    checkpoint = load_checkpoint(p, map_location=map_location)
    config = None
    config_file = os.path.join(os.path.dirname(os.path.abspath(p)), "config.json")
    if not any(k in checkpoint for k in _CONFIG_KEYS) and os.path.isfile(config_file):
        try:
            with open(config_file, encoding="utf-8") as fh:
                config = json.load(fh)
        except (OSError, ValueError) as err:
            raise CheckpointError(
                p, f"holds no config and the config.json next to it cannot be read ({err})", "restore config.json"
            ) from None
    try:
        return model_from_checkpoint(checkpoint, config)
    except (TypeError, ValueError, RuntimeError) as err:  # RuntimeError: load_state_dict's mismatches
        text = " ".join(str(err).split())
        text = text if len(text) <= 400 else text[:400] + " ..."
        raise CheckpointError(p, f"does not rebuild a wrapped WRN: {text}", "") from None
