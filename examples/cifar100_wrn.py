#!/usr/bin/env python
"""Train a MIMO / MixMo / MixShare Wide ResNet on CIFAR-100 with the MixShare paper's recipe, end to end.

Defaults are the paper's appendix (WRN-28-2, M = 2, the "mixshare" fadeout preset):

    batch 64 counting the repeats, batch repetition 2 (32 unique images per step), SGD Nesterov momentum 0.9,
    lr = 0.1 x (unique images per step) / 128 = 0.025, linear warmup over the first epoch, x0.1 at 25 / 50 / 75 %
    of training (epochs 75 / 150 / 225 of 300), weight decay 6e-4 on every parameter (MixMo's l2 of 3e-4 as a loss
    term), fadeout of the unmixing to 1/3 of training (epoch 100), input repetition from the preset (10 % for
    MixShare), random crop (padding 4) and horizontal flip drawn independently for every repeated copy, progress
    (fadeout, CutMix ramp) updated every step from step / total steps.

Usage:
    python examples/cifar100_wrn.py --data-dir ~/data --download                # the paper's setting, 300 epochs
    python examples/cifar100_wrn.py --method mixmo --width 5 --seed 1           # another Table 1 cell
    python examples/cifar100_wrn.py --quick                                     # minutes on a CPU, synthetic data
    python examples/cifar100_wrn.py --resume runs/mixshare-wrn28-2-s0-...       # continue a stopped or killed run
    torchrun --nproc_per_node=4 examples/cifar100_wrn.py --data-dir ~/data      # DistributedDataParallel

``--method``: ``single`` (the plain WRN, no MIMO), ``mimo``, ``mixmo``, ``unmix``, ``unmix-aligned``, ``mixshare``,
``mixshare-partial`` (the library's presets; any preset field can be overridden, e.g. ``--fadeout-end 0.5``).

Every run writes to ``<out-dir>/<run-name>/``: ``config.json`` (every hyper-parameter, as resolved),
``metrics.csv`` (one row per epoch), ``checkpoint.pt`` (after every epoch), ``checkpoint.prev.pt`` (the one before),
``summary.json`` (the final metrics), and ``tensorboard/`` when TensorBoard is installed. The last epoch is what
gets reported (no model selection on the test set); ``--val-split`` holds out training images to select on instead.

Distribution shift (``--shift-eval``, on by default, off for ``--smoke``): at the end of the run the test set is
evaluated again under corruptions (``--shift-corruptions`` x ``--shift-severities`` of
``mixshare_layers.evaluation.shift``,
applied on the fly on the device, deterministic from ``--data-seed``) and against an OOD set (``--ood``: for
synthetic data, images of classes the model never saw; for CIFAR-100, SVHN's test split when ``--data-dir`` holds
``test_32x32.mat`` or with ``--download``), through ``mixshare_layers.evaluation.evaluate_uncertainty``: accuracy,
NLL, ECE, adaptive ECE, Brier, AURC, mean confidence, disagreement and mutual information per corruption and
severity, and OOD AUROC / AUPR / FPR95 from the max probability, the entropy and the mutual information between
members; with ``--val-split``, again at the temperature fitted on the validation images. It writes
``uncertainty.json`` (the whole report), ``shift.csv`` and ``ood.csv`` (one row per shift / per score) and, with
matplotlib, ``uncertainty.png`` (reliability diagram, accuracy and ECE against severity, OOD AUROC).

Units: in ``metrics.csv``, ``shift.csv``, ``ood.csv`` and TensorBoard, accuracies, ECE, disagreement, AUROC / AUPR /
FPR95 and sharing rates are percentages (columns ending in ``_pct``), NLL, losses and entropies nats per image
(``_nats``), Brier a score in [0, 2]; values are rounded to 4 significant digits.

Checkpoints (``mixshare_layers.checkpoint``) hold tensors and plain values only, the run's config and the model's
recipe included (``mixshare_layers.checkpoint.load_model`` and ``python -m mixshare_layers.analysis`` rebuild the
model from it), and a SHA-256 digest of the file: they load with ``weights_only=True`` and nothing else, a damaged
file is refused (never trained from), and each new one is written to a temporary file, verified, and only then
renamed over the last, whose verified predecessor stays as ``checkpoint.prev.pt``. ``--resume RUN`` continues from
``RUN/checkpoint.pt``; ``--resume FILE`` from exactly that file (e.g. ``RUN/checkpoint.prev.pt`` when the last one
is damaged, as the error then says). A run that cannot start (a bad option, missing data, a folder that cannot be
written) prints one line, exits with code 2 and leaves nothing on disk.

``main(argv)`` runs the script in-process and returns the summary (also saved as ``summary.json``). Its keys:

    ensemble_acc, mean_individual_acc   ensemble / mean member top-1 accuracy on the test set, percent
    individual_acc                      list of M member accuracies, percent
    collapsed_members                   members whose accuracy stayed near chance while another learned
                                        (mixshare_layers.evaluation.metrics.collapsed_members; also printed as a warning
                                        at every evaluation)
    nll                                 negative log-likelihood of the ensemble, nats per image
    ece                                 expected calibration error, 15 bins, fraction in [0, 1]
    mean_confidence                     mean top-1 probability of the ensemble, percent (compare: ensemble_acc)
    brier                               Brier score summed over classes, per image, in [0, 2]
    disagreement                        mean pairwise top-1 disagreement of the members, percent
    classifier_sharing, encoder_sharing sharing rates of paper Sec. 2, percent, per-feature min/max averaged over
                                        the features (None for "single"); *_sum_ratio: the histogram-overlap reading
    ensemble_rule                       "prob" (mean of probabilities) or "logit" (mean of logits)
    epochs, steps, method, seed, depth, width, num_subnetworks, dataset, world_size, run_dir,
    train_time_s, images_per_s          the run (images/s counts the repeated rows the network sees)
    val                                 the same metrics on the held-out split (None without --val-split)
    stopped_early                       True when --stop-epoch ended the run before --epochs
    rank_max_abs_diff                   distributed runs: largest difference of any weight across ranks (0.0)
    shift                               the shift evaluation (None without it): "clean" and "corruption_mean"
                                        {ensemble_acc_pct, mean_individual_acc_pct, nll_nats, ece_pct}, "ood"
                                        {set: {score: {auroc_pct, aupr_pct, fpr95_pct}}}, "temperature" and
                                        "calibrated_clean" (the clean test set at it; None without --val-split)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import io
import json
import math
import os
import random
import sys
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixshare_layers import PRESETS, MIMOBatcher, MIMOConfig, MIMOWrapper, get_preset
from mixshare_layers.checkpoint import (
    WRN_BUILDER,
    CheckpointError,
    ModelRecipe,
    load_checkpoint,
    previous_checkpoint_path,
    save_checkpoint,
    verify_checkpoint,
)
from mixshare_layers.checkpoint.files import folder_problem
from mixshare_layers.evaluation.metrics import EnsembleMetrics, collapsed_members
from mixshare_layers.evaluation.shift import CORRUPTIONS, SEVERITIES
from mixshare_layers.functional.ensemble import ensemble_probs
from mixshare_layers.models import wide_resnet

METHODS = ("single", *PRESETS)
DATASETS, DATA_PATHS = ("cifar100", "synthetic"), ("device", "loader")
RULES, AMPS = ("prob", "logit"), ("off", "bf16", "fp16")
LR_SCHEDULES = ("step", "cosine")
SUMMARY_METRICS = ("ensemble_acc", "mean_individual_acc", "nll", "ece", "brier", "disagreement")
CKPT_NAME = "checkpoint.pt"
PREV_NAME = previous_checkpoint_path(CKPT_NAME).name  # checkpoint.prev.pt: the verified one before
CKPT_KEYS = ("epoch", "step", "model", "optimizer", "scheduler", "scaler", "rng", "history")
# options that describe how to run, not what to train: never restored from a resumed run's config
RUNTIME_KEYS = ("resume", "stop_epoch", "benchmark", "quick", "smoke", "device")
SEED_LIMIT = 2**32
# the end-of-run evaluation under distribution shift: a few cheap families of
# mixshare_layers.evaluation.shift, three severities
SHIFT_CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "jpeg_compression", "contrast")
SHIFT_SEVERITIES = (1, 3, 5)
OOD_CHOICES = ("auto", "synthetic", "svhn", "none")
SVHN_FILE = "test_32x32.mat"

# --quick: the README's main job, a few minutes on a 2-core CPU; --smoke: seconds, for CI
QUICK = dict(
    dataset="synthetic",
    synthetic_train=4000,
    synthetic_test=1000,
    synthetic_classes=10,
    synthetic_noise=2.5,  # hard enough that members, ensemble and shifts differ once the schedule lets it learn
    depth=10,
    width=1,
    epochs=5,
    eval_every=1,
    lr_schedule="cosine",  # 5 epochs: the paper's steps would leave the last 1.25 at 1/1000 of the peak lr
    val_split=0.1,  # 400 held-out images: the temperature of the shift evaluation is fitted on them
)
SMOKE = dict(
    dataset="synthetic",
    synthetic_train=96,
    synthetic_test=64,
    synthetic_classes=10,
    synthetic_size=16,
    depth=10,
    width=1,
    epochs=1,
    batch_size=32,
    eval_every=0,
    eval_batch_size=64,
    tensorboard=False,
    progress=False,
    shift_eval=False,
)


class UserError(Exception):
    """A problem the user can fix from the command line (printed as one line by the script)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """The dataset files are missing (and ``--download`` was not given)."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite (the last complete checkpoint is left untouched)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) with exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------
def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.25,0.5,0.75, got {text!r}") from err
    if any(not 0.0 < v < 1.0 for v in values) or values != sorted(values):
        raise argparse.ArgumentTypeError(f"milestones must be increasing fractions in (0, 1), got {text!r}")
    return values


def _corruptions(text: str) -> list[str]:
    names = [v for v in text.replace(",", " ").split() if v]
    unknown = [v for v in names if v not in CORRUPTIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected names among {', '.join(CORRUPTIONS)}, got {text!r}")
    return names


def _severities(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected severities like 1,3,5, got {text!r}") from err
    if not values or any(v not in SEVERITIES for v in values) or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"severities must be increasing integers in 1..5, got {text!r}")
    return values


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The command line. With ``suppress``, options not given are absent (to tell what the user set)."""
    p = OneLineParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS if suppress else None,
    )

    def add(*names: str, **kw: Any) -> None:
        if suppress:
            kw.pop("default", None)
        p.add_argument(*names, **kw)

    # -- mode
    add("--quick", action="store_true", default=False, help="small WRN, few epochs, synthetic data (a few minutes)")
    add("--smoke", action="store_true", default=False, help="seconds-long run for CI")
    add("--resume", type=str, default=None, help="run directory, or the checkpoint file, to continue from")
    add("--stop-epoch", type=int, default=0, help="stop after this epoch as if interrupted (0: train to the end)")
    add("--benchmark", type=int, default=0, help="time N steps of the pipeline vs the bare model step, then exit")
    # -- data
    add("--dataset", choices=DATASETS, default="cifar100")
    add("--data-dir", type=str, default="./data", help="folder holding cifar-100-python/")
    add("--download", action="store_true", default=False, help="download CIFAR-100 into --data-dir if missing")
    add("--synthetic-train", type=int, default=50000, help="synthetic training images")
    add("--synthetic-test", type=int, default=10000, help="synthetic test images")
    add("--synthetic-classes", type=int, default=100)
    add("--synthetic-size", type=int, default=32, help="synthetic image side")
    add("--synthetic-noise", type=float, default=2.5, help="pixel noise of the synthetic data (higher: harder)")
    add("--data-seed", type=int, default=0, help="seed of the synthetic data and of the validation split")
    add("--val-split", type=float, default=0.0, help="fraction of training images held out for validation")
    add(
        "--data-path",
        choices=DATA_PATHS,
        default="device",
        help="device: whole dataset as uint8 on the training device; loader: DataLoader with workers",
    )
    add("--workers", type=int, default=4, help="DataLoader workers (loader path)")
    # -- model
    add("--method", choices=METHODS, default="mixshare")
    add("--num-subnetworks", type=int, default=2, help="M")
    add("--depth", type=int, default=28)
    add("--width", type=int, default=2)
    for f in dataclasses.fields(MIMOConfig):  # every preset field, default None = the preset's value
        kind = {"bool": _bool, "str": str, "float": float}.get(str(f.type), _optional(float))
        add(f"--{f.name.replace('_', '-')}", type=kind, default=None, help=f"override the preset's {f.name}")
    # -- optimisation
    add("--epochs", type=int, default=300)
    add("--batch-size", type=int, default=64, help="training rows per step and process, counting the repeats")
    add("--batch-repetition", type=int, default=2)
    add("--base-lr", type=float, default=0.1, help="lr per 128 unique images per step")
    add("--lr", type=_optional(float), default=None, help="peak lr (default: base-lr x unique images / 128)")
    add("--momentum", type=float, default=0.9)
    add("--nesterov", type=_bool, default=True)
    add("--weight-decay", type=float, default=6e-4, help="SGD weight decay on every parameter (= 2 x MixMo's l2)")
    add("--warmup-epochs", type=float, default=1.0)
    add(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="step",
        help="after the warmup: step = x --lr-gamma at each of --milestones (the paper's); cosine = half a cosine "
        "from the peak to 0 at the end of training (--quick's)",
    )
    add("--milestones", type=_fractions, default=[0.25, 0.5, 0.75], help="lr decay points, fractions of training")
    add("--lr-gamma", type=float, default=0.1)
    add("--label-smoothing", type=float, default=0.0)
    add("--seed", type=int, default=0)
    # -- evaluation and logging
    add("--ensemble-rule", choices=RULES, default="prob")
    add("--eval-every", type=int, default=10, help="evaluate every N epochs (0: only at the end)")
    add("--eval-batch-size", type=int, default=500)
    add("--log-every", type=int, default=25, help="steps between loss checks / bar updates (one host sync)")
    add(
        "--shift-eval",
        type=_bool,
        default=True,
        help="at the end, evaluate on corrupted test images and an OOD set (uncertainty.json, shift.csv, ood.csv)",
    )
    add(
        "--shift-corruptions",
        type=_corruptions,
        default=list(SHIFT_CORRUPTIONS),
        help=f"corruption families (mixshare_layers.evaluation.shift: {', '.join(CORRUPTIONS)})",
    )
    add("--shift-severities", type=_severities, default=list(SHIFT_SEVERITIES), help="severities among 1..5")
    add(
        "--ood",
        choices=OOD_CHOICES,
        default="auto",
        help="OOD set: auto = synthetic images of unseen classes for --dataset synthetic, SVHN's test split for "
        f"cifar100 when --data-dir holds {SVHN_FILE} (or with --download; needs scipy), else none",
    )
    add("--ood-samples", type=int, default=0, help="OOD images (0: as many as the test set / all of SVHN's test)")
    add("--out-dir", type=str, default="runs")
    add("--run-name", type=str, default=None, help="default: <method>-wrn<depth>-<width>-s<seed>-<time>")
    add("--tensorboard", type=_bool, default=True, help="write TensorBoard logs (skipped if not installed)")
    add("--progress", type=_bool, default=True, help="show a tqdm progress bar")
    # -- speed
    add("--device", type=str, default="auto", help="auto (cuda, then mps, then cpu) or a torch device")
    add("--amp", choices=AMPS, default="off")
    add("--channels-last", type=_bool, default=False)
    add("--compile", type=_bool, default=False)
    return p


