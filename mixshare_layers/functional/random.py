"""Generator-aware samplers that torch does not provide with a ``generator=`` argument.

``torch.distributions.Gamma``/``Dirichlet`` cannot take a ``torch.Generator``, so mixes drawn through them could not
be replayed from a seeded generator. These samplers use only ``torch.rand``/``torch.randn`` with the caller's
generator, on the caller's device, fully vectorised.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["generator_kwargs", "sample_dirichlet", "sample_gamma"]

# Marsaglia & Tsang's squeeze accepts > 95% of candidates for shape >= 1; with this many candidates drawn in
# parallel the chance that none is accepted is below 1e-13 per sample (then the last candidate is used).
_CANDIDATES = 10


def generator_kwargs(generator: torch.Generator | None) -> dict[str, Any]:
    """``{"generator": generator}``, or ``{}`` for ``None``.

    Passing ``generator=None`` explicitly to a random factory makes ``torch.compile`` fail once shapes become dynamic
    (e.g. after a recompile for a smaller last batch), so the keyword is only given when there is a generator.
    """
    return {} if generator is None else {"generator": generator}


def sample_gamma(
    concentration: float,
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw Gamma(concentration, 1) variates with Marsaglia & Tsang's method, vectorised.

    Args:
        concentration: the shape parameter, > 0.
        shape: output shape.
        device: where to draw (the generator must live there too).
        dtype: floating dtype of the result; the draw is done in float64 on CPU and float32 elsewhere.
        generator: optional ``torch.Generator`` for replayable draws.

    Shape:
        - Output: ``shape``, positive values.

    Note:
        For ``concentration < 1`` the boost ``Gamma(a) = Gamma(a + 1) * U ** (1 / a)`` is used.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = sample_gamma(2.0, (10000,), generator=g)
        >>> x.shape, bool((x > 0).all()), round(float(x.mean()), 1)  # the mean of Gamma(2, 1) is 2
        (torch.Size([10000]), True, 2.0)
    """
    if concentration <= 0:
        raise ValueError(f"concentration must be > 0, but got {concentration}")
    work = torch.float64 if torch.device(device or "cpu").type == "cpu" else torch.float32
    boost = concentration < 1.0
    a = concentration + 1.0 if boost else concentration
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    cand_shape = (_CANDIDATES, *shape)
    rng = generator_kwargs(generator)
    x = torch.randn(cand_shape, device=device, dtype=work, **rng)
    u = torch.rand(cand_shape, device=device, dtype=work, **rng)
    v = (1.0 + c * x) ** 3
    safe_v = v.clamp_min(torch.finfo(work).tiny)
    accept = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * safe_v + d * torch.log(safe_v))
    # index of the first accepted candidate (the last one if none was accepted)
    accept = torch.cat([accept[:-1], torch.ones_like(accept[-1:])], dim=0)
    first = accept.to(torch.uint8).argmax(dim=0, keepdim=True)
    out = (d * safe_v).gather(0, first).squeeze(0)
    if boost:
        u_boost = torch.rand(shape, device=device, dtype=work, **rng)
        out = out * u_boost.clamp_min(torch.finfo(work).tiny) ** (1.0 / concentration)
    return out.to(dtype)


def sample_dirichlet(
    alpha: float,
    batch_size: int,
    num_members: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Symmetric Dirichlet(alpha, ..., alpha) draws of shape ``(batch_size, num_members)``.

    For two members this is Beta(alpha, alpha) on the first column.

    Args:
        alpha: the concentration; ``alpha <= 0`` gives exactly ``1 / M`` everywhere (no randomness): MIMO's sum.
        batch_size: B.
        num_members: M.
        device: where to draw (the generator must live there too).
        dtype: floating dtype of the result.
        generator: optional ``torch.Generator`` for replayable draws.

    Shape:
        - Output: ``(B, M)``, non-negative, every row sums to 1.

    Example:
        >>> import torch
        >>> lam = sample_dirichlet(2.0, 4, 3, generator=torch.Generator().manual_seed(0))
        >>> lam.shape, bool(torch.allclose(lam.sum(dim=1), torch.ones(4)))
        (torch.Size([4, 3]), True)
        >>> sample_dirichlet(0.0, 1, 4)
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    if alpha <= 0:
        return torch.full((batch_size, num_members), 1.0 / num_members, device=device, dtype=dtype)
    g = sample_gamma(
        alpha,
        (batch_size, num_members),
        device=device,
        dtype=torch.float64 if torch.device(device or "cpu").type == "cpu" else torch.float32,
        generator=generator,
    )
    return (g / g.sum(dim=1, keepdim=True)).to(dtype)
