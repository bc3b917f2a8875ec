#!/usr/bin/env python
"""Differential training: the library's presets against the independent reference (tests/reference), many seeds.

Each run trains one method with one implementation on the same data, the same unique-image batch order (per seed)
and the same budget, then evaluates it with that implementation's own evaluation (the library: ``EnsembleMetrics``
and ``mixshare_layers.analysis.sharing_rates``; the reference: its own code). The table gives, per method and
metric, mean ± standard error over seeds for both, their difference, and flags (``**``) every difference larger
than two standard errors of the difference (``sqrt(SE_lib^2 + SE_ref^2)``).

Components can be swapped between the implementations (``--swap``), in both directions: ``impl=library`` with
``--swap mix`` trains the library's model with the reference's mix sampler, ``impl=reference --swap mix`` the
reference's model with the library's sampler. The components:

    init      the initial weights (the other implementation's, built from the same seed and copied over)
    batch     batching + augmentation (library: MIMOBatcher with mixshare_layers.data's random_crop_flip and
              Normalize per repeated copy, the pipeline of examples/cifar100_wrn.py; reference: make_rows + crop/flip
              per input)
    augment   the augmentation alone, library only: the library's own rows with the reference's augmentation of
              every member's input on its own (MIMOBatcher(augment="inputs")); with ``batch``, which already
              holds the reference's augmentation, it is refused
    mix       the mix sampler (library: sample_mix_params through the CutMixMixer; reference: draw_mix)
    schedule  the progress hooks: CutMix probability ramp and fadeout strength
    loss      the loss weights and reduction

Settings (every value is printed in the table's header):

    data      ``--task hard24`` (default): SyntheticImageDataset, 40 classes, 24x24, 5000 train / 2000 test
              images, data seed 0, the class texture in a window of side 14 px (7/12 of the image) at a random
              place on clutter of relative amplitude 0.7, pixel noise 1.0. ``--task hard``: the same at 32x32 with
              a 16 px window (CIFAR's image size, 2.3 times the cost per step).
    network   WRN-10-1 (64 final features), M = 2
    training  ``--recipe fast`` (default): 1500 steps; ``--recipe default``: 2000 steps. Both: 32 unique images x
              batch repetition 2 (64 rows) per step, SGD Nesterov momentum 0.9, peak lr 0.05 with linear warmup
              over the first 5 % of steps then linear decay to 0, weight decay 6e-4 on every parameter, random
              crop (padding 4) + horizontal flip per input; progress (CutMix ramp, fadeout) = step / steps
    eval      the 2000 test images, ensemble = mean of member probabilities (NLL of that mixture), sharing rates
              with the per-feature mean-ratio reduction (paper Sec. 2), collapsed members
              (``mixshare_layers.evaluation.metrics.collapsed_members``)
    seeds     seed s: initialisation from ``torch.manual_seed(s)``, the unique-image batch order from a generator
              seeded 10000 + s (the same for both implementations), batching / augmentation / mixes from
              generators seeded 1000 s + 1 and 1000 s + 2

Cost: a WRN-10-1 step at 24x24 takes about 65 ms on one thread of this project's 2-core CPU, so one run of the
fast recipe takes 2-6 minutes (depending on the load) and the full differential (6 methods x 5 seeds x 2
implementations, ``--jobs 2``) 1.5-3 hours.

Usage:
    python benchmarks/differential.py --out runs/differential                # every method, seeds 0-4, both sides
    python benchmarks/differential.py --methods mixmo --swap init --out runs/differential   # swapped initialisation
    python benchmarks/differential.py --impl library --swap augment --out runs/differential   # per-input crops
    python benchmarks/differential.py --table-only --groups --out runs/differential   # tabulate what is there
    python benchmarks/differential.py --table-only --compare-init torch mixmo        # one init against another

With ``--impl library`` and ``--swap``, the table compares the swapped library with the library as it is (both
groups' runs in ``--out``). Runs are cached in ``<out>/results.json`` (rewritten atomically after every run); a run
already there is skipped. Each run uses one intra-op thread; ``--jobs`` runs go in parallel (separate processes).
To measure another version of the library (the "before" tables of docs/reproducing.md), export it and point
``MIXSHARE_DIFF_LIBRARY`` at it, with a ``--label`` to keep its runs apart:

    git archive <commit> | tar -x -C /tmp/old
    MIXSHARE_DIFF_LIBRARY=/tmp/old python benchmarks/differential.py --label before-fix --methods mixmo ...
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
# another copy of the library to measure (e.g. an older commit, exported with `git archive`), ahead of this one
LIBRARY_SRC = os.environ.get("MIXSHARE_DIFF_LIBRARY")
if LIBRARY_SRC:
    sys.path.insert(0, LIBRARY_SRC)

import reference as ref  # noqa: E402  (tests/reference: shares no code with the library)
from reference.train import TrainConfig, channel_stats, epoch_batches, lr_factor  # noqa: E402

from mixshare_layers import MIMOWrapper, MixInfo  # noqa: E402
from mixshare_layers.analysis import sharing_rates  # noqa: E402
from mixshare_layers.data import Normalize, SyntheticImageDataset, random_crop_flip  # noqa: E402
from mixshare_layers.evaluation.metrics import EnsembleMetrics, collapsed_members  # noqa: E402
from mixshare_layers.files import write_json  # noqa: E402
from mixshare_layers.functional import cutmix_probability, sample_mix_params  # noqa: E402
from mixshare_layers.functional.loss import mimo_cross_entropy, rebalanced_weights  # noqa: E402
from mixshare_layers.models import mixmo_init_, torch_init_, wide_resnet  # noqa: E402
from mixshare_layers.presets import get_preset  # noqa: E402

METHODS = ("mimo", "mixmo", "unmix", "unmix-aligned", "mixshare", "mixshare-partial")
SWAPS = ("init", "batch", "augment", "mix", "schedule", "loss")
TASKS: dict[str, dict[str, Any]] = {
    "hard": dict(num_classes=40, image_size=32, train=5000, test=2000, noise=1.0, object_size=0.5, clutter=0.7),
    "hard24": dict(num_classes=40, image_size=24, train=5000, test=2000, noise=1.0, object_size=7 / 12, clutter=0.7),
    "tiny": dict(num_classes=10, image_size=32, train=256, test=256, noise=1.0, object_size=1.0, clutter=0.0),
    # a task a CPU can train resnet18 on (benchmarks/reinit_backbones.py): a 12 px window at 16x16, less clutter
    "mid16": dict(num_classes=20, image_size=16, train=4000, test=2000, noise=1.0, object_size=0.75, clutter=0.5),
}
RECIPES: dict[str, dict[str, Any]] = {
    "default": dict(depth=10, width=1, members=2, steps=2000, batch=32, repetition=2, lr=0.05, weight_decay=6e-4,
                    warmup=0.05),
    "fast": dict(depth=10, width=1, members=2, steps=1500, batch=32, repetition=2, lr=0.05, weight_decay=6e-4,
                 warmup=0.05),
    "long": dict(depth=10, width=1, members=2, steps=6000, batch=32, repetition=2, lr=0.05, weight_decay=6e-4,
                 warmup=0.05),  # "fast" trained 4 times longer
    "tiny": dict(depth=10, width=1, members=2, steps=30, batch=16, repetition=2, lr=0.05, weight_decay=6e-4,
                 warmup=0.1),
}  # fmt: skip
METRICS = (
    ("ensemble_acc", "ensemble acc. (%)"),
    ("mean_individual_acc", "mean member acc. (%)"),
    ("worst_member_acc", "worst member acc. (%)"),
    ("nll", "ensemble NLL"),
    ("classifier_sharing", "classifier sharing (%)"),
    ("encoder_sharing", "encoder sharing (%)"),
)


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
def load_task(name: str, data_seed: int = 0) -> dict[str, Any]:
    t = TASKS[name]
    kw = dict(num_classes=t["num_classes"], image_size=t["image_size"], seed=data_seed, noise=t["noise"],
              object_size=t["object_size"], clutter=t["clutter"])  # fmt: skip
    train = SyntheticImageDataset(t["train"], train=True, **kw)
    test = SyntheticImageDataset(t["test"], train=False, **kw)
    return {"train_x": train.data, "train_y": train.targets, "test_x": test.data, "test_y": test.targets,
            "num_classes": t["num_classes"]}  # fmt: skip


def batch_order(seed: int, n: int, batch: int) -> Iterator[np.ndarray]:
    """The unique-image batches of a seed, the same for both implementations."""
    return epoch_batches(np.random.default_rng(10_000 + seed), n, batch)


# ----------------------------------------------------------------------------------------------------------------
# bridges between the two implementations (weights, mixes)
# ----------------------------------------------------------------------------------------------------------------
def _core_tensors(core: nn.Module) -> list[Tensor]:
    return [*core.parameters(), *core.buffers()]


@torch.no_grad()
def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy every weight and BatchNorm buffer between a ``MIMOWrapper`` (library WRN) and a ``ReferenceMIMO``.

    Either may be the source. The cores are matched tensor by tensor in registration order (same architecture);
    the library's fused encoder weight ``(M * 16, 3, 3, 3)`` holds the reference's M encoders member-major, its
    ``MultiHead`` the M heads as ``(M, K, D)`` and ``(M, K)``.
    """
    lib, other = (src, dst) if isinstance(src, MIMOWrapper) else (dst, src)
    assert isinstance(lib, MIMOWrapper) and isinstance(other, ref.ReferenceMIMO)
    a, b = _core_tensors(src.core), _core_tensors(dst.core)
    if [t.shape for t in a] != [t.shape for t in b]:
        raise ValueError("the two cores do not have the same architecture")
    for s, d in zip(a, b, strict=True):
        d.copy_(s)
    kernels = lib.encoder.kernels()
    for i, (enc, head) in enumerate(zip(other.encoders, other.heads, strict=True)):
        if src is lib:
            enc.weight.copy_(kernels[i])
            head.weight.copy_(lib.heads.weight[i])
            head.bias.copy_(lib.heads.bias[i])
        else:
            kernels[i].copy_(enc.weight)
            lib.heads.weight[i].copy_(head.weight)
            lib.heads.bias[i].copy_(head.bias)