def parse_config(argv: Sequence[str] | None) -> tuple[dict[str, Any], set[str]]:
    """Resolve the command line into a config dict and the set of option names the user gave."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = vars(build_parser().parse_args(argv))
    given = set(vars(build_parser(suppress=True).parse_args(argv)))
    if cfg["quick"] and cfg["smoke"]:
        raise UserError("--quick and --smoke are exclusive: pick one")
    mode = QUICK if cfg["quick"] else SMOKE if cfg["smoke"] else {}
    for key, value in mode.items():
        if key not in given:
            cfg[key] = value
    return cfg, given


def _opt(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_config(cfg: dict[str, Any]) -> None:
    """Every option checked before anything is loaded, built or written (a ``UserError`` naming the option)."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    def at_least(key: str, low: int) -> None:
        need(cfg[key] >= low, f"{_opt(key)} must be >= {low}, got {cfg[key]}")

    def real(key: str, low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False) -> None:
        v = cfg[key]
        ok = math.isfinite(v) and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
        interval = ("(" if open_low else "[") + f"{low:g}, {high:g}" + (")" if open_high or high == math.inf else "]")
        need(ok, f"{_opt(key)} must be a finite number in {interval}, got {v:g}")

    choices = {
        "method": METHODS,
        "dataset": DATASETS,
        "data_path": DATA_PATHS,
        "ensemble_rule": RULES,
        "amp": AMPS,
        "ood": OOD_CHOICES,
        "lr_schedule": LR_SCHEDULES,
    }
    for key, allowed in choices.items():  # argparse checks them on the command line; a resumed config too
        need(cfg[key] in allowed, f"{_opt(key)} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    for key in ("epochs", "batch_repetition", "num_subnetworks", "log_every", "eval_batch_size", "width"):
        at_least(key, 1)
    for key in ("stop_epoch", "benchmark", "eval_every", "workers", "ood_samples"):
        at_least(key, 0)
    for key in ("synthetic_train", "synthetic_test"):
        at_least(key, 1)
    at_least("synthetic_classes", 2)
    at_least("synthetic_size", 4)
    for key in ("seed", "data_seed"):
        need(0 <= cfg[key] < SEED_LIMIT, f"{_opt(key)} must be in [0, 2**32), got {cfg[key]}")
    need(
        cfg["batch_size"] >= cfg["batch_repetition"] and cfg["batch_size"] % cfg["batch_repetition"] == 0,
        f"--batch-size ({cfg['batch_size']}) must be a positive multiple of --batch-repetition "
        f"({cfg['batch_repetition']}): it counts the repeated rows",
    )
    need(
        cfg["depth"] >= 10 and (cfg["depth"] - 4) % 6 == 0,
        f"--depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {cfg['depth']}",
    )
    corruptions, severities = cfg["shift_corruptions"], cfg["shift_severities"]  # a resumed config: check again
    need(
        isinstance(corruptions, list) and bool(corruptions) and all(c in CORRUPTIONS for c in corruptions),
        f"--shift-corruptions must name families among {', '.join(CORRUPTIONS)}, got {corruptions!r}",
    )
    need(
        isinstance(severities, list) and bool(severities) and all(v in SEVERITIES for v in severities),
        f"--shift-severities must be integers in 1..5, got {severities!r}",
    )
    need(
        cfg["ood"] != "synthetic" or cfg["dataset"] == "synthetic",
        "--ood synthetic makes unseen classes of the synthetic data, so it needs --dataset synthetic; for "
        "cifar100 use --ood svhn (or auto, or none)",
    )
    real("val_split", 0.0, 1.0, open_high=True)
    real("synthetic_noise", 0.0)
    real("base_lr", 0.0, open_low=True)
    if cfg["lr"] is not None:
        real("lr", 0.0, open_low=True)
    real("momentum", 0.0, 1.0, open_high=True)
    need(not cfg["nesterov"] or cfg["momentum"] > 0, "--nesterov true needs a --momentum above 0 (or --nesterov false)")
    real("weight_decay", 0.0)
    real("warmup_epochs", 0.0)
    real("lr_gamma", 0.0, open_low=True)
    real("label_smoothing", 0.0, 1.0)
    name = cfg["run_name"]
    if name is not None:
        need(
            name not in ("", ".", "..") and "/" not in name and os.sep not in name and (os.altsep or "/") not in name,
            f"--run-name must be a plain folder name (no path separator, not '.' or '..'), got {name!r}",
        )
    if cfg["method"] == "single":
        need(cfg["num_subnetworks"] in (1, 2), "--method single is the plain backbone: leave --num-subnetworks out")
        overridden = [f.name for f in dataclasses.fields(MIMOConfig) if cfg[f.name] is not None]
        need(not overridden, f"--method single has no MIMO options, but got {', '.join(overridden)}")
        return
    preset = get_preset(cfg["method"])
    for key, value in preset_overrides(cfg).items():  # each override alone, so that the message names its option
        try:
            preset.replace(**{key: value})
        except (TypeError, ValueError) as err:
            raise UserError(f"{_opt(key)} {value}: {err}") from err


def pick_device(name: str, local_rank: int) -> torch.device:
    """The training device for ``--device name`` (``UserError`` if it is not a device that exists here)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise UserError("--device meta holds no values: use auto, cpu, cuda, cuda:N or mps")
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise UserError(f"--device {name}: no {device.type} device is available here: use --device cpu (or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise UserError(f"--device {name}: device index {device.index}, but there are {count} {device.type} devices")
    return device


def preset_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    return {f.name: cfg[f.name] for f in dataclasses.fields(MIMOConfig) if cfg[f.name] is not None}


# ----------------------------------------------------------------------------------------------------------------
# small utilities: atomic files, distributed helpers
# ----------------------------------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync, then ``os.replace`` (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


class Dist:
    """Rank / world size and the few collectives the script needs (all no-ops in a single process)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.owned = False

    def init(self, device: torch.device) -> None:
        if self.enabled and not self.dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            self.dist.init_process_group(backend, **kwargs)
            self.owned = True

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            # Free the DDP wrapper and its reducer (kept alive by reference cycles of the run's closures) while the
            # interpreter is fully alive: a gloo process group torn down during interpreter finalisation can abort
            # the process ("terminate called without an active exception"; seen once in 2-process CPU CI runs).
            gc.collect()
            self.dist.destroy_process_group()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            self.dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def max_(self, t: Tensor) -> Tensor:
        if self.enabled:
            self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return t


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    train_x: Tensor  # (N, C, H, W) uint8, CPU
    train_y: Tensor  # (N,) int64
    test_x: Tensor
    test_y: Tensor
    val_x: Tensor | None
    val_y: Tensor | None
    num_classes: int
    ood: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # OOD sets for the shift evaluation, uint8


def _cifar_missing_message(data_dir: str) -> str:
    return (
        f"CIFAR-100 not found in --data-dir {data_dir!r} (expected {os.path.join(data_dir, 'cifar-100-python')}/"
        "{train,test,meta}): point --data-dir at the folder that holds cifar-100-python/, or add --download"
    )


def load_cifar100(data_dir: str, download: bool, dist: Dist) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    try:
        from torchvision.datasets import CIFAR100
    except ImportError as err:
        raise UserError(
            "--dataset cifar100 needs torchvision: pip install torchvision (or mixshare-layers[examples]); "
            "--dataset synthetic runs without it"
        ) from err
    folder = Path(data_dir) / CIFAR100.base_folder
    present = all((folder / name).is_file() for name in ("train", "test", "meta"))
    if not present and not download:
        raise DataNotFoundError(_cifar_missing_message(data_dir))
    if download and not present:
        if dist.main:
            CIFAR100(data_dir, train=True, download=True)
        dist.barrier()
    try:
        # torchvision checks the md5 of every file against its published sums, then unpickles them
        train = CIFAR100(data_dir, train=True, download=False)
        test = CIFAR100(data_dir, train=False, download=False)
    except RuntimeError as err:  # torchvision's "not found or corrupted"
        raise DataNotFoundError(f"{_cifar_missing_message(data_dir)} (torchvision said: {err})") from err

    def as_tensor(ds: Any) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) HWC -> (N, 3, 32, 32)
        return x, torch.as_tensor(ds.targets, dtype=torch.int64)

    return (*as_tensor(train), *as_tensor(test), len(train.classes))


