"""Shared fixtures of the test suite (CPU by default; CUDA variants are skipped where there is no GPU)."""

from __future__ import annotations

import os

import pytest
import torch

# The tests use tiny tensors, for which one intra-op thread is as fast as several; on a busy shared machine more
# threads spin against each other and make small ops 10-100x slower. OMP_NUM_THREADS, when set, is respected.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_rng():
    """Every test leaves the global torch RNG (CPU and CUDA) as it found it."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    yield
    torch.set_rng_state(cpu_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
        ),
    ]
)
def device(request) -> torch.device:
    """Run a test body on the CPU and, where there is one, on a CUDA device."""
    return torch.device(request.param)
