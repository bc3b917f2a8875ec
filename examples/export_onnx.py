"""Fold a MIMO network into one plain module and export it with torch.export and to ONNX.

At test time the M encoders of a MIMO network are summed and its M heads read the same pooled vector, so the whole
ensemble folds into one convolution + the shared core + one ``nn.Linear(D, M * K)`` (``model.fold()``). This script
builds (or loads) a wrapped WRN, folds it, exports it with a dynamic batch size, and checks the ONNX file against
the PyTorch model with onnxruntime.

    python examples/export_onnx.py --out mixshare.onnx                         # random weights, WRN-28-2, M = 2
    python examples/export_onnx.py --checkpoint runs/RUN/checkpoint.pt --out m.onnx  # a training checkpoint
    python examples/export_onnx.py --checkpoint model.pt --depth 16 --out m.onnx     # a bare MIMOWrapper state_dict

``--checkpoint`` is loaded with ``mixshare_layers.checkpoint.load_checkpoint`` (``weights_only=True`` only, never
more; the digest of files written by the library is verified): either a checkpoint with the model under ``"model"``
and its settings under ``"config"`` (examples/cifar100_wrn.py's ``checkpoint.pt``; the architecture comes from it)
or a bare ``MIMOWrapper`` state_dict (the architecture comes from ``--depth`` ``--width`` ``--num-classes``
``--num-subnetworks`` ``--preset``). A file that stores Python objects is refused, with how to convert it. Errors are
one line and exit code 2.

Needs the ``export`` extra: ``pip install mixshare-layers[export]`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import torch

from mixshare_layers import PRESETS, MIMOWrapper
from mixshare_layers.analysis import load_wrn_checkpoint
from mixshare_layers.checkpoint import CheckpointError, load_checkpoint
from mixshare_layers.files import atomic_write, folder_problem
from mixshare_layers.models import wide_resnet

DEPTH, WIDTH, CLASSES, M = 28, 2, 100, 2  # defaults; override on the command line
STATE_KEYS = ("model", "model_state", "state_dict", "model_state_dict")  # a training checkpoint's model entry
EXTRAS = ("onnx", "onnxscript", "onnxruntime")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) with exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


class ExportError(Exception):
    """A problem the user can fix (printed as one line by the script)."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="mixshare.onnx", help="ONNX file to write")
    parser.add_argument("--checkpoint", default=None, help="optional checkpoint or MIMOWrapper state_dict to load")
    parser.add_argument("--depth", type=int, default=DEPTH)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--num-classes", type=int, default=CLASSES)
    parser.add_argument("--num-subnetworks", type=int, default=M)
    parser.add_argument("--preset", default="mixshare", choices=sorted(PRESETS))
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every option checked before anything is loaded or written (``parser.error``: one line, exit code 2)."""
    if args.depth < 10 or (args.depth - 4) % 6:
        parser.error(f"argument --depth: must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {args.depth}")
    for name in ("width", "num_classes", "num_subnetworks"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    out = Path(args.out)
    if out.is_dir():
        parser.error(f"argument --out: {out} is a folder; give a file name such as {out / 'model.onnx'}")
    problem = folder_problem(out.parent)
    if problem is not None:
        parser.error(f"argument --out: cannot write {out}: {problem}")
    missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f'the export needs {", ".join(missing)}: pip install "mixshare-layers[export]"')


def load_model(args: argparse.Namespace) -> MIMOWrapper:
    """The wrapped WRN: random weights, or those of ``--checkpoint`` (``ExportError`` if it cannot be used)."""
    if not args.checkpoint:
        backbone = wide_resnet(args.depth, args.width, num_classes=args.num_classes)
        return MIMOWrapper(backbone, args.num_subnetworks, args.preset)
    try:
        state = load_checkpoint(args.checkpoint)
        if any(key in state for key in STATE_KEYS):  # a training checkpoint: it knows its architecture
            model, config = load_wrn_checkpoint(args.checkpoint)
            print(
                f"architecture from the checkpoint: WRN-{config['depth']}-{config['width']}, "
                f"{config['num_classes']} classes, M = {config['num_subnetworks']}, {config['method']}"
            )
            return model
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    backbone = wide_resnet(args.depth, args.width, num_classes=args.num_classes)
    model = MIMOWrapper(backbone, args.num_subnetworks, args.preset)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        text = " ".join(str(err).split())
        raise ExportError(
            f"checkpoint {args.checkpoint}: does not fit WRN-{args.depth}-{args.width} with {args.num_classes} "
            f"classes and M = {args.num_subnetworks} ({text[:200]} ...): give the --depth --width --num-classes "
            "--num-subnetworks --preset it was trained with"
        ) from None
    return model


def main(argv: Sequence[str] | None = None) -> Path:
    """Export as the command line says; returns the ONNX file."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    model = load_model(args)
    model.eval()
    folded = model.fold()  # conv (summed encoders) -> core -> global average pool -> Linear(D, M*K) -> (B, M, K)

    example = torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(folded, (example,), dynamic_shapes=({0: batch},))  # an ExportedProgram
    print(exported.graph_signature.user_inputs, "->", exported.graph_signature.user_outputs)

    onnx_program = torch.onnx.export(
        folded, (example,), input_names=["images"], output_names=["logits"], dynamic_shapes=({0: batch},), dynamo=True
    )
    proto = onnx_program.model_proto  # the ONNX model, weights included
    out = atomic_write(args.out, lambda f: f.write(proto.SerializeToString()))  # never half-written

    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)
    (logits,) = session.run(["logits"], {"images": x.numpy()})  # (5, M, K)
    with torch.no_grad():
        err = (torch.from_numpy(logits) - model(x)).abs().max().item()
    probs = torch.from_numpy(logits).softmax(-1).mean(1)  # ensemble: average of the member probabilities
    print(f"wrote {out}: logits {tuple(logits.shape)}, max |onnx - torch| = {err:.2e}, "
          f"ensemble prediction of the first image: class {probs[0].argmax().item()}")  # fmt: skip
    return out


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: :func:`main`, with an ``ExportError`` printed as one line; returns the exit code."""
    try:
        main(argv)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
