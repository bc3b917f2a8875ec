"""``python -m mixshare_layers.analysis CHECKPOINT --out DIR``: sharing rates and influence figures of a checkpoint.

Writes, under ``DIR`` (every file atomically):

* ``sharing.json``: the checkpoint's settings, the encoder / classifier sharing rates (both reductions, percent),
  the App. D variance sharing rate of each probed layer, the raw ``(M, F)`` influence tables, and the
  ``evaluation`` of the model on test images of its dataset (``--eval-images``): ``raw`` metrics and, when the
  checkpoint's model holds a fitted temperature (``MIMOWrapper.calibrate``), ``calibrated`` ones at that stored
  temperature (``temperature_source: "checkpoint"``); without one, ``calibrated`` is ``null`` (raw only);
* ``encoder_influence.png/.svg`` and ``classifier_influence.png/.svg`` (Fig. 3 / Fig. 5 of the paper);
* ``variance_<layer>.png/.svg`` for each probed core layer (Fig. 6), unless ``--variance-images 0``.

The checkpoint is a dict of plain values (format in :mod:`mixshare_layers.analysis.checkpoint`): any wrapped model
saved with its recipe (:func:`mixshare_layers.checkpoint.save_model`: the library's WRN, a torchvision or timm
backbone, a described hand-made split), e.g. the ``checkpoint.pt`` written by ``examples/cifar100_wrn.py``, or a
wrapped WRN with its config; a model built by a builder your code registered is analysed from Python
(:func:`main` with the same arguments, after :func:`~mixshare_layers.checkpoint.register_builder`). It is loaded with
:func:`mixshare_layers.checkpoint.load_checkpoint` (``weights_only=True`` only, digest checked). Every error (a bad
option, a damaged or refused checkpoint, an output folder that cannot be written) is one line on stderr and exit
code 2, and nothing is written unless the analysis runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import torch
from torch import Tensor

from ..checkpoint import CheckpointError
from ..evaluation.evaluate import evaluate_uncertainty
from ..files import folder_problem, write_json
from ..wrapper import MIMOWrapper
from .checkpoint import load_wrn_checkpoint
from .sharing import classifier_influence, encoder_influence, sharing_rate
from .variance import feature_variance_influence

DATA_CHOICES = ("auto", "synthetic", "cifar100", "none")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _fail(message: str, cause: BaseException | None = None) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from cause


def _device_problem(name: str) -> str | None:
    """Why ``name`` is not a usable torch device here, or None."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"{name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)"
    if device.type == "cpu":
        return None
    if device.type == "meta":
        return "'meta' tensors hold no values: pick a real device"
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        return f"{name!r}: no {device.type} device is available here (use cpu)"
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        return f"{name!r}: there are only {count} {device.type} devices"
    return None


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every option checked before anything is loaded or written (``p.error``: one line, exit code 2)."""
    if args.variance_images < 0:
        p.error(f"argument --variance-images: must be >= 0, but got {args.variance_images}")
    if args.eval_images < 0:
        p.error(f"argument --eval-images: must be >= 0, but got {args.eval_images}")
    if args.image_size is not None and args.image_size < 4:
        p.error(f"argument --image-size: must be >= 4, but got {args.image_size}")
    if args.layers is not None and not args.layers:
        p.error("argument --layers: give at least one module name (or leave the option out)")
    problem = _device_problem(args.device)
    if problem is not None:
        p.error(f"argument --device: {problem}")
    problem = folder_problem(args.out)
    if problem is not None:
        p.error(f"argument --out: cannot write to {args.out}: {problem}")
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        p.error('figures need matplotlib: pip install "mixshare-layers[analysis]", or add --no-plots')
    if args.data == "cifar100" and max(args.variance_images, args.eval_images) > 0:
        if not (Path(args.data_root) / "cifar-100-python").is_dir():
            p.error(
                f"argument --data-root: no CIFAR-100 in {args.data_root!r} (expected a cifar-100-python folder "
                "there; never downloaded): give --data-root, or --data synthetic / none"
            )
        if importlib.util.find_spec("torchvision") is None:
            p.error('--data cifar100 needs torchvision: pip install "mixshare-layers[examples]"')


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m mixshare_layers.analysis",
        description="Feature-sharing analysis of a MIMO / MixMo / MixShare checkpoint (paper Sec. 2 and App. D).",
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint file with the model's weights and its recipe (mixshare_layers.checkpoint.save_model, "
        "examples/cifar100_wrn.py), or a wrapped WRN's weights and config (see the module docs)",
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument(
        "--data",
        choices=DATA_CHOICES,
        default="auto",
        help="images for the App. D variance influence and the evaluation: 'auto' = the checkpoint's dataset "
        "(synthetic or cifar100; cifar100 only when --data-root holds it), 'none' = skip both",
    )
    p.add_argument("--data-root", default="./data", help="folder with torchvision's CIFAR-100 (never downloaded)")
    p.add_argument("--variance-images", type=int, default=512, help="test images for the variance (0: skip)")
    p.add_argument(
        "--eval-images",
        type=int,
        default=512,
        help="labelled test images to evaluate the model on, raw and at the checkpoint's stored temperature when "
        "it holds one (0: skip)",
    )
    p.add_argument("--rule", choices=("prob", "logit"), default="prob", help="ensemble rule of the evaluation")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the synthetic images for the variance (default: the checkpoint's config, else 32)",
    )
    p.add_argument("--layers", nargs="*", default=None, help="module names to probe (default: each core stage)")
    p.add_argument("--sort", choices=("owner", "sharing", "none"), default="owner", help="feature order in figures")
    p.add_argument("--formats", nargs="+", default=["png", "svg"], choices=("png", "svg", "pdf"))
    p.add_argument("--no-plots", action="store_true", help="write only sharing.json (no matplotlib needed)")
    p.add_argument("--device", default="cpu", help="device for the variance forward passes")
    return p


def _rates(h: Tensor) -> dict[str, float]:
    return {"mean_ratio": float(sharing_rate(h, "mean-ratio")), "sum_ratio": float(sharing_rate(h, "sum-ratio"))}


class _TestImages(NamedTuple):
    images: Tensor  #: ``(N, C, H, W)`` in ``[0, 1]``
    labels: Tensor  #: ``(N,)``
    source: str  #: "synthetic" or "cifar100"
    normalise: Callable[[Tensor], Tensor]  #: the checkpoint's training normalisation (or the images' own)


def _test_images(config: dict[str, Any], args: argparse.Namespace, model: MIMOWrapper) -> _TestImages | None:
    """The first ``max(--variance-images, --eval-images)`` labelled test images of the checkpoint's dataset, or
    None to skip both."""
    n = max(args.variance_images, args.eval_images)
    if n == 0 or args.data == "none":
        return None
    dataset = str(config.get("dataset", "synthetic")).lower()
    source = dataset if args.data == "auto" else args.data
    if source.startswith("synth"):
        from ..data import SyntheticImageDataset

        size = args.image_size or int(config.get("synthetic_size", config.get("image_size", 32)))
        seed = int(config.get("data_seed", 0))
        classes = int(config.get("num_classes") or model.num_classes or 10)
        channels = getattr(model.encoder, "input_channels", None) or 3
        test = SyntheticImageDataset(
            n,
            max(2, classes),
            size,
            channels,
            train=False,
            seed=seed,
            noise=float(config.get("synthetic_noise", 2.5)),
            object_size=float(config.get("synthetic_object_size", 1.0)),  # the hard variants' settings
            clutter=float(config.get("synthetic_clutter", 0.0)),
        )
        images, labels, source = test.data, test.targets, "synthetic"
    elif source.startswith("cifar"):
        root = Path(args.data_root)
        if args.data == "auto" and not (root / "cifar-100-python").is_dir():
            print(
                f"variance influence and evaluation skipped: no CIFAR-100 under {root} (give --data-root)",
                file=sys.stderr,
            )
            return None
        try:
            import torchvision
        except ImportError as exc:
            _fail('--data cifar100 needs torchvision: pip install "mixshare-layers[examples]"', exc)
        try:
            cifar = torchvision.datasets.CIFAR100(str(root), train=False, download=False)
        except RuntimeError as err:  # torchvision's "not found or corrupted"
            _fail(f"CIFAR-100 in {root} cannot be read ({err}): check --data-root", err)
        images = torch.from_numpy(cifar.data[:n]).permute(0, 3, 1, 2).contiguous()
        labels, source = torch.tensor(cifar.targets[:n]), "cifar100"
    else:
        print(
            f"variance influence and evaluation skipped: unknown dataset {dataset!r} in the checkpoint", file=sys.stderr
        )
        return None
    x = images.float() / 255.0
    mean = config.get("mean") or config.get("normalize_mean")
    std = config.get("std") or config.get("normalize_std")
    if mean is None or std is None:  # the test images' own channel statistics (~ the training set's, as the script)
        mean_t, std_t = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    else:
        mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)

    def normalise(batch: Tensor) -> Tensor:
        m, s = mean_t.to(batch.device).view(1, -1, 1, 1), std_t.to(batch.device).view(1, -1, 1, 1)
        return (batch - m) / s

    return _TestImages(x, labels, source, normalise)


#: the metrics of the evaluation kept in sharing.json (fractions, nats)
EVALUATION_METRICS = ("ensemble_acc", "mean_individual_acc", "individual_acc", "nll", "ece", "adaptive_ece", "brier")


def _evaluation(model: MIMOWrapper, test: _TestImages, args: argparse.Namespace) -> dict[str, Any]:
    """The model's metrics on the test images, raw and at the temperature it stores for ``--rule`` (if any)."""
    n = min(args.eval_images, test.images.shape[0])
    data = (test.images[:n], test.labels[:n])
    report = evaluate_uncertainty(
        model, data, rule=args.rule, corruptions=(), preprocess=test.normalise, device=args.device, batch_size=256
    )

    def kept(metrics: dict[str, Any]) -> dict[str, Any]:
        return {k: metrics[k] for k in EVALUATION_METRICS if k in metrics}

    stored = report["temperature_source"] == "model"
    return {
        "data": test.source,
        "images": n,
        "rule": args.rule,
        "units": "fractions and nats per sample",
        "temperature": report["temperature"] if stored else None,
        "temperature_source": "checkpoint" if stored else None,
        "raw": kept(report["clean"]),
        "calibrated": kept(report["calibrated"]["clean"]) if stored else None,
    }


