"""Small validation helpers shared by every module.

They raise ``TypeError`` for a wrong type and ``ValueError`` for a wrong value, and every message names the
argument, the value received and what was expected. They only look at Python values and tensor *shapes*, so they
never synchronise with the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "check_choice",
    "check_fraction",
    "check_int",
    "check_ndim",
    "check_num_subnetworks",
    "check_real",
    "check_shape",
]


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """Return ``value`` as an ``int`` after checking it is an integer (bools refused) at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, but got {value!r} of type {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, but got {value}")
    return int(value)


def check_num_subnetworks(value: object, name: str = "num_subnetworks") -> int:
    """Validate the number of subnetworks M (an int >= 1)."""
    return check_int(name, value, minimum=1)


def check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` as a finite ``float`` inside the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, but got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not -math.inf < value < math.inf:  # not math.isfinite: that fails on torch.compile's symbolic floats
        raise ValueError(f"{name} must be finite, but got {value}")
    bad_low = low is not None and (value < low if low_inclusive else value <= low)
    bad_high = high is not None and (value > high if high_inclusive else value >= high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = ("[" if low_inclusive else "(") + f"{lo}, {hi}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{name} must be in {interval}, but got {value:g}")
    return value


def check_fraction(name: str, value: object) -> float:
    """A fraction in (0, 1]."""
    return check_real(name, value, low=0.0, high=1.0, low_inclusive=False)


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Check that ``value`` is one of the strings in ``choices`` (the message lists them)."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {valid}, but got {value!r}")
    return value


def check_ndim(name: str, tensor: object, ndim: int, layout: str) -> torch.Tensor:
    """Check that ``tensor`` is a tensor with ``ndim`` dimensions laid out as ``layout`` (e.g. "(B, C, H, W)")."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, but got {type(tensor).__name__}")
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
