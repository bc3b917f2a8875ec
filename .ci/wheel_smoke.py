"""Smoke test of the installed wheel: import, wrap, one training step, fold.

Run by .ci/run with the interpreter of a fresh virtual environment holding only the wheel and its declared
dependencies, from a temporary folder and in isolated mode (``python -I``), so the source tree cannot be imported:
this proves the wheel is complete on its own. Argument: the repository root (only to check it is not on the path).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path


def main(repo: Path) -> None:
    import torch

    import mixshare_layers
    from mixshare_layers import MIMOWrapper
    from mixshare_layers.models import wide_resnet

    # 1. the package comes from the environment's site-packages, not from the repository
    location = Path(mixshare_layers.__file__).resolve()
    if repo in location.parents or "site-packages" not in location.parts:
        raise SystemExit(f"mixshare_layers was imported from {location}, not from the installed wheel")
    if any(Path(p or ".").resolve() == repo for p in sys.path):
        raise SystemExit(f"the repository {repo} is on sys.path: {sys.path}")
    installed = importlib.metadata.version("mixshare-layers")
    if installed != mixshare_layers.__version__:
        raise SystemExit(f"metadata version {installed} != mixshare_layers.__version__ {mixshare_layers.__version__}")
    # only the hard dependencies were installed: the optional extras must not be needed to import
    for extra_pkg in ("torchvision", "timm", "matplotlib", "onnx", "tqdm", "tensorboard"):
        if importlib.util.find_spec(extra_pkg) is not None:
            raise SystemExit(f"{extra_pkg} is installed: the environment is not the bare wheel's")
    modules = ("functional", "layers", "models", "data", "analysis", "evaluation", "deploy", "checkpoint", "files",
               "vocabulary", "integrations")
    for name in modules:
        importlib.import_module(f"mixshare_layers.{name}")
    if not (location.parent / "py.typed").is_file():
        raise SystemExit("py.typed is missing from the installed package")

    # 2. wrap a backbone and take one training step
    torch.manual_seed(0)
    model = MIMOWrapper(wide_resnet(10, 1, num_classes=10), num_subnetworks=2, preset="mixshare")
    batcher, criterion = model.make_batcher(batch_repetition=2), model.make_loss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(10, (8,))
    before = model.heads.weight.detach().clone()
    model.set_progress(0.0)
    xs, ys = batcher(images, labels)
    loss = criterion(model(xs), ys)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if not torch.isfinite(loss) or torch.equal(before, model.heads.weight):
        raise SystemExit(f"the training step did not update the model (loss {loss.item()})")

    # 3. fold for deployment: one conv + core + one linear, same logits as the eval-mode wrapper
    model.eval()
    folded = model.fold()
    with torch.no_grad():
        diff = (folded(images) - model(images)).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"the folded model differs from the wrapper by {diff}")
    print(
        f"wheel smoke test passed: mixshare_layers {installed} from {location.parent}, loss {loss.item():.3f}, "
        f"fold max diff {diff:.1e}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