def load_data(cfg: dict[str, Any], dist: Dist) -> Data:
    reference = None  # the synthetic test set: the OOD set is made of its kind
    if cfg["dataset"] == "cifar100":
        train_x, train_y, test_x, test_y, k = load_cifar100(cfg["data_dir"], cfg["download"], dist)
    else:
        from mixshare_layers.data import SyntheticImageDataset

        kw = dict(
            num_classes=cfg["synthetic_classes"],
            image_size=cfg["synthetic_size"],
            seed=cfg["data_seed"],
            noise=cfg["synthetic_noise"],
        )
        train = SyntheticImageDataset(cfg["synthetic_train"], train=True, **kw)
        test = SyntheticImageDataset(cfg["synthetic_test"], train=False, **kw)
        train_x, train_y, test_x, test_y, k = train.data, train.targets, test.data, test.targets, train.num_classes
        reference = test
    val_x = val_y = None
    if cfg["val_split"] > 0:
        n = train_x.shape[0]
        n_val = max(1, round(cfg["val_split"] * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["data_seed"] + 7919))
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        train_x, train_y = train_x[train_idx], train_y[train_idx]
    ood = load_ood(cfg, dist, reference if cfg["dataset"] == "synthetic" else None, test_x.shape[0])
    return Data(train_x, train_y, test_x, test_y, val_x, val_y, k, ood)


def load_ood(cfg: dict[str, Any], dist: Dist, reference: Any, num_test: int) -> dict[str, Tensor]:
    """The OOD set of the end-of-run shift evaluation, ``{name: (N, C, H, W) uint8}`` (empty: none).

    ``synthetic``: :func:`mixshare_layers.data.synthetic_ood_dataset`, images of the training data's kind whose
    classes the model never saw; ``svhn``: SVHN's test split (:func:`mixshare_layers.data.load_svhn`, torchvision
    and scipy). ``auto`` picks the first for synthetic data, the second for CIFAR-100 when it is at hand, and
    otherwise says why there is no OOD evaluation. Sets ``cfg["ood_resolved"]``.
    """
    cfg["ood_resolved"] = None
    choice = cfg["ood"]
    if not cfg["shift_eval"] or choice == "none" or cfg["benchmark"]:
        return {}
    if choice == "auto":
        choice = "synthetic" if cfg["dataset"] == "synthetic" else "svhn"
    n = cfg["ood_samples"] or None
    if choice == "synthetic":
        from mixshare_layers.data import synthetic_ood_dataset

        cfg["ood_resolved"] = "synthetic"
        return {"synthetic": synthetic_ood_dataset(reference, n or num_test).data}
    import importlib.util

    explicit = cfg["ood"] == "svhn"
    path = Path(cfg["data_dir"]) / SVHN_FILE
    problem = None
    if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("scipy") is None:
        problem = "SVHN needs torchvision and scipy (pip install torchvision scipy)"
    elif not path.is_file() and not cfg["download"]:
        problem = f"no SVHN test split in --data-dir (expected {path}): add --download, or place the file there"
    if problem is not None:
        if explicit:
            raise DataNotFoundError(f"--ood svhn: {problem}; or pick --ood none")
        if dist.main:
            print(f"note: no OOD evaluation: {problem} (or --ood none to silence this)", flush=True)
        return {}
    from mixshare_layers.data import load_svhn

    try:
        if cfg["download"] and not path.is_file():
            if dist.main:
                load_svhn(cfg["data_dir"], "test", download=True)
            dist.barrier()
        images, _ = load_svhn(cfg["data_dir"], "test")
    except (FileNotFoundError, RuntimeError, OSError, ValueError) as err:
        raise DataNotFoundError(f"--ood: SVHN in --data-dir {cfg['data_dir']!r} cannot be read ({err})") from err
    cfg["ood_resolved"] = "svhn"
    return {"svhn": images[:n] if n else images}


