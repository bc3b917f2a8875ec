"""mixshare_layers: any CNN backbone as a MIMO / MixMo / MixShare multi-input multi-output ensemble.

Layout convention: the subnetwork axis M is dim 1, after the batch: training inputs ``(B, M, C, H, W)``, labels
``(B, M)``, logits ``(B, M, K)``. See :class:`MixInfo` for what λ and the masks mean.
"""

from ._checks import get_value_checks, set_value_checks
from ._version import __version__
from .adapters import BackboneSplit, UnsupportedBackboneError, split_backbone
from .batcher import MIMOBatcher
from .data import SyntheticImageDataset
from .loss import MIMOLoss
from .mix_info import MixInfo
from .mixer import CutMixMixer
from .multi_encoder import MultiEncoder
from .multi_head import MultiHead
from .presets import PRESETS, MIMOConfig, get_preset
from .unmixer import Unmixer
from .wrapper import MIMOOutput, MIMOWrapper, ProgressWarning

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
