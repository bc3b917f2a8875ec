"""The MIMO layers, one concept per file, in the order a training batch meets them.

* :mod:`~mixshare_layers.layers.batcher`: :class:`MIMOBatcher` builds the M-input rows (batch and input repetition);
* :mod:`~mixshare_layers.layers.encoder`: :class:`MultiEncoder`, M first layers (independent, aligned or colinear);
* :mod:`~mixshare_layers.layers.mixer`: :class:`CutMixMixer` mixes the M encodings and returns the masks used;
* :mod:`~mixshare_layers.layers.unmixer`: :class:`Unmixer` filters the final features per member (full, partial,
  fadeout) and pools them;
* :mod:`~mixshare_layers.layers.head`: :class:`MultiHead`, M classifiers;
* :mod:`~mixshare_layers.layers.loss`: :class:`MIMOLoss`, the members' cross-entropies with MixMo's weights.

A mix is recorded in a :class:`~mixshare_layers.MixInfo` that unmixing and the loss replay;
:class:`~mixshare_layers.MIMOWrapper` assembles the layers around a backbone's core.
"""

from .batcher import MIMOBatcher
from .encoder import MultiEncoder
from .head import MultiHead
from .loss import MIMOLoss
from .mixer import CutMixMixer
from .unmixer import Unmixer

__all__ = ["CutMixMixer", "MIMOBatcher", "MIMOLoss", "MultiEncoder", "MultiHead", "Unmixer"]