class EpochSampler(torch.utils.data.Sampler[int]):
    """This rank's share of a seeded permutation of ``n`` indices, new every epoch, same on every rank.

    The permutation depends only on (seed, epoch), so a resumed run sees exactly the batches it would have seen;
    rank ``r`` of ``w`` takes positions ``r, r + w, ...`` after dropping the tail that doesn't divide evenly.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.n // self.world
        return perm[: per_rank * self.world][self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.n // self.world


class _UInt8Images(torch.utils.data.Dataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator | None) -> Tensor:
    """Random crop with zero padding and a random horizontal flip, independently per image, on ``x``'s device.

    Shape:
        - ``x``: ``(N, C, H, W)`` (any dtype, uint8 here) -> ``(N, C, H, W)``.
    """
    n, _, h, w = x.shape
    dev = x.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), device=dev, generator=generator)
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=dev)  # (N, H) source rows in the padded image
    cols = offsets[1, :, None] + torch.arange(w, device=dev)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: (N, H, W, C)
    return out.permute(0, 3, 1, 2)


class Normalize:
    """uint8 images -> float, standardised per channel with the training set's mean and std."""

    def __init__(self, train_x: Tensor, device: torch.device, channels_last: bool) -> None:
        c = train_x.shape[1]
        total, squares = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        for chunk in train_x.split(4096):  # chunks: a float64 copy of all of CIFAR would take 1.2 GB
            xs = chunk.double().transpose(0, 1).reshape(c, -1)
            total += xs.sum(dim=1)
            squares += xs.square().sum(dim=1)
        n = train_x.numel() / c
        mean = total / n / 255
        std = (squares / n - (total / n).square()).clamp_min(1e-12).sqrt() / 255
        self.scale = (1 / (255 * std)).float().view(1, -1, 1, 1).to(device)
        self.shift = (-mean / std).float().view(1, -1, 1, 1).to(device)
        self.unit_scale = self.scale * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale).contiguous(memory_format=self.memory_format)

    def unit(self, x: Tensor) -> Tensor:
        """The same for float images in [0, 1] (what the corruptions of the shift evaluation return)."""
        return torch.addcmul(self.shift, x, self.unit_scale).contiguous(memory_format=self.memory_format)


# ----------------------------------------------------------------------------------------------------------------
# model, optimiser, schedule
# ----------------------------------------------------------------------------------------------------------------
def build_model(cfg: dict[str, Any], num_classes: int, device: torch.device) -> nn.Module:
    backbone = wide_resnet(cfg["depth"], cfg["width"], num_classes=num_classes)
    if cfg["method"] == "single":
        model: nn.Module = backbone
    else:
        try:
            model = MIMOWrapper(backbone, cfg["num_subnetworks"], preset=cfg["method"], **preset_overrides(cfg))
        except (TypeError, ValueError) as err:  # a preset override out of range: say it as a command-line error
            raise UserError(str(err)) from err
    model = model.to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return model


def model_recipe(cfg: dict[str, Any], model: nn.Module, num_classes: int) -> dict[str, Any] | None:
    """The checkpoint's recipe of the wrapped WRN (plain values), or None for ``--method single`` (no wrapper)."""
    if not isinstance(model, MIMOWrapper):
        return None
    kwargs = {"depth": cfg["depth"], "width": cfg["width"], "num_classes": num_classes}
    return ModelRecipe.of(model, WRN_BUILDER, kwargs).to_dict()


class LRSchedule:
    """Per-step lr factor: linear warmup to 1 over ``warmup_steps``, then either ``gamma`` at each milestone step
    (``kind="step"``) or half a cosine from 1 at the end of the warmup to 0 at ``total_steps`` (``kind="cosine"``)."""

    def __init__(
        self,
        warmup_steps: int,
        milestone_steps: list[int],
        gamma: float,
        *,
        kind: str = "step",
        total_steps: int | None = None,
    ) -> None:
        if kind not in LR_SCHEDULES:
            raise ValueError(f"kind must be one of {', '.join(LR_SCHEDULES)}, but got {kind!r}")
        if kind == "cosine" and (total_steps is None or total_steps < 1):
            raise ValueError(f"the cosine schedule needs total_steps >= 1, but got {total_steps!r}")
        self.warmup_steps = warmup_steps
        self.milestone_steps = milestone_steps
        self.gamma = gamma
        self.kind = kind
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.kind == "step":
            return warm * self.gamma ** sum(step >= m for m in self.milestone_steps)
        assert self.total_steps is not None
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return warm * 0.5 * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, cfg: dict[str, Any], ctx: dict[str, Any], dist: Dist
) -> dict[str, Any]:
    """Metrics of ``model`` on ``(x, y)`` (this rank evaluates every ``world``-th image; sums all-reduced)."""
    device, normalize, m = ctx["device"], ctx["normalize"], ctx["m"]
    was_training = model.training
    model.eval()
    acc = EnsembleMetrics(m, cfg["ensemble_rule"], device=device)
    confidence = torch.zeros((), dtype=torch.float64, device=device)  # sum of the ensemble's top-1 probabilities
    idx = torch.arange(dist.rank, x.shape[0], dist.world)
    for chunk in idx.split(cfg["eval_batch_size"]):
        xb = normalize(x[chunk.to(x.device)].to(device, non_blocking=True))
        yb = y[chunk.to(y.device)].to(device, non_blocking=True)
        with ctx["autocast"]():
            logits = model(xb)
        logits = (logits.unsqueeze(1) if logits.dim() == 2 else logits).float()
        acc.update(logits, yb)
        confidence += ensemble_probs(logits, cfg["ensemble_rule"]).amax(dim=-1).double().sum()
    acc.all_reduce()
    if dist.enabled:
        dist.dist.all_reduce(confidence)
    model.train(was_training)
    out = acc.compute()
    pct = {k: 100.0 * out[k] for k in ("ensemble_acc", "mean_individual_acc", "disagreement")}
    return {
        **out,
        **pct,
        "mean_confidence": 100.0 * float(confidence) / max(int(out["count"]), 1),  # percent
        "individual_acc": [100.0 * a for a in out["individual_acc"]],  # type: ignore[union-attr]
        "collapsed_members": collapsed_members(out["individual_acc"], ctx["num_classes"]),  # type: ignore[arg-type]
        "num_classes": ctx["num_classes"],
        **model_sharing_rates(model),
    }


def collapse_warning(res: dict[str, Any], split: str) -> str | None:
    """The evaluation-time warning for collapsed members (None when every member is healthy)."""
    bad = res["collapsed_members"]
    if not bad:
        return None
    accs = res["individual_acc"]
    healthy = [i for i in range(len(accs)) if i not in bad]
    return (
        f"WARNING: {split}: member(s) {', '.join(str(i) for i in bad)} collapsed: accuracy "
        f"{' / '.join(f'{accs[i]:.2f}' for i in bad)} % near chance ({100 / res['num_classes']:.2f} %) while member(s) "
        f"{', '.join(str(i) for i in healthy)} reached {' / '.join(f'{accs[i]:.2f}' for i in healthy)} %; the ensemble "
        "is carried by the healthy ones"
    )


SHARING_KEYS = ("classifier_sharing", "encoder_sharing", "classifier_sharing_sum_ratio", "encoder_sharing_sum_ratio")


def model_sharing_rates(model: nn.Module) -> dict[str, float | None]:
    """Sharing rates of paper Sec. 2 in percent (None for a plain network or non-convolution encoders)."""
    out: dict[str, float | None] = dict.fromkeys(SHARING_KEYS)
    if isinstance(model, MIMOWrapper) and model.num_subnetworks >= 2:
        from mixshare_layers.analysis import sharing_rates

        rates = sharing_rates(model)  # {"classifier", "classifier_sum_ratio", "encoder", "encoder_sum_ratio"}
        names = dict(
            zip(("classifier", "encoder", "classifier_sum_ratio", "encoder_sum_ratio"), SHARING_KEYS, strict=True)
        )
        out.update({names[k]: v for k, v in rates.items() if k in names})
    return out


# ----------------------------------------------------------------------------------------------------------------
# distribution shift: corrupted test images and an OOD set, at the end of the run
# ----------------------------------------------------------------------------------------------------------------
# (report key, CSV column, factor): fractions in percent, NLL and entropies in nats per image, Brier as is
SHIFT_COLUMNS = (
    ("ensemble_acc", "ensemble_acc_pct", 100.0),
    ("mean_individual_acc", "mean_individual_acc_pct", 100.0),
    ("nll", "nll_nats", 1.0),
    ("ece", "ece_pct", 100.0),
    ("adaptive_ece", "adaptive_ece_pct", 100.0),
    ("brier", "brier", 1.0),
    ("aurc", "aurc_pct", 100.0),
    ("mean_confidence", "mean_confidence_pct", 100.0),
    ("disagreement", "disagreement_pct", 100.0),
    ("mutual_information", "mutual_information_nats", 1.0),
)
OOD_SCORES = (("msp", "max probability"), ("entropy", "entropy"), ("mutual_information", "mutual information"))
OOD_COLUMNS = (("auroc", "auroc_pct"), ("aupr", "aupr_pct"), ("fpr95", "fpr95_pct"))


