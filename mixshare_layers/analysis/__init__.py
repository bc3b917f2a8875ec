"""Analysing how subnetworks use features (paper Sec. 2, Fig. 2/3/5/6, App. D).

* :func:`encoder_influence` / :func:`classifier_influence`: ``(M, F)`` influence tables from the weights;
* :func:`feature_variance_influence`: ``(M, C)`` tables of intermediate layers from the data (App. D);
* :func:`sharing_rate` / :func:`sharing_rates`: one number in percent (two documented reductions);
* :func:`plot_influence`: the paper's overlapping histograms (needs the ``analysis`` extra: matplotlib);
* :func:`load_wrn_checkpoint`: rebuild a wrapped WRN from a training checkpoint;
* ``python -m mixshare_layers.analysis CHECKPOINT --out DIR``: all of it for one checkpoint.
"""

from .checkpoint import load_wrn_checkpoint, model_from_checkpoint
from .plots import feature_order, plot_influence  # matplotlib itself is imported on first use
from .sharing import (
    SHARING_REDUCTIONS,
    classifier_influence,
    encoder_influence,
    feature_sharing,
    sharing_rate,
    sharing_rates,
)
from .variance import default_variance_layers, feature_variance_influence

__all__ = [
    "SHARING_REDUCTIONS",
    "classifier_influence",
    "default_variance_layers",
    "encoder_influence",
    "feature_order",
    "feature_sharing",
    "feature_variance_influence",
    "load_wrn_checkpoint",
    "model_from_checkpoint",
    "plot_influence",
    "sharing_rate",
    "sharing_rates",
]
