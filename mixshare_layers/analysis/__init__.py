"""Analysing how subnetworks use features (paper Sec. 2, Fig. 2/3/5/6, App. D)."""

from .sharing import SHARING_REDUCTIONS, classifier_influence, encoder_influence, sharing_rate

__all__ = ["SHARING_REDUCTIONS", "classifier_influence", "encoder_influence", "sharing_rate"]
