"""What a prediction costs: the time of one pass over a set of images."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from .._checks import check_int

__all__ = ["inference_ms_per_image"]


@torch.no_grad()
def inference_ms_per_image(model: nn.Module, images: Tensor, batch_size: int = 500) -> float:
    """Milliseconds per image of one pass over ``images`` (already preprocessed) in eval mode: the cost of a
    prediction, every member included. One batch runs before the clock (first-call allocations); the module's mode
    is restored."""
    batch_size = check_int("batch_size", batch_size, minimum=1)
    was_training = model.training
    model.eval()
    try:
        model(images[:batch_size])
        start = time.perf_counter()
        for chunk in images.split(batch_size):
            model(chunk)
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)
        return 1000 * (time.perf_counter() - start) / max(len(images), 1)
    finally:
        model.train(was_training)
