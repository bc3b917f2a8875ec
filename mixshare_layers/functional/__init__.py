"""Tensor-level operations behind the modules (no parameters, no state)."""

from .ensemble import (
    ENSEMBLE_RULES,
    ensemble_log_probs,
    ensemble_probs,
    from_estimator_major,
    to_estimator_major,
)
from .loss import mimo_cross_entropy, rebalanced_weights
from .mixing import cutmix_probability, mix, mix_reference, sample_mix_params
from .random import sample_dirichlet, sample_gamma
from .unmixing import global_pool, unmix_pool, unmix_pool_reference

__all__ = [
    "ENSEMBLE_RULES",
    "cutmix_probability",
    "ensemble_log_probs",
    "ensemble_probs",
    "from_estimator_major",
    "global_pool",
    "mimo_cross_entropy",
    "mix",
    "mix_reference",
    "rebalanced_weights",
    "sample_dirichlet",
    "sample_gamma",
    "sample_mix_params",
    "to_estimator_major",
    "unmix_pool",
    "unmix_pool_reference",
]
