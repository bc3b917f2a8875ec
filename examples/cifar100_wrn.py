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
``metrics.csv`` (one row per epoch), ``checkpoint.pt`` (after every epoch, written atomically), ``summary.json``
(the final metrics), and ``tensorboard/`` when TensorBoard is installed. The last epoch is what gets reported
(no model selection on the test set); ``--val-split`` holds out training images to select on instead.

``main(argv)`` runs the script in-process and returns the summary (also saved as ``summary.json``). Its keys:

    ensemble_acc, mean_individual_acc   ensemble / mean member top-1 accuracy on the test set, percent
    individual_acc                      list of M member accuracies, percent
    collapsed_members                   members whose accuracy stayed near chance while another learned
                                        (mixshare_layers.metrics.collapsed_members; also printed as a warning
                                        at every evaluation)
    nll                                 negative log-likelihood of the ensemble, nats per image
    ece                                 expected calibration error, 15 bins, fraction in [0, 1]
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixshare_layers import PRESETS, MIMOBatcher, MIMOConfig, MIMOWrapper
from mixshare_layers.metrics import EnsembleMetrics, collapsed_members
from mixshare_layers.models import wide_resnet

METHODS = ("single", *PRESETS)
SUMMARY_METRICS = ("ensemble_acc", "mean_individual_acc", "nll", "ece", "brier", "disagreement")
CKPT_NAME = "checkpoint.pt"
CKPT_FORMAT = 1
# options that describe how to run, not what to train: never restored from a resumed run's config.json
RUNTIME_KEYS = ("resume", "stop_epoch", "benchmark", "quick", "smoke")

# --quick: the README's main job, a few minutes on a 2-core CPU; --smoke: seconds, for CI
QUICK = dict(
    dataset="synthetic",
    synthetic_train=4000,
    synthetic_test=1000,
    synthetic_classes=10,
    synthetic_noise=1.5,
    depth=10,
    width=1,
    epochs=5,
    eval_every=1,
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
)


