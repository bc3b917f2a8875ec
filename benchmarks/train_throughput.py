#!/usr/bin/env python
"""Images/s of examples/cifar100_wrn.py's training loop against the bare model step, on the same model.

The loop is the example's, built from the same library pieces: a batch cut from the whole uint8 dataset on the
device, crop/flip of every repeated copy and normalisation (``mixshare_layers.data``), ``MIMOBatcher``,
``set_progress``, forward, loss, backward, SGD with the recipe's ``LambdaLR`` schedule, the running loss kept on the
device and read once every ``--log-every`` steps. The bare step is forward, loss, backward and SGD on one training
batch already built in memory. Rounds of ``--steps`` steps of each alternate (7 by default; neighbouring rounds share
the machine's load); the result is the median rate of each and the median of the per-round ratios. Rates count the
rows the network sees (batch size x batch repetition per step).

    python benchmarks/train_throughput.py --steps 30                          # the --quick model (WRN-10-1)
    python benchmarks/train_throughput.py --depth 28 --width 2 --device cuda --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mixshare_layers import MIMOBatcher, MIMOWrapper
from mixshare_layers.data import Normalize, SyntheticImageDataset, random_crop_flip
from mixshare_layers.files import write_json
from mixshare_layers.models import wide_resnet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="mixshare", help="a preset of mixshare_layers.PRESETS")
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--num-subnetworks", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images", type=int, default=2048, help="synthetic training images on the device")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="rows per step, counting the repeats")
    p.add_argument("--batch-repetition", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="steps per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = SyntheticImageDataset(args.images, args.classes, args.image_size, seed=0)
    images, labels = data.data.to(device), data.targets.to(device)
    model = MIMOWrapper(wide_resnet(args.depth, args.width, num_classes=args.classes), args.num_subnetworks,
                        preset=args.method).to(device)  # fmt: skip
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator(device).manual_seed(1)
    normalize = Normalize.from_images(data.data, channels_last=args.channels_last).to(device)
    batcher = MIMOBatcher(args.num_subnetworks, args.batch_repetition, model.config.input_repetition, generator=gen,
                          transform=lambda x: normalize(random_crop_flip(x, 4, gen)))  # fmt: skip
    criterion = model.make_loss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9, nesterov=True, weight_decay=6e-4)
    total = args.steps * args.rounds
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1)))  # noqa: E731 (the --quick schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    train_model = torch.compile(model) if args.compile else model
    unique = args.batch_size // args.batch_repetition
    mix_gen = torch.Generator(device).manual_seed(2)

    def optimise(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = criterion(train_model(xs, generator=mix_gen), ys)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step = 0

    def run_loop() -> float:  # the example's loop
        nonlocal step
        loss_sum, t0 = torch.zeros((), device=device), time.perf_counter()
        order = torch.randperm(len(labels), device=device, generator=gen)
        for i in range(args.steps):
            idx = order[(i * unique) % (len(labels) - unique + 1) :][:unique]
            model.set_progress(min(1.0, step / total))
            loss_sum += optimise(*batcher(images[idx], labels[idx]))
            scheduler.step()
            step += 1
            if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
                float(loss_sum)  # the loop's one host sync
        sync()
        return args.steps * args.batch_size / (time.perf_counter() - t0)

    ready = batcher(images[:unique], labels[:unique])  # one training batch, built once

    def run_bare() -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            optimise(*ready)
        sync()
        return args.steps * args.batch_size / (time.perf_counter() - t0)

    model.train()
    run_bare()  # warm-up
    loop, bare = [], []
    for _ in range(args.rounds):
        loop.append(run_loop())
        bare.append(run_bare())
    ratios = sorted(a / b for a, b in zip(loop, bare, strict=True))
    result = {
        "script_images_per_s": sorted(loop)[len(loop) // 2],
        "bare_images_per_s": sorted(bare)[len(bare) // 2],
        "ratio": ratios[len(ratios) // 2],
        "steps": args.steps,
        "script_rounds": loop,
        "bare_rounds": bare,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    print(json.dumps(result, indent=2), flush=True)
    if args.json is not None:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
