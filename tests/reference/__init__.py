"""An independent, plain-PyTorch reference of MIMO, MixMo and the MixShare variants (for differential testing).

Written from the MixShare paper and the documented behaviour of MixMo's and MIMO's public code (mixing, loss
rebalancing, batch and input repetition, initialisation), not from ``mixshare_layers``: nothing here imports the
library, and nothing is shared with it but PyTorch and NumPy. It is deliberately plain (Python loops over members
and samples, NumPy random draws, masks materialised at full resolution) so that it can be read in one sitting and
checked against the paper line by line.

Modules:

* :mod:`.model`: MixMo's CIFAR Wide ResNet as an M-input M-output network (M first convolutions, one shared core,
  M linear heads), truncated He-normal initialisation, the training forward (mix, core, unmix, heads) and the
  test forward (summed encodings, one pass).
* :mod:`.mixing`: the presets, the mix sampler (per-sample Dirichlet ratios, CutMix box of side sqrt(λ) clipped to
  the map with λ recomputed as the realised area, box owner and CutMix-or-linear coin per batch, MixMo's ramp of
  the CutMix probability), unmix pooling and the loss weights.
* :mod:`.data`: batch repetition, one permutation per member, input repetition, random crop + flip per input.
* :mod:`.train`: the training loop, the evaluation (mean of member probabilities) and the sharing rates.

Semantic choices where the paper is silent are the ones the library documents (so that a difference measures a
bug, not a convention): unmixing pools each member's feature map as a masked *average* (sum of mask x feature over
the sum of the mask), masks are brought to the final resolution by area averaging, the fadeout strength is
``min(1, progress / fadeout_end)``.
"""

from .data import augment_crop_flip, make_rows
from .mixing import PRESETS, Mix, cutmix_probability, draw_mix, loss_weights, unmix_pool
from .model import ReferenceMIMO, truncated_he_normal
from .train import TrainConfig, evaluate, sharing_rates, train

__all__ = [
    "PRESETS",
    "Mix",
    "ReferenceMIMO",
    "TrainConfig",
    "augment_crop_flip",
    "cutmix_probability",
    "draw_mix",
    "evaluate",
    "loss_weights",
    "make_rows",
    "sharing_rates",
    "train",
    "truncated_he_normal",
    "unmix_pool",
]
