"""Small validation helpers shared by every module.

They raise ``TypeError`` for a wrong type (or dtype) and ``ValueError`` for a wrong value (or shape, device, range),
and every message names the argument, the value received and what was expected.

Cost: the checks read Python values and tensor metadata (shape, dtype, device), which never synchronises with the
device, so they run on every call. Checks of tensor *values* (the range of class labels, a progress given as a
tensor) read the data, which on an accelerator is a host synchronisation; they run only where that is free, on
tensors in host memory, unless :func:`set_value_checks` says otherwise (``"always"`` to debug a GPU run, ``"never"``).
Out-of-range labels on a GPU then meet PyTorch's own device-side assert in the cross-entropy kernel.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch

from .vocabulary import VALUE_CHECK_MODES, ValueCheckMode

__all__ = [
    "VALUE_CHECK_MODES",
    "check_bool",
    "check_choice",
    "check_device",
    "check_dtype",
    "check_floating",
    "check_fraction",
    "check_images",
    "check_int",
    "check_ndim",
    "check_num_subnetworks",
    "check_real",
    "check_shape",
    "check_targets",
    "check_tensor",
    "get_value_checks",
    "set_value_checks",
    "values_checked",
]

_Word = TypeVar("_Word", bound=str)


def _value_checks_from_environment() -> ValueCheckMode:
    """``MIXSHARE_VALUE_CHECKS`` (default ``"cpu"``); a typo must not silently turn the checks off."""
    mode = os.environ.get("MIXSHARE_VALUE_CHECKS", "cpu").strip().lower() or "cpu"
    for known in VALUE_CHECK_MODES:
        if mode == known:
            return known
    raise ValueError(
        f"MIXSHARE_VALUE_CHECKS must be one of {', '.join(map(repr, VALUE_CHECK_MODES))}, but got {mode!r}"
    )


_value_checks: ValueCheckMode = _value_checks_from_environment()


def set_value_checks(mode: str) -> None:
    """Choose when the library reads tensor *values* to check them (class-label range, a tensor progress).

    Args:
        mode: ``"cpu"`` (default; also ``MIXSHARE_VALUE_CHECKS``): check tensors in host memory only, where reading
            them is free; tensors on an accelerator are not read, so a training step never waits for the device.
            ``"always"``: check every tensor, at the cost of one host synchronisation per check (to find a bad label
            in a GPU run with a clear message instead of a device-side assert). ``"never"``: no value checks.
            Shape, dtype and device checks always run: they cost no synchronisation.

    Note:
        Value checks are skipped while ``torch.compile`` traces and during CUDA-graph capture, whatever the mode.

    Example:
        >>> from mixshare_layers import set_value_checks, get_value_checks
        >>> set_value_checks("always"); get_value_checks()
        'always'
        >>> set_value_checks("cpu")
    """
    global _value_checks
    _value_checks = check_choice("mode", mode, VALUE_CHECK_MODES)


def get_value_checks() -> ValueCheckMode:
    """The current mode of :func:`set_value_checks`."""
    return _value_checks


def values_checked(tensor: torch.Tensor) -> bool:
    """Whether the value checks of the current mode read ``tensor`` (never while compiling or capturing)."""
    if _value_checks == "never" or torch.compiler.is_compiling():
        return False
    if tensor.device.type == "meta":
        return False  # no values
    if tensor.device.type == "cpu":
        return True
    if _value_checks != "always":
        return False
    return not (tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


# -- numbers -------------------------------------------------------------------------------------------------------
def _is_bool(value: object) -> bool:
    """Python and NumPy booleans (``numpy.bool_`` is not an ``int`` subclass, nor registered as a number)."""
    return isinstance(value, bool) or (type(value).__name__ in ("bool_", "bool") and hasattr(value, "dtype"))


def _scalar_tensor(name: str, value: torch.Tensor, kind: str) -> torch.Tensor:
    if value.dim() != 0:
        raise ValueError(f"{name} must be {kind} (as a tensor: 0-dim), but got a tensor of shape {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be {kind}, but got a 0-dim tensor of dtype {value.dtype}")
    return value


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """Return ``value`` as an ``int`` after checking it is an integer at least ``minimum``.

    Python ints, NumPy integers and 0-dim integer tensors are accepted; booleans and floats are refused.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, numbers.Integral) and not _is_bool(value):  # NumPy integers
        number = operator.index(value)
    elif isinstance(value, torch.Tensor) and not value.is_floating_point():
        number = int(_scalar_tensor(name, value, "an int").item())
    else:
        raise TypeError(f"{name} must be an int, but got {value!r} of type {type(value).__name__}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, but got {number}")
    return int(number)


