"""Fold a MIMO network into one plain module and export it with torch.export and to ONNX.

At test time the M encoders of a MIMO network are summed and its M heads read the same pooled vector, so the whole
ensemble folds into one convolution + the shared core + one ``nn.Linear(D, M * K)`` (``model.fold()``). This script
builds (or loads) a wrapped WRN, folds it, exports it with a dynamic batch size, and checks the ONNX file against
the PyTorch model with onnxruntime.

    python examples/export_onnx.py --out mixshare.onnx                  # random weights, WRN-28-2, M = 2
    python examples/export_onnx.py --checkpoint run/model.pt --out m.onnx  # a state_dict saved from MIMOWrapper

Needs the ``export`` extra: ``pip install mixshare-layers[export]`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import os

import torch

from mixshare_layers import MIMOWrapper
from mixshare_layers.models import wide_resnet

DEPTH, WIDTH, CLASSES, M = 28, 2, 100, 2  # defaults; override on the command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="mixshare.onnx", help="ONNX file to write")
    parser.add_argument("--checkpoint", default=None, help="optional MIMOWrapper state_dict to load")
    parser.add_argument("--depth", type=int, default=DEPTH)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--num-classes", type=int, default=CLASSES)
    parser.add_argument("--num-subnetworks", type=int, default=M)
    parser.add_argument("--preset", default="mixshare")
    args = parser.parse_args()

    model = MIMOWrapper(
        wide_resnet(args.depth, args.width, num_classes=args.num_classes), args.num_subnetworks, args.preset
    )
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
    model.eval()
    folded = model.fold()  # conv (summed encoders) -> core -> global average pool -> Linear(D, M*K) -> (B, M, K)

    example = torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(folded, (example,), dynamic_shapes=({0: batch},))  # an ExportedProgram
    print(exported.graph_signature.user_inputs, "->", exported.graph_signature.user_outputs)

    tmp = args.out + ".tmp"  # write next to the target, then rename: no half-written file on failure
    onnx_program = torch.onnx.export(
        folded, (example,), input_names=["images"], output_names=["logits"], dynamic_shapes=({0: batch},), dynamo=True
    )
    onnx_program.save(tmp)
    os.replace(tmp, args.out)

    import onnxruntime as ort

    session = ort.InferenceSession(args.out, providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)
    (logits,) = session.run(["logits"], {"images": x.numpy()})  # (5, M, K)
    with torch.no_grad():
        err = (torch.from_numpy(logits) - model(x)).abs().max().item()
    probs = torch.from_numpy(logits).softmax(-1).mean(1)  # ensemble: average of the member probabilities
    print(f"wrote {args.out}: logits {tuple(logits.shape)}, max |onnx - torch| = {err:.2e}, "
          f"ensemble prediction of the first image: class {probs[0].argmax().item()}")  # fmt: skip


if __name__ == "__main__":
    main()