def mix_to_info(mix: ref.Mix, dtype: torch.dtype = torch.float32) -> MixInfo:
    """The library's description of a reference draw (same boxes, compositions and ratios)."""
    b, m = mix.lam.shape
    lam = torch.from_numpy(mix.lam).to(dtype)
    if mix.cutmix:
        inside = F.one_hot(torch.full((b,), mix.owner), m).to(dtype)
        others = lam * (1 - inside)
        outside = others / others.sum(dim=1, keepdim=True)
    else:
        inside = outside = lam
    h, w = mix.masks.shape[-2:]
    return MixInfo(boxes=torch.from_numpy(mix.boxes), inside=inside, outside=outside, ratios=mix.ratios.to(dtype),
                   cutmix=torch.tensor(mix.cutmix), height=h, width=w)  # fmt: skip


def _conv_he(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, (nn.Conv2d, nn.BatchNorm2d)):
            mixmo_init_(sub)


#: the initialisations compared (``--init``), as the library's WRN takes them; the reference has the same four
LIBRARY_INITS: dict[str, Any] = {
    "mixmo": "mixmo",
    "torch": "torch",
    "torch-convs": "torch-he-heads",  # PyTorch's convolutions, He-normal heads: the library's default
    "torch-heads": lambda m: (torch_init_(m), _conv_he(m)),  # He-normal convolutions, PyTorch's heads
}