class _Autocast(nn.Module):
    """``model`` run under the run's autocast (the corruptions outside it stay in float32)."""

    def __init__(self, model: nn.Module, autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, x: Tensor) -> Tensor:
        with self.autocast():
            return self.model(x)


def shift_evaluation(model: nn.Module, data: Data, cfg: dict[str, Any], ctx: dict[str, Any], dist: Dist) -> Any:
    """:func:`mixshare_layers.evaluation.evaluate_uncertainty` of the test set, clean and corrupted on the fly on
    the device (deterministic from ``--data-seed``), and of the OOD set; with ``--val-split``, also at the
    temperature fitted on the validation images. Every rank evaluates its share; the results gather them all."""
    from mixshare_layers.evaluation import evaluate_uncertainty

    shard = slice(dist.rank, None, dist.world)
    val = None
    if data.val_x is not None and data.val_y is not None:
        val = (data.val_x[shard], data.val_y[shard])
    return evaluate_uncertainty(
        _Autocast(model, ctx["autocast"]),
        (data.test_x[shard], data.test_y[shard]),
        ood={name: x[shard] for name, x in data.ood.items()} or None,
        val=val,
        corruptions=cfg["shift_corruptions"],
        severities=cfg["shift_severities"],
        rule=cfg["ensemble_rule"],
        preprocess=ctx["normalize"].unit,
        batch_size=cfg["eval_batch_size"],
        device=ctx["device"],
        seed=cfg["data_seed"],
    )


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as None, at any depth (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def shift_rows(report: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of shift.csv (clean, each corruption and severity, the means) and ood.csv (set x score), at
    temperature 1 and, when one was fitted, at the fitted temperature; units in the column names."""
    shift: list[dict[str, Any]] = []
    ood: list[dict[str, Any]] = []
    parts = [(1.0, report)]
    if report.get("calibrated") is not None:
        parts.append((report["temperature"], report["calibrated"]))
    for temperature, rep in parts:
        cells: list[tuple[str, Any, dict[str, Any]]] = [("clean", 0, rep["clean"])]
        for corruption, by_severity in rep["shift"].items():
            cells += [(corruption, severity, m) for severity, m in by_severity.items()]
        cells += [("mean", severity, m) for severity, m in rep["shift_by_severity"].items()]
        if rep["shift_mean"]:
            cells.append(("mean", "all", rep["shift_mean"]))
        for name, severity, metrics in cells:
            row = {"shift": name, "severity": severity, "temperature": temperature}
            row.update({col: factor * metrics[key] for key, col, factor in SHIFT_COLUMNS if key in metrics})
            shift.append(row)
        for name, scores in rep["ood"].items():
            for score, _ in OOD_SCORES:
                row = {"ood_set": name, "score": score, "temperature": temperature}
                row.update({col: 100.0 * scores[score][key] for key, col in OOD_COLUMNS})
                ood.append(row)
    return shift, ood


def shift_table(report: dict[str, Any], ood_name: str | None) -> str:
    """The end-of-run print of the shift evaluation (temperature 1)."""
    lines = [f"distribution shift (test set, corrupted on the fly; rule {report['rule']}):"]
    lines.append(f"  {'shift':<22} {'acc (%)':>8} {'NLL':>7} {'ECE (%)':>8} {'conf (%)':>9}")

    def line(name: str, m: dict[str, Any]) -> str:
        return (
            f"  {name:<22} {100 * m['ensemble_acc']:8.2f} {m['nll']:7.3f} {100 * m['ece']:8.2f} "
            f"{100 * m['mean_confidence']:9.2f}"
        )

    lines.append(line("clean", report["clean"]))
    for corruption, by_severity in report["shift"].items():
        lines += [line(f"{corruption} {severity}", m) for severity, m in by_severity.items()]
    if report["shift_mean"]:
        lines.append(line("mean over corruptions", report["shift_mean"]))
    for name, scores in report["ood"].items():
        lines.append(f"OOD detection: {ood_name or name} images (positives) against the test set:")
        lines.append(f"  {'score':<22} {'AUROC (%)':>10} {'AUPR (%)':>9} {'FPR95 (%)':>10}")
        for score, label in OOD_SCORES:
            r = scores[score]
            lines.append(f"  {label:<22} {100 * r['auroc']:10.2f} {100 * r['aupr']:9.2f} {100 * r['fpr95']:10.2f}")
    if report.get("temperature") is not None:
        cal = report["calibrated"]["clean"]
        lines.append(
            f"temperature {report['temperature']:.3f} (fitted on the validation split): clean NLL "
            f"{cal['nll']:.3f}, ECE {100 * cal['ece']:.2f} %"
        )
    return "\n".join(lines)


SHIFT_CSV = ["shift", "severity", "temperature", *(col for _, col, _ in SHIFT_COLUMNS)]
OOD_CSV = ["ood_set", "score", "temperature", *(col for _, col in OOD_COLUMNS)]


def write_shift_files(run_dir: Path, report: dict[str, Any], cfg: dict[str, Any]) -> None:
    """uncertainty.json (the whole report: fractions and nats, its "units" say which), shift.csv and ood.csv
    (percent and nats, in the column names), and uncertainty.png when matplotlib is installed; all atomic."""
    full = {**report, "ood_set": cfg["ood_resolved"], "corruption_seed": cfg["data_seed"]}
    atomic_text(run_dir / "uncertainty.json", json.dumps(_finite(full), indent=2) + "\n")
    rows, ood_rows = shift_rows(report)
    write_csv(run_dir / "shift.csv", SHIFT_CSV, rows)
    if ood_rows:
        write_csv(run_dir / "ood.csv", OOD_CSV, ood_rows)
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        from mixshare_layers.evaluation import plot_uncertainty_report

        title = f"{cfg['method']}: clean, corrupted and OOD test images"
        plot_uncertainty_report(report, run_dir / "uncertainty", title=title)  # written atomically


def shift_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The summary's digest of the shift evaluation (percent and nats, as the key names say)."""

    def digest(m: dict[str, Any]) -> dict[str, Any]:
        return {col: factor * m[key] for key, col, factor in SHIFT_COLUMNS[:4] if key in m}

    return _finite(
        {
            "clean": digest(report["clean"]),
            "corruption_mean": digest(report["shift_mean"]) if report["shift_mean"] else None,
            "ood": {
                name: {score: {col: 100.0 * scores[score][key] for key, col in OOD_COLUMNS} for score, _ in OOD_SCORES}
                for name, scores in report["ood"].items()
            },
            "temperature": report.get("temperature"),
            "calibrated_clean": digest(report["calibrated"]["clean"]) if report.get("calibrated") else None,
        }
    )


# ----------------------------------------------------------------------------------------------------------------
# checkpoints and RNG state
# ----------------------------------------------------------------------------------------------------------------
def rng_state(gens: dict[str, torch.Generator]) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    state.update({name: g.get_state() for name, g in gens.items()})
    return state


def set_rng_state(state: dict[str, Any], gens: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in gens.items():
        g.set_state(state[name])


def all_finite(tensors: Iterator[Tensor]) -> bool:
    flags = [t.isfinite().all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _state_tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _state_tensors(v)


def kept_message(last_saved: tuple[Path, int] | None) -> str:
    """What a run that stops now leaves to resume from."""
    if last_saved is None:
        return "no checkpoint was written yet (the run stopped in its first epoch), there is nothing to resume"
    path, epoch = last_saved
    return f"the last complete checkpoint ({path}, epoch {epoch}) is intact"


def write_checkpoint(path: Path, state: dict[str, Any], kept: str) -> None:
    """Save ``state`` (digest, verified, the previous file kept as checkpoint.prev.pt) if every weight is finite."""
    if not all_finite(_state_tensors({k: state[k] for k in ("model", "optimizer")})):
        raise NonFiniteLossError(
            f"the weights are not finite after epoch {state['epoch']}: not writing the checkpoint; {kept}. Try a "
            "lower --lr, or --amp off / bf16"
        )
    save_checkpoint(path, state, keep_previous=True)


def _intact(path: Path) -> bool:
    try:
        return verify_checkpoint(path)
    except CheckpointError:
        return False


def resume_source(text: str) -> tuple[Path, Path]:
    """``(checkpoint file, run folder)`` for ``--resume text``: a run folder's checkpoint.pt, or exactly the file."""
    path = Path(text)
    if path.is_dir():
        ckpt = path / CKPT_NAME
        if ckpt.exists() or ckpt.is_symlink():
            return ckpt, path
        if (path / PREV_NAME).is_file():
            raise UserError(
                f"--resume {text}: the folder has no {CKPT_NAME}, only {PREV_NAME} (the one before): resume from "
                f"it explicitly with --resume {path / PREV_NAME}"
            )
        if (path / "config.json").is_file():
            raise UserError(
                f"--resume {text}: the run has a config.json but no {CKPT_NAME}: it stopped before finishing its "
                f"first epoch, so there is nothing to resume; start it again (its options with --run-name "
                f"{path.name}) or delete the folder"
            )
        raise UserError(f"--resume {text}: not a run folder (no {CKPT_NAME}, no config.json)")
    if path.exists() or path.is_symlink():
        return path, path.parent
    raise UserError(f"--resume {text} does not exist: give a run folder or a checkpoint file")


def read_checkpoint(path: Path) -> tuple[dict[str, Any], bool]:
    """A checkpoint to resume from and whether its digest was verified (``UserError`` saying what to do if not)."""
    try:
        verified = verify_checkpoint(path)
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        hint = err.hint
        prev = previous_checkpoint_path(path)
        if err.damaged and prev.is_file() and _intact(prev):
            hint = f"the previous checkpoint is intact: resume from it with --resume {prev}"
        raise UserError(f"--resume: checkpoint {err.path}: {err.reason}" + (f"; {hint}" if hint else "")) from None
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    if missing:
        raise UserError(
            f"--resume: checkpoint {path} is not a training checkpoint of this script: it lacks {', '.join(missing)}"
        )
    return ckpt, verified


def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"--resume: the checkpoint holds no config (written by an older version) and {path} is missing"
        ) from None
    except (OSError, ValueError) as err:
        raise UserError(f"--resume: {path} cannot be read ({' '.join(str(err).split())})") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {path} does not hold a config (a JSON object)")
    return saved


# ----------------------------------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------------------------------
class Bar:
    """tqdm when installed and wanted, else a line every few updates (rank 0 only)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
            except ImportError:
                self.bar = None

    def update_to(self, done: int, **postfix: str) -> None:
        """Move the bar to ``done`` steps and show ``postfix``."""
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def open_tensorboard(run_dir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed: skipping TensorBoard logs (pip install tensorboard)", flush=True)
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)


# the evaluation metrics in metrics.csv and TensorBoard: (key of evaluate(), name with its unit, factor)
EVAL_COLUMNS = (
    ("ensemble_acc", "ensemble_acc_pct", 1.0),  # evaluate() gives accuracies and disagreement in percent already
    ("mean_individual_acc", "mean_individual_acc_pct", 1.0),
    ("nll", "nll_nats", 1.0),
    ("ece", "ece_pct", 100.0),  # a fraction in evaluate() and the summary (mixshare_layers.evaluation.metrics' unit)
    ("brier", "brier", 1.0),
    ("disagreement", "disagreement_pct", 1.0),
    ("mean_confidence", "mean_confidence_pct", 1.0),
)
SHARING_COLUMNS = (
    ("classifier_sharing", "classifier_sharing_pct"),
    ("encoder_sharing", "encoder_sharing_pct"),
    ("classifier_sharing_sum_ratio", "classifier_sharing_sum_ratio_pct"),
    ("encoder_sharing_sum_ratio", "encoder_sharing_sum_ratio_pct"),
)


def csv_columns(cfg: dict[str, Any], m: int, splits: list[str]) -> list[tuple[str, str, float]]:
    """metrics.csv's columns as ``(column, key of the history rows, factor)``: one unit per kind of quantity, in
    the names (``_pct``: percent, ``_nats``: nats per image; Brier in [0, 2]; lr, images/s and seconds as named)."""
    cols = [("epoch", "epoch", 1.0), ("step", "step", 1.0), ("lr", "lr", 1.0), ("train_loss_nats", "train_loss", 1.0)]
    cols += [("images_per_s", "images_per_s", 1.0), ("time_s", "time_s", 1.0)]
    for s in splits:
        cols += [(f"{s}_{name}", f"{s}_{key}", factor) for key, name, factor in EVAL_COLUMNS]
        cols += [(f"{s}_acc_{i}_pct", f"{s}_acc_{i}", 1.0) for i in range(m)]
    return cols + [(name, key, 1.0) for key, name in SHARING_COLUMNS]


def write_metrics_csv(path: Path, columns: list[tuple[str, str, float]], history: list[dict[str, Any]]) -> None:
    """metrics.csv from the history rows (their keys and units are the checkpoint's, whatever the CSV shows)."""
    rows = [
        {col: (None if row.get(key) is None else row[key] * factor if factor != 1.0 else row[key])
         for col, key, factor in columns}
        for row in history
    ]  # fmt: skip
    write_csv(path, [col for col, _, _ in columns], rows)


def eval_scalars(split: str, res: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard scalars of one evaluation: the metrics, every member's accuracy, the sharing rates (percent)."""
    out = {f"{split}/{name}": res[key] * factor for key, name, factor in EVAL_COLUMNS}
    out.update({f"{split}/acc_member_{j}_pct": a for j, a in enumerate(res["individual_acc"])})
    out.update({f"sharing/{name}": res[key] for key, name in SHARING_COLUMNS if res.get(key) is not None})
    return out


def csv_value(value: Any) -> Any:
    """A CSV cell: floats to 4 significant digits (``64.63``, ``0.0125``, ``12350.0``), None empty, else as is."""
    if value is None:
        return ""
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else value
    return value


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_value(row.get(k)) for k in columns})
    atomic_text(path, buf.getvalue())


def results_table(summary: dict[str, Any]) -> str:
    def rate(key: str) -> str:
        return "-" if summary[key] is None else f"{summary[key]:.1f}"

    rows = [
        ("method", summary["method"]),
        ("ensemble accuracy (%)", f"{summary['ensemble_acc']:.2f}"),
        ("mean individual accuracy (%)", f"{summary['mean_individual_acc']:.2f}"),
        ("individual accuracies (%)", " / ".join(f"{a:.2f}" for a in summary["individual_acc"])),
        ("collapsed members", ", ".join(map(str, summary.get("collapsed_members") or [])) or "none"),
        ("mean confidence (%)", f"{summary['mean_confidence']:.2f}"),
        (f"NLL (nats, rule {summary['ensemble_rule']})", f"{summary['nll']:.4f}"),
        ("ECE (%, 15 bins)", f"{100 * summary['ece']:.2f}"),
        ("Brier (sum over classes)", f"{summary['brier']:.4f}"),
        ("disagreement (%)", f"{summary['disagreement']:.2f}"),
        ("classifier sharing (%)", rate("classifier_sharing")),
        ("encoder sharing (%)", rate("encoder_sharing")),
        ("epochs / steps", f"{summary['epochs']} / {summary['steps']}"),
        ("train time (s), images/s", f"{summary['train_time_s']:.1f}, {summary['images_per_s']:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * 34 + "+"
    body = [f"| {k:<{width}} | {v:<32} |" for k, v in rows]
    return "\n".join([line, *body, line])


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Resume:
    """What ``--resume`` continues from."""

    path: Path  # the checkpoint file, exactly as named (or RUN/checkpoint.pt)
    checkpoint: dict[str, Any]
    verified: bool  # its digest was checked (False: written before checkpoints carried one)


def resolve_run(cfg: dict[str, Any], given: set[str], dist: Dist) -> tuple[dict[str, Any], Path, Resume | None]:
    """Pick the run directory (nothing is created); on --resume load the checkpoint and restore the run's config.

    The config comes from the checkpoint (or, for checkpoints written before they held one, from the run folder's
    config.json); options given now win, except the ones that say where the run lives.
    """
    if cfg["resume"]:
        clash = sorted(given & {"out_dir", "run_name"})
        if clash:
            raise UserError(
                f"--resume continues the run in its own folder: leave out {' and '.join(map(_opt, clash))}"
            )
        path, run_dir = resume_source(cfg["resume"])
        ckpt, verified = read_checkpoint(path)
        saved = ckpt.get("config")
        if not isinstance(saved, dict):
            saved = read_run_config(run_dir)
        for key, value in saved.items():
            if key in cfg and key not in given and key not in RUNTIME_KEYS:
                cfg[key] = value
        return cfg, run_dir, Resume(path, ckpt, verified)
    name = cfg["run_name"]
    if name is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{cfg['method']}-wrn{cfg['depth']}-{cfg['width']}-s{cfg['seed']}-{stamp}"
        name = dist.broadcast_object(name)
    cfg["run_name"] = name
    run_dir = Path(cfg["out_dir"]) / name
    if any((run_dir / f).exists() for f in (CKPT_NAME, PREV_NAME)):
        raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick --run-name")
    return cfg, run_dir, None


def check_run_folder(cfg: dict[str, Any], run_dir: Path, resume: Resume | None) -> None:
    """The run folder can be written, and a resumed run will not overwrite a good checkpoint it was not told about."""
    problem = folder_problem(run_dir)
    if problem is not None:
        where = f"--resume {cfg['resume']}" if resume else f"--out-dir {cfg['out_dir']}"
        raise UserError(f"{where}: cannot write the run folder {run_dir}: {problem}")
    if resume is None:
        return
    target = run_dir / CKPT_NAME
    if target.exists() and not os.path.samefile(target, resume.path):
        try:
            verify_checkpoint(target)
        except CheckpointError:
            return  # damaged: the resumed run replaces it
        raise UserError(
            f"--resume {resume.path}: the run folder already holds {target}, which continuing from "
            f"{resume.path.name} would overwrite: resume from the folder, or move {resume.path.name} into a folder "
            "of its own (with a copy of config.json)"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the script with command-line arguments ``argv`` and return the final summary (see module docstring)."""
    cfg, given = parse_config(argv)
    if not cfg["resume"]:  # a resumed run's options are checked once its config is restored
        check_config(cfg)
    dist = Dist()
    device = pick_device(cfg["device"], dist.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init(device)
    try:
        with contextlib.ExitStack() as cleanup:  # closes the logs even when the run stops on an error
            return _run(cfg, given, dist, device, cleanup)
    finally:
        dist.close()


def _run(
    cfg: dict[str, Any], given: set[str], dist: Dist, device: torch.device, cleanup: contextlib.ExitStack
) -> dict[str, Any]:
    cfg, run_dir, resume = resolve_run(cfg, given, dist)
    check_config(cfg)
    check_run_folder(cfg, run_dir, resume)
    say = print if dist.main else (lambda *a, **k: None)
    if resume is not None and resume.checkpoint["epoch"] > cfg["epochs"]:
        raise UserError(
            f"--epochs {cfg['epochs']} is below the epoch of the checkpoint to resume ({resume.checkpoint['epoch']}, "
            f"{resume.path})"
        )

    # -- seeds: global RNG for initialisation (same on every rank), dedicated generators per rank for the data
    #    augmentation / batcher and for the mixing masks (independent mask sampling per rank)
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    gens = {
        "data_gen": torch.Generator(device=device).manual_seed(cfg["seed"] * 1000 + 2 * dist.rank + 1),
        "mix_gen": torch.Generator(device=device).manual_seed(cfg["seed"] * 1000 + 2 * dist.rank + 2),
    }

    data = load_data(cfg, dist)
    mimo = cfg["method"] != "single"
    m = cfg["num_subnetworks"] if mimo else 1
    model = build_model(cfg, data.num_classes, device)
    raw: nn.Module = model

    b = cfg["batch_repetition"]
    unique = cfg["batch_size"] // b  # unique images per step and process
    sampler = EpochSampler(data.train_x.shape[0], cfg["seed"], dist.rank, dist.world)
    steps_per_epoch = len(sampler) // unique
    if steps_per_epoch < 1:
        raise UserError(
            f"not one full batch per epoch: {len(sampler)} training images per process for {unique} unique images "
            "per step; lower --batch-size or use more data"
        )
    total_steps = steps_per_epoch * cfg["epochs"]
    lr = cfg["lr"] if cfg["lr"] is not None else cfg["base_lr"] * unique * dist.world / 128
    cfg["lr_resolved"] = lr
    cfg["steps_per_epoch"] = steps_per_epoch
    cfg["world_size"] = dist.world
    cfg["mimo_config"] = dataclasses.asdict(raw.config) if mimo else None  # the preset with its overrides
    # how the checkpoint rebuilds its model (mixshare_layers.checkpoint.load_model, python -m mixshare_layers.analysis)
    recipe = model_recipe(cfg, raw, data.num_classes)

    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=cfg["momentum"],
        nesterov=cfg["nesterov"],
        weight_decay=cfg["weight_decay"],
    )
    schedule = LRSchedule(
        round(cfg["warmup_epochs"] * steps_per_epoch),
        [round(f * total_steps) for f in cfg["milestones"]],
        cfg["lr_gamma"],
        kind=cfg["lr_schedule"],
        total_steps=total_steps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"])
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")

    def autocast() -> contextlib.AbstractContextManager:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    normalize = Normalize(data.train_x, device, cfg["channels_last"])
    batcher = MIMOBatcher(
        m,
        b,
        raw.config.input_repetition if mimo else 0.0,  # type: ignore[union-attr]
        transform=lambda x: normalize(random_crop_flip(x, 4, gens["data_gen"])),
        generator=gens["data_gen"],
    )
    criterion = raw.make_loss(cfg["label_smoothing"]) if mimo else None  # type: ignore[operator]

    # -- resume
    start_epoch, history = 0, []
    last_saved: tuple[Path, int] | None = None  # the latest complete checkpoint: (file, epoch)
    if resume is not None:
        ckpt = resume.checkpoint
        try:
            raw.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt["scaler"]:  # empty when the run was saved without fp16 AMP
                scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            text = " ".join(str(err).split())
            raise UserError(
                f"--resume: checkpoint {resume.path} does not fit the model and optimiser built from the run's config "
                f"({text[:300]}{' ...' if len(text) > 300 else ''})"
            ) from None
        start_epoch, history = ckpt["epoch"], list(ckpt["history"])
        last_saved = (resume.path, start_epoch)
        if not resume.verified:
            say(f"note: {resume.path} carries no digest (written by an older version): its integrity is not checked")
        if given & {"lr", "base_lr"}:  # a new peak lr given with --resume replaces the saved one from here on
            scheduler.base_lrs = [lr for _ in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["initial_lr"] = lr
                group["lr"] = lr * schedule(scheduler.last_epoch)
            say(f"note: peak lr set to {lr:g} from the command line")
        states = ckpt["rng"]
        if len(states) == dist.world:
            set_rng_state(states[dist.rank], gens)
        else:
            say(f"note: checkpoint saved by {len(states)} processes, resuming with {dist.world}: RNG re-seeded")
        say(f"resumed {run_dir} from {resume.path.name} at epoch {start_epoch} (step {ckpt['step']})")
        del ckpt
        resume.checkpoint = {}  # free the loaded tensors

    train_model: nn.Module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
    if cfg["compile"]:
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    # -- data path: "device" keeps every image as uint8 on the training device (CIFAR-100: 180 MB)
    on_device = cfg["data_path"] == "device"
    train_x_dev = data.train_x.to(device) if on_device else data.train_x
    train_y_dev = data.train_y.to(device) if on_device else data.train_y
    if on_device:
        data.test_x, data.test_y = data.test_x.to(device), data.test_y.to(device)
        if data.val_x is not None and data.val_y is not None:
            data.val_x, data.val_y = data.val_x.to(device), data.val_y.to(device)
    loader = None
    if cfg["data_path"] == "loader":
        loader = torch.utils.data.DataLoader(
            _UInt8Images(data.train_x, data.train_y),
            batch_size=unique,
            sampler=sampler,
            drop_last=True,
            num_workers=cfg["workers"],
            persistent_workers=cfg["workers"] > 0,
            pin_memory=device.type == "cuda",
        )

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        sampler.set_epoch(epoch)
        if loader is not None:
            for xb, yb in loader:
                yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            return
        order = sampler.indices()[: steps_per_epoch * unique].to(device)
        for chunk in order.view(steps_per_epoch, unique):
            yield train_x_dev[chunk], train_y_dev[chunk]

    fp16 = cfg["amp"] == "fp16"

    def forward_loss(xs: Tensor, ys: Tensor) -> Tensor:
        with autocast():
            if mimo:
                out = train_model(xs, generator=gens["mix_gen"])
                return criterion(out, ys)  # type: ignore[misc]
            logits = train_model(xs[:, 0])
            return F.cross_entropy(logits.float(), ys[:, 0], label_smoothing=cfg["label_smoothing"])

    def optimise(loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def train_step(xb: Tensor, yb: Tensor, step: int, bad: Tensor) -> tuple[Tensor, Tensor]:
        if mimo:
            raw.set_progress(min(1.0, step / total_steps))  # type: ignore[operator]
        xs, ys = batcher(xb, yb)  # (B*b, M, C, H, W), (B*b, M): crop/flip per repeated copy, on device
        loss = forward_loss(xs, ys)
        optimise(loss)
        scheduler.step()
        loss = loss.detach()
        if not fp16:  # remember the first non-finite step without a host sync; fp16 skips them via the scaler
            bad = torch.where((bad < 0) & ~loss.isfinite(), torch.full_like(bad, step), bad)
        return loss, bad

    ctx = {"device": device, "normalize": normalize, "m": m, "autocast": autocast, "num_classes": data.num_classes}

    def make_run_dir() -> None:  # the first thing written: a run that could not start leaves nothing behind
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the run folder {run_dir} ({err.strerror or err})") from None

    if cfg["benchmark"]:
        result = benchmark(cfg, batches, train_step, forward_loss, optimise, batcher, device, say)
        if dist.main:
            make_run_dir()
            atomic_text(run_dir / "benchmark.json", json.dumps(result, indent=2) + "\n")
        return result

    # -- run directory, config, logs
    splits = ["test"] if data.val_x is None else ["val", "test"]
    columns = csv_columns(cfg, m, splits)
    writer = None
    if dist.main:
        say("config:")
        for key in sorted(cfg):
            say(f"  {key:<20} {cfg[key]}")
        say(f"  {'model':<20} {type(raw).__name__}, {sum(p.numel() for p in raw.parameters()):,} parameters")
        say(f"run directory: {run_dir}")
        make_run_dir()
        atomic_text(run_dir / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if cfg["tensorboard"]:
            writer = open_tensorboard(run_dir, start_epoch * steps_per_epoch if start_epoch else None)
            if writer is not None:
                cleanup.callback(writer.close)
        for stale in run_dir.glob(".checkpoint*.tmp*"):  # a temp file left by a run killed while saving
            stale.unlink()

    def log_scalars(values: dict[str, Any], step: int) -> None:
        if writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    writer.add_scalar(k, v, step)

    step = start_epoch * steps_per_epoch
    train_time = sum(r.get("epoch_time_s", 0.0) for r in history)
    images_seen = sum(r.get("images", 0) for r in history)
    stopped_early = False
    last_eval: dict[str, dict[str, Any]] = {}
    model.train()
    for epoch in range(start_epoch, cfg["epochs"]):
        bar = Bar(steps_per_epoch, f"epoch {epoch + 1}/{cfg['epochs']}", cfg["progress"] and dist.main)
        cleanup.callback(bar.close)
        bad = torch.full((), -1, dtype=torch.int64, device=device)
        loss_sum = torch.zeros((), device=device)
        t0 = time.perf_counter()
        t_mark, done_mark = t0, 0
        last_loss, speed = float("nan"), 0.0
        for i, (xb, yb) in enumerate(batches(epoch)):
            loss, bad = train_step(xb, yb, step, bad)
            loss_sum += loss
            step += 1
            if (i + 1) % cfg["log_every"] == 0 or i + 1 == steps_per_epoch:
                first_bad = int(dist.max_(bad.clone()))  # one host sync every log_every steps
                if first_bad >= 0:
                    raise NonFiniteLossError(
                        f"non-finite training loss at epoch {first_bad // steps_per_epoch + 1}, step "
                        f"{first_bad % steps_per_epoch + 1} of {steps_per_epoch} (global step {first_bad + 1}); "
                        f"stopping without writing a checkpoint: {kept_message(last_saved)}. Try a lower --lr, or "
                        "--amp off / bf16"
                    )
                now = time.perf_counter()
                last_loss = float(loss)
                speed = (i + 1 - done_mark) * cfg["batch_size"] * dist.world / max(now - t_mark, 1e-9)
                t_mark, done_mark = now, i + 1
                current_lr = scheduler.get_last_lr()[0]
                bar.update_to(i + 1, loss=f"{last_loss:.3f}", lr=f"{current_lr:.4g}", img_s=f"{speed:.0f}")
                if dist.main:
                    scalars = {"train/loss_nats": last_loss, "train/lr": current_lr, "train/images_per_s": speed}
                    log_scalars(scalars, step)
        bar.close()
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        images = steps_per_epoch * cfg["batch_size"] * dist.world
        images_seen += images
        if dist.enabled:  # BatchNorm statistics: rank 0's, so that every rank holds the same model
            for buf in raw.buffers():
                dist.dist.broadcast(buf, src=0)

        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "lr": scheduler.get_last_lr()[0],
            "train_loss": float(loss_sum) / steps_per_epoch,
            "images_per_s": images / epoch_time,
            "time_s": train_time,
            "epoch_time_s": epoch_time,
            "images": images,
        }
        final = epoch + 1 == cfg["epochs"]
        stop_now = cfg["stop_epoch"] > 0 and epoch + 1 >= cfg["stop_epoch"] and not final
        if final or (cfg["eval_every"] > 0 and (epoch + 1) % cfg["eval_every"] == 0):
            for s in splits:
                x, y = (data.val_x, data.val_y) if s == "val" else (data.test_x, data.test_y)
                last_eval[s] = res = evaluate(raw, x, y, cfg, ctx, dist)  # type: ignore[arg-type]
                row.update({f"{s}_{k}": res[k] for k, _, _ in EVAL_COLUMNS})
                row.update({f"{s}_acc_{j}": a for j, a in enumerate(res["individual_acc"])})
                row.update({key: res[key] for key, _ in SHARING_COLUMNS})
                log_scalars(eval_scalars(s, res), step)
                warning = collapse_warning(res, s)
                if warning:
                    say(warning)
            ev = last_eval[splits[0]]
            say(
                f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, {splits[0]} ensemble acc {ev['ensemble_acc']:.2f} %"
                f" (members {' / '.join(f'{a:.2f}' for a in ev['individual_acc'])} %), NLL {ev['nll']:.3f}, ECE "
                f"{100 * ev['ece']:.2f} %, confidence {ev['mean_confidence']:.2f} %, lr {row['lr']:.3g}, "
                f"{row['images_per_s']:.0f} img/s"
            )
        else:
            say(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, {row['images_per_s']:.0f} img/s, {epoch_time:.1f} s")
        history.append(row)

        # -- checkpoint (every rank contributes its RNG state; rank 0 writes)
        rngs = dist.gather_objects(rng_state(gens))
        if dist.main:
            write_metrics_csv(run_dir / "metrics.csv", columns, history)
            write_checkpoint(
                run_dir / CKPT_NAME,
                {
                    "config": json.loads(json.dumps(cfg)),  # plain values, what rebuilds the model and the run
                    **({"recipe": recipe} if recipe is not None else {}),
                    "epoch": epoch + 1,
                    "step": step,
                    "model": raw.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rngs,
                    "history": history,
                },
                kept_message(last_saved),
            )
        last_saved = (run_dir / CKPT_NAME, epoch + 1)
        dist.barrier()
        if stop_now:
            stopped_early = True
            say(f"stopping after epoch {epoch + 1} (--stop-epoch); continue with --resume {run_dir}")
            break

    if not last_eval:  # resumed a finished run, or stopped early: evaluate the current weights
        for s in splits:
            x, y = (data.val_x, data.val_y) if s == "val" else (data.test_x, data.test_y)
            last_eval[s] = evaluate(raw, x, y, cfg, ctx, dist)  # type: ignore[arg-type]
            warning = collapse_warning(last_eval[s], s)
            if warning:
                say(warning)

    shift_report = None
    if cfg["shift_eval"] and not stopped_early:
        t_shift = time.perf_counter()
        shift_report = shift_evaluation(raw, data, cfg, ctx, dist)
        if dist.main:
            write_shift_files(run_dir, shift_report, cfg)
            say(f"shift evaluation: {time.perf_counter() - t_shift:.1f} s")

    test = last_eval["test"]
    summary: dict[str, Any] = {
        **{k: test[k] for k in (*SUMMARY_METRICS, "individual_acc", "mean_confidence", "collapsed_members")},
        **{k: test[k] for k in SHARING_KEYS},
        "ensemble_rule": cfg["ensemble_rule"],
        "epochs": history[-1]["epoch"] if history else 0,
        "steps": step,
        "method": cfg["method"],
        "seed": cfg["seed"],
        "depth": cfg["depth"],
        "width": cfg["width"],
        "num_subnetworks": m,
        "dataset": cfg["dataset"],
        "world_size": dist.world,
        "run_dir": str(run_dir),
        "train_time_s": train_time,
        "images_per_s": images_seen / train_time if train_time > 0 else 0.0,
        "val": {k: last_eval["val"][k] for k in (*SUMMARY_METRICS, "individual_acc")} if "val" in last_eval else None,
        "stopped_early": stopped_early,
        "shift": None if shift_report is None else shift_summary(shift_report),
    }
    if dist.enabled:
        flat = torch.cat([t.detach().double().flatten() for t in raw.state_dict().values() if t.is_floating_point()])
        hi, lo = dist.max_(flat.clone()), -dist.max_(-flat)
        summary["rank_max_abs_diff"] = float((hi - lo).max())
    if dist.main:
        atomic_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        say(results_table(summary))
        if shift_report is not None:
            say(shift_table(shift_report, cfg["ood_resolved"]))
    dist.barrier()
    return summary


def benchmark(
    cfg: dict[str, Any],
    batches: Callable[[int], Iterator[tuple[Tensor, Tensor]]],
    train_step: Callable[..., tuple[Tensor, Tensor]],
    forward_loss: Callable[[Tensor, Tensor], Tensor],
    optimise: Callable[[Tensor], None],
    batcher: MIMOBatcher,
    device: torch.device,
    say: Callable[..., None],
) -> dict[str, Any]:
    """Images/s of the script's training loop vs the bare model step on tensors already in memory.

    Alternates rounds of ``cfg["benchmark"]`` steps of each (the script's loop: fetching the batch, crop/flip,
    batching, progress, schedule, non-finite tracking and its periodic sync; the bare step: forward, loss,
    backward and optimiser step on one pre-built training batch), 7 rounds; reports the median rates and the
    median of the per-round ratios.
    """
    n = cfg["benchmark"]
    first = next(batches(0))
    xs, ys = batcher(*first)  # one ready training batch for the bare step

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_script() -> float:
        bad = torch.full((), -1, dtype=torch.int64, device=device)
        done, t0 = 0, time.perf_counter()
        epoch = 0
        while done < n:
            for xb, yb in batches(epoch):
                _, bad = train_step(xb, yb, 0, bad)
                done += 1
                if done % cfg["log_every"] == 0 or done == n:
                    int(bad)
                if done == n:
                    break
            epoch += 1
        sync()
        return n * cfg["batch_size"] / (time.perf_counter() - t0)

    def run_bare() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            optimise(forward_loss(xs, ys))
        sync()
        return n * cfg["batch_size"] / (time.perf_counter() - t0)

    run_bare()  # warm-up
    script, bare = [], []
    for _ in range(7):
        script.append(run_script())
        bare.append(run_bare())
    ratios = sorted(s / b for s, b in zip(script, bare, strict=True))  # paired: neighbours in time share the load
    result = {
        "script_images_per_s": sorted(script)[3],
        "bare_images_per_s": sorted(bare)[3],
        "ratio": ratios[3],
        "steps": n,
        "script_rounds": script,
        "bare_rounds": bare,
    }
    say(json.dumps(result, indent=2))
    return result


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: :func:`main`, with a ``UserError`` printed as one line; returns the exit code (0 or 2)."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
