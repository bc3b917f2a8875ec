"""Training loop, evaluation and sharing rates of the reference (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import augment_crop_flip, make_rows
from .mixing import PRESETS, cutmix_probability, draw_mix, loss_weights
from .model import ReferenceMIMO


@dataclass
class TrainConfig:
    """The recipe: SGD with Nesterov momentum, linear warmup then linear decay to 0, weight decay on everything.

    ``batch`` counts unique images per step; each appears ``repetition`` times per member.
    """

    preset: str = "mixmo"
    members: int = 2
    depth: int = 16
    width: int = 1
    steps: int = 4000
    batch: int = 32
    repetition: int = 2
    lr: float = 0.025
    momentum: float = 0.9
    weight_decay: float = 6e-4
    warmup: float = 0.05
    init: str = "mixmo"  # initialisation, see ReferenceMIMO
    overrides: dict[str, Any] = field(default_factory=dict)  # preset fields to change

    def method(self) -> dict[str, Any]:
        return {**PRESETS[self.preset], **self.overrides}


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warmup over ``round(warmup * steps)`` steps, then linear decay to 0 at ``steps``."""
    w = max(1, round(warmup * steps))
    return (step + 1) / w if step < w else max(0.0, (steps - step) / (steps - w))


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images scaled to [0, 1], shape ``(1, C, 1, 1)``."""
    x = images.double().div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(dim=1).view(1, -1, 1, 1), x.std(dim=1).view(1, -1, 1, 1)


def epoch_batches(rng: np.random.Generator, n: int, batch: int) -> Iterator[np.ndarray]:
    """Unique-image batches from a new permutation every epoch (the incomplete tail of each epoch dropped)."""
    while True:
        perm = rng.permutation(n)
        for k in range(n // batch):
            yield perm[k * batch : (k + 1) * batch]


def train(
    cfg: TrainConfig,
    images: Tensor,
    labels: Tensor,
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    order: Iterator[np.ndarray] | None = None,
    hooks: dict[str, Callable] | None = None,
) -> ReferenceMIMO:
    """Train a :class:`ReferenceMIMO` on uint8 ``images`` ``(N, 3, H, W)`` and ``labels`` ``(N,)``.

    Args:
        cfg: the recipe and the method.
        images: training images, uint8.
        labels: their classes.
        seed: seeds the initialisation (torch) and every other draw (one NumPy generator: data order, batching,
            augmentation, mixes).
        dtype: floating dtype of the model and the batches.
        order: the unique-image batches to use (default: new permutations every epoch).
        hooks: replace a component (for the differential swaps; default: the reference's own):
            ``"init"(model)`` re-initialises the model; ``"batch"(indices) -> (x (n, M, 3, H, W), y (n, M))``
            builds a training batch; ``"mix"(n, H, W, progress) -> (masks (n, M, H, W), ratios (n, M))`` draws the
            mixes; ``"schedule"(progress) -> (cutmix probability, fadeout strength)``;
            ``"loss"(logits, y, ratios) -> scalar``.
    """
    hooks = hooks or {}
    method = cfg.method()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    num_classes = int(labels.max()) + 1
    model = ReferenceMIMO(num_classes, cfg.members, cfg.depth, cfg.width, method["encoder_init"], cfg.init)
    model = model.to(dtype)
    if "init" in hooks:
        hooks["init"](model)
    mean, std = channel_stats(images)
    mean, std = mean.to(dtype), std.to(dtype)
    order = order if order is not None else epoch_batches(rng, images.shape[0], cfg.batch)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)  # fmt: skip
    m, (h, w) = cfg.members, images.shape[-2:]
    model.train()
    for step in range(cfg.steps):
        progress = step / cfg.steps
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
        indices = next(order)
        if "batch" in hooks:
            x, y = hooks["batch"](indices)
        else:
            rows = make_rows(rng, indices, m, cfg.repetition, method["input_repetition"])  # (n, M)
            flat = augment_crop_flip(rng, images[torch.from_numpy(rows.reshape(-1))])  # one crop/flip per input
            x = ((flat.to(dtype) / 255 - mean) / std).view(len(rows), m, *flat.shape[1:])
            y = labels[torch.from_numpy(rows)]
        n = x.shape[0]
        if "schedule" in hooks:
            p_cut, strength = hooks["schedule"](progress)
        else:
            p_cut = cutmix_probability(method["cutmix_prob"], method["ramp"], progress)
            strength = min(1.0, progress / method["fadeout_end"])
        if "mix" in hooks:
            masks, ratios = hooks["mix"](n, h, w, progress)
        else:
            mix = draw_mix(rng, n, m, h, w, method["alpha"], p_cut)
            masks, ratios = mix.masks, mix.ratios
        masks, ratios = masks.to(dtype), ratios.to(dtype)
        logits = model.forward_train(x, masks, unmix=method["unmix"], strength=strength, fraction=method["fraction"])
        if "loss" in hooks:
            loss = hooks["loss"](logits, y, ratios)
        else:
            ce = F.cross_entropy(logits.reshape(n * m, -1), y.reshape(-1), reduction="none").view(n, m)
            loss = (loss_weights(ratios, method["root"]) * ce).mean(dim=0).sum()  # sum over members of batch means
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def evaluate(model: ReferenceMIMO, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor,
             batch: int = 500) -> dict[str, Any]:  # fmt: skip
    """Ensemble (mean of member probabilities) and member accuracy in %, NLL of the ensemble, sharing rates."""
    model.eval()
    dtype = next(model.parameters()).dtype
    logits = torch.cat([
        model.forward_eval((images[k : k + batch].to(dtype) / 255 - mean.to(dtype)) / std.to(dtype))
        for k in range(0, images.shape[0], batch)
    ]).double()  # fmt: skip
    probs = logits.softmax(dim=2).mean(dim=1)  # (N, K)
    members = (logits.argmax(dim=2) == labels[:, None]).double().mean(dim=0) * 100
    return {
        "ensemble_acc": float((probs.argmax(dim=1) == labels).double().mean() * 100),
        "individual_acc": members.tolist(),
        "mean_individual_acc": float(members.mean()),
        "nll": float(-probs.gather(1, labels[:, None]).clamp_min(1e-300).log().mean()),
        **sharing_rates(model),
    }


def _rate(influence: Tensor) -> float:
    """100 x the mean over features of min_i h_i / max_i h_i (features nobody uses left out)."""
    lo, hi = influence.min(dim=0).values, influence.max(dim=0).values
    used = hi > 0
    return float((lo[used] / hi[used]).mean() * 100)


def sharing_rates(model: ReferenceMIMO) -> dict[str, float]:
    """Paper Sec. 2: per feature, the L1 norm of each encoder's kernel (input block) / each head's weight column
    (output block); the sharing rate is the mean over features of min / max across members."""
    enc = torch.stack([e.weight.detach().abs().sum(dim=(1, 2, 3)) for e in model.encoders])  # (M, 16)
    heads = torch.stack([hd.weight.detach().abs().sum(dim=0) for hd in model.heads])  # (M, D)
    return {"encoder_sharing": _rate(enc.double()), "classifier_sharing": _rate(heads.double())}
