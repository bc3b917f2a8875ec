#!/usr/bin/env python
"""Train a MixShare vision transformer (a small timm ViT) on the library's synthetic images, on a CPU in minutes.

The backbone is timm's ViT-Tiny design (pre-norm blocks, MLP ratio 4) narrowed to width 64 with 2 heads and
shortened to 4 blocks, so that a run takes minutes on 2 CPU cores: 4x4 patches of 24x24 images (a 6x6 grid of 36
patch tokens), no class token and a head that averages the patch tokens (``global_pool="avg"``), which is what
unmixing needs: each member's head then reads the masked average of the patch tokens of its own input
(docs/how-to/vit.md). The inputs are mixed on the patch grid, after the patch projection and before timm adds the
positional embeddings.

Recipe (a transformer needs more than a CNN's SGD): AdamW (betas 0.9 / 0.999, weight decay 0.05 on weight matrices
only), linear warmup over the first 5 % of the steps then cosine decay to 0, gradient clipping at norm 1, and the
paper's augmentation drawn independently for every repeated copy: random crop (zero padding 4) and horizontal flip.
Label smoothing, stochastic depth and random erasing (DeiT's) are options, off by default: this 0.2 M-parameter model
underfits a short budget, and with DeiT's values MixShare's ensemble lost 2.7 points (1000 steps on 5000 images, seed
0: 81.2 % against 83.9 %).

Initialisation: the core is timm's ViT as built; the wrapper draws its M heads (and, for presets with independent
encoders, its M patch-embedding copies) afresh with the split's ``reinit``, timm's own ViT initialisation (the head's
linear layer truncated-normal with std 0.02 and a zero bias; the patch projection PyTorch's default).
``--reinit torch`` draws them with PyTorch's defaults instead (``reset_parameters()``: the head's weight and bias
uniform in ``+-1 / sqrt(dim)``), the library's choice before it used each backbone's own (docs/reproducing.md,
"Backbones' own initialisers against PyTorch's defaults").

Every method gets the same budget: ``--steps`` steps of ``--rows`` rows (64 images through the network per step).
The MIMO presets see ``rows / 2`` images per step, each twice (batch repetition 2, every member gets its own
shuffle); the plain ViT (``--method single``) sees ``rows`` distinct images per step. The defaults (2000 training
images, 3000 steps: 48 epochs for the presets) are the setting in which MixShare's ensemble beat each of its members
in every seed measured (docs/how-to/vit.md): with more images and fewer epochs the two members stay nearly one
network and the ensemble gains little.

Usage:
    python examples/vit_synthetic.py                          # MixShare, M = 2 (about 4 min on an idle core)
    python examples/vit_synthetic.py --method mixmo --seed 1  # any preset of the library, or "single"
    python examples/vit_synthetic.py --val 400                # also fit a temperature on 400 held-out images
    python examples/vit_synthetic.py --reinit torch           # heads drawn with PyTorch's defaults, not timm's
    python examples/vit_synthetic.py --json runs/vit.json     # also write the summary as JSON
    python examples/vit_synthetic.py --smoke                  # seconds: a check that it runs (CI)

``main(argv)`` returns the summary: ``ensemble_acc``, ``individual_acc`` (list of M), ``mean_individual_acc``,
``disagreement`` (fractions in [0, 1]), ``nll`` (nats per image), ``ece`` (15 bins), ``brier`` (summed over classes),
for the ensemble's mean of member probabilities; ``classifier_sharing`` / ``encoder_sharing`` (percent, paper Sec. 2:
per-feature min / max of the heads' first-layer columns, resp. the patch-embedding kernels; ``*_sum_ratio`` the
histogram-overlap reading; ``None`` for the plain ViT); ``temperature`` and ``calibrated`` (``nll``, ``ece``,
``brier`` of the test set at that temperature; both ``None`` without ``--val``); ``chance``, ``steps``,
``train_time_s``, ``rows_per_s``, ``history`` (every evaluation) and ``config``.

Calibration: MIMO members trained on mixed inputs are under-confident on clean ones (ECE 0.1 to 0.2 here, against
0.01 for the plain ViT). ``--val N`` holds out the last N training images and fits one temperature on them
(``mixshare_layers.evaluation.fit_temperature``, on the ensemble's log-probabilities): accuracies do not change.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixshare_layers import PRESETS, MIMOLoss, MIMOWrapper, SyntheticImageDataset, split_backbone
from mixshare_layers.analysis import sharing_rates
from mixshare_layers.data import Normalize, random_crop_flip
from mixshare_layers.evaluation import fit_temperature, tempered_log_probs
from mixshare_layers.evaluation.metrics import EnsembleMetrics
from mixshare_layers.files import write_json

# -- defaults (every one is a command-line option) ------------------------------------------------------------------
METHOD, M, REPETITION = "mixshare", 2, 2
CLASSES, IMAGE, TRAIN, TEST, NOISE, OBJECT_SIZE, CLUTTER = 10, 24, 2000, 2000, 3.0, 1.0, 0.0  # SyntheticImageDataset
PATCH, DIM, DEPTH, HEADS, DROP_PATH = 4, 64, 4, 2, 0.0  # the ViT: 6x6 patch grid, 0.2 M parameters
STEPS, ROWS, LR, WEIGHT_DECAY, WARMUP = 3000, 64, 1e-3, 0.05, 0.05  # ROWS counts the repeated images of a step
LABEL_SMOOTHING, CLIP, ERASING = 0.0, 1.0, 0.0
EVAL_EVERY, THREADS, VAL, REINIT = 250, 1, 0, "backbone"
METHODS = ("single", *PRESETS)
SMOKE = dict(train=96, test=64, classes=4, image=16, dim=24, depth=1, steps=3, rows=16, eval_every=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default=METHOD, help="a preset, or 'single' (the plain ViT)")
    p.add_argument("--num-subnetworks", type=int, default=M)
    p.add_argument("--batch-repetition", type=int, default=None,
                   help=f"copies of each image per step ({REPETITION} for the presets, 1 for 'single')")  # fmt: skip
    p.add_argument("--classes", type=int, default=CLASSES)
    p.add_argument("--image", type=int, default=IMAGE, help="image side (pixels)")
    p.add_argument("--train", type=int, default=TRAIN, help="training images")
    p.add_argument("--test", type=int, default=TEST, help="test images")
    p.add_argument("--val", type=int, default=VAL,
                   help="training images held out to fit a temperature on (the last ones of the training split; 0: "
                   "none): the summary then also gives the test metrics at that temperature")  # fmt: skip
    p.add_argument("--noise", type=float, default=NOISE, help="pixel noise of the synthetic images (higher: harder)")
    p.add_argument(
        "--object-size",
        type=float,
        default=OBJECT_SIZE,
        help="side of the window showing the class texture, as a fraction of the image (1: whole image)",
    )
    p.add_argument(
        "--clutter",
        type=float,
        default=CLUTTER,
        help="amplitude of a random background texture, relative to the class texture's (0: none)",
    )
    p.add_argument("--patch", type=int, default=PATCH, help="patch side (pixels)")
    p.add_argument("--dim", type=int, default=DIM, help="embedding width")
    p.add_argument("--depth", type=int, default=DEPTH, help="transformer blocks")
    p.add_argument("--heads", type=int, default=HEADS, help="attention heads")
    p.add_argument("--drop-path", type=float, default=DROP_PATH, help="stochastic depth rate")
    p.add_argument("--reinit", choices=("backbone", "torch"), default=REINIT,
                   help="how the wrapper draws its heads and independent encoder copies: timm's ViT initialisation "
                   "(the split's own) or PyTorch's defaults")  # fmt: skip
    p.add_argument("--steps", type=int, default=STEPS, help="training steps (the budget)")
    p.add_argument("--rows", type=int, default=ROWS, help="rows per step, counting the repeated images")
    p.add_argument("--lr", type=float, default=LR, help="peak learning rate of AdamW")
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    p.add_argument("--warmup", type=float, default=WARMUP, help="share of the steps spent warming up")
    p.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING)
    p.add_argument("--clip", type=float, default=CLIP, help="gradient norm clipping (0: off)")
    p.add_argument("--erasing", type=float, default=ERASING, help="probability of random erasing per image")
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY, help="steps between test evaluations (0: at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch CPU threads (0: torch's default); the matrices are small, one thread is the safe choice "
                   "on a shared machine")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the summary to this file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps: seconds")
    return p


# -- data and augmentation, batched on the device -------------------------------------------------------------------
class Augment:
    """uint8 images ``(N, C, H, W)`` -> standardised float images, with a random crop (zero padding 4), a flip and
    random erasing drawn independently per image (every repeated copy of an image gets its own)."""

    def __init__(self, train_uint8: Tensor, erasing: float, generator: torch.Generator, padding: int = 4) -> None:
        # per-channel mean and std of the training images, kept on their device
        self.normalize = Normalize.from_images(train_uint8).to(train_uint8.device)
        self.erasing, self.g, self.padding = erasing, generator, padding

    def __call__(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        dev, g = x.device, self.g
        out = self.normalize(random_crop_flip(x, self.padding, g))
        if self.erasing > 0:  # a box of 2-33 % of the image, aspect ratio in [0.3, 3.3], filled with noise
            area = h * w * (0.02 + 0.31 * torch.rand(n, device=dev, generator=g))
            aspect = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * torch.rand(n, device=dev, generator=g))
            bh = (area * aspect).sqrt().round().clamp(1, h).long()
            bw = (area / aspect).sqrt().round().clamp(1, w).long()
            y0 = (torch.rand(n, device=dev, generator=g) * (h - bh + 1)).long()
            x0 = (torch.rand(n, device=dev, generator=g) * (w - bw + 1)).long()
            ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
            inside = ((ys >= y0[:, None]) & (ys < (y0 + bh)[:, None]))[:, :, None] & (
                (xs >= x0[:, None]) & (xs < (x0 + bw)[:, None])
            )[:, None, :]  # (N, H, W)
            erase = inside & (torch.rand(n, 1, 1, device=dev, generator=g) < self.erasing)
            noise = torch.randn(out.shape, device=dev, generator=g)
            out = torch.where(erase[:, None], noise, out)
        return out


# -- model and optimiser --------------------------------------------------------------------------------------------
def build_vit(args: argparse.Namespace) -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=args.image,
        patch_size=args.patch,
        embed_dim=args.dim,
        depth=args.depth,
        num_heads=args.heads,
        num_classes=args.classes,
        global_pool="avg",  # average of the patch tokens: unmixing generalises it to each member's masked average
        class_token=False,
        drop_path_rate=args.drop_path,
    )


def build_model(args: argparse.Namespace, m: int) -> nn.Module:
    """The plain ViT (``--method single``), or the ViT wrapped with M members whose heads and independent encoder
    copies are drawn by the split's ``reinit`` (timm's) or, with ``--reinit torch``, by PyTorch's defaults."""
    backbone = build_vit(args)
    if args.method == "single":
        return backbone
    split = split_backbone(backbone)
    if args.reinit == "torch":
        split = split._replace(reinit=None)  # a split without reinit: every drawn layer's reset_parameters()
    return MIMOWrapper(backbone, m, args.method, split=split, total_steps=args.steps)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and kernels only (not on norms, biases, positional embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith("pos_embed") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return factor


# -- evaluation -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, x: Tensor, augment: Augment, batch: int = 500) -> Tensor:
    """The members' eval-mode logits ``(N, M, K)`` (``M = 1`` for the plain ViT)."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(augment.normalize(x[i : i + batch])) for i in range(0, x.shape[0], batch)])
    model.train(was_training)
    return logits if logits.dim() == 3 else logits[:, None]


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, augment: Augment, m: int, temperature: float = 1.0
) -> dict[str, Any]:
    """Ensemble metrics on ``(x, y)`` (mean of member probabilities, the ensemble's log-probabilities divided by
    ``temperature``: member accuracies and ensemble accuracy do not depend on it), and a MIMO model's sharing rates."""
    logits = predict(model, x, augment)
    metrics = EnsembleMetrics(m, "prob", device=x.device)
    log_probs = None if temperature == 1.0 else tempered_log_probs(logits, "prob", temperature)[0]
    metrics.update(logits, y, log_probs=log_probs)
    out: dict[str, Any] = dict(metrics.compute())
    rates = sharing_rates(model) if isinstance(model, MIMOWrapper) else {}
    for key in ("classifier", "encoder", "classifier_sum_ratio", "encoder_sum_ratio"):
        out[key.replace("classifier", "classifier_sharing").replace("encoder", "encoder_sharing")] = rates.get(key)
    return out


# -- the run --------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:  # the smoke sizes replace the defaults; options given on the command line still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    mimo = args.method != "single"
    b = args.batch_repetition or (REPETITION if mimo else 1)
    m = args.num_subnetworks if mimo else 1
    if args.rows % b:
        parser.error(f"--rows {args.rows} must be a multiple of the batch repetition {b}")
    if not 0 <= args.val < args.train:
        parser.error(f"--val {args.val} must be at least 0 and below --train {args.train}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed)

    # data: uint8 tensors on the device; the test split holds other samples of the same classes
    kw = dict(
        num_classes=args.classes, image_size=args.image, seed=args.seed, noise=args.noise,
        object_size=args.object_size, clutter=args.clutter,
    )  # fmt: skip
    try:
        train, test = SyntheticImageDataset(args.train, **kw), SyntheticImageDataset(args.test, train=False, **kw)
    except ValueError as err:  # a data option out of range: the dataset's message names it
        parser.error(str(err))
    n_train = args.train - args.val  # the last --val images of the training split are held out
    x_train, y_train = train.data[:n_train].to(device), train.targets[:n_train].to(device)
    x_val, y_val = train.data[n_train:].to(device), train.targets[n_train:].to(device)
    x_test, y_test = test.data.to(device), test.targets.to(device)
    augment = Augment(x_train, args.erasing, g)

    model = build_model(args, m).to(device).train()
    loss_fn = MIMOLoss(label_smoothing=args.label_smoothing)  # the preset's loss weights, read from the output
    batcher = model.make_batcher(b, transform=augment, generator=g) if isinstance(model, MIMOWrapper) else None
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    warmup = max(1, round(args.warmup * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, args.steps))
    params = sum(p.numel() for p in model.parameters())
    unique = args.rows // b
    print(f"{args.method}: timm ViT {args.depth} x {args.dim} ({args.heads} heads, {args.patch}x{args.patch} patches, "
          f"{(args.image // args.patch) ** 2} tokens), M = {m}, {params / 1e6:.2f} M parameters; {args.steps} steps of "
          f"{unique} images x {b} ({args.steps * unique / n_train:.1f} epochs)", flush=True)  # fmt: skip
    print(f"data: {train!r}; test split: {test!r}", flush=True)

    order, cursor = torch.randperm(n_train, device=device, generator=g), 0
    history, t_train = [], 0.0
    for step in range(args.steps):
        t0 = time.perf_counter()
        if cursor + unique > n_train:  # a new epoch: a new order
            order, cursor = torch.randperm(n_train, device=device, generator=g), 0
        idx = order[cursor : cursor + unique]
        cursor += unique
        if batcher is not None:
            xs, ys = batcher(x_train[idx], y_train[idx])  # (rows, M, C, H, W), (rows, M)
            loss = loss_fn(model(xs), ys)
        else:
            xs = augment(x_train[idx].repeat(b, 1, 1, 1))  # (rows, C, H, W)
            loss = F.cross_entropy(model(xs), y_train[idx].repeat(b), label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        scheduler.step()
        t_train += time.perf_counter() - t0
        last = step + 1 == args.steps
        if last or (args.eval_every and (step + 1) % args.eval_every == 0):
            value = loss.item()  # read only here: no host sync in the other steps
            if not math.isfinite(value):
                raise FloatingPointError(f"the training loss is {value} at step {step + 1}")
            res = evaluate(model, x_test, y_test, augment, m)
            history.append({"step": step + 1, "loss": value, **res})
            members = " / ".join(f"{100 * a:.1f}" for a in res["individual_acc"])
            print(f"step {step + 1:>5}  loss {value:.3f}  test acc {100 * res['ensemble_acc']:.2f} % (members "
                  f"{members})  NLL {res['nll']:.3f}  ECE {res['ece']:.3f}  {t_train:.0f} s", flush=True)  # fmt: skip

    summary = {
        **history[-1],
        "mean_individual_acc": sum(history[-1]["individual_acc"]) / m,
        "chance": 1.0 / args.classes,
        "steps": args.steps,
        "train_time_s": t_train,
        "rows_per_s": args.steps * args.rows / t_train,
        "history": history,
        "temperature": None,  # with --val: fitted on the held-out images, and the test metrics at it
        "calibrated": None,
        "config": {**vars(args), "batch_repetition": b, "num_subnetworks": m, "parameters": params},
    }
    print(f"\n{args.method}, seed {args.seed}: ensemble {100 * summary['ensemble_acc']:.2f} %, members "
          + ", ".join(f"{100 * a:.2f}" for a in summary["individual_acc"])
          + f" % (chance {100 * summary['chance']:.0f} %), NLL {summary['nll']:.4f}, ECE {summary['ece']:.4f}"
          + ("" if summary["classifier_sharing"] is None else
             f", sharing: classifier {summary['classifier_sharing']:.1f} %, encoder {summary['encoder_sharing']:.1f} %")
          + f"; {t_train:.0f} s of training ({summary['rows_per_s']:.0f} rows/s)")  # fmt: skip
    if args.val:
        temperature = fit_temperature(predict(model, x_val, augment), y_val, "prob")
        calibrated = evaluate(model, x_test, y_test, augment, m, temperature)
        summary["temperature"] = temperature
        summary["calibrated"] = {key: calibrated[key] for key in ("nll", "ece", "brier")}
        print(f"temperature {temperature:.3f} (fitted on {args.val} held-out training images): test NLL "
              f"{calibrated['nll']:.4f}, ECE {calibrated['ece']:.4f}, Brier {calibrated['brier']:.4f}")  # fmt: skip
    if args.json:
        write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
