"""Integrations with training frameworks, each an optional extra.

* :mod:`mixshare_layers.integrations.lightning` (``pip install "mixshare-layers[lightning]"``): the
  :class:`~mixshare_layers.integrations.lightning.MIMOProgress` callback and
  :class:`~mixshare_layers.integrations.lightning.MIMOLightningModule`;
* :mod:`mixshare_layers.integrations.torch_uncertainty` (``pip install "mixshare-layers[torch-uncertainty]"``): a
  :class:`~mixshare_layers.MIMOWrapper` as one of torch-uncertainty's ensembles, in its ``ClassificationRoutine``
  and ``TUTrainer``.

Importing this package needs nothing beyond torch; each submodule raises an ``ImportError`` naming its extra when
the framework is missing.
"""

__all__: list[str] = []
