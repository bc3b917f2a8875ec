"""Tensor-level operations behind the modules (no parameters, no state)."""

from .ensemble import (
    ENSEMBLE_RULES,
    ensemble_log_probs,
    ensemble_probs,
    from_estimator_major,
    to_estimator_major,
)
from .layout import FEATURE_LAYOUTS, as_maps, check_features, from_maps, grid_mean, head_input, token_grid
from .loss import mimo_cross_entropy, rebalanced_weights
from .mixing import cutmix_probability, mix, mix_reference, sample_mix_params
from .random import sample_dirichlet, sample_gamma
from .unmixing import global_pool, unmix_pool, unmix_pool_reference

__all__ = [
    "ENSEMBLE_RULES",
    "FEATURE_LAYOUTS",
    "as_maps",
    "check_features",
    "cutmix_probability",
    "ensemble_log_probs",
    "ensemble_probs",
    "from_estimator_major",
    "from_maps",
    "global_pool",
    "grid_mean",
    "head_input",
    "mimo_cross_entropy",
    "mix",
    "mix_reference",
    "rebalanced_weights",
    "sample_dirichlet",
    "sample_gamma",
    "sample_mix_params",
    "to_estimator_major",
    "token_grid",
    "unmix_pool",
    "unmix_pool_reference",
]