def library_model(cfg: TrainConfig, num_classes: int, seed: int, dtype: torch.dtype = torch.float32) -> MIMOWrapper:
    """The library's network for a run, built from the seed as a user would (backbone, then wrapper)."""
    torch.manual_seed(seed)
    backbone = wide_resnet(cfg.depth, cfg.width, num_classes=num_classes, init=LIBRARY_INITS[cfg.init])
    return MIMOWrapper(backbone, cfg.members, preset=cfg.preset).to(dtype)


def reference_model(cfg: TrainConfig, num_classes: int, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    enc_init = cfg.method()["encoder_init"]
    return ref.ReferenceMIMO(num_classes, cfg.members, cfg.depth, cfg.width, enc_init, cfg.init).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# component factories: each returns the named component of one implementation, for a run of the other
# ----------------------------------------------------------------------------------------------------------------
def library_batcher(cfg: TrainConfig, data: dict[str, Any], seed: int, dtype: torch.dtype,
                    augment: str = "copies"):  # fmt: skip
    """The library's rows; ``augment`` says where the crop + flip runs (``MIMOBatcher``'s option)."""
    gen = torch.Generator().manual_seed(seed * 1000 + 1)
    normalize = Normalize.from_images(data["train_x"])
    input_rep = get_preset(cfg.preset).input_repetition
    from mixshare_layers import MIMOBatcher

    batcher = MIMOBatcher(cfg.members, cfg.repetition, input_rep, augment=augment,
                          transform=lambda x: normalize(random_crop_flip(x, 4, gen)), generator=gen)  # fmt: skip

    def batch(indices: np.ndarray) -> tuple[Tensor, Tensor]:
        idx = torch.from_numpy(np.asarray(indices))
        xs, ys = batcher(data["train_x"][idx], data["train_y"][idx])
        return xs.to(dtype), ys

    return batch


def reference_batcher(cfg: TrainConfig, data: dict[str, Any], seed: int, dtype: torch.dtype):
    rng = np.random.default_rng(seed * 1000 + 1)
    mean, std = (t.to(dtype) for t in channel_stats(data["train_x"]))
    input_rep = cfg.method()["input_repetition"]

    def batch(indices: np.ndarray) -> tuple[Tensor, Tensor]:
        rows = ref.make_rows(rng, indices, cfg.members, cfg.repetition, input_rep)
        flat = ref.augment_crop_flip(rng, data["train_x"][torch.from_numpy(rows.reshape(-1))])
        x = ((flat.to(dtype) / 255 - mean) / std).view(len(rows), cfg.members, *flat.shape[1:])
        return x, data["train_y"][torch.from_numpy(rows)]

    return batch


def library_schedule(cfg: TrainConfig):
    c = get_preset(cfg.preset)
    from mixshare_layers import Unmixer

    unmixer = Unmixer(c.unmix_mode if c.unmix_mode != "none" else "full", fadeout_end=c.fadeout_end)

    def schedule(progress: float) -> tuple[float, float]:
        p = float(cutmix_probability(c.cutmix_prob, c.cutmix_ramp, progress))
        return p, float(unmixer.strength(progress)) if c.unmix_mode == "fadeout" else 0.0

    return schedule


def reference_schedule(cfg: TrainConfig):
    method = cfg.method()

    def schedule(progress: float) -> tuple[float, float]:
        p = ref.cutmix_probability(method["cutmix_prob"], method["ramp"], progress)
        return p, min(1.0, progress / method["fadeout_end"]) if method["unmix"] == "fadeout" else 0.0

    return schedule


def library_sampler(cfg: TrainConfig, seed: int, schedule):
    c = get_preset(cfg.preset)
    gen = torch.Generator().manual_seed(seed * 1000 + 2)

    def draw(n: int, h: int, w: int, progress: float) -> MixInfo:
        p, _ = schedule(progress)
        return sample_mix_params(n, cfg.members, h, w, alpha=c.alpha, cutmix_prob=p, shuffle_roles=c.shuffle_roles,
                                 generator=gen)  # fmt: skip

    return draw


def reference_sampler(cfg: TrainConfig, seed: int, schedule):
    method = cfg.method()
    rng = np.random.default_rng(seed * 1000 + 2)

    def draw(n: int, h: int, w: int, progress: float) -> MixInfo:
        p, _ = schedule(progress)
        return mix_to_info(ref.draw_mix(rng, n, cfg.members, h, w, method["alpha"], p))

    return draw


def library_loss(cfg: TrainConfig):
    root = get_preset(cfg.preset).rebalance_root
    return lambda logits, y, ratios: mimo_cross_entropy(logits, y, rebalanced_weights(ratios, root))


def reference_loss(cfg: TrainConfig):
    root = cfg.method()["root"]

    def loss(logits: Tensor, y: Tensor, ratios: Tensor) -> Tensor:
        n, m = y.shape
        ce = F.cross_entropy(logits.reshape(n * m, -1), y.reshape(-1), reduction="none").view(n, m)
        return (ref.loss_weights(ratios, root) * ce).mean(dim=0).sum()

    return loss


# ----------------------------------------------------------------------------------------------------------------
# the two training loops
# ----------------------------------------------------------------------------------------------------------------
def train_library(cfg: TrainConfig, data: dict[str, Any], seed: int, swaps: Sequence[str] = (),
                  dtype: torch.dtype = torch.float32) -> MIMOWrapper:  # fmt: skip
    """The library as a user drives it (examples/cifar100_wrn.py's loop), with ``swaps`` taken from the reference."""
    model = library_model(cfg, data["num_classes"], seed, dtype)
    if "init" in swaps:
        copy_weights(reference_model(cfg, data["num_classes"], seed, dtype), model)
    if "batch" in swaps:
        batch = reference_batcher(cfg, data, seed, dtype)
    else:
        batch = library_batcher(cfg, data, seed, dtype, augment="inputs" if "augment" in swaps else "copies")
    schedule = (reference_schedule if "schedule" in swaps else library_schedule)(cfg)
    if "schedule" in swaps:  # the library's progress hooks answer with the reference's schedule
        model.mixer.current_cutmix_prob = lambda progress=0.0: torch.tensor(schedule(float(progress))[0])  # type: ignore[method-assign]
        model.unmixer.strength = lambda progress: torch.tensor(schedule(float(progress))[1])  # type: ignore[method-assign]
    mix_gen = torch.Generator().manual_seed(seed * 1000 + 2)
    if "mix" in swaps:  # the mixer's draw replaced by the reference sampler's, converted to a MixInfo
        draw = reference_sampler(cfg, seed, schedule)
        model.mixer.make_params = lambda enc, progress=0.0, generator=None: draw(  # type: ignore[method-assign]
            enc.shape[0], enc.shape[-2], enc.shape[-1], float(progress)
        ).to(dtype=dtype)
    criterion = model.make_loss()
    loss_fn = reference_loss(cfg) if "loss" in swaps else None
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)  # fmt: skip
    order = batch_order(seed, data["train_x"].shape[0], cfg.batch)
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
        model.set_progress(step / cfg.steps)
        xs, ys = batch(next(order))
        out = model(xs, generator=mix_gen)
        loss = criterion(out, ys) if loss_fn is None else loss_fn(out.logits, ys, out.mix_info.ratios)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def train_reference(cfg: TrainConfig, data: dict[str, Any], seed: int, swaps: Sequence[str] = (),
                    dtype: torch.dtype = torch.float32) -> nn.Module:  # fmt: skip
    """The reference's own loop, with ``swaps`` taken from the library (``augment`` is the library's alone)."""
    if "augment" in swaps:
        raise ValueError("swaps may not hold 'augment' for the reference: it has no repeated copies to augment")
    hooks: dict[str, Any] = {}
    if "init" in swaps:
        lib = library_model(cfg, data["num_classes"], seed, dtype)
        hooks["init"] = lambda model: copy_weights(lib, model)
    if "batch" in swaps:
        hooks["batch"] = library_batcher(cfg, data, seed, dtype)
    schedule = library_schedule(cfg) if "schedule" in swaps else reference_schedule(cfg)
    if "schedule" in swaps:
        hooks["schedule"] = schedule
    if "mix" in swaps:
        draw = library_sampler(cfg, seed, schedule)

        def mix(n: int, h: int, w: int, progress: float) -> tuple[Tensor, Tensor]:
            info = draw(n, h, w, progress)
            return info.masks_at(), info.ratios

        hooks["mix"] = mix
    if "loss" in swaps:
        hooks["loss"] = library_loss(cfg)
    order = batch_order(seed, data["train_x"].shape[0], cfg.batch)
    return ref.train(cfg, data["train_x"], data["train_y"], seed, dtype=dtype, order=order, hooks=hooks)


