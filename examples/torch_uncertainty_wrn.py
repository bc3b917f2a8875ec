#!/usr/bin/env python
"""Train a MixShare Wide ResNet with torch-uncertainty's routine and trainer, and evaluate its OOD detection.

The model is a ``MIMOWrapper`` around the library's CIFAR WRN; ``MIMOClassificationRoutine`` makes it one of
torch-uncertainty's ensembles (estimator-major batches and logits, the preset's loss, progress per step), so
``TUTrainer`` trains it and torch-uncertainty's test loop reports its metrics: accuracy, NLL, Brier, (adaptive) ECE,
AURC, the ensemble's disagreement and mutual information, and OOD detection (AUROC, AUPR, FPR95) with the chosen
criterion. Data: the library's offline synthetic images (``SyntheticImageDataset``), with an OOD set of classes the
model never saw (``synthetic_ood_dataset``). At the end the same model is evaluated by
``mixshare_layers.evaluation.evaluate_uncertainty`` and the numbers the two libraries share are printed side by
side (they agree: both average member probabilities).

    python examples/torch_uncertainty_wrn.py                                  # WRN-10-1, M = 2, minutes on a CPU
    python examples/torch_uncertainty_wrn.py --ood-criterion msp --epochs 20
    python examples/torch_uncertainty_wrn.py --smoke                          # seconds: a check that it runs

Needs the ``torch-uncertainty`` extra: ``pip install "mixshare-layers[torch-uncertainty]"``. Writes under
``--out-dir``: the CSV logs, ``metrics.json`` (``{"test": {metric: value}}``, torch-uncertainty's test metrics) and
``uncertainty.json`` (the report of ``evaluate_uncertainty``); values are fractions (torch-uncertainty's console
table shows percents). ``main(argv)`` returns ``{"torch_uncertainty": {metric: value}, "mixshare_layers": report}``.
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
from mixshare_layers.evaluation import evaluate_uncertainty
from mixshare_layers.files import write_json
from mixshare_layers.integrations.torch_uncertainty import MIMOClassificationRoutine
from mixshare_layers.models import wide_resnet

# defaults (override on the command line)
PRESET, M, DEPTH, WIDTH = "mixshare", 2, 10, 1
CLASSES, NOISE, TRAIN, TEST, OOD = 10, 5.5, 4000, 1000, 1000
EPOCHS, ROWS, REPETITION = 8, 64, 2  # ROWS counts the repeated images of a step: ROWS / REPETITION unique ones
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=PRESET)
    p.add_argument("--num-subnetworks", type=int, default=M)
    p.add_argument("--depth", type=int, default=DEPTH)
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--classes", type=int, default=CLASSES)
    p.add_argument("--noise", type=float, default=NOISE, help="pixel noise of the synthetic images")
    p.add_argument("--train-size", type=int, default=TRAIN)
    p.add_argument("--test-size", type=int, default=TEST)
    p.add_argument("--ood-size", type=int, default=OOD)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--rows", type=int, default=ROWS, help="training rows per step, counting the repeats")
    p.add_argument("--batch-repetition", type=int, default=REPETITION)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--ood-criterion", default="mutual_information", help="msp, entropy, mutual_information, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="runs/torch_uncertainty_wrn", help="logs (CSV) go here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one epoch: seconds")
    return p


class Images(torch.utils.data.Dataset):
    """(normalised image, label) pairs from uint8 tensors."""

    def __init__(self, x: Tensor, y: Tensor, normalize: Normalize) -> None:
        self.x, self.y, self.normalize = x, y, normalize

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.normalize(self.x[i : i + 1])[0], self.y[i]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.depth, args.width, args.train_size, args.test_size, args.ood_size = 10, 1, 128, 64, 64
        args.epochs, args.rows, args.classes = 1, 32, 4
    from lightning.pytorch import seed_everything
    from lightning.pytorch.loggers import CSVLogger
    from torch_uncertainty import TUTrainer

    seed_everything(args.seed, verbose=False)

    # data: uint8 tensors, normalised in the datasets; crop + flip of every repeated copy in the batch format
    kw = dict(num_classes=args.classes, seed=args.seed, noise=args.noise)
    train = SyntheticImageDataset(args.train_size, train=True, **kw)
    test = SyntheticImageDataset(args.test_size, train=False, **kw)
    ood = synthetic_ood_dataset(test, args.ood_size)  # classes the model never saw
    normalize = Normalize.from_images(train.data)  # per-channel mean and std of the training images
    unique = max(1, args.rows // args.batch_repetition)

    def loader(ds: SyntheticImageDataset, shuffle: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            Images(ds.data, ds.targets, normalize), batch_size=unique if shuffle else 256, shuffle=shuffle,
            drop_last=shuffle,
        )  # fmt: skip

    backbone = wide_resnet(args.depth, args.width, num_classes=args.classes)
    model = MIMOWrapper(backbone, args.num_subnetworks, args.preset)
    steps = args.epochs * (args.train_size // unique)

    def optim_recipe(net: torch.nn.Module) -> dict[str, Any]:
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
        warmup = max(1, steps // 20)

        def factor(s: int) -> float:  # linear warmup, then cosine to 1 % of the peak
            return min(1.0, (s + 1) / warmup) * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    routine = MIMOClassificationRoutine(
        model,
        batch_repetition=args.batch_repetition,
        transform=random_crop_flip,  # random crop (zero padding 4) + flip, for every repeated copy of a batch
        optim_recipe=optim_recipe,
        eval_ood=True,
        ood_criterion=args.ood_criterion,
    )
    trainer = TUTrainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=CSVLogger(args.out_dir, name=""),
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(routine, loader(train, True))
    results = trainer.test(routine, dataloaders=[loader(test, False), loader(ood, False)], verbose=not args.smoke)[0]

    # the same model through mixshare_layers.evaluation (un-normalised images in, the normalisation as preprocess)
    report = evaluate_uncertainty(
        model, (test.data, test.targets), ood={"synthetic": ood.data}, corruptions=(), preprocess=normalize
    )
    ours = report["clean"]
    criterion = {"msp": "msp", "entropy": "expected_entropy", "mutual_information": "mutual_information"}
    pairs = [
        ("accuracy", results["test/cls/Acc"], ours["ensemble_acc"]),
        ("NLL (nats)", results["test/cls/NLL"], ours["nll"]),
        ("ECE", results["test/cal/ECE"], ours["ece"]),
        ("adaptive ECE", results["test/cal/aECE"], ours["adaptive_ece"]),
        ("AURC", results["test/sc/AURC"], ours["aurc"]),
        ("mutual information (nats)", results["test/ens_MI"], ours["mutual_information"]),
    ]
    if args.ood_criterion in criterion:
        ood_ours = report["ood"]["synthetic"][criterion[args.ood_criterion]]
        pairs += [(f"OOD {k.upper()} ({args.ood_criterion})", results[f"ood/{k.upper()}"], ood_ours[k])
                  for k in ("auroc", "aupr", "fpr95")]  # fmt: skip
    print(f"\n{'metric (fractions)':<40} {'torch-uncertainty':>18} {'mixshare_layers':>16}")
    for name, theirs, mine in pairs:
        print(f"{name:<40} {float(theirs):>18.4f} {float(mine):>16.4f}")
    theirs_all = {k: float(v) for k, v in results.items()}
    write_json(Path(args.out_dir) / "metrics.json", {"test": theirs_all})
    write_json(Path(args.out_dir) / "uncertainty.json", report)
    return {"torch_uncertainty": theirs_all, "mixshare_layers": report}


if __name__ == "__main__":
    main()
