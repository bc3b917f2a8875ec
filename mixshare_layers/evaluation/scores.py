"""Per-sample uncertainty scores of an M-member ensemble (larger = more uncertain), in nats where they are entropies.

- ``msp``: ``1 - max_k p(k)``: one minus the maximum probability of the ensemble prediction
- ``entropy``: ``H(p) = -sum_k p(k) log p(k)`` of the ensemble prediction ``p`` (predictive entropy)
- ``mutual_information``: ``H(mean_m p_m) - mean_m H(p_m)``: what the members disagree about (epistemic part)
- ``expected_entropy``: ``mean_m H(p_m)``: the members' own uncertainty (aleatoric part)

``p`` is the ensemble prediction under the chosen ``rule`` (``"prob"``: ``mean_m p_m``; ``"logit"``:
``softmax(mean_m z_m)``) and temperature; ``p_m = softmax(z_m)`` are the members' probabilities. The mutual
information and the expected entropy always use the *mixture* ``mean_m p_m`` of the members, whatever the rule: they
describe the members, and ``entropy = mutual_information + expected_entropy`` holds exactly for ``rule="prob"`` at
temperature 1. torch-uncertainty's ``"entropy"`` OOD criterion is ``expected_entropy`` here, its ``"msp"`` criterion
is ``msp - 1`` (the negative maximum probability), its ``"mutual_information"`` criterion the same as here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .temperature import tempered_log_probs

__all__ = ["UNCERTAINTY_SCORES", "entropy", "uncertainty_scores"]

UNCERTAINTY_SCORES = ("msp", "entropy", "mutual_information", "expected_entropy")


def entropy(log_probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats of the distributions whose log-probabilities are ``log_probs`` (``0 log 0 = 0``).

    Example:
        >>> entropy(torch.tensor([0.5, 0.5, 0.0]).log())
        tensor(0.6931)
    """
    p = log_probs.exp()
    return -torch.where(p > 0, p * log_probs, torch.zeros_like(p)).sum(dim=dim)


def uncertainty_scores(
    logits: Tensor,
    rule: str = "prob",
    *,
    temperature: float = 1.0,
    temperature_mode: str = "ensemble",
) -> dict[str, Tensor]:
    """Every score of :data:`UNCERTAINTY_SCORES` for each sample (see the module docstring).

    Args:
        logits: the members' logits.
        rule: ensemble rule, ``"prob"`` or ``"logit"``.
        temperature: temperature of the ensemble (:func:`~mixshare_layers.evaluation.tempered_log_probs`).
        temperature_mode: ``"ensemble"`` or ``"members"``.

    Returns:
        ``{"msp", "entropy", "mutual_information", "expected_entropy"}``, each ``(B,)``, float32 at least.

    Shape:
        - ``logits``: ``(B, M, K)``.

    Example:
        >>> logits = torch.tensor([[[4.0, 0.0], [0.0, 4.0]], [[4.0, 0.0], [4.0, 0.0]]])  # disagree, agree
        >>> for name, values in uncertainty_scores(logits).items():
        ...     print(name, [round(v, 3) for v in values.tolist()])
        msp [0.5, 0.018]
        entropy [0.693, 0.09]
        mutual_information [0.603, 0.0]
        expected_entropy [0.09, 0.09]
    """
    ens, members = tempered_log_probs(logits, rule, temperature, temperature_mode)
    member_entropy = entropy(members).mean(dim=1)
    m = members.shape[1]
    mixture = torch.logsumexp(members, dim=1) - torch.log(torch.tensor(float(m), dtype=members.dtype))
    return {
        "msp": 1.0 - ens.exp().amax(dim=1),
        "entropy": entropy(ens),
        "mutual_information": (entropy(mixture) - member_entropy).clamp_min(0.0),
        "expected_entropy": member_entropy,
    }
