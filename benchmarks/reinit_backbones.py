#!/usr/bin/env python
"""The backbones' own initialisers against PyTorch's defaults, for the layers a wrapper draws afresh.

A wrapper without pretrained weights draws its M heads, and for presets with independent encoders its M encoder
copies, with its split's ``reinit``: the backbone's own initialiser (torchvision's per family, timm's per model;
``mixshare_layers.adapters.inits``). A split whose ``reinit`` is ``None`` draws them with PyTorch's defaults (every
layer's ``reset_parameters()``), as the library did before. The core is the backbone's as built either way. This
trains both, per backbone, preset and seed, and tabulates the difference.

Backbones (what differs between the two arms, read on the built models):

    resnet18  torchvision's ``resnet18`` with the library's CIFAR stem (``mixshare_layers.models.cifar_resnet``:
              3x3 stride-1 ``conv1``, no max-pool), trained here through the public API (``MIMOWrapper``,
              ``make_batcher``, ``make_loss``) on ``--task`` (default ``hard24`` of ``benchmarks/differential.py``:
              40 classes, 24x24, 5000 train / 2000 test, object 7/12 of the image on clutter 0.7, noise 1.0) with
              that harness's ``--recipe`` (default ``fast``: 32 unique images x batch repetition 2 per step, SGD
              Nesterov 0.9, peak lr 0.05, 5 % linear warmup then linear decay, weight decay 6e-4, crop + flip) for
              ``--resnet-steps`` steps, at the peak lr ``--resnet-lr`` where given. At lr 0.05 on ``hard24`` the
              wrapped resnet18 collapses to uniform outputs within the warmup: the MIMO loss sums the M members'
              losses, so the core's gradient is M times a single network's, and the plain resnet18 collapses the
              same way at lr 0.1 (docs/reproducing.md); ``--task mid16 --resnet-lr 0.02`` is a setting it learns
              in on a CPU. torchvision draws convolutions Kaiming-normal (fan-out, ReLU): the encoder
              copies get std 0.059 against PyTorch's 0.111; the head is ``nn.Linear``'s default in both arms, so
              under ``mixshare`` (aligned encoders: copies of the backbone's ``conv1``) both arms draw from one
              distribution and differ by the draw alone.
    vit       ``examples/vit_synthetic.py`` (its defaults: a 4-block width-64 timm ViT on 10 classes of 24x24
              synthetic images, AdamW, warmup + cosine) with ``--reinit`` and ``--steps --vit-steps``, run as a
              child process with one thread and ``--json``. timm's ViT initialisation draws the head's linear
              layer truncated-normal with std 0.02 and a zero bias, against ``nn.Linear``'s uniform weight and bias
              (std 0.072 at width 64); the patch projection is PyTorch's default in both.

Seed ``s``: the backbone (hence the core) is built after ``torch.manual_seed(s)``, so both arms of a seed share the
core, the data and the batch order; they differ in the drawn layers and what follows from them.

The table gives mean ± standard error over seeds of the ensemble accuracy, the mean member accuracy and the
ensemble NLL per backbone, preset and initialiser, and the difference backbone - torch twice: of the means, with
the standard error ``sqrt(SE_a^2 + SE_b^2)``, and paired by seed (mean ± standard error of the per-seed
differences); ``**`` where a difference exceeds two standard errors.

Usage:
    python -m benchmarks.reinit_backbones --out runs/reinit_backbones               # everything, seeds 0-2
    python -m benchmarks.reinit_backbones --backbones vit --seeds 0 1 --vit-steps 1500
    python -m benchmarks.reinit_backbones --backbones resnet18 --presets mixmo --task mid16 --resnet-steps 400 \
        --resnet-lr 0.02
    python -m benchmarks.reinit_backbones --table-only --out runs/reinit_backbones  # tabulate every run there

Runs are cached in ``<out>/results.json`` (rewritten atomically after every run); a run already there is skipped,
so an interrupted sweep continues where it stopped. Each run uses one intra-op thread; ``--jobs`` runs go in
parallel.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import torchvision

from benchmarks.differential import (
    RECIPES,
    TASKS,
    TrainConfig,
    batch_order,
    compare,
    evaluate_library,
    load_task,
    lr_factor,
    mean_se,
)
from mixshare_layers import MIMOWrapper, split_backbone
from mixshare_layers.data import Normalize, random_crop_flip
from mixshare_layers.files import write_json
from mixshare_layers.models import cifar_resnet

ROOT = Path(__file__).resolve().parents[1]
VIT_EXAMPLE = ROOT / "examples" / "vit_synthetic.py"
BACKBONES = ("resnet18", "vit")
PRESETS = ("mixmo", "mixshare")
REINITS = ("backbone", "torch")  # the split's own reinit; None (PyTorch's defaults)
RESNET_STEPS, VIT_STEPS = 300, 3000
METRICS = (("ensemble_acc", "ensemble acc. (%)", 1), ("mean_individual_acc", "mean member acc. (%)", 1),
           ("nll", "ensemble NLL", 3), ("ece", "ensemble ECE", 3), ("calibrated_nll", "NLL, calibrated", 3),
           ("calibrated_ece", "ECE, calibrated", 3), ("temperature", "temperature", 2))  # fmt: skip
# a metric gets its rows where every run of both arms has it (ECE and the calibrated ones: ViT runs; the calibrated
# ones only with the example's --val)


def resnet_wrapper(preset: str, reinit: str, num_classes: int, seed: int) -> MIMOWrapper:
    """resnet18 with the CIFAR stem, wrapped; ``reinit="torch"`` gives the wrapper a split without ``reinit``."""
    torch.manual_seed(seed)
    backbone = cifar_resnet(torchvision.models.resnet18(num_classes=num_classes))
    split = split_backbone(backbone)
    if reinit == "torch":
        split = split._replace(reinit=None)
    return MIMOWrapper(backbone, 2, preset, split=split)


def train_resnet(job: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one resnet18 run (differential.py's loop and evaluation, on this backbone)."""
    data = load_task(job["task"])
    recipe = {**RECIPES[job["recipe"]], "steps": job["steps"]}
    if job.get("lr") is not None:
        recipe["lr"] = job["lr"]
    cfg = TrainConfig(preset=job["preset"], **recipe)
    model = resnet_wrapper(job["preset"], job["reinit"], data["num_classes"], job["seed"])
    gen = torch.Generator().manual_seed(job["seed"] * 1000 + 1)
    normalize = Normalize.from_images(data["train_x"])
    batcher = model.make_batcher(cfg.repetition, transform=lambda x: normalize(random_crop_flip(x, 4, gen)),
                                 generator=gen)  # fmt: skip
    mix_gen = torch.Generator().manual_seed(job["seed"] * 1000 + 2)
    criterion = model.make_loss()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)  # fmt: skip
    order = batch_order(job["seed"], data["train_x"].shape[0], cfg.batch)
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
        model.set_progress(step / cfg.steps)
        idx = torch.from_numpy(next(order))
        xs, ys = batcher(data["train_x"][idx], data["train_y"][idx])
        loss = criterion(model(xs, generator=mix_gen), ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_time = time.perf_counter() - t0
    metrics = evaluate_library(model, data)
    return {**job, **metrics, "train_time_s": train_time}


def train_vit(job: dict[str, Any], out: Path) -> dict[str, Any]:
    """One run of the ViT example as a child process; its summary is kept beside the results."""
    summary = out / "vit" / f"{run_name(job)}.json"
    command = [sys.executable, str(VIT_EXAMPLE), "--method", job["preset"], "--reinit", job["reinit"], "--seed",
               str(job["seed"]), "--steps", str(job["steps"]), "--eval-every", "0", "--threads", "1", "--json",
               str(summary), *job["vit_args"]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    s = json.loads(summary.read_text())
    members = [100 * a for a in s["individual_acc"]]
    calibrated = s["calibrated"] or {}  # with --val: the test metrics at the temperature fitted on held-out images
    return {**job, "ensemble_acc": 100 * s["ensemble_acc"], "individual_acc": members,
            "mean_individual_acc": 100 * s["mean_individual_acc"], "nll": s["nll"], "ece": s["ece"],
            "calibrated_nll": calibrated.get("nll"), "calibrated_ece": calibrated.get("ece"),
            "temperature": s["temperature"], "train_time_s": s["train_time_s"]}  # fmt: skip


def run_one(job: dict[str, Any], out: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    return train_resnet(job) if job["backbone"] == "resnet18" else train_vit(job, out)


def run_name(job: dict[str, Any]) -> str:
    return f"{job['backbone']}-{job['preset']}-{job['reinit']}-steps{job['steps']}-s{job['seed']}"


def _key(r: dict[str, Any]) -> tuple:
    return (r["backbone"], r["preset"], r["reinit"], r["seed"], r["steps"], r.get("task"), r.get("recipe"),
            r.get("lr"), tuple(r.get("vit_args", ())))  # fmt: skip


def _setting(r: dict[str, Any]) -> tuple:
    """What a group of runs shares besides backbone and preset: the steps, and for resnet18 the task and lr."""
    return (r["steps"], r.get("task") or "", r.get("lr") or 0.0)


def _setting_cell(setting: tuple) -> str:
    steps, task, lr = setting
    return ", ".join([str(steps), *([task] if task else []), *([f"lr {lr:g}"] if lr else [])])


def _fmt(mean: float, se: float, digits: int, sign: str = "") -> str:
    return f"{mean:{sign}.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def _diff(mean: float, se: float, digits: int) -> str:
    """A signed difference with its standard error, ``**`` where it exceeds two of them."""
    return _fmt(mean, se, digits, "+") + (" **" if math.isfinite(se) and abs(mean) > 2 * se else "")


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per backbone, preset and metric, both initialisers and their difference (backbone - torch), over
    the seeds of each arm and paired by seed."""
    lines = ["| backbone | preset | setting | metric | backbone's own | PyTorch's defaults | own - PyTorch | "
             "paired by seed | seeds |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    groups = sorted(
        {(r["backbone"], r["preset"], _setting(r)) for r in results},
        key=lambda g: (BACKBONES.index(g[0]), PRESETS.index(g[1]) if g[1] in PRESETS else 9, g[2]),
    )
    flags = 0
    for backbone, preset, setting in groups:
        runs = {arm: {r["seed"]: r for r in results if (r["backbone"], r["preset"], _setting(r), r["reinit"]) ==
                      (backbone, preset, setting, arm)} for arm in REINITS}  # fmt: skip
        own, torch_ = runs["backbone"], runs["torch"]
        if not own or not torch_:
            continue
        paired = sorted(set(own) & set(torch_))
        for key, name, digits in METRICS:
            if any(r.get(key) is None for r in [*own.values(), *torch_.values()]):
                continue
            c = compare([r[key] for r in own.values()], [r[key] for r in torch_.values()])
            d_mean, d_se, _ = mean_se([own[s][key] - torch_[s][key] for s in paired])
            cells = [_diff(c["diff"], c["se"], digits), _diff(d_mean, d_se, digits)]
            flags += sum(cell.endswith("**") for cell in cells)
            arms = " | ".join(_fmt(*c[arm][:2], digits) for arm in ("a", "b"))
            lines.append(f"| {backbone} | `{preset}` | {_setting_cell(setting)} | {name} | {arms} | "
                         f"{' | '.join(cells)} | {len(own)} / {len(torch_)} |")  # fmt: skip
    lines += ["", "mean ± standard error over seeds; own - PyTorch: the difference of the means, its standard error "
              "sqrt(SE_own^2 + SE_torch^2); paired by seed: the mean ± standard error of the per-seed differences "
              f"(both arms of a seed share the core, the data and the batch order); ** = beyond two standard errors "
              f"({flags} flagged)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    p.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    p.add_argument("--reinits", nargs="+", choices=REINITS, default=list(REINITS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--resnet-steps", type=int, default=RESNET_STEPS, help="resnet18's training steps")
    p.add_argument("--task", choices=sorted(TASKS), default="hard24", help="resnet18's task (differential.py's)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="fast",
                   help="resnet18's recipe (differential.py's; its steps replaced by --resnet-steps)")  # fmt: skip
    p.add_argument("--resnet-lr", type=float, default=None, help="resnet18's peak lr (default: the recipe's)")
    p.add_argument("--vit-steps", type=int, default=VIT_STEPS, help="the ViT example's --steps")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    p.add_argument("--out", type=Path, default=Path("runs/reinit_backbones"))
    p.add_argument("--table-only", action="store_true")
    p.add_argument("vit_args", nargs="*", help="more options for the ViT example, after --")
    args = p.parse_args(argv)
    for name in ("resnet_steps", "vit_steps", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.resnet_lr is not None and not (math.isfinite(args.resnet_lr) and args.resnet_lr > 0):
        p.error(f"--resnet-lr must be a positive number, got {args.resnet_lr}")
    path = args.out / "results.json"
    results: list[dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else []
    jobs = []
    for backbone in args.backbones:
        for preset in args.presets:
            for seed in args.seeds:
                for reinit in args.reinits:
                    job = dict(backbone=backbone, preset=preset, reinit=reinit, seed=seed)
                    if backbone == "resnet18":
                        job.update(steps=args.resnet_steps, task=args.task, recipe=args.recipe)
                        if args.resnet_lr is not None:
                            job["lr"] = args.resnet_lr
                    else:
                        job.update(steps=args.vit_steps, vit_args=list(args.vit_args))
                    jobs.append(job)
    done = {_key(r) for r in results}
    todo = [] if args.table_only else [j for j in jobs if _key(j) not in done]
    (args.out / "vit").mkdir(parents=True, exist_ok=True)

    def finished(r: dict[str, Any]) -> None:
        results.append(r)
        write_json(path, results)
        print(f"[reinit] {run_name(r)}: ensemble {r['ensemble_acc']:.1f} %, members "
              f"{' / '.join(f'{a:.1f}' for a in r['individual_acc'])}, NLL {r['nll']:.3f}, "
              f"{r['train_time_s']:.0f} s", flush=True)  # fmt: skip

    if todo:
        print(f"[reinit] {len(todo)} runs to do, {args.jobs} at a time", flush=True)
    if todo and args.jobs == 1:
        threads = torch.get_num_threads()
        try:
            for j in todo:
                finished(run_one(j, args.out))
        finally:
            torch.set_num_threads(threads)
    elif todo:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(run_one, j, args.out) for j in todo]):
                finished(fut.result())
    wanted = {_key(j) for j in jobs}
    print(table(results if args.table_only else [r for r in results if _key(r) in wanted]), flush=True)
    return results


if __name__ == "__main__":
    main()
