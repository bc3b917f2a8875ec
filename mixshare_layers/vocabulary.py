"""The library's vocabulary: every option word it accepts, as a ``Literal`` type and the tuple of its values.

Each idea has one name, and two ideas never share one. In particular the word *pooling* appears in two places
that mean different things:

* :data:`HeadPooling` is how a backbone's head reads the core's features (``BackboneSplit.pooling``,
  ``MIMOWrapper.pooling``): the grid average, the class token, or the features themselves;
* :data:`UnmixReduction` is how unmixing turns one member's masked features into a vector (the ``pooling``
  argument of :class:`~mixshare_layers.Unmixer` and the preset field ``unmix_pooling``): a masked average or a
  masked sum.

Public signatures take plain strings (``layout="tokens"``); the ``Literal`` types say which strings, for readers
and type checkers, and the tuples are what the checks compare against (an unknown word is refused with a message
listing the tuple). Option words that a single evaluation or analysis tool reads (a plot's sort order, the
sharing-rate reduction) stay in that tool's module.

Example:
    >>> from mixshare_layers.vocabulary import FEATURE_LAYOUTS, UNMIX_REDUCTIONS
    >>> FEATURE_LAYOUTS
    ('channels_first', 'channels_last', 'tokens')
    >>> UNMIX_REDUCTIONS
    ('mean', 'sum')
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "AUGMENT_TARGETS",
    "BACKENDS",
    "ENCODER_INITS",
    "ENCODING_LAYOUTS",
    "ENSEMBLE_RULES",
    "FEATURE_LAYOUTS",
    "HEAD_POOLINGS",
    "PROGRESS_GRANULARITIES",
    "TEMPERATURE_MODES",
    "UNMIX_MODES",
    "UNMIX_REDUCTIONS",
    "VALUE_CHECK_MODES",
    "AugmentTarget",
    "Backend",
    "EncoderInit",
    "EncodingLayout",
    "EnsembleRule",
    "FeatureLayout",
    "HeadPooling",
    "ProgressGranularity",
    "TemperatureMode",
    "UnmixMode",
    "UnmixReduction",
    "ValueCheckMode",
]

# -- the features and how they are read -----------------------------------------------------------------------------
FeatureLayout = Literal["channels_first", "channels_last", "tokens"]
"""The core's features: maps ``(B, C, h, w)``, channels-last maps ``(B, h, w, C)``, or tokens ``(B, P + h w, C)``."""
FEATURE_LAYOUTS: tuple[FeatureLayout, ...] = get_args(FeatureLayout)

EncodingLayout = Literal["channels_first", "channels_last"]
"""The encoder's output, where the inputs are mixed: ``(B, C', H', W')`` or channels-last ``(B, H', W', C')``."""
ENCODING_LAYOUTS: tuple[EncodingLayout, ...] = get_args(EncodingLayout)

HeadPooling = Literal["avg", "token", "head"]
"""How the head reads the features: their grid average, the first prefix token, or the features as they are."""
HEAD_POOLINGS: tuple[HeadPooling, ...] = get_args(HeadPooling)

# -- the MIMO layers ----------------------------------------------------------------------------------------------
EncoderInit = Literal["independent", "aligned", "colinear"]
"""How the M encoders start: independent draws, copies of one layer, or copies scaled by random factors."""
ENCODER_INITS: tuple[EncoderInit, ...] = get_args(EncoderInit)

UnmixMode = Literal["none", "full", "partial", "fadeout"]
"""Which channels unmixing filters: none (MixMo), all, the first share, or all with masks fading out in training."""
UNMIX_MODES: tuple[UnmixMode, ...] = get_args(UnmixMode)

UnmixReduction = Literal["mean", "sum"]
"""How unmixing reduces a member's masked features: divided by its mask mass (an average), or by ``h * w``."""
UNMIX_REDUCTIONS: tuple[UnmixReduction, ...] = get_args(UnmixReduction)

Backend = Literal["auto", "torch", "triton"]
"""Which implementation runs the masked ops: Triton for CUDA tensors when it imports, plain torch, or Triton."""
BACKENDS: tuple[Backend, ...] = get_args(Backend)

# -- predictions and training -------------------------------------------------------------------------------------
EnsembleRule = Literal["prob", "logit"]
"""How the M members' logits make one prediction: average their probabilities, or their logits."""
ENSEMBLE_RULES: tuple[EnsembleRule, ...] = get_args(EnsembleRule)

TemperatureMode = Literal["ensemble", "members"]
"""What temperature scaling divides: the ensemble's log-probabilities, or every member's logits."""
TEMPERATURE_MODES: tuple[TemperatureMode, ...] = get_args(TemperatureMode)

AugmentTarget = Literal["copies", "inputs"]
"""What a batcher's transform augments: the repeated copies before the shuffles, or every member's input after."""
AUGMENT_TARGETS: tuple[AugmentTarget, ...] = get_args(AugmentTarget)

ProgressGranularity = Literal["step", "epoch"]
"""What a trainer measures training progress in: optimizer steps, or epochs."""
PROGRESS_GRANULARITIES: tuple[ProgressGranularity, ...] = get_args(ProgressGranularity)

ValueCheckMode = Literal["cpu", "always", "never"]
"""When tensor values are read to be checked: tensors in host memory only, every tensor, or never."""
VALUE_CHECK_MODES: tuple[ValueCheckMode, ...] = get_args(ValueCheckMode)
