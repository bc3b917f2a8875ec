#!/usr/bin/env python
"""Train a MIMO / MixMo / MixShare Wide ResNet on CIFAR-100 with the MixShare paper's recipe, end to end.

In order: 1. data, 2. model (a WRN in a MIMOWrapper with a preset), 3. MIMO batching (M images per row, each repeated
copy cropped and flipped on the device), 4. SGD and its schedule, the train loop, 5. evaluation (the members' health
checked each time; at the end a temperature fitted on the validation split becomes part of the model, then corrupted
test images and an OOD set), 6. the report: a table and <out-dir>/<run-name>/ with config.json, metrics.csv,
tensorboard/, summary.json (every key names its unit: _pct percent, _nats nats per image), uncertainty.json,
shift.csv, ood.csv, and checkpoint.pt after every epoch (loads without running code, has a digest and the recipe
that `python -m mixshare_layers.analysis` rebuilds the model from; the one before it stays as checkpoint.prev.pt).
With --baseline true the plain WRN is trained first with the same recipe and steps (<run-name>-single/), and the two
are printed side by side: what the ensemble buys.

  python examples/cifar100_wrn.py --data-dir ~/data --download               # the paper's setting, 300 epochs
  python examples/cifar100_wrn.py --quick --threads 2                        # minutes on a CPU: single vs MixShare
  python examples/cifar100_wrn.py --resume runs/mixshare-wrn28-2-s0-...      # continue bitwise as if never stopped
  torchrun --nproc_per_node=4 examples/cifar100_wrn.py --data-dir ~/data     # DistributedDataParallel
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset, random_split

from mixshare_layers import PRESETS, MIMOBatcher, MIMOConfig, MIMOWrapper, get_preset
from mixshare_layers.analysis import sharing_rates
from mixshare_layers.checkpoint import WRN_BUILDER, ModelRecipe, RunError, runs
from mixshare_layers.data import Normalize, SyntheticImageDataset, load_cifar100, random_crop_flip
from mixshare_layers.data.ood import load_svhn, synthetic_ood_dataset
from mixshare_layers.evaluation import (
    CORRUPTIONS,
    collapsed_members,
    evaluate_uncertainty,
    inference_ms_per_image,
    report,
)
from mixshare_layers.files import write_json
from mixshare_layers.models import wide_resnet

# Every option (--batch-size sets batch_size) and its default: the paper's recipe, in the order the page uses them
DEFAULTS = dict(
    dataset="cifar100", data_dir="./data", download=False, data_path="device", workers=4, synthetic_train=50000,
    synthetic_test=10000, synthetic_classes=100, synthetic_size=32, synthetic_noise=2.5, synthetic_object_size=1.0,
    synthetic_clutter=0.0, data_seed=0, val_split=0.0, init="torch-he-heads",
    method="mixshare", num_subnetworks=2, depth=28, width=2,  # + every MIMOConfig field (None: the preset's)
    batch_size=64, batch_repetition=2,  # rows per step and process, counting the repeats: 32 images, each twice
    epochs=300, base_lr=0.1, lr=None, momentum=0.9, nesterov=True, weight_decay=6e-4, warmup_epochs=1.0,
    lr_schedule="step", milestones=[0.25, 0.5, 0.75], lr_gamma=0.1, label_smoothing=0.0, seed=0, log_every=25,
    ensemble_rule="prob", eval_every=10, eval_batch_size=500, shift_eval=True, ood="auto", ood_samples=0,
    shift_corruptions=["gaussian_noise", "gaussian_blur", "jpeg_compression", "contrast"], shift_severities=[1, 3, 5],
    calibrate=True, baseline=False,
    out_dir="runs", run_name=None, tensorboard=True, progress=True, quick=False, smoke=False, resume=None,
    stop_epoch=0, threads=0, device="auto", amp="off", channels_last=False, compile=False,
)  # fmt: skip
CHOICES = dict(dataset=("cifar100", "synthetic"), data_path=("device", "loader"), method=("single", *PRESETS),
               ensemble_rule=("prob", "logit"), ood=("auto", "synthetic", "svhn", "none"), amp=("off", "bf16", "fp16"),
               lr_schedule=("step", "cosine"), init=("torch-he-heads", "torch", "mixmo"))  # fmt: skip
RANGES = {  # where every number must lie, checked once on the options as resolved (a resumed run's with those given)
    "[1, inf)": "epochs batch_size batch_repetition num_subnetworks width eval_batch_size log_every synthetic_train "
                "synthetic_test", "[2, inf)": "synthetic_classes", "[4, inf)": "synthetic_size",
    "[0, inf)": "stop_epoch eval_every workers ood_samples threads weight_decay warmup_epochs synthetic_noise "
                "synthetic_clutter", "(0, 1]": "synthetic_object_size",
    "(0, inf)": "lr base_lr lr_gamma", "[0, 4294967296)": "seed data_seed", "[0, 1)": "momentum val_split",
    "[0, 1]": "label_smoothing",
}  # fmt: skip
# --quick: the README's run, minutes on a 2-core CPU (cosine: 5 epochs of the paper's steps would end at lr / 1000)
QUICK = dict(dataset="synthetic", synthetic_train=5000, synthetic_test=2000, synthetic_classes=40, synthetic_size=24,
             synthetic_noise=1.0, synthetic_object_size=0.5833, synthetic_clutter=0.7, depth=10, width=1, epochs=10,
             eval_every=2, lr_schedule="cosine", val_split=0.1, baseline=True)  # fmt: skip
SMOKE = dict(dataset="synthetic", synthetic_train=96, synthetic_test=64, synthetic_classes=10, synthetic_size=16,
             depth=10, width=1, epochs=1, batch_size=32, eval_every=0, eval_batch_size=64, tensorboard=False,
             progress=False, shift_eval=False)  # fmt: skip
RUNTIME = ("resume", "stop_epoch", "quick", "smoke", "device", "threads", "baseline")  # how to run: not restored


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block, exit code 2
        self.exit(2, f"error: {message} (see --help)\n")


# -- 0. the command line ----------------------------------------------------------------------------------------------
def parse_options(argv: list[str], resume_command: str):
    """The options, resolved: a mode's defaults (--quick, --smoke), and with --resume the run's own (given ones win)."""
    def boolean(text: str) -> bool:
        if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("1", "true", "yes", "on")
    parser = OneLineParser(description=__doc__, allow_abbrev=False, formatter_class=type(
        "Help", (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter), {}))  # fmt: skip
    for key, default in DEFAULTS.items():
        flag, kind = f"--{key.replace('_', '-')}", {"lr": float, "resume": str, "run_name": str}.get(key, type(default))
        if isinstance(default, list):  # comma-separated
            kind = partial(lambda item, text: [item(v) for v in text.replace(",", " ").split()], type(default[0]))
        if key in ("quick", "smoke", "download"):
            parser.add_argument(flag, action="store_true")
        else:
            kind = boolean if kind is bool else kind
            parser.add_argument(flag, type=kind, default=default, choices=CHOICES.get(key), help="%(default)s")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="as --calibrate false")
    for f in dataclasses.fields(MIMOConfig):  # every preset field; None: the preset's value
        kind = {"bool": boolean, "str": str}.get(str(f.type), lambda t: None if t == "none" else float(t))
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, help=f"the preset's {f.name}, overridden")
    args = parser.parse_args(argv)
    if args.quick != args.smoke:
        parser.set_defaults(**(QUICK if args.quick else SMOKE))
    if args.resume and {"--out-dir", "--run-name"} & {a.split("=")[0] for a in argv}:
        raise RunError("--resume continues the run in its own folder: leave out --out-dir and --run-name")
    path, checkpoint, saved, verified = runs.resume_run(args.resume, required=("model", "history", "rng"),
        resume_command=resume_command, option="--resume") if args.resume else (None, None, {}, True)  # fmt: skip
    if not verified:
        print(f"note: {path} carries no digest (written by an older version): its integrity is not checked")
    parser.set_defaults(**{k: v for k, v in saved.items() if k in vars(args) and k not in RUNTIME})
    args = parser.parse_args(argv)
    if args.resume and "--baseline" not in [a.split("=")[0] for a in argv]:  # (on with --quick) a run goes on alone
        args.baseline = False
    if path is not None:  # the run goes on in its own folder
        args.out_dir, args.run_name = str(path.parent.parent), path.parent.name
    return args, path, checkpoint


def check_options(args) -> dict:
    """Every option in range and every combination possible, before anything is loaded, built or written; returns
    the preset's overrides."""
    flag = {k: "--" + k.replace("_", "-") for k in vars(args)}
    for interval, keys in RANGES.items():
        (low, high), values = map(float, interval[1:-1].split(", ")), {k: getattr(args, k) for k in keys.split()}
        for key, v in values.items():
            if v is not None and not (math.isfinite(v) and (low < v if interval[0] == "(" else low <= v)
                                      and (v < high if interval[-1] == ")" else v <= high)):  # fmt: skip
                raise RunError(f"{flag[key]} must be a finite number in {interval}, got {v:g}")
    rows, reps, m, sev, c, name = (getattr(args, k) for k in ("batch_size", "batch_repetition", "milestones",
                                                              "shift_severities", "shift_corruptions", "run_name"))
    problems = {
        f"--batch-size ({rows}) must be a positive multiple of --batch-repetition ({reps})": rows % reps,
        f"--depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {args.depth}": (args.depth - 4) % 6 or args.depth < 10,
        "--nesterov true needs a --momentum above 0 (or --nesterov false)": args.nesterov and not args.momentum,
        f"--milestones must increase in (0, 1), got {m}": not m or m != sorted(set(m)) or not 0 < m[0] <= m[-1] < 1,
        f"--shift-corruptions must be among {', '.join(CORRUPTIONS)}": not {*c} <= {*CORRUPTIONS} or not c,
        f"--shift-severities must increase in 1..5, got {sev}": not sev or sev != sorted({*sev} & {1, 2, 3, 4, 5}),
        "--ood synthetic needs --dataset synthetic": args.ood == "synthetic" and args.dataset != "synthetic",
        f"--run-name must be a plain folder name, got {name!r}": name in ("", ".", "..") or "/" in (name or ""),
        "--quick and --smoke are exclusive: pick one": args.quick and args.smoke,
        "--baseline trains the plain backbone beside a MIMO method: pick a --method other than single":
            args.baseline and args.method == "single",
        "--baseline trains a new run beside this one: leave it out with --resume (resume each run alone)":
            args.baseline and args.resume,
    }  # fmt: skip
    for message, bad in problems.items():
        if bad:
            raise RunError(message)
    overrides = {k: v for k, v in vars(args).items() if k in MIMOConfig.__dataclass_fields__ and v is not None}
    if args.method == "single" and (overrides or args.num_subnetworks > 2):
        raise RunError(f"--method single has no MIMO options, but got {', '.join(overrides) or 'num_subnetworks'}")
    for key, value in overrides.items():  # one at a time, so that the message names its option
        try:
            get_preset(args.method).replace(**{key: value})
        except (TypeError, ValueError) as err:
            raise RunError(f"{flag[key]} {value}: {err}") from None
    return overrides


