#!/usr/bin/env python
"""Train a MixShare Wide ResNet with Lightning, then evaluate its uncertainty on clean, OOD and corrupted images.

``MIMOLightningModule`` trains a ``MIMOWrapper`` with the library's batcher (batch repetition, a shuffle per member,
the preset's input repetition) and the preset's loss, and adds the ``MIMOProgress`` callback, which sets the
progress (fadeout of the unmixing, CutMix ramp) from ``global_step / estimated_stepping_batches`` before every step.
Validation logs the ensemble's accuracy, NLL, ECE, Brier, disagreement and every member's accuracy; the test loop
adds adaptive / classwise ECE, AURC, entropies and OOD detection against the second test dataloader. Finally
``evaluate_uncertainty`` reports the same model under corruptions, with a temperature fitted on the validation
split, and draws a one-page figure when matplotlib is installed.

    python examples/lightning_wrn.py                       # WRN-10-1, M = 2, synthetic data, minutes on a CPU
    python examples/lightning_wrn.py --preset mixmo --epochs 20
    python examples/lightning_wrn.py --smoke               # seconds: a check that it runs

Needs the ``lightning`` extra: ``pip install "mixshare-layers[lightning]"``. Writes under ``--out-dir``: Lightning's
CSV logs, ``metrics.json`` (``{"val": ..., "test": ...}``, the last validation and the test metrics),
``uncertainty.json`` (the report of ``evaluate_uncertainty``) and, with matplotlib, ``uncertainty.png``; every value
is a fraction or nats per image, never a percent. ``main(argv)`` returns ``{"val": ..., "test": ..., "report": ...}``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mixshare_layers import MIMOWrapper, SyntheticImageDataset
from mixshare_layers.data import Normalize, random_crop_flip, synthetic_ood_dataset
from mixshare_layers.evaluation import evaluate_uncertainty, flatten_report
from mixshare_layers.files import write_json
from mixshare_layers.integrations.lightning import MIMOLightningModule
from mixshare_layers.models import wide_resnet

# defaults (override on the command line)
PRESET, M, DEPTH, WIDTH = "mixshare", 2, 10, 1
CLASSES, NOISE, TRAIN, VAL, TEST, OOD = 10, 5.5, 4000, 500, 1000, 1000
EPOCHS, ROWS, REPETITION, LR = 8, 64, 2, 0.05  # ROWS counts the repeated images of a step
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "jpeg_compression")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=PRESET)
    p.add_argument("--num-subnetworks", type=int, default=M)
    p.add_argument("--depth", type=int, default=DEPTH)
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--classes", type=int, default=CLASSES)
    p.add_argument("--noise", type=float, default=NOISE, help="pixel noise of the synthetic images")
    p.add_argument("--train-size", type=int, default=TRAIN)
    p.add_argument("--val-size", type=int, default=VAL, help="held out of the training images")
    p.add_argument("--test-size", type=int, default=TEST)
    p.add_argument("--ood-size", type=int, default=OOD)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--rows", type=int, default=ROWS, help="training rows per step, counting the repeats")
    p.add_argument("--batch-repetition", type=int, default=REPETITION)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated; empty for none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="runs/lightning_wrn")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one epoch: seconds")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.depth, args.width, args.classes = 10, 1, 4
        args.train_size, args.val_size, args.test_size, args.ood_size = 128, 32, 64, 64
        args.epochs, args.rows = 1, 32
        args.corruptions = "contrast"
    import lightning.pytorch as pl

    pl.seed_everything(args.seed, verbose=False)
    out_dir = Path(args.out_dir)

    # data: uint8 tensors, normalised when read; evaluate_uncertainty takes them raw, with the normalisation apart
    kw = dict(num_classes=args.classes, seed=args.seed, noise=args.noise)
    full = SyntheticImageDataset(args.train_size + args.val_size, train=True, **kw)
    normalize = Normalize.from_images(full.data[: args.train_size])  # per-channel mean and std of the training split

    def normalize_one(image: Tensor) -> Tensor:  # the datasets read one (C, H, W) image at a time
        return normalize(image[None])[0]

    full.transform = normalize_one
    train = torch.utils.data.Subset(full, range(args.train_size))
    val_idx = torch.arange(args.train_size, args.train_size + args.val_size)
    val = torch.utils.data.Subset(full, val_idx.tolist())
    test = SyntheticImageDataset(args.test_size, train=False, transform=normalize_one, **kw)
    ood = synthetic_ood_dataset(test, args.ood_size)  # classes the model never saw
    unique = max(1, args.rows // args.batch_repetition)
    loader = torch.utils.data.DataLoader
    backbone = wide_resnet(args.depth, args.width, num_classes=args.classes)
    model = MIMOWrapper(backbone, args.num_subnetworks, args.preset)

    def schedule(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
        warmup = max(1, total // 20)  # linear warmup, then cosine to 1 % of the peak

        def factor(s: int) -> float:
            return min(1.0, (s + 1) / warmup) * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    module = MIMOLightningModule(
        model,
        batch_repetition=args.batch_repetition,
        transform=random_crop_flip,  # random crop (zero padding 4) + flip, for every repeated copy of a batch
        optimizer=lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lr_scheduler=schedule,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=pl.loggers.CSVLogger(out_dir, name=""),
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=False,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader(train, batch_size=unique, shuffle=True, drop_last=True), loader(val, batch_size=256))
    val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    test_metrics = trainer.test(module, dataloaders=[loader(test, batch_size=256), loader(ood, batch_size=256)],
                                verbose=not args.smoke)[0]  # fmt: skip

    # clean, OOD and corrupted test images, with a temperature fitted on the validation split
    corruptions = [c for c in args.corruptions.split(",") if c]
    report = evaluate_uncertainty(
        model,
        (test.data, test.targets),  # uint8, corrupted in [0, 1], then normalised by preprocess
        ood={"synthetic": ood.data},
        val=(full.data[val_idx], full.targets[val_idx]),
        corruptions=corruptions,
        severities=(1, 3, 5) if not args.smoke else (5,),
        preprocess=normalize,
    )
    test_metrics = {k: float(v) for k, v in test_metrics.items()}
    write_json(out_dir / "metrics.json", {"val": val_metrics, "test": test_metrics})
    write_json(out_dir / "uncertainty.json", report)
    try:
        from mixshare_layers.evaluation import plot_uncertainty_report

        plot_uncertainty_report(report, out_dir / "uncertainty", title=f"{args.preset}, WRN-{args.depth}-{args.width}")
    except ImportError:
        print("matplotlib is not installed: no figure")
    flat = flatten_report(report)
    print(f"\ntemperature {report['temperature']:.3f} (fitted on {len(val_idx)} validation images, rule 'prob')")
    print(f"{'':<26}{'acc':>7}{'NLL':>8}{'ECE':>8}{'aECE':>8}{'AURC':>8}")
    rows = [("clean", "clean"), ("clean, calibrated", "calibrated/clean")]
    if corruptions:
        rows += [("corrupted (mean)", "shift_mean"), ("corrupted, calibrated", "calibrated/shift_mean")]
    for label, key in rows:
        values = [flat[f"{key}/{m}"] for m in ("ensemble_acc", "nll", "ece", "adaptive_ece", "aurc")]
        print(f"{label:<26}" + "".join(f"{v:>8.4f}" if i else f"{v:>7.4f}" for i, v in enumerate(values)))
    print("OOD AUROC: " + ", ".join(f"{s} {v['auroc']:.4f}" for s, v in report["ood"]["synthetic"].items()))
    return {"val": val_metrics, "test": test_metrics, "report": report}


if __name__ == "__main__":
    main()