def lockstep(cfg: TrainConfig, data: dict[str, Any], seed: int, *, dtype: torch.dtype = torch.float64,
             progress_offset: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Train the library's and the reference's networks side by side from the same weights, on the same batches
    and the same mixes, and measure how far their parameters drift apart.

    The library network (built from ``seed``) gives its initial weights to the reference; every step, the
    reference batcher makes the batch and the reference sampler the mixes, given to both (the library's through
    its mixer's ``make_params``); the library is driven through its public path otherwise (``set_progress``,
    ``model(x)``, ``make_loss()``). ``progress_offset`` starts the progress there (e.g. inside MixMo's CutMix
    ramp or during fadeout).

    Returns:
        ``{"max_param_diff": ..., "max_buffer_diff": ..., "max_loss_diff": ..., "steps": ...}``: the largest
        absolute difference of any parameter / BatchNorm buffer after the last step, and of the losses.
    """
    lib = library_model(cfg, data["num_classes"], seed, dtype)
    other = reference_model(cfg, data["num_classes"], seed, dtype)
    copy_weights(lib, other)
    method = cfg.method()
    batch = reference_batcher(cfg, data, seed, dtype)
    rng = np.random.default_rng(seed * 1000 + 2)
    opts = [torch.optim.SGD(mod.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                            weight_decay=cfg.weight_decay) for mod in (lib, other)]  # fmt: skip
    criterion = lib.make_loss()
    order = batch_order(seed, data["train_x"].shape[0], cfg.batch)
    lib.train()
    other.train()
    loss_diff = 0.0
    for step in range(cfg.steps):
        progress = min(1.0, progress_offset + step / cfg.steps)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
        x, y = batch(next(order))
        p_cut = ref.cutmix_probability(method["cutmix_prob"], method["ramp"], progress)
        mix = ref.draw_mix(rng, x.shape[0], cfg.members, x.shape[-2], x.shape[-1], method["alpha"], p_cut)
        info = mix_to_info(mix, dtype)
        lib.set_progress(progress)
        lib.mixer.make_params = lambda enc, progress=0.0, generator=None, info=info: info  # type: ignore[method-assign]
        loss_lib = criterion(lib(x), y)
        strength = min(1.0, progress / method["fadeout_end"])
        logits = other.forward_train(x, mix.masks.to(dtype), unmix=method["unmix"], strength=strength,
                                     fraction=method["fraction"])  # fmt: skip
        loss_ref = reference_loss(cfg)(logits, y, mix.ratios.to(dtype))
        loss_diff = max(loss_diff, abs(float(loss_lib.detach()) - float(loss_ref.detach())))
        for opt, loss in zip(opts, (loss_lib, loss_ref), strict=True):
            opt.zero_grad()
            loss.backward()
            opt.step()
    lib_p = [*lib.encoder.kernels().unbind(0), *lib.core.parameters(), *lib.heads.weight.unbind(0),
             *lib.heads.bias.unbind(0)]  # fmt: skip
    ref_p = [*(e.weight for e in other.encoders), *other.core.parameters(), *(h.weight for h in other.heads),
             *(h.bias for h in other.heads)]  # fmt: skip
    param_diff = max(float((a - b).detach().abs().max()) for a, b in zip(lib_p, ref_p, strict=True))
    buffers = zip(lib.core.buffers(), other.core.buffers(), strict=True)
    buffer_diff = max(float((a.double() - b.double()).abs().max()) for a, b in buffers)
    return {"max_param_diff": param_diff, "max_buffer_diff": buffer_diff, "max_loss_diff": loss_diff,
            "steps": cfg.steps}  # fmt: skip


@torch.no_grad()
def evaluate_library(model: MIMOWrapper, data: dict[str, Any]) -> dict[str, Any]:
    """The evaluation of examples/cifar100_wrn.py: normalised test images, ``EnsembleMetrics`` (rule "prob")."""
    normalize = Normalize.from_images(data["train_x"])
    model.eval()
    acc = EnsembleMetrics(model.num_subnetworks, "prob")
    dtype = next(model.parameters()).dtype
    for k in range(0, data["test_x"].shape[0], 500):
        logits = model(normalize(data["test_x"][k : k + 500]).to(dtype))
        acc.update(logits, data["test_y"][k : k + 500])
    out = acc.compute()
    rates = sharing_rates(model)
    members = [100 * a for a in out["individual_acc"]]  # type: ignore[union-attr]
    return {"ensemble_acc": 100 * out["ensemble_acc"], "individual_acc": members,
            "mean_individual_acc": sum(members) / len(members), "nll": out["nll"],
            "classifier_sharing": rates["classifier"], "encoder_sharing": rates["encoder"]}  # fmt: skip


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one (implementation, method, seed, swaps) run; returns its record."""
    torch.set_num_threads(1)
    data = load_task(job["task"])
    cfg = TrainConfig(preset=job["method"], init=job.get("init", "mixmo"), **RECIPES[job["recipe"]])
    t0 = time.perf_counter()
    if job["impl"] == "library":
        model = train_library(cfg, data, job["seed"], job["swaps"])
        metrics = evaluate_library(model, data)
    else:
        model = train_reference(cfg, data, job["seed"], job["swaps"])
        mean, std = channel_stats(data["train_x"])
        metrics = ref.evaluate(model, data["test_x"], data["test_y"], mean, std)
    metrics["worst_member_acc"] = min(metrics["individual_acc"])
    metrics["collapsed"] = collapsed_members([a / 100 for a in metrics["individual_acc"]], data["num_classes"])
    import mixshare_layers

    return {**job, **metrics, "train_time_s": time.perf_counter() - t0, "library_path": mixshare_layers.__file__}


# ----------------------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------------------
def mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, standard error of the mean (sample std / sqrt(n); NaN for n < 2) and n."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan, n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n), n


def compare(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Both means and SEs, the difference ``a - b``, its SE and whether ``|diff| > 2 SE_diff``."""
    ma, sa, na = mean_se(a)
    mb, sb, nb = mean_se(b)
    se = math.sqrt(sa**2 + sb**2) if na > 1 and nb > 1 else math.nan
    diff = ma - mb
    return {"a": (ma, sa, na), "b": (mb, sb, nb), "diff": diff, "se": se,
            "flag": bool(math.isfinite(se) and abs(diff) > 2 * se)}  # fmt: skip


def _fmt(mean: float, se: float, digits: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def _label(impl: str, swaps: Sequence[str]) -> str:
    return impl + (f" + {'+'.join(swaps)} from {'ref.' if impl == 'library' else 'lib.'}" if swaps else "")


def table(results: list[dict[str, Any]], methods: Sequence[str], a: tuple[str, tuple[str, ...]],
          b: tuple[str, tuple[str, ...]]) -> str:  # fmt: skip
    """Markdown: for each method, each metric of run group ``a`` vs ``b`` (``(impl, swaps)`` each)."""
    lines = [f"| method | metric | {_label(*a)} | {_label(*b)} | difference | n |", "|---|---|---|---|---|---|"]
    flags = 0
    for method in methods:

        def group(key: tuple[str, tuple[str, ...]], method: str = method) -> list[dict[str, Any]]:
            return [r for r in results if r["method"] == method and r["impl"] == key[0] and tuple(r["swaps"]) == key[1]]

        ra, rb = group(a), group(b)
        if not ra or not rb:
            continue
        for key, name in METRICS:
            c = compare([r[key] for r in ra], [r[key] for r in rb])
            digits = 3 if key == "nll" else 1
            flag = c["flag"]
            flags += flag
            diff = f"{c['diff']:+.{digits}f} ± {c['se']:.{digits}f}" + (" **" if flag else "")
            lines.append(f"| `{method}` | {name} | {_fmt(*c['a'][:2], digits)} | {_fmt(*c['b'][:2], digits)} | {diff} "
                         f"| {c['a'][2]} / {c['b'][2]} |")  # fmt: skip
        collapsed = [f"{r['impl']} s{r['seed']}" for r in ra + rb if r.get("collapsed")]
        if collapsed:
            lines.append(f"| `{method}` | runs with a collapsed member | {', '.join(collapsed)} | | | |")
    lines.append("")
    lines.append(f"mean ± standard error over seeds; difference = left - right ± its standard error; ** = more than "
                 f"two standard errors ({flags} flagged).")  # fmt: skip
    return "\n".join(lines) + "\n"


def init_table(results: list[dict[str, Any]], methods: Sequence[str], a: str, b: str) -> str:
    """Markdown: for each method and implementation, each metric under initialisation ``a`` against ``b`` (no swaps,
    one task, recipe and library version in ``results``): both means, the difference of the means with its standard
    error, and the mean ± standard error of the per-seed differences. Both runs of a seed share the batch order and
    the mixes' generators, so the paired column is the sharper test; ``**`` marks either beyond two standard
    errors."""
    lines = [f"| method | implementation | metric | init `{a}` | init `{b}` | {a} - {b} | paired by seed | n |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    flags = 0
    for method in methods:
        for impl in ("library", "reference"):
            runs = {init: {r["seed"]: r for r in results if (r["method"], r["impl"], r.get("init", "mixmo")) ==
                           (method, impl, init) and not r["swaps"]} for init in (a, b)}  # fmt: skip
            if not runs[a] or not runs[b]:
                continue
            seeds = sorted(set(runs[a]) & set(runs[b]))
            for key, name in METRICS:
                digits = 3 if key == "nll" else 1
                c = compare([r[key] for r in runs[a].values()], [r[key] for r in runs[b].values()])
                d, d_se, _ = mean_se([runs[a][s][key] - runs[b][s][key] for s in seeds])
                cells = []
                for mean, se in ((c["diff"], c["se"]), (d, d_se)):
                    flag = math.isfinite(se) and abs(mean) > 2 * se
                    flags += flag
                    cells.append(f"{mean:+.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")
                                 + (" **" if flag else ""))  # fmt: skip
                means = f"{_fmt(*c['a'][:2], digits)} | {_fmt(*c['b'][:2], digits)}"
                lines.append(f"| `{method}` | {impl} | {name} | {means} | {' | '.join(cells)} | "
                             f"{c['a'][2]} / {c['b'][2]} |")  # fmt: skip
            collapsed = [f"{init} s{r['seed']}" for init in (a, b) for r in runs[init].values() if r.get("collapsed")]
            if collapsed:
                lines.append(f"| `{method}` | {impl} | runs with a collapsed member | {', '.join(collapsed)} | | | | |")
    lines += ["", f"mean ± standard error over seeds; {a} - {b}: the difference of the means ± "
              f"sqrt(SE_a^2 + SE_b^2); paired by seed: the per-seed differences; ** = beyond two standard errors "
              f"({flags} flagged)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def group_table(results: list[dict[str, Any]], methods: Sequence[str]) -> str:
    """Markdown: one row per (method, library version, implementation, swaps) group, mean ± SE of every metric."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        if r["method"] in methods:
            label = r.get("label", "current") if r["impl"] == "library" or r["swaps"] else "-"
            groups.setdefault((methods.index(r["method"]), label, r["impl"], tuple(r["swaps"])), []).append(r)
    head = "| method | library version | run | " + " | ".join(name for _, name in METRICS) + " | n | collapsed |"
    lines = [head, "|" + "---|" * (len(METRICS) + 5)]
    for (mi, label, impl, swaps), rs in sorted(groups.items()):
        cells = []
        for key, _ in METRICS:
            mean, se, _ = mean_se([r[key] for r in rs])
            cells.append(_fmt(mean, se, 3 if key == "nll" else 1))
        collapsed = sum(bool(r.get("collapsed")) for r in rs)
        lines.append(f"| `{methods[mi]}` | {label} | {_label(impl, swaps)} | " + " | ".join(cells)
                     + f" | {len(rs)} | {collapsed} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--impl", choices=("both", "library", "reference"), default="both")
    p.add_argument("--swap", nargs="*", default=[], choices=SWAPS, help="components taken from the other side")
    p.add_argument("--task", choices=sorted(TASKS), default="hard24")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="fast")
    p.add_argument("--init", choices=sorted(LIBRARY_INITS), default="torch-convs",
                   help="initialisation of both sides (default: the library's)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--label", default="current", help="name of the library version measured (kept in each run)")
    p.add_argument("--out", default="runs/differential")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--groups", action="store_true", help="also print every group of runs (versions, swaps) found")
    p.add_argument("--compare-init", nargs=2, metavar=("A", "B"), choices=sorted(LIBRARY_INITS),
                   help="also print, per method and implementation, initialisation A against B (runs already there)")
    args = p.parse_args(argv)
    if "augment" in args.swap and args.impl != "library":
        p.error("--swap augment changes the library's batcher only: give --impl library")
    if {"augment", "batch"} <= set(args.swap):
        p.error("--swap batch already takes the reference's augmentation: give batch or augment, not both")
    out = Path(args.out)
    path = out / "results.json"
    results: list[dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else []
    swaps = tuple(s for s in SWAPS if s in args.swap)
    impls = ("library", "reference") if args.impl == "both" else (args.impl,)
    jobs = [dict(impl=impl, method=m, seed=s, swaps=list(swaps), task=args.task, recipe=args.recipe, label=args.label,
                 init=args.init) for m in args.methods for s in args.seeds for impl in impls]  # fmt: skip

    def key(r: dict[str, Any]) -> tuple:
        # the reference does not depend on the library version: its runs serve every label
        label = r.get("label", "current") if r["impl"] == "library" or r["swaps"] else "-"
        return (r["impl"], r["method"], r["seed"], tuple(r["swaps"]), r["task"], r["recipe"], r.get("init", "mixmo"),
                label)

    done = {key(r) for r in results}
    todo = [] if args.table_only else [j for j in jobs if key(j) not in done]
    def finished(r: dict[str, Any]) -> None:
        results.append(r)
        write_json(path, results)
        members = " / ".join(f"{a:.1f}" for a in r["individual_acc"])
        print(f"[differential] {_label(r['impl'], r['swaps'])} {r['method']} s{r['seed']}: ens "
              f"{r['ensemble_acc']:.1f}, members {members}, nll {r['nll']:.3f}, sharing "
              f"{r['classifier_sharing']:.1f} / {r['encoder_sharing']:.1f}, {r['train_time_s']:.0f} s", flush=True)

    if todo:
        print(f"[differential] {len(todo)} runs to do, {args.jobs} at a time", flush=True)
    if todo and args.jobs <= 1:
        threads = torch.get_num_threads()
        try:
            for j in todo:
                finished(run_one(j))
        finally:
            torch.set_num_threads(threads)
    elif todo:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            for fut in as_completed([pool.submit(run_one, j) for j in todo]):
                finished(fut.result())
    mine = [r for r in results if r["task"] == args.task and r["recipe"] == args.recipe
            and r.get("init", "mixmo") == args.init and key(r)[-1] in (args.label, "-")]  # fmt: skip
    header = (f"library {args.label!r}, init {args.init}; task {args.task} {TASKS[args.task]}, "
              f"recipe {args.recipe} {RECIPES[args.recipe]}")
    text = header + "\n\n"
    if args.impl == "both":
        text += table(mine, args.methods, ("library", swaps), ("reference", swaps))
    elif args.impl == "library" and swaps:  # what the swapped components change in the library
        text += table(mine, args.methods, ("library", swaps), ("library", ()))
    if args.groups:
        same = [r for r in results if r["task"] == args.task and r["recipe"] == args.recipe]
        text += "\n" + group_table(same, args.methods)
    if args.compare_init:
        same = [r for r in results if r["task"] == args.task and r["recipe"] == args.recipe
                and key(r)[-1] in (args.label, "-")]  # fmt: skip
        text += "\n" + init_table(same, args.methods, *args.compare_init)
    print(text, flush=True)
    return results


if __name__ == "__main__":
    main()