# -- 1. data: whole uint8 (N, C, H, W) tensors; batches are augmented on the device -----------------------------------
def load_data(args, rank: int, say):
    """``(train, val, test, ood, num_classes)``: (images, labels) pairs (val: None without --val-split), OOD sets."""
    choice = args.ood if args.ood != "auto" else "synthetic" if args.dataset == "synthetic" else "svhn"
    svhn = Path(args.data_dir) / "test_32x32.mat"
    use_svhn = args.shift_eval and choice == "svhn" and (svhn.is_file() or args.download)
    if args.shift_eval and choice == "svhn" and not use_svhn:
        problem = f"no SVHN test split in --data-dir (expected {svhn}): add --download"
        if args.ood == "svhn":
            raise RunError(f"--ood svhn: {problem}, or pick --ood none")
        say(f"note: no OOD evaluation: {problem}, or --ood none to silence this")
    try:
        if args.download and rank == 0:  # rank 0 fetches what is missing; the others wait
            if args.dataset == "cifar100":
                load_cifar100(args.data_dir, download=True)
            if use_svhn:
                load_svhn(args.data_dir, "test", download=True)
        if args.download and dist.is_initialized():
            dist.barrier()
        ood = {"svhn": load_svhn(args.data_dir, "test")[0][: args.ood_samples or None]} if use_svhn else {}
        if args.dataset == "cifar100":
            train_x, train_y, *test = load_cifar100(args.data_dir)
    except (ImportError, OSError, RuntimeError, ValueError) as err:
        raise RunError(f"{err}: point --data-dir at the folder with cifar-100-python/ (and test_32x32.mat), or add "
                       "--download") from None  # fmt: skip
    num_classes = 100 if args.dataset == "cifar100" else args.synthetic_classes
    if args.dataset == "synthetic":
        kw = dict(image_size=args.synthetic_size, noise=args.synthetic_noise, object_size=args.synthetic_object_size,
                  clutter=args.synthetic_clutter, seed=args.data_seed)
        train = SyntheticImageDataset(args.synthetic_train, num_classes, train=True, **kw)
        test_set = SyntheticImageDataset(args.synthetic_test, num_classes, train=False, **kw)
        train_x, train_y, test = train.data, train.targets, (test_set.data, test_set.targets)
        if args.shift_eval and choice == "synthetic":  # images of the same kind, of classes the model never saw
            ood = {"synthetic": synthetic_ood_dataset(test_set, args.ood_samples or len(test_set)).data}
    val = None
    if args.val_split > 0:  # the same held-out images for every seed of a --data-seed
        n_val, g = max(1, round(args.val_split * len(train_y))), torch.Generator().manual_seed(args.data_seed)
        kept, held = (s.indices for s in random_split(range(len(train_y)), [len(train_y) - n_val, n_val], g))
        val, train_x, train_y = (train_x[held], train_y[held]), train_x[kept], train_y[kept]
    return (train_x, train_y), val, tuple(test), ood, num_classes