def check_num_subnetworks(value: object, name: str = "num_subnetworks") -> int:
    """Validate the number of subnetworks M (an int >= 1)."""
    return check_int(name, value, minimum=1)


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` after checking it is a bool (Python or NumPy); strings, numbers and ``None`` are refused.

    A flag such as ``pretrained="no"`` is truthy, so accepting anything would silently mean ``True``.
    """
    if not _is_bool(value):
        raise TypeError(f"{name} must be a bool, but got {value!r} of type {type(value).__name__}")
    return bool(value)


def check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` as a finite ``float`` inside the given bounds.

    Python ints and floats, NumPy scalars and 0-dim real tensors are accepted (a tensor is read, so use this at
    construction, not in a training step); booleans are refused.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, numbers.Real) and not _is_bool(value):  # NumPy scalars, fractions
        number = float(value)
    elif isinstance(value, torch.Tensor):
        number = float(_scalar_tensor(name, value, "a real number").item())
    else:
        raise TypeError(f"{name} must be a real number, but got {value!r} of type {type(value).__name__}")
    if not -math.inf < number < math.inf:  # not math.isfinite: that fails on torch.compile's symbolic floats
        raise ValueError(f"{name} must be finite, but got {number}")
    bad_low = low is not None and (number < low if low_inclusive else number <= low)
    bad_high = high is not None and (number > high if high_inclusive else number >= high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = ("[" if low_inclusive else "(") + f"{lo}, {hi}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{name} must be in {interval}, but got {number:g}")
    return number


def check_fraction(name: str, value: object) -> float:
    """A fraction in (0, 1]."""
    return check_real(name, value, low=0.0, high=1.0, low_inclusive=False)


def check_choice(name: str, value: object, choices: Iterable[_Word]) -> _Word:
    """Check that ``value`` is one of the strings in ``choices`` (the message lists them); returns it.

    ``choices`` is usually a tuple of :mod:`mixshare_layers.vocabulary`, whose ``Literal`` type the result takes.
    """
    words = tuple(choices)
    for word in words:
        if isinstance(value, str) and value == word:
            return word
    valid = ", ".join(repr(c) for c in words)
    raise ValueError(f"{name} must be one of {valid}, but got {value!r}")


# -- tensors -------------------------------------------------------------------------------------------------------
def check_tensor(
    name: str, value: object, layout: str, *, stack_dim: int | dict[int, int] | None = None
) -> torch.Tensor:
    """Check that ``value`` is a tensor.

    A list or tuple of tensors gets a hint to stack it: on dim ``stack_dim``, or, for a dict, on the dim it maps the
    items' number of dimensions to (e.g. ``{3: 0, 4: 1}``: images ``(C, H, W)`` make a batch, batches
    ``(B, C, H, W)`` the M inputs).
    """
    if isinstance(value, torch.Tensor):
        return value
    got = type(value).__name__
    if isinstance(value, (list, tuple)):
        tensors = bool(value) and all(isinstance(v, torch.Tensor) for v in value)
        got = f"a {got} of {len(value)} {'tensor' if tensors else 'item'}{'s' if len(value) != 1 else ''}"
        dims = {v.dim() for v in value if isinstance(v, torch.Tensor)}
        if tensors and len(dims) == 1:
            dim = stack_dim.get(dims.pop()) if isinstance(stack_dim, dict) else stack_dim
            if dim is not None:
                got += f"; stack them into one tensor first (torch.stack({name}, dim={dim}))"
    raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, but got {got}")


def check_ndim(
    name: str, tensor: object, ndim: int, layout: str, *, stack_dim: int | dict[int, int] | None = None
) -> torch.Tensor:
    """Check that ``tensor`` is a tensor with ``ndim`` dimensions laid out as ``layout`` (e.g. "(B, C, H, W)")."""
    tensor = check_tensor(name, tensor, layout, stack_dim=stack_dim)
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, but got a tensor of shape {tuple(tensor.shape)}")
    return tensor


def check_shape(name: str, tensor: object, expected: Sequence[int | None], layout: str) -> torch.Tensor:
    """Check a tensor's shape against ``expected`` where ``None`` matches any size."""
    tensor = check_ndim(name, tensor, len(expected), layout)
    for got, want in zip(tensor.shape, expected, strict=True):
        if want is not None and got != want:
            shown = tuple("*" if w is None else w for w in expected)
            raise ValueError(
                f"{name} must have shape {layout} = {shown}, but got a tensor of shape {tuple(tensor.shape)}"
            )
    return tensor