def _evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    def line(m: dict[str, Any]) -> str:
        return f"accuracy {100 * m['ensemble_acc']:.2f} %, NLL {m['nll']:.4f}, ECE {100 * m['ece']:.2f} %"

    head = f"evaluation on {evaluation['images']} {evaluation['data']} test images (rule {evaluation['rule']!r})"
    lines = [f"{head}: raw {line(evaluation['raw'])}"]
    if evaluation["calibrated"] is None:
        lines.append("  the checkpoint holds no fitted temperature: raw only")
    else:
        t = evaluation["temperature"]
        lines.append(f"  calibrated with the checkpoint's stored temperature {t:.4g}: {line(evaluation['calibrated'])}")
    return lines


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the analysis; returns what ``sharing.json`` holds.

    Raises:
        SystemExit: (code 2, one line on stderr) a bad option.
        CheckpointError: the checkpoint cannot be loaded safely or rebuilt (one-line message naming the file).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    out = Path(args.out)
    model, config = load_wrn_checkpoint(args.checkpoint)
    if model.num_subnetworks < 2:
        raise CheckpointError(
            args.checkpoint, f"its model has num_subnetworks={model.num_subnetworks}: no subnetworks to compare"
        )

    tables: dict[str, Tensor] = {
        "encoder": encoder_influence(model),
        "classifier": classifier_influence(model),
    }
    test = _test_images(config, args, model)
    model.to(args.device)
    evaluation = None
    if test is not None and args.eval_images > 0:
        try:
            evaluation = _evaluation(model, test, args)
        except (RuntimeError, AssertionError, TypeError, ValueError) as err:  # the model refuses these images
            text = " ".join(str(err).split())[:300]
            _fail(
                f"the evaluation on {tuple(test.images.shape[1:])} images failed ({type(err).__name__}: {text}): give "
                "the model's input size with --image-size, or skip it with --eval-images 0",
                err,
            )
    images = None if test is None else test.normalise(test.images[: args.variance_images])
    if images is not None and images.shape[0] >= 2:
        try:
            variance = feature_variance_influence(
                model, images, layers=args.layers, fixed_input=images[0], device=args.device
            )
        except ValueError as err:  # a --layers name that is not a module of the model, or not a feature map
            if args.layers is None:
                raise
            parser.error(f"argument --layers: {err}")
        except (RuntimeError, AssertionError, TypeError) as err:  # the model refuses images of this size
            text = " ".join(str(err).split())[:300]
            _fail(
                f"the variance pass on {tuple(images.shape[1:])} images failed ({type(err).__name__}: {text}): give "
                "the model's input size with --image-size, or skip it with --data none",
                err,
            )
        for layer, h in variance.items():
            tables[f"variance:{layer}"] = h.float()
    plain_config = {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool, type(None)))}
    result: dict[str, Any] = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "method": config.get("method"),
        "num_subnetworks": model.num_subnetworks,
        "config": plain_config,
        "rates": {name: _rates(h) for name, h in tables.items()},
        "influence": {
            name: [[round(v, 7) if math.isfinite(v) else None for v in row] for row in h.tolist()]
            for name, h in tables.items()
        },
        "evaluation": evaluation,
        "figures": [],
    }
    write_json(out / "sharing.json", result)

    if not args.no_plots:
        from .plots import plot_influence

        titles = {
            "encoder": ("Input block: L1 norm of each encoder's kernel per channel", "encoder kernel L1"),
            "classifier": ("Output block: L1 norm of each head's weight column per feature", "classifier column L1"),
        }
        for name, h in tables.items():
            if name.startswith("variance:"):
                layer = name.split(":", 1)[1]
                title, ylabel, stem = (
                    f"Feature variance w.r.t. each input after {layer}",
                    "variance",
                    f"variance_{layer}",
                )
            else:
                (title, ylabel), stem = titles[name], f"{name}_influence"
            title = f"{config.get('method', '')}: {title}"
            files = plot_influence(
                h, out / _safe(stem), title=title, ylabel=ylabel, sort=args.sort, formats=args.formats
            )
            result["figures"].extend(str(f) for f in files)
        write_json(out / "sharing.json", result)

    for name, r in result["rates"].items():
        print(f"{name:>24s}: sharing {r['mean_ratio']:6.2f}% (mean ratio)  {r['sum_ratio']:6.2f}% (sum ratio)")
    if evaluation is not None:
        print(*_evaluation_lines(evaluation), sep="\n")
    print(f"wrote {out / 'sharing.json'}" + (f" and {len(result['figures'])} figures" if result["figures"] else ""))
    return result


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: :func:`main`, with a checkpoint error printed as one line; returns the exit code."""
    try:
        main(argv)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
