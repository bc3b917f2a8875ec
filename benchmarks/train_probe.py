#!/usr/bin/env python
"""Watch a training's first steps: the loss, the largest logit and the final features, plain or wrapped.

A diagnosis tool for a backbone that does not learn under a recipe: it trains one network on a task of
``benchmarks/differential.py`` with that harness's recipe (SGD Nesterov 0.9, linear warmup then linear decay, weight
decay, crop + flip, 32 unique images x batch repetition 2 per step; ``--lr`` and ``--steps`` replace the recipe's)
and prints, every ``--every`` steps, the training loss (for a wrapper: the MIMO loss, summed over the M members, so
chance is ``M ln K``), the largest absolute logit, the mean of the final feature maps and the fraction of them above
zero (dead ReLUs show as a fraction near 0), and the gradient norm. The plain network gets the same rows, one
prediction each.

    backbones  ``wrn`` (the library's WRN-10-1) or ``resnet18`` (torchvision's, with the CIFAR stem)
    --plain    the backbone alone, no wrapper (the loss is then one cross-entropy per row, chance ``ln K``)

Usage:
    python -m benchmarks.train_probe --backbone resnet18 --preset mixmo --lr 0.05 --steps 450
    python -m benchmarks.train_probe --backbone resnet18 --plain --lr 0.1 --steps 450   # the plain net at twice the lr
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from benchmarks.differential import RECIPES, TASKS, batch_order, load_task, lr_factor
from mixshare_layers import MIMOWrapper, split_backbone
from mixshare_layers.data import Normalize, random_crop_flip
from mixshare_layers.models import cifar_resnet, wide_resnet
from mixshare_layers.presets import PRESETS

BACKBONES = ("wrn", "resnet18")


def build(backbone: str, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """The network and the module whose output is the final feature map."""
    if backbone == "wrn":
        net = wide_resnet(10, 1, num_classes=num_classes)
        return net, net.relu
    net = cifar_resnet(torchvision.models.resnet18(num_classes=num_classes))
    return net, net.layer4


def probe(backbone: str, preset: str | None, *, task: str = "hard24", recipe: str = "fast", lr: float | None = None,
          steps: int | None = None, every: int = 10, seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """Train and return one record per printed step; ``preset=None`` trains the plain backbone."""
    cfg = {**RECIPES[recipe], **({} if lr is None else {"lr": lr}), **({} if steps is None else {"steps": steps})}
    data = load_task(task)
    torch.manual_seed(seed)
    net, last = build(backbone, data["num_classes"])
    model = net if preset is None else MIMOWrapper(net, cfg["members"], preset, split=split_backbone(net))
    normalize = Normalize.from_images(data["train_x"])
    gen, mix_gen = torch.Generator().manual_seed(seed * 1000 + 1), torch.Generator().manual_seed(seed * 1000 + 2)

    def augment(x: Tensor) -> Tensor:
        return normalize(random_crop_flip(x, 4, gen))

    if isinstance(model, MIMOWrapper):
        batcher = model.make_batcher(cfg["repetition"], transform=augment, generator=gen)
        criterion = model.make_loss()
    features: dict[str, Tensor] = {}
    last.register_forward_hook(lambda module, args, out: features.__setitem__("f", out.detach()))
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, nesterov=True,
                          weight_decay=cfg["weight_decay"])  # fmt: skip
    order = batch_order(seed, data["train_x"].shape[0], cfg["batch"])
    records, t0 = [], time.perf_counter()
    model.train()
    for step in range(cfg["steps"]):
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * lr_factor(step, cfg["steps"], cfg["warmup"])
        idx = torch.from_numpy(next(order))
        x, y = data["train_x"][idx], data["train_y"][idx]
        if isinstance(model, MIMOWrapper):
            model.set_progress(step / cfg["steps"])
            xs, ys = batcher(x, y)
            out = model(xs, generator=mix_gen)
            loss, logits = criterion(out, ys), out.logits
        else:
            x, y = x.repeat(cfg["repetition"], 1, 1, 1), y.repeat(cfg["repetition"])
            logits = model(augment(x))
            loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None))
        opt.step()
        if step % every == 0 or step == cfg["steps"] - 1:
            f = features["f"]
            records.append(dict(step=step, loss=float(loss.detach()), max_logit=float(logits.detach().abs().max()),
                                feature_mean=float(f.mean()), feature_positive=float((f > 0).float().mean()),
                                grad_norm=grad, seconds=time.perf_counter() - t0))  # fmt: skip
    return records


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=BACKBONES, default="resnet18")
    p.add_argument("--preset", choices=sorted(PRESETS), default="mixmo")
    p.add_argument("--plain", action="store_true", help="the backbone alone, no wrapper")
    p.add_argument("--task", choices=sorted(TASKS), default="hard24")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="fast")
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: the recipe's)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--every", type=int, default=10, help="print every this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive number, got {args.lr}")
    for name in ("steps", "every", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    records = probe(args.backbone, None if args.plain else args.preset, task=args.task, recipe=args.recipe,
                    lr=args.lr, steps=args.steps, every=args.every, seed=args.seed)  # fmt: skip
    for r in records:
        print(f"step {r['step']:>5}  loss {r['loss']:.3f}  max |logit| {r['max_logit']:6.1f}  features: mean "
              f"{r['feature_mean']:.3f}, above 0 {r['feature_positive']:.3f}  grad norm {r['grad_norm']:.2f}  "
              f"{r['seconds']:.0f} s")  # fmt: skip
    return records


if __name__ == "__main__":
    main()
