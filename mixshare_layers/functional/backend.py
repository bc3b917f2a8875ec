"""Choosing between the plain torch path and the fused Triton kernels of the masked ops.

Every masked op (:func:`~mixshare_layers.functional.mix`, :func:`~mixshare_layers.functional.unmix_pool`) has two
implementations with the same contract:

* ``"torch"``: plain tensor code (a custom ``autograd.Function`` whose backward writes each gradient in one pass);
  runs everywhere and is traced by ``torch.compile`` without graph breaks;
* ``"triton"``: fused Triton kernels, masks computed in-kernel from the box coordinates, registered as
  ``torch.library`` custom ops (``mixshare::mix``, ``mixshare::unmix_pool``) with their own backward and fake
  (meta) implementations, so autograd and ``torch.compile`` see proper ops. CUDA tensors only (or CPU tensors under
  ``TRITON_INTERPRET=1``, which is how CI checks the kernels without a GPU).

The choice is made once, when a module is built (``backend="auto" | "torch" | "triton"``); ``None`` reads the
environment variable ``MIXSHARE_BACKEND`` (default ``"auto"``). ``"auto"`` takes Triton for CUDA tensors when
``triton`` imports, else torch. Triton is an optional extra (``pip install mixshare-layers[triton]``): importing
:mod:`mixshare_layers` never imports it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch
from torch import Tensor

from .._checks import check_choice
from ..vocabulary import BACKENDS

__all__ = ["BACKENDS", "ENV_VAR", "resolve_backend", "triton_available", "use_triton"]
ENV_VAR = "MIXSHARE_BACKEND"

# Read once at import: the Triton interpreter must be chosen before triton itself is imported anyway.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TRITON_STATE: dict[str, object] = {}  # "ok": triton imports; "ops": the module of registered custom ops
_OPS_MODULE = "mixshare_layers.functional._triton.ops"


def triton_available() -> bool:
    """Whether ``triton`` imports here (the answer is cached)."""
    if "ok" not in _TRITON_STATE:
        try:
            importlib.import_module("triton")
        except ImportError:  # an absent or broken install both mean "no Triton"
            _TRITON_STATE["ok"] = False
        else:
            _TRITON_STATE["ok"] = True
    return bool(_TRITON_STATE["ok"])


def resolve_backend(backend: str | None = None) -> str:
    """Validate a backend name; ``None`` reads ``MIXSHARE_BACKEND`` (default ``"auto"``).

    Raises:
        ValueError: for a name other than ``"auto"``, ``"torch"``, ``"triton"``.
        ImportError: for ``"triton"`` when the ``triton`` package does not import.
    """
    if backend is None:
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        name = f"the environment variable {ENV_VAR}"
    else:
        name = "backend"
    check_choice(name, backend, BACKENDS)
    if backend != "torch" and "ops" not in _TRITON_STATE and (backend == "triton" or torch.cuda.is_available()):
        # Load (and register) the custom ops now, outside any torch.compile trace, so forward never imports.
        if triton_available():
            _TRITON_STATE["ops"] = importlib.import_module(_OPS_MODULE)
        elif backend == "triton":
            raise ImportError(
                "backend='triton' needs the triton package, which does not import here; install the extra with "
                "`pip install mixshare-layers[triton]` (or use backend='torch' / 'auto')"
            )
    return backend


def use_triton(backend: str, tensor: Tensor) -> bool:
    """Whether an op on ``tensor`` runs the Triton kernels under the (resolved) ``backend``.

    Decided from Python facts only (device type, a cached import check), so it costs nothing under
    ``torch.compile``.

    Raises:
        ValueError: ``backend="triton"`` with a tensor that is not on CUDA (outside ``TRITON_INTERPRET=1``).
    """
    if backend == "torch":
        return False
    on_device = tensor.is_cuda or _INTERPRET
    if backend == "triton":
        if not on_device:
            raise ValueError(
                f"backend='triton' runs on CUDA tensors, but got a tensor on {tensor.device}; use backend='auto' "
                "(Triton on CUDA, torch elsewhere) or backend='torch'"
            )
        return True
    return tensor.is_cuda and triton_available()


def triton_ops() -> ModuleType:
    """The module holding the registered Triton custom ops (imports triton on first use)."""
    if "ops" not in _TRITON_STATE:
        _TRITON_STATE["ops"] = importlib.import_module(_OPS_MODULE)
    return _TRITON_STATE["ops"]  # type: ignore[return-value]