class UserError(Exception):
    """A problem the user can fix from the command line (printed as one line by the script)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """The dataset files are missing (and ``--download`` was not given)."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite (the last complete checkpoint is left untouched)."""


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


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The command line. With ``suppress``, options not given are absent (to tell what the user set)."""
    p = argparse.ArgumentParser(
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
    add("--resume", type=str, default=None, help="run directory (or its checkpoint.pt) to continue")
    add("--stop-epoch", type=int, default=0, help="stop after this epoch as if interrupted (0: train to the end)")
    add("--benchmark", type=int, default=0, help="time N steps of the pipeline vs the bare model step, then exit")
    # -- data
    add("--dataset", choices=("cifar100", "synthetic"), default="cifar100")
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
        choices=("device", "loader"),
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
    add("--milestones", type=_fractions, default=[0.25, 0.5, 0.75], help="lr decay points, fractions of training")
    add("--lr-gamma", type=float, default=0.1)
    add("--label-smoothing", type=float, default=0.0)
    add("--seed", type=int, default=0)
    # -- evaluation and logging
    add("--ensemble-rule", choices=("prob", "logit"), default="prob")
    add("--eval-every", type=int, default=10, help="evaluate every N epochs (0: only at the end)")
    add("--eval-batch-size", type=int, default=500)
    add("--log-every", type=int, default=25, help="steps between loss checks / bar updates (one host sync)")
    add("--out-dir", type=str, default="runs")
    add("--run-name", type=str, default=None, help="default: <method>-wrn<depth>-<width>-s<seed>-<time>")
    add("--tensorboard", type=_bool, default=True, help="write TensorBoard logs (skipped if not installed)")
    add("--progress", type=_bool, default=True, help="show a tqdm progress bar")
    # -- speed
    add("--device", type=str, default="auto", help="auto (cuda, then mps, then cpu) or a torch device")
    add("--amp", choices=("off", "bf16", "fp16"), default="off")
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


def check_config(cfg: dict[str, Any]) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    need(cfg["epochs"] >= 1, f"--epochs must be >= 1, got {cfg['epochs']}")
    need(cfg["batch_repetition"] >= 1, f"--batch-repetition must be >= 1, got {cfg['batch_repetition']}")
    need(
        cfg["batch_size"] >= cfg["batch_repetition"] and cfg["batch_size"] % cfg["batch_repetition"] == 0,
        f"--batch-size ({cfg['batch_size']}) must be a positive multiple of --batch-repetition "
        f"({cfg['batch_repetition']}): it counts the repeated rows",
    )
    need(0.0 <= cfg["val_split"] < 1.0, f"--val-split must be in [0, 1), got {cfg['val_split']}")
    need(cfg["num_subnetworks"] >= 1, f"--num-subnetworks must be >= 1, got {cfg['num_subnetworks']}")
    need(cfg["stop_epoch"] >= 0, f"--stop-epoch must be >= 0, got {cfg['stop_epoch']}")
    need(cfg["log_every"] >= 1, f"--log-every must be >= 1, got {cfg['log_every']}")
    need(cfg["eval_batch_size"] >= 1, f"--eval-batch-size must be >= 1, got {cfg['eval_batch_size']}")
    need(cfg["workers"] >= 0, f"--workers must be >= 0, got {cfg['workers']}")
    if cfg["method"] == "single":
        need(cfg["num_subnetworks"] in (1, 2), "--method single is the plain backbone: leave --num-subnetworks out")
        overridden = [f.name for f in dataclasses.fields(MIMOConfig) if cfg[f.name] is not None]
        need(not overridden, f"--method single has no MIMO options, but got {', '.join(overridden)}")


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


def pick_device(name: str, local_rank: int) -> torch.device:
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
    val_x = val_y = None
    if cfg["val_split"] > 0:
        n = train_x.shape[0]
        n_val = max(1, round(cfg["val_split"] * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["data_seed"] + 7919))
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        train_x, train_y = train_x[train_idx], train_y[train_idx]
    return Data(train_x, train_y, test_x, test_y, val_x, val_y, k)


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
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale).contiguous(memory_format=self.memory_format)


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


class LRSchedule:
    """Per-step lr factor: linear warmup to 1 over ``warmup_steps``, times ``gamma`` at each milestone step."""

    def __init__(self, warmup_steps: int, milestone_steps: list[int], gamma: float) -> None:
        self.warmup_steps = warmup_steps
        self.milestone_steps = milestone_steps
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return warm * self.gamma ** sum(step >= m for m in self.milestone_steps)


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
    idx = torch.arange(dist.rank, x.shape[0], dist.world)
    for chunk in idx.split(cfg["eval_batch_size"]):
        xb = normalize(x[chunk.to(x.device)].to(device, non_blocking=True))
        yb = y[chunk.to(y.device)].to(device, non_blocking=True)
        with ctx["autocast"]():
            logits = model(xb)
        acc.update((logits.unsqueeze(1) if logits.dim() == 2 else logits).float(), yb)
    acc.all_reduce()
    model.train(was_training)
    out = acc.compute()
    pct = {k: 100.0 * out[k] for k in ("ensemble_acc", "mean_individual_acc", "disagreement")}
    return {
        **out,
        **pct,
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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    if not all_finite(_state_tensors({k: state[k] for k in ("model", "optimizer")})):
        raise NonFiniteLossError(
            f"the weights are not finite after epoch {state['epoch']}: not writing the checkpoint (the previous one "
            "is kept)"
        )

    def write(fh: io.BufferedWriter) -> None:
        torch.save(state, fh)

    atomic_write(path, write)


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only=True: only tensors and plain containers are unpickled (the file holds nothing else)
    return torch.load(path, map_location="cpu", weights_only=True)


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


def csv_columns(cfg: dict[str, Any], m: int, splits: list[str]) -> list[str]:
    cols = ["epoch", "step", "lr", "train_loss", "images_per_s", "time_s"]
    for s in splits:
        cols += [f"{s}_{k}" for k in SUMMARY_METRICS]
        cols += [f"{s}_acc_{i}" for i in range(m)]
    return [*cols, "classifier_sharing", "encoder_sharing"]


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
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
        (f"NLL (rule {summary['ensemble_rule']})", f"{summary['nll']:.4f}"),
        ("ECE (15 bins)", f"{summary['ece']:.4f}"),
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
def resolve_run(cfg: dict[str, Any], given: set[str], dist: Dist) -> tuple[dict[str, Any], Path, dict | None]:
    """Pick the run directory; on --resume restore its config (options given now win) and its checkpoint."""
    ckpt = None
    if cfg["resume"]:
        path = Path(cfg["resume"])
        run_dir = path.parent if path.is_file() else path
        if not (run_dir / "config.json").is_file():
            raise UserError(f"--resume {cfg['resume']!r}: no config.json there (expected a run directory)")
        saved = json.loads((run_dir / "config.json").read_text())
        for key, value in saved.items():
            if key in cfg and key not in given and key not in RUNTIME_KEYS:
                cfg[key] = value
        if (run_dir / CKPT_NAME).is_file():
            ckpt = load_checkpoint(run_dir / CKPT_NAME)
        return cfg, run_dir, ckpt
    name = cfg["run_name"]
    if name is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{cfg['method']}-wrn{cfg['depth']}-{cfg['width']}-s{cfg['seed']}-{stamp}"
        name = dist.broadcast_object(name)
    cfg["run_name"] = name
    run_dir = Path(cfg["out_dir"]) / name
    if dist.main:
        if (run_dir / CKPT_NAME).exists():
            raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick --run-name")
        run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, run_dir, None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the script with command-line arguments ``argv`` and return the final summary (see module docstring)."""
    cfg, given = parse_config(argv)
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
    cfg, run_dir, ckpt = resolve_run(cfg, given, dist)
    check_config(cfg)
    say = print if dist.main else (lambda *a, **k: None)

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
    if ckpt is not None:
        if ckpt.get("format") != CKPT_FORMAT:
            raise UserError(f"{run_dir / CKPT_NAME} has format {ckpt.get('format')}, expected {CKPT_FORMAT}")
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when the run was saved without fp16 AMP
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history = ckpt["epoch"], list(ckpt["history"])
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
        say(f"resumed {run_dir} at epoch {start_epoch} (step {ckpt['step']})")
        del ckpt

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

    if cfg["benchmark"]:
        result = benchmark(cfg, batches, train_step, forward_loss, optimise, batcher, device, say)
        if dist.main:
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
        atomic_text(run_dir / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if cfg["tensorboard"]:
            writer = open_tensorboard(run_dir, start_epoch * steps_per_epoch if start_epoch else None)
            if writer is not None:
                cleanup.callback(writer.close)
        for stale in run_dir.glob(f".{CKPT_NAME}.tmp*"):  # a temp file left by a run killed while saving
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
                        f"stopping without writing a checkpoint: the last complete one ({run_dir / CKPT_NAME}, "
                        f"epoch {epoch}) is intact. Try a lower --lr, or --amp off / bf16"
                    )
                now = time.perf_counter()
                last_loss = float(loss)
                speed = (i + 1 - done_mark) * cfg["batch_size"] * dist.world / max(now - t_mark, 1e-9)
                t_mark, done_mark = now, i + 1
                current_lr = scheduler.get_last_lr()[0]
                bar.update_to(i + 1, loss=f"{last_loss:.3f}", lr=f"{current_lr:.4g}", img_s=f"{speed:.0f}")
                if dist.main:
                    log_scalars({"train/loss": last_loss, "train/lr": current_lr, "train/images_per_s": speed}, step)
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
                row.update({f"{s}_{k}": res[k] for k in SUMMARY_METRICS})
                row.update({f"{s}_acc_{j}": a for j, a in enumerate(res["individual_acc"])})
                row["classifier_sharing"], row["encoder_sharing"] = res["classifier_sharing"], res["encoder_sharing"]
                log_scalars({f"{s}/{k}": res[k] for k in SUMMARY_METRICS}, step)
                warning = collapse_warning(res, s)
                if warning:
                    say(warning)
            ev = last_eval[splits[0]]
            say(
                f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, {splits[0]} ensemble acc {ev['ensemble_acc']:.2f} %,"
                f" members {' / '.join(f'{a:.2f}' for a in ev['individual_acc'])} %, {row['images_per_s']:.0f} img/s"
            )
        else:
            say(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, {row['images_per_s']:.0f} img/s, {epoch_time:.1f} s")
        history.append(row)

        # -- checkpoint (every rank contributes its RNG state; rank 0 writes)
        rngs = dist.gather_objects(rng_state(gens))
        if dist.main:
            write_csv(run_dir / "metrics.csv", columns, history)
            save_checkpoint(
                run_dir / CKPT_NAME,
                {
                    "format": CKPT_FORMAT,
                    "epoch": epoch + 1,
                    "step": step,
                    "model": raw.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rngs,
                    "history": history,
                },
            )
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

    test = last_eval["test"]
    summary: dict[str, Any] = {
        **{k: test[k] for k in (*SUMMARY_METRICS, "individual_acc", "collapsed_members", *SHARING_KEYS)},
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
    }
    if dist.enabled:
        flat = torch.cat([t.detach().double().flatten() for t in raw.state_dict().values() if t.is_floating_point()])
        hi, lo = dist.max_(flat.clone()), -dist.max_(-flat)
        summary["rank_max_abs_diff"] = float((hi - lo).max())
    if dist.main:
        atomic_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        say(results_table(summary))
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


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