# -- 4. SGD with the recipe's schedule --------------------------------------------------------------------------------
def make_optimizer(args, model, lr: float, steps_per_epoch: int):
    """SGD and its per-step schedule: a linear warmup, then x gamma at each milestone (the paper) or a half cosine."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, nesterov=args.nesterov,
                                weight_decay=args.weight_decay)  # fmt: skip
    warmup, total = round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch
    milestones = [round(f * total) for f in args.milestones]

    def factor(step: int) -> float:  # of the peak lr, at a step
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if args.lr_schedule == "step":
            return warm * args.lr_gamma ** sum(step >= m for m in milestones)
        return warm * 0.5 * (1 + math.cos(math.pi * min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- the run ----------------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
    """Run the recipe with the command line ``argv``: the method, and with --baseline first the plain backbone."""
    resume_command = f"python {sys.argv[0]} --resume"
    args, resume_path, checkpoint = parse_options(argv, resume_command)
    overrides = check_options(args)
    world, rank, local_rank = (int(os.environ.get(k, "0")) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    world, say = max(world, 1), partial(print, flush=True) if rank == 0 else lambda *a, **k: None
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:  # torch says whether the device exists here (and holds values: not meta)
        device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else args.device)
        torch.zeros(1, device=device).item()
    except (AssertionError, NotImplementedError, RuntimeError) as err:
        raise RunError(f"--device {args.device}: {str(err).splitlines()[0][:150]} (use --device cpu)") from None
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
        atexit.register(gc.collect)  # (first) free DDP's reducer: gloo's teardown during interpreter exit can abort
    data = load_data(args, rank, say)  # the same images for both trainings
    plan = [(args, overrides)]
    if args.baseline:  # the plain backbone first, same recipe and steps, in a folder of its own
        single = argparse.Namespace(**{**vars(args), "method": "single", "run_name": args.run_name and
                                       f"{args.run_name}-single"})  # fmt: skip
        plan.insert(0, (single, {}))
    progress = report.Progress(len(plan), enabled=args.progress and rank == 0)
    try:
        summaries = [train(a, over, data, device, progress, resume_command, resume_path, checkpoint)
                     for a, over in plan]  # fmt: skip
    finally:
        progress.close()
    if len(summaries) > 1:
        say(f"\nthe plain backbone and {args.method} (M = {args.num_subnetworks}), the same recipe and "
            f"{summaries[0]['steps']} steps each, on the test split:", report.comparison_table(summaries), sep="\n")


def train(args, overrides: dict, data, device: torch.device, progress, resume_command: str, resume_path, checkpoint):
    """Train one network with the options ``args`` (2. to 6.) and return its summary."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    box = [args.run_name or f"{args.method}-wrn{args.depth}-{args.width}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if world > 1:  # rank 0's clock names the run
        dist.broadcast_object_list(box, src=0)
    run_dir = Path(args.out_dir) / box[0]
    runs.check_run_folder(run_dir, new=checkpoint is None, resume_command=resume_command,
                          option="--resume" if checkpoint else "--out-dir")  # fmt: skip
    progress.start_run(args.method)
    say = progress.write if rank == 0 else lambda *lines: None

    # 1. data; per process, a generator for the augmentation and one for the mixing masks
    torch.manual_seed(args.seed)
    seed = 1000 * args.seed + 2 * rank
    gens = {"data": torch.Generator(device).manual_seed(seed), "mix": torch.Generator(device).manual_seed(seed + 1)}
    (train_x, train_y), val, test, ood, num_classes = data
    unique = args.batch_size // args.batch_repetition  # unique images per step and process
    sampler = DistributedSampler(TensorDataset(train_y), world, rank, seed=args.seed, drop_last=True)  # order per epoch
    steps_per_epoch = len(sampler) // unique
    if steps_per_epoch < 1:
        raise RunError(f"not one batch per epoch: {len(sampler)} training images per process for {unique} per step")
    on_device = args.data_path == "device"  # the whole uint8 dataset on the device (CIFAR-100: 180 MB), or workers
    tensors = (train_x.to(device), train_y.to(device)) if on_device else (train_x, train_y)
    loader = DataLoader(TensorDataset(*tensors), batch_size=None, sampler=BatchSampler(sampler, unique, drop_last=True),
                        num_workers=0 if on_device else args.workers)  # batches of indices: one indexing per step
    val_all = val and tuple(t.to(device) for t in val)  # every process fits the temperature on all of them
    test, val = (p and tuple(t[rank::world].to(device) for t in p) for p in (test, val))  # a share of them per process

    # 2. model; 3. MIMO batching: (B, C, H, W) -> (B * b, M, C, H, W), every repeated copy cropped and flipped
    wrn = dict(depth=args.depth, width=args.width, num_classes=num_classes, init=args.init)  # as the recipe names it
    model = wide_resnet(**wrn)
    if args.method != "single":
        model = MIMOWrapper(model, args.num_subnetworks, preset=args.method, **overrides)
    mimo, m = isinstance(model, MIMOWrapper), getattr(model, "num_subnetworks", 1)
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    normalize = Normalize.from_images(train_x, channels_last=args.channels_last).to(device)
    augment = partial(random_crop_flip, padding=4, generator=gens["data"])
    batcher = MIMOBatcher(m, args.batch_repetition, model.config.input_repetition if mimo else 0.0,
                          transform=lambda x: normalize(augment(x)), generator=gens["data"])  # fmt: skip
    criterion = model.make_loss(args.label_smoothing) if mimo else (  # the plain network: its first input only
        lambda logits, ys: F.cross_entropy(logits, ys[:, 0], label_smoothing=args.label_smoothing))

    # 4. SGD and its schedule; the peak lr scales with the unique images of all processes
    lr = args.lr or args.base_lr * unique * world / 128
    optimizer, scheduler = make_optimizer(args, model, lr, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    start_epoch, history, saved_at = 0, [], None
    if checkpoint is not None:  # on exactly where it stopped (a new --lr applies from the next step)
        parts = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        same_rng = runs.restore_training(checkpoint, parts, gens, source=f"--resume: checkpoint {resume_path}")
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        start_epoch, history, saved_at = checkpoint["epoch"], checkpoint["history"], (resume_path, checkpoint["epoch"])
        say(f"resumed {run_dir} from {resume_path.name} at epoch {start_epoch}" + ("" if same_rng else ", re-seeded"))
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    train_model = torch.compile(train_model) if args.compile else train_model

    # 6. the run folder: the first thing written, once nothing can fail any more
    config = {**vars(args), "run_name": run_dir.name, "lr_resolved": lr, "steps_per_epoch": steps_per_epoch,
              "world_size": world, "ood_resolved": next(iter(ood), None),
              "mimo_config": dataclasses.asdict(model.config) if mimo else None}  # fmt: skip
    recipe = mimo and ModelRecipe.of(model, WRN_BUILDER, wrn)  # what rebuilds the model from the checkpoint
    splits = {"test": test} if val is None else {"val": val, "test": test}
    log = report.RunLog(run_dir, list(splits), m, rows=history, tensorboard=args.tensorboard, progress=progress,
                        purge_step=start_epoch * steps_per_epoch, enabled=rank == 0)  # fmt: skip
    log.print("config:", *(f"  {k:<20} {config[k]}" for k in sorted(config)), f"run directory: {run_dir}")
    if rank == 0:
        write_json(run_dir / "config.json", config)  # (and the folder)

    def evaluate(data, **shift):  # each process its share of the images; the metrics gather them all
        return evaluate_uncertainty(model, data, rule=args.ensemble_rule, preprocess=normalize, device=device,
                                    batch_size=args.eval_batch_size, **({"corruptions": ()} | shift))  # fmt: skip

    def evaluate_splits() -> dict:  # 5. every split's metrics, the members' health, the sharing rates (percent)
        out, sharing = {}, report.sharing_entries(sharing_rates(model) if m > 1 else None)
        for split, data in splits.items():
            res = out[split] = {**evaluate(data)["clean"], "sharing": sharing}
            res["collapsed_members"] = collapsed_members(res["individual_acc"], num_classes)
            warning = report.collapse_warning(split, res["individual_acc"], res["collapsed_members"], num_classes)
            log.print(*([warning] if warning else []))
        return out

    step, last, stopped_early, state = start_epoch * steps_per_epoch, {}, False, None
    train_time = history[-1]["time_s"] if history else 0.0
    model.train()
    for epoch in range(start_epoch, args.epochs):
        log.start_epoch(epoch + 1, args.epochs, steps_per_epoch)
        loss_sum, t0 = torch.zeros((), device=device), time.perf_counter()
        sampler.set_epoch(epoch)
        for i, (xb, yb) in enumerate(loader):
            if mimo:
                model.set_progress(min(1.0, step / (steps_per_epoch * args.epochs)))
            xs, ys = batcher(xb.to(device, non_blocking=True), yb.to(device))  # (B * b, M, C, H, W), (B * b, M)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = criterion(train_model(xs, generator=gens["mix"]) if mimo else train_model(xs[:, 0]), ys)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach()
            step += 1
            if (i + 1) % args.log_every and i + 1 < steps_per_epoch:
                continue
            if world > 1:  # one host sync every --log-every steps; every process sees a divergence
                dist.all_reduce(loss_sum.div_(world))
            if not loss_sum.isfinite() and args.amp != "fp16":  # (fp16's scaler skips such steps itself)
                kept = f"the last complete checkpoint ({saved_at[0]}, epoch {saved_at[1]}) is intact" if saved_at else (
                    "no checkpoint was written yet (the run stopped in its first epoch), there is nothing to resume")
                raise RunError(f"non-finite training loss by epoch {epoch + 1}, step {i + 1} of {steps_per_epoch}: "
                               f"not writing a checkpoint; {kept}. Try a lower --lr, or --amp off / bf16")  # fmt: skip
            rows_per_s = (i + 1) * args.batch_size * world / (time.perf_counter() - t0)
            log.step(i + 1, step, loss.item(), scheduler.get_last_lr()[0], rows_per_s)
        if world > 1:  # rank 0's BatchNorm statistics, so that every process holds the same model
            for buf in model.buffers():
                dist.broadcast(buf, src=0)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        row = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0], "train_loss_nats": float(loss_sum) /
               steps_per_epoch, "images_per_s": steps_per_epoch * args.batch_size * world / epoch_time, "time_s":
               train_time, "epoch_time_s": epoch_time}  # fmt: skip

        # 5. evaluation, at the last epoch and every --eval-every; then the checkpoint
        evaluated = epoch + 1 == args.epochs or (args.eval_every and (epoch + 1) % args.eval_every == 0)
        if evaluated:
            last = evaluate_splits()
            row.update({k: v for s, r in last.items() for k, v in report.epoch_columns(s, r, r["sharing"]).items()})
        log.epoch(row, *(next(iter(last.items())) if evaluated else ()))
        state = dict(config=config, epoch=epoch + 1, step=step, model=model.state_dict(),
                     optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                     history=log.rows, **({"recipe": recipe.to_dict()} if recipe else {}))  # fmt: skip
        saved_at = (runs.save_run_checkpoint(run_dir, state, gens), epoch + 1)
        stopped_early = 0 < args.stop_epoch <= epoch + 1 < args.epochs
        if stopped_early:
            log.print(f"stopping after epoch {epoch + 1} (--stop-epoch); continue with --resume {run_dir}")
            break

    last = last or evaluate_splits()  # a finished run resumed, or stopped early: the weights as they are
    if mimo and args.calibrate and val_all and state is not None and not stopped_early:  # T becomes part of the model
        fitted = model.calibrate(normalize(val_all[0]), val_all[1], batch_size=args.eval_batch_size)
        log.print(f"calibrated on {len(val_all[1])} validation images: temperature {fitted[args.ensemble_rule]:.3f}")
        saved_at = (runs.save_run_checkpoint(run_dir, {**state, "model": model.state_dict()}, gens), saved_at[1])
    ms_per_image = inference_ms_per_image(model, normalize(test[0]), args.eval_batch_size)
    shift = None
    if args.shift_eval and not stopped_early:  # the test set corrupted on the fly, and the OOD set
        t_shift = time.perf_counter()  # at the model's temperature; the plain network's fitted here (--calibrate)
        shift = evaluate(test, ood={k: x[rank::world] for k, x in ood.items()} or None, seed=args.data_seed,
                         val=val if args.calibrate and not mimo else None, corruptions=args.shift_corruptions,
                         severities=args.shift_severities)  # fmt: skip
        if rank == 0:
            report.write_shift_report(run_dir, shift, title=f"{args.method}: clean, corrupted and OOD test images",
                                      ood_set=config["ood_resolved"], corruption_seed=args.data_seed)  # fmt: skip
        log.print(f"shift evaluation: {time.perf_counter() - t_shift:.1f} s")
    log.close()

    # 6. the report
    summary = report.run_summary(
        last, shift, **{k: config[k] for k in ("ensemble_rule", "method", "seed", "depth", "width", "dataset")},
        epochs=log.rows[-1]["epoch"] if log.rows else 0, steps=step, num_subnetworks=m, world_size=world,
        run_dir=str(run_dir), train_time_s=train_time, stopped_early=stopped_early,
        images_per_s=step * args.batch_size * world / max(train_time, 1e-9), test_ms_per_image=ms_per_image,
        parameters=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip
    if world > 1:  # the largest difference of any weight between processes (0: they hold the same model)
        spread = torch.cat([t.double().flatten() for t in model.state_dict().values() if t.is_floating_point()])
        dist.all_reduce(spread := torch.stack([spread, -spread]), op=dist.ReduceOp.MAX)
        summary["rank_max_abs_diff"] = float((spread[0] + spread[1]).max())
    if rank == 0:
        write_json(run_dir / "summary.json", summary)
    log.print(report.results_table(summary), *([report.shift_table(shift, config["ood_resolved"])] if shift else []))
    return summary


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except RunError as err:  # a problem the user can fix: one line, exit code 2
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
