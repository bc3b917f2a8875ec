"""Why the initialisation matters: weight norms and effective step sizes over a MixMo training, per init.

With BatchNorm after every convolution, a convolution's output does not depend on the scale of its weights, so what
moves its function is the step *relative* to the weights: ``||Δw|| / ||w||`` (the effective step size; with weight
decay the norm itself drifts towards an equilibrium). This script trains the differential harness's library run
(``benchmarks/differential.py``: task hard24, recipe fast, MixMo) once per initialisation and logs, every
``--every`` steps, for the core's convolutions (pooled), the encoders and the heads:

* the weight norm ``||w||``;
* the effective step ``||w_t - w_{t-1}|| / ||w_{t-1}||`` of that step.

Usage::

    python -m benchmarks.init_mechanism --inits torch mixmo --seed 0 --out runs/init_mechanism.json
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.differential import (
    RECIPES,
    TrainConfig,
    batch_order,
    evaluate_library,
    library_batcher,
    library_model,
    load_task,
    lr_factor,
)
from mixshare_layers.files import write_json


def _groups(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    core = [m.weight for m in model.core.modules() if isinstance(m, nn.Conv2d)]
    heads = [p for n, p in model.heads.named_parameters() if "weight" in n]
    encoder = [p for n, p in model.encoder.named_parameters() if "weight" in n]
    return {"core convs": core, "encoders": encoder, "heads": heads}


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum(t.detach().double().square().sum() for t in tensors)))


def trace(init: str, seed: int, recipe: str, every: int) -> dict[str, Any]:
    """Train once and record the norms and effective steps of each weight group every ``every`` steps."""
    torch.set_num_threads(1)
    data = load_task("hard24")
    cfg = TrainConfig(preset="mixmo", init=init, **RECIPES[recipe])
    model = library_model(cfg, data["num_classes"], seed)
    batch = library_batcher(cfg, data, seed, torch.float32)
    criterion = model.make_loss()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)  # fmt: skip
    order = batch_order(seed, data["train_x"].shape[0], cfg.batch)
    mix_gen = torch.Generator().manual_seed(seed * 1000 + 2)
    groups = _groups(model)
    rows = []
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
        model.set_progress(step / cfg.steps)
        xs, ys = batch(next(order))
        loss = criterion(model(xs, generator=mix_gen), ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        logged = step % every == 0 or step == cfg.steps - 1
        before = {k: [t.detach().clone() for t in ts] for k, ts in groups.items()} if logged else None
        opt.step()
        if before is not None:
            row: dict[str, Any] = {"step": step, "loss": float(loss.detach())}
            for k, ts in groups.items():
                delta = [t.detach() - b for t, b in zip(ts, before[k], strict=True)]
                row[f"{k} norm"] = _norm(ts)
                row[f"{k} step"] = _norm(delta) / max(_norm(before[k]), 1e-12)
            rows.append(row)
    return {"init": init, "seed": seed, "recipe": recipe, "rows": rows, "final": evaluate_library(model, data)}


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inits", nargs="+", default=["torch", "mixmo"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default="fast", choices=sorted(RECIPES))
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--out", default="runs/init_mechanism.json")
    args = p.parse_args(argv)
    results = [trace(init, args.seed, args.recipe, args.every) for init in args.inits]
    write_json(args.out, results)
    keys = [k for k in results[0]["rows"][0] if k not in ("step", "loss")]
    print("step | " + " | ".join(f"{r['init']}: {k}" for r in results for k in keys))
    for i in range(len(results[0]["rows"])):
        cells = [f"{r['rows'][i][k]:.4g}" for r in results for k in keys]
        print(f"{results[0]['rows'][i]['step']} | " + " | ".join(cells))
    for r in results:
        f = r["final"]
        print(f"{r['init']}: ensemble {f['ensemble_acc']:.1f} %, members {f['individual_acc']}")
    return results


if __name__ == "__main__":
    main()