def check_floating(name: str, tensor: torch.Tensor, what: str = "a floating-point tensor") -> torch.Tensor:
    """Check that ``tensor`` has a floating dtype (integer images and logits are refused)."""
    if not tensor.is_floating_point():
        hint = " (for uint8 pixels: x.float() / 255, then normalise)" if tensor.dtype == torch.uint8 else ""
        raise TypeError(f"{name} must be {what}, but got dtype {tensor.dtype}; convert it first{hint}")
    return tensor


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return False


def check_device(name: str, tensor: torch.Tensor, device: torch.device | None, owner: str = "the model") -> None:
    """Check that ``tensor`` lives on ``device`` (``None``: anywhere)."""
    if device is not None and tensor.device != device:
        raise ValueError(
            f"{name} is on device {tensor.device}, not on {device} like {owner}; move one of them "
            f"({name}.to({str(device)!r}) or model.to({str(tensor.device)!r}))"
        )


def check_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype | None, owner: str = "the model") -> None:
    """Check that a floating ``tensor`` has ``dtype`` (``None``: any); under autocast any floating dtype is accepted."""
    if dtype is not None and tensor.dtype != dtype and not _autocast_on(tensor.device.type):
        raise TypeError(
            f"{name} has dtype {tensor.dtype} but the parameters of {owner} are {dtype}; convert one of them "
            f"({name}.to({dtype}) or model.to({tensor.dtype})), or run under torch.autocast for mixed precision"
        )


def check_images(
    name: str,
    x: object,
    *,
    layout: str,
    ndims: Sequence[int] = (4,),
    channels: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    owner: str = "the model",
) -> torch.Tensor:
    """Check a batch of images laid out channels-first, ``(..., C, H, W)``, before the first layer sees it.

    Args:
        name: the argument's name in messages.
        x: the value to check.
        layout: the expected layout, for messages (e.g. ``"(B, M, C, H, W)"``).
        ndims: accepted numbers of dimensions.
        channels: expected C (dim -3); ``None``: any.
        dtype: the model's parameter dtype; ``None``: any floating dtype. Any floating dtype passes under autocast.
        device: the model's device; ``None``: any.
        owner: what the images are fed to, for messages.

    An empty batch (``B = 0``) is accepted; empty spatial dims are not.
    """
    x = check_tensor(name, x, layout, stack_dim={3: 0, 4: 1} if 5 in ndims else {3: 0})
    if x.dim() not in ndims:
        raise ValueError(f"{name} must have shape {layout}, but got a tensor of shape {tuple(x.shape)}")
    check_floating(name, x, "a floating-point image tensor")
    check_device(name, x, device, owner)
    check_dtype(name, x, dtype, owner)
    if channels is not None and x.shape[-3] != channels:
        raise ValueError(
            f"{name} has {x.shape[-3]} channels (dim {x.dim() - 3} of shape {tuple(x.shape)}, layout {layout}) but "
            f"{owner} expects {channels}"
        )
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"{name} must have a non-empty spatial size H x W, but got shape {tuple(x.shape)}")
    return x


def check_targets(
    name: str,
    targets: object,
    *,
    shape: Sequence[int],
    layout: str,
    num_classes: int | None = None,
    device: torch.device | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Check class-index targets: an integer tensor of ``shape`` on ``device``, values in ``[0, num_classes)``.

    The value range (``ignore_index`` allowed besides) is checked where :func:`values_checked` says reading the
    tensor is free. Returns the targets as int64 (what the cross-entropy kernels take).
    """
    t = check_tensor(name, targets, layout, stack_dim={len(shape) - 1: len(shape) - 1})
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer class indices (int64), but got dtype {t.dtype}; soft or one-hot targets are "
            f"not supported (one-hot: {name}.argmax(-1); float indices: {name}.long())"
        )
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, but got {tuple(t.shape)}")
    check_device(name, t, device, "the logits")
    if num_classes is not None and t.numel() and values_checked(t):
        bad = (t < 0) | (t >= num_classes)
        if ignore_index is not None:
            bad &= t != ignore_index
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            value = int(t[where])
            at = f"{name}[{', '.join(map(str, where))}] = {value}"
            msg = f"{name} must hold class indices in [0, {num_classes}) (K = {num_classes} classes), but {at}"
            if ignore_index is None and value == -100:
                msg += " (-100 is cross-entropy's usual ignore_index: pass ignore_index=-100 to skip those labels)"
            elif ignore_index is not None:
                msg += f" (ignore_index={ignore_index})"
            raise ValueError(msg)
    return t if t.dtype == torch.int64 else t.long()
