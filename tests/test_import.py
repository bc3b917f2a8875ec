"""The package imports with only its hard dependencies (torch, einops), and its public names exist."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

import mixshare_layers

BLOCKED = (
    "torchvision", "timm", "triton", "matplotlib", "tqdm", "tensorboard", "onnx", "onnxruntime", "onnxscript",
    "lightning", "pytorch_lightning", "torch_uncertainty", "torchmetrics", "sklearn", "scipy", "PIL", "seaborn",
    "pandas", "rich",
)  # fmt: skip

CORE_MODULES = (
    "mixshare_layers",
    "mixshare_layers._checks",
    "mixshare_layers._deprecated",
    "mixshare_layers._version",
    "mixshare_layers.adapters",
    "mixshare_layers.adapters.check",
    "mixshare_layers.adapters.registry",
    "mixshare_layers.adapters.split",
    "mixshare_layers.adapters.surgery",
    "mixshare_layers.adapters.timm",
    "mixshare_layers.adapters.torchvision",
    "mixshare_layers.analysis",
    "mixshare_layers.layers",
    "mixshare_layers.layers.batcher",
    "mixshare_layers.checkpoint",
    "mixshare_layers.checkpoint.convert",
    "mixshare_layers.files",
    "mixshare_layers.checkpoint.store",
    "mixshare_layers.data",
    "mixshare_layers.deploy",
    "mixshare_layers.deploy.fold",
    "mixshare_layers.deploy.heads",
    "mixshare_layers.data.ood",
    "mixshare_layers.data.synthetic",
    "mixshare_layers.functional",
    "mixshare_layers.functional.backend",
    "mixshare_layers.functional.ensemble",
    "mixshare_layers.functional.layout",
    "mixshare_layers.functional.loss",
    "mixshare_layers.functional.mixing",
    "mixshare_layers.functional.random",
    "mixshare_layers.functional.unmixing",
    "mixshare_layers.integrations",
    "mixshare_layers.layers.loss",
    "mixshare_layers.mix_info",
    "mixshare_layers.layers.mixer",
    "mixshare_layers.models",
    "mixshare_layers.models.wide_resnet",
    "mixshare_layers.layers.encoder",
    "mixshare_layers.layers.head",
    "mixshare_layers.presets",
    "mixshare_layers.evaluation.shift",
    "mixshare_layers.evaluation",
    "mixshare_layers.evaluation.accumulator",
    "mixshare_layers.evaluation.calibration",
    "mixshare_layers.evaluation.evaluate",
    "mixshare_layers.evaluation.ood",
    "mixshare_layers.evaluation.plots",
    "mixshare_layers.evaluation.scores",
    "mixshare_layers.evaluation.selective",
    "mixshare_layers.evaluation.temperature",
    "mixshare_layers.layers.unmixer",
    "mixshare_layers.vocabulary",
    "mixshare_layers.wrapper",
)

_SCRIPT = """
import importlib, importlib.abc, sys

BLOCKED = set({blocked!r})

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: only torch and einops may be imported")
        return None

for name in list(sys.modules):  # nothing optional may be preloaded
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
sys.meta_path.insert(0, Blocker())
for name in BLOCKED:  # as if not installed: importlib.util.find_spec gives None, an import raises ImportError
    sys.modules[name] = None
for name in BLOCKED:  # the blocker works
    try:
        importlib.import_module(name)
    except ImportError:
        continue  # blocked, as wanted
    raise SystemExit(f"blocker failed for {{name}}")

for module in {modules!r}:
    importlib.import_module(module)

import torch
import mixshare_layers as ml
from mixshare_layers.models import wide_resnet
model = ml.MIMOWrapper(wide_resnet(10, 1, num_classes=3), 2, "mixshare")
out = model(torch.randn(2, 2, 3, 8, 8))
loss = model.make_loss()(out, torch.zeros(2, 2, dtype=torch.long))
loss.backward()
from mixshare_layers.evaluation.shift import corrupt
from mixshare_layers.evaluation import evaluate_uncertainty
labelled = (torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
report = evaluate_uncertainty(model, labelled, ood=torch.rand(3, 3, 8, 8), val=labelled, severities=[2])
assert set(report["shift"]) == set(ml.evaluation.CORRUPTIONS), report["shift"]
# the integrations name their extra
for module, extra in (("lightning", "lightning"), ("torch_uncertainty", "torch-uncertainty")):
    try:
        importlib.import_module("mixshare_layers.integrations." + module)
    except ModuleNotFoundError as exc:
        assert f'pip install "mixshare-layers[{{extra}}]"' in str(exc), str(exc)
    else:
        raise SystemExit(f"mixshare_layers.integrations.{{module}} imported without its framework")
leaked = sorted({{n.split(".")[0] for n, m in sys.modules.items() if m is not None}} & BLOCKED)
if leaked:
    raise SystemExit(f"optional packages imported: {{leaked}}")
print("ok", ml.__version__)
"""


def test_import_with_only_torch_and_einops():
    script = textwrap.dedent(_SCRIPT.format(blocked=BLOCKED, modules=CORE_MODULES))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok ")


@pytest.mark.parametrize(
    "module",
    [
        "mixshare_layers",
        "mixshare_layers.functional",
        "mixshare_layers.models",
        "mixshare_layers.data",
        "mixshare_layers.evaluation",
        "mixshare_layers.evaluation.shift",
        "mixshare_layers.layers",
        "mixshare_layers.deploy",
        "mixshare_layers.vocabulary",
    ],
)
def test_all_names_exist(module):
    mod = importlib.import_module(module)
    assert len(mod.__all__) == len(set(mod.__all__))
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert missing == []


def test_version_and_public_api():
    assert isinstance(mixshare_layers.__version__, str) and mixshare_layers.__version__.count(".") >= 1
    for name in (
        "MIMOWrapper",
        "MIMOBatcher",
        "MIMOLoss",
        "MixInfo",
        "CutMixMixer",
        "Unmixer",
        "MultiEncoder",
        "MultiHead",
        "BackboneSplit",
        "UnsupportedBackboneError",
        "SyntheticImageDataset",
        "get_preset",
    ):
        assert name in mixshare_layers.__all__
