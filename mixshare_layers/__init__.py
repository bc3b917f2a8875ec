"""mixshare_layers: any backbone (CNN or vision transformer) as a MIMO / MixMo / MixShare ensemble.

Layout convention: the subnetwork axis M is dim 1, after the batch: training inputs ``(B, M, C, H, W)``, labels
``(B, M)``, logits ``(B, M, K)``. See :class:`MixInfo` for what λ and the masks mean.
"""

from . import _deprecated
from ._checks import get_value_checks, set_value_checks
from ._version import __version__
from .adapters import BackboneSplit, UnsupportedBackboneError, split_backbone
from .data import SyntheticImageDataset
from .layers import CutMixMixer, MIMOBatcher, MIMOLoss, MultiEncoder, MultiHead, Unmixer
from .mix_info import MixInfo
from .presets import PRESETS, MIMOConfig, get_preset
from .wrapper import MIMOOutput, MIMOWrapper, ProgressWarning

_deprecated.install()

__all__ = [
    "PRESETS",
    "BackboneSplit",
    "CutMixMixer",
    "MIMOBatcher",
    "MIMOConfig",
    "MIMOLoss",
    "MIMOOutput",
    "MIMOWrapper",
    "MixInfo",
    "MultiEncoder",
    "MultiHead",
    "ProgressWarning",
    "SyntheticImageDataset",
    "Unmixer",
    "UnsupportedBackboneError",
    "__version__",
    "get_preset",
    "get_value_checks",
    "set_value_checks",
    "split_backbone",
]
