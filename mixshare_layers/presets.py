"""The method presets: one table, every entry overridable by keyword.

| preset             | encoder init | alpha | cutmix p | ramp | unmixing          | loss weights (r) | input rep. |
|--------------------|--------------|-------|----------|------|-------------------|------------------|------------|
| "mimo"             | independent  | 0     | 0        | 0    | none              | none (1 each)    | 0          |
| "mixmo"            | independent  | 2     | 0.5      | 1/12 | none              | r = 3            | 0          |
| "unmix"            | independent  | 2     | 0.5      | 1/12 | full              | r = 3            | 0          |
| "unmix-aligned"    | aligned      | 2     | 0.5      | 1/12 | full              | r = 3            | 0          |
| "mixshare"         | aligned      | 2     | 1        | 0    | fadeout to 1/3    | r = 1 (M λ)      | 0.1        |
| "mixshare-partial" | aligned      | 2     | 1        | 0    | partial, 25%      | r = 1 (M λ)      | 0.1        |

"mimo" is Havasi et al.'s MIMO (a plain sum of the encodings); "mixmo" is Cut-MixMo's defaults; the "unmix" rows are
Table 1's MixMo + Unmix and MixMo + Unmix + kernel init; the "mixshare" rows are the paper's two MixShare variants
(CutMix always, input repetition 10 %, the plain mixing ratios as loss weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from ._checks import check_bool, check_choice, check_fraction, check_real
from .vocabulary import ENCODER_INITS, UNMIX_MODES, UNMIX_REDUCTIONS

__all__ = ["PRESETS", "MIMOConfig", "get_preset"]


@dataclass(frozen=True)
class MIMOConfig:
    """Every hyper-parameter a preset fixes (see the module docstring for the table).

    Attributes:
        encoder_init: ``"independent" | "aligned" | "colinear"`` (:data:`~mixshare_layers.vocabulary.EncoderInit`,
            :class:`~mixshare_layers.MultiEncoder`).
        alpha: Dirichlet concentration of the mixing ratios (``<= 0``: exactly ``1 / M``).
        cutmix_prob: probability of CutMix per batch (else linear mixing).
        cutmix_ramp: end fraction of training over which ``cutmix_prob`` falls to 0.
        shuffle_roles: shuffle the box owner per batch.
        unmix_mode: ``"none" | "full" | "partial" | "fadeout"`` (:data:`~mixshare_layers.vocabulary.UnmixMode`,
            :class:`~mixshare_layers.Unmixer`).
        unmix_fraction: channel share for partial unmixing.
        fadeout_end: progress at which fadeout stops unmixing.
        unmix_pooling: how unmixing reduces each member's masked features, ``"mean"`` (masked average) or ``"sum"``
            (:data:`~mixshare_layers.vocabulary.UnmixReduction`; the ``pooling`` of :class:`~mixshare_layers.Unmixer`,
            not the head's pooling of a backbone split).
        rebalance_root: MixMo's loss-weight root r (``None``: weight 1 for every member).
        input_repetition: share of rows whose M inputs are the same image (:class:`~mixshare_layers.MIMOBatcher`).

    Example:
        >>> config = MIMOConfig(unmix_mode="full")
        >>> config.replace(alpha=1.0).alpha, config.alpha
        (1.0, 2.0)
        >>> config.replace(alpah=1.0)
        Traceback (most recent call last):
            ...
        TypeError: unknown option(s) 'alpah'; valid options are ...
    """

    encoder_init: str = "independent"
    alpha: float = 2.0
    cutmix_prob: float = 0.5
    cutmix_ramp: float = 1.0 / 12.0
    shuffle_roles: bool = True
    unmix_mode: str = "none"
    unmix_fraction: float = 0.25
    fadeout_end: float = 1.0 / 3.0
    unmix_pooling: str = "mean"
    rebalance_root: float | None = 3.0
    input_repetition: float = 0.0

    def __post_init__(self) -> None:
        # numbers are stored as Python floats (NumPy scalars and 0-dim tensors are accepted and converted)
        real = {
            "alpha": check_real("alpha", self.alpha),
            "cutmix_prob": check_real("cutmix_prob", self.cutmix_prob, low=0.0, high=1.0),
            "cutmix_ramp": check_real("cutmix_ramp", self.cutmix_ramp, low=0.0, high=1.0),
            "unmix_fraction": check_fraction("unmix_fraction", self.unmix_fraction),
            "fadeout_end": check_fraction("fadeout_end", self.fadeout_end),
            "input_repetition": check_real("input_repetition", self.input_repetition, low=0.0, high=1.0),
            "rebalance_root": None
            if self.rebalance_root is None
            else check_real("rebalance_root", self.rebalance_root, low=0.0, low_inclusive=False),
            "shuffle_roles": check_bool("shuffle_roles", self.shuffle_roles),
        }
        check_choice("encoder_init", self.encoder_init, ENCODER_INITS)
        check_choice("unmix_mode", self.unmix_mode, UNMIX_MODES)
        check_choice("unmix_pooling", self.unmix_pooling, UNMIX_REDUCTIONS)
        for name, value in real.items():
            object.__setattr__(self, name, value)  # frozen dataclass: the documented way to normalise a field

    def replace(self, **overrides: object) -> MIMOConfig:
        """A copy with some fields changed; unknown names raise a ``TypeError`` listing the valid ones."""
        valid = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(map(repr, unknown))}; valid options are {', '.join(sorted(valid))}"
            )
        return dataclasses.replace(self, **overrides)  # type: ignore[arg-type]


_MIXMO = MIMOConfig()
PRESETS: dict[str, MIMOConfig] = {
    "mimo": MIMOConfig(alpha=0.0, cutmix_prob=0.0, cutmix_ramp=0.0, rebalance_root=None),
    "mixmo": _MIXMO,
    "unmix": _MIXMO.replace(unmix_mode="full"),
    "unmix-aligned": _MIXMO.replace(unmix_mode="full", encoder_init="aligned"),
    "mixshare": MIMOConfig(
        encoder_init="aligned",
        cutmix_prob=1.0,
        cutmix_ramp=0.0,
        unmix_mode="fadeout",
        rebalance_root=1.0,
        input_repetition=0.1,
    ),
    "mixshare-partial": MIMOConfig(
        encoder_init="aligned",
        cutmix_prob=1.0,
        cutmix_ramp=0.0,
        unmix_mode="partial",
        unmix_fraction=0.25,
        rebalance_root=1.0,
        input_repetition=0.1,
    ),
}


def get_preset(name: str, **overrides: object) -> MIMOConfig:
    """The configuration of preset ``name`` with ``overrides`` applied.

    Args:
        name: one of the keys of ``PRESETS`` (the table in the module docstring).
        **overrides: fields of :class:`MIMOConfig` to change.

    Example:
        >>> sorted(PRESETS)
        ['mimo', 'mixmo', 'mixshare', 'mixshare-partial', 'unmix', 'unmix-aligned']
        >>> config = get_preset("mixshare", fadeout_end=0.5)
        >>> config.unmix_mode, config.fadeout_end, config.rebalance_root
        ('fadeout', 0.5, 1.0)
    """
    check_choice("preset", name, PRESETS)
    return PRESETS[name].replace(**overrides)
