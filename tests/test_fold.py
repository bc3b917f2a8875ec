"""Inference folding (``model.fold()`` / ``mixshare_layers.deploy.fold``) and its export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixshare_layers import BackboneSplit, MIMOWrapper
from mixshare_layers.deploy import FoldedMIMO, fold
from mixshare_layers.models import wide_resnet


def _trained_like(m: int, dtype: torch.dtype, seed: int = 0) -> MIMOWrapper:
    torch.manual_seed(seed)
    model = MIMOWrapper(wide_resnet(10, 1, num_classes=7), num_subnetworks=m, preset="mixmo").to(dtype)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_fold_equals_eval_forward(m, dtype, tol):
    model = _trained_like(m, dtype)
    folded = model.fold()
    assert isinstance(folded, FoldedMIMO) and not folded.training
    assert isinstance(folded.encoder, nn.Conv2d) and folded.head.out_features == m * 7
    x = torch.randn(4, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=tol, atol=tol)


def test_fold_is_an_independent_copy():
    model = _trained_like(2, torch.float32)
    folded = fold(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = folded(x)
        model.encoder.weight.add_(1.0)
        model.heads.weight.mul_(2.0)
        next(iter(model.core.parameters())).add_(1.0)
        torch.testing.assert_close(folded(x), before)


def test_fold_keeps_nonlinear_encoders_and_refuses_other_models():
    torch.manual_seed(0)
    backbone = wide_resnet(10, 1, num_classes=5)
    split = BackboneSplit(
        encoder=nn.Sequential(backbone.conv1, nn.ReLU()),
        core=nn.Sequential(backbone.layer1, backbone.layer2, backbone.layer3, backbone.bn, backbone.relu),
        classifier=backbone.fc,
    )
    model = MIMOWrapper(None, 2, "mixmo", split=split).eval()
    folded = model.fold()  # the sum of M non-linear encoders is no single layer: the M copies are kept, summed
    assert not isinstance(folded.encoder, nn.Conv2d) and len(folded.encoder.encoders) == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))
    with pytest.raises(TypeError, match="model must be a MIMOWrapper, but got Linear"):
        fold(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\)"):
        _trained_like(2, torch.float32).fold()(torch.randn(2, 2, 3, 32, 32))


def test_torch_export_of_folded_model():
    model = _trained_like(2, torch.float32)
    folded = model.fold()
    x = torch.randn(3, 3, 32, 32)
    exported = torch.export.export(folded, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    y = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(y), model(y), rtol=1e-5, atol=1e-5)


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _trained_like(2, torch.float32)
    folded = model.fold()
    path = tmp_path / "mixshare.onnx"
    x = torch.randn(2, 3, 32, 32)
    torch.onnx.export(
        folded,
        (x,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        dynamo=True,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.randn(5, 3, 32, 32)
    (got,) = session.run(["logits"], {"images": y.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(y), rtol=1e-4, atol=1e-4)
