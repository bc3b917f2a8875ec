"""Checkpoints that rebuild their model: recipes, the builder allowlist, save_model / load_model and the analysis CLI
on any wrapped backbone (the library's WRN, torchvision, timm, a described hand-made split)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_cases import code_running_checkpoint
from torch import nn

from mixshare_layers import BackboneSplit, MIMOWrapper
from mixshare_layers.analysis import (
    classifier_influence,
    encoder_influence,
    load_wrn_checkpoint,
    model_from_checkpoint,
    sharing_rate,
)
from mixshare_layers.analysis.__main__ import cli, main
from mixshare_layers.checkpoint import (
    WRN_BUILDER,
    CheckpointError,
    ModelRecipe,
    RecipeError,
    builder_names,
    check_recipe,
    describe_split,
    load_checkpoint,
    load_model,
    register_builder,
    resolve_builder,
    save_checkpoint,
    save_model,
)
from mixshare_layers.models import wide_resnet

WRN_KWARGS = {"depth": 10, "width": 1, "num_classes": 10}


def _perturb_heads(model: MIMOWrapper) -> MIMOWrapper:
    """Make the members differ (as training would), so that sharing rates are not trivially 100 %."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.mul_(torch.rand_like(p) + 0.5)
    return model


def _same_model(a: MIMOWrapper, b: MIMOWrapper, images: torch.Tensor) -> None:
    assert type(a.core) is type(b.core) and a.preset == b.preset and a.num_subnetworks == b.num_subnetworks
    assert a.config == b.config and a.pretrained == b.pretrained
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=0)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(images), a(images), rtol=0, atol=0)


def _one_line(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = cli(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _analyse_end_to_end(path: Path, model: MIMOWrapper, out: Path, *extra: str) -> dict:
    """The CLI on ``path``: its rates are the in-memory model's, and it probed the core with the variance pass."""
    result = main([str(path), "--out", str(out), "--no-plots", "--variance-images", "8", *extra])
    saved = json.loads((out / "sharing.json").read_text())
    assert saved["num_subnetworks"] == model.num_subnetworks and saved["method"] == model.preset
    expected = float(sharing_rate(classifier_influence(model)))
    assert saved["rates"]["classifier"]["mean_ratio"] == pytest.approx(expected, rel=1e-6)
    expected = float(sharing_rate(encoder_influence(model)))
    assert saved["rates"]["encoder"]["mean_ratio"] == pytest.approx(expected, rel=1e-6)
    assert any(name.startswith("variance:") for name in saved["rates"]), saved["rates"].keys()
    return result


# ---------------------------------------------------------------------------------------------------------------
# every family, saved and rebuilt exactly, and through the analysis CLI
# ---------------------------------------------------------------------------------------------------------------
def test_wrn_recipe_round_trip_and_cli(tmp_path):
    torch.manual_seed(0)
    model = _perturb_heads(MIMOWrapper(wide_resnet(**WRN_KWARGS), 3, preset="mixmo", alpha=1.0, unmix_mode="full"))
    model.set_total_steps(40, step=7)
    path = save_model(tmp_path / "wrn.pt", model, builder=WRN_BUILDER, builder_kwargs=WRN_KWARGS, extra={"epoch": 4})
    loaded, checkpoint = load_model(path)
    assert checkpoint["epoch"] == 4 and checkpoint["recipe"]["overrides"] == {"alpha": 1.0, "unmix_mode": "full"}
    assert not loaded.training and int(loaded.num_steps) == 7  # the progress mode travels with the weights
    _same_model(model, loaded, torch.randn(2, 3, 32, 32))
    _analyse_end_to_end(path, model, tmp_path / "an")


def test_torchvision_resnet18_through_the_cli(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _perturb_heads(MIMOWrapper(torchvision.models.resnet18(num_classes=10), 2, preset="mixshare"))
    path = save_model(tmp_path / "r18.pt", model, builder="torchvision:resnet18", builder_kwargs={"num_classes": 10})
    loaded, _ = load_wrn_checkpoint(path)  # the analysis loader takes any recipe
    _same_model(model, loaded, torch.randn(2, 3, 32, 32))
    result = _analyse_end_to_end(path, model, tmp_path / "an")
    assert result["config"]["builder"] == "torchvision:resnet18" and "variance:core.6" in result["rates"]
    # as a module, in a fresh process: exit 0 and the same file
    out = tmp_path / "module"
    cmd = [sys.executable, "-m", "mixshare_layers.analysis", str(path), "--out", str(out), "--no-plots"]
    proc = subprocess.run([*cmd, "--data", "none"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "sharing.json").read_text())["rates"]["classifier"] == result["rates"]["classifier"]


def test_torchvision_resnet_with_the_cifar_stem(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from mixshare_layers.models import cifar_resnet

    torch.manual_seed(0)
    model = MIMOWrapper(cifar_resnet(torchvision.models.resnet18(num_classes=7)), 2, preset="mixshare-partial")
    kwargs = {"num_classes": 7}
    with pytest.raises(RecipeError, match=r"the recipe builds 'encoder' as MultiEncoder\(.*kernel_size=\(7, 7\)"):
        save_model(tmp_path / "no-stem.pt", model, builder="torchvision:resnet18", builder_kwargs=kwargs)
    assert not (tmp_path / "no-stem.pt").exists()
    path = save_model(
        tmp_path / "cifar.pt",
        model,
        builder="torchvision:resnet18",
        builder_kwargs=kwargs,
        transforms=["mixshare_layers.models.cifar_resnet"],
    )
    loaded, _ = load_model(path)
    _same_model(model, loaded, torch.randn(2, 3, 32, 32))


def test_timm_model_through_the_cli(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=5, drop_rate=0.1)
    model = _perturb_heads(MIMOWrapper(net, 2, preset="mixmo"))
    kwargs = {"num_classes": 5, "drop_rate": 0.1}
    # without drop_rate, timm's head is its bare Linear; the model's has dropout (a generic head): caught at saving
    with pytest.raises(RecipeError, match=r"builds 'heads' as MultiHead\(in_features=96.* has MultiHead\(.*generic"):
        save_model(tmp_path / "x.pt", model, builder="timm:test_resnet", builder_kwargs={"num_classes": 5})
    path = save_model(tmp_path / "timm.pt", model, builder="timm:test_resnet", builder_kwargs=kwargs)
    loaded, checkpoint = load_model(path)
    assert checkpoint["recipe"]["builder_kwargs"] == kwargs
    _same_model(model, loaded, torch.randn(2, 3, 32, 32))
    _analyse_end_to_end(path, model, tmp_path / "an")


class _Net(nn.Module):
    """A network no adapter knows: split by hand."""

    def __init__(self, classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
        self.act = nn.ReLU()
        self.fc = nn.Linear(width, classes)


def _hand_split(net: _Net) -> BackboneSplit:
    return BackboneSplit(encoder=net.stem, core=nn.Sequential(net.body, net.act), classifier=net.fc)


def test_hand_made_split_with_a_registered_builder(tmp_path, capsys):
    handle = register_builder("tests.net", _Net)
    try:
        assert "tests.net" in builder_names()
        net = _Net(classes=3, width=6)
        model = _perturb_heads(MIMOWrapper(net, 2, preset="unmix-aligned", split=_hand_split(net)))
        with pytest.raises(RecipeError, match=r"not registered|no adapter knows how to split a _Net"):
            save_model(tmp_path / "x.pt", model, builder="tests.net", builder_kwargs={"classes": 3, "width": 6})
        description = describe_split(net, _hand_split(net))
        assert description["encoder"] == "stem" and description["core"] == ["body", "act"]
        path = save_model(
            tmp_path / "hand.pt",
            model,
            builder="tests.net",
            builder_kwargs={"classes": 3, "width": 6},
            split=description,
        )
        loaded, _ = load_model(path)
        _same_model(model, loaded, torch.randn(2, 3, 16, 16))
        _analyse_end_to_end(path, model, tmp_path / "an", "--image-size", "16")
    finally:
        handle.remove()
    # unregistered in this process (the command line never imports code): one line saying what to do
    code, err = _run_cli([str(path), "--out", str(tmp_path / "out"), "--no-plots"], capsys)
    _one_line(code, err, str(path), "'tests.net' is not registered", "register_builder")
    assert not (tmp_path / "out").exists()


def test_a_split_that_cannot_be_described():
    net = _Net()

    class Body(nn.Module):  # a container of the user's own: not a module of the backbone
        def __init__(self) -> None:
            super().__init__()
            self.body, self.act = net.body, net.act

        def forward(self, x):
            return self.act(self.body(x))

    with pytest.raises(RecipeError, match=r"split\.core \(Body\) is not a module of the backbone.*save_checkpoint"):
        describe_split(net, BackboneSplit(encoder=net.stem, core=Body(), classifier=net.fc))


def test_checkpoint_without_recipe_says_how_to_load_it_from_python(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    model = MIMOWrapper(torchvision.models.resnet18(num_classes=10), 2, preset="mixshare")
    path = save_checkpoint(tmp_path / "bare.pt", {"model": model.state_dict(), "config": {"method": "mixshare"}})
    code, err = _run_cli([str(path), "--out", str(tmp_path / "out"), "--no-plots"], capsys)
    _one_line(code, err, "records no recipe", "save_model", "load_state_dict(load_checkpoint(path)['model'])")
    with pytest.raises(CheckpointError, match="records no recipe"):
        load_model(path)
    with pytest.raises(ValueError, match=r"records no recipe .* config lacks \['depth', 'width'\]"):
        model_from_checkpoint(load_checkpoint(path))


@pytest.mark.parametrize(
    ("builder", "message"),
    [
        ("os.system", "'os.system' is not registered in this process"),
        ("mixshare_layers.wrapper.MIMOWrapper", "is not one of the library's"),
        ("torchvision:not_a_model", "is not a classification model of this torchvision"),
    ],
)
def test_cli_refuses_a_builder_outside_the_allowlist_and_runs_nothing(tmp_path, capsys, builder, message):
    if builder.startswith("torchvision:"):
        pytest.importorskip("torchvision")
    marker = tmp_path / "marker"
    model = MIMOWrapper(wide_resnet(**WRN_KWARGS), 2, preset="mixshare")
    recipe = {**ModelRecipe.of(model, WRN_BUILDER, WRN_KWARGS).to_dict(), "builder": builder}
    recipe["builder_kwargs"] = {"command": f"touch {marker}"}  # what os.system would run, were it ever called
    path = save_checkpoint(tmp_path / "refused.pt", {"model": model.state_dict(), "recipe": recipe})
    code, err = _run_cli([str(path), "--out", str(tmp_path / "out"), "--no-plots"], capsys)
    _one_line(code, err, str(path), "cannot rebuild its model from its recipe", message)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_as_a_module_refuses_a_checkpoint_without_recipe_or_config(tmp_path):
    model = MIMOWrapper(wide_resnet(**WRN_KWARGS), 2, preset="mixshare")
    path = save_checkpoint(tmp_path / "weights.pt", {"model": model.state_dict(), "epoch": 3})
    cmd = [sys.executable, "-m", "mixshare_layers.analysis", str(path), "--out", str(tmp_path / "out")]
    proc = subprocess.run([*cmd, "--no-plots"], capture_output=True, text=True, timeout=300, check=False)
    _one_line(proc.returncode, proc.stderr, str(path), "records no recipe", "no config", "save_model(")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_recipe_checkpoint_whose_pickle_runs_code_is_refused(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "marker"
    recipe = ModelRecipe(WRN_BUILDER, WRN_KWARGS).to_dict()
    evil = code_running_checkpoint(tmp_path / "evil.pt", marker, recipe=recipe)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    code, err = _run_cli([str(evil), "--out", str(tmp_path / "out"), "--no-plots"], capsys)
    _one_line(code, err, str(evil), "refused", "builtins.exec")
    with pytest.raises(CheckpointError, match="refused"):
        load_model(evil)
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# refusals: the allowlist, plain arguments, arguments that load something, malformed recipes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("builder", "message"),
    [
        ("os.system", "'os.system' is not registered in this process"),
        ("builtins.eval", "is not registered"),
        ("mixshare_layers.wrapper.MIMOWrapper", "is not one of the library's"),
        ("torchvision:not_a_model", "is not a classification model of this torchvision"),
        ("torchvision:fasterrcnn_resnet50_fpn", "is not a classification model"),
        ("timm:hf-hub:timm/resnet18.a1_in1k", "is not a model of this timm"),
        ("timm:local-dir:/tmp/model", "is not a model of this timm"),
        ("timm:resnet18.not_a_tag", "is not a model of this timm"),
        ("with space", "without whitespace"),
    ],
)
def test_builders_outside_the_allowlist_are_refused(builder, message):
    if builder.startswith("torchvision:"):
        pytest.importorskip("torchvision")
    if builder.startswith("timm:"):
        pytest.importorskip("timm")
    with pytest.raises(RecipeError, match=message):
        resolve_builder(builder)


def test_timm_tags_are_allowed():
    pytest.importorskip("timm")
    assert callable(resolve_builder("timm:resnet18.a1_in1k"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": "IMAGENET1K_V1"}, r"\['weights'\]='IMAGENET1K_V1' would load or download weights"),
        ({"pretrained": True}, "would load or download"),
        ({"checkpoint_path": "/tmp/evil.pt"}, "would load or download"),
        ({"pretrained_cfg": "in1k"}, "would load or download"),
        ({"cache_dir": "/tmp"}, "would load or download"),
        ({"norm_layer": nn.BatchNorm2d}, r"\['norm_layer'\] has type type, but builder arguments are plain"),
        ({"sizes": [1, {2, 3}]}, r"\['sizes'\]\[1\] has type set"),
        ({"__class__": 1}, "keys must be Python identifiers"),
    ],
)
def test_builder_arguments_are_plain_and_load_nothing(kwargs, message):
    with pytest.raises(RecipeError, match=message):
        ModelRecipe("torchvision:resnet18", kwargs)


def test_defaults_of_loading_arguments_are_dropped():
    recipe = ModelRecipe("torchvision:resnet18", {"weights": None, "pretrained": False, "num_classes": (3,)[0]})
    assert recipe.builder_kwargs == {"num_classes": 3}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "format is 'other'"),
        ({"version": 2}, "version 2, written by a newer mixshare_layers"),
        ({"version": "1"}, "version must be a positive int"),
        ({"code": "print(1)"}, r"unknown keys \['code'\]"),
        ({"preset": "bogus"}, "preset must be one of"),
        ({"num_subnetworks": 0}, "num_subnetworks must be an integer >= 1"),
        ({"overrides": {"alpah": 1.0}}, "unknown option"),
        ({"pretrained": "yes"}, "pretrained must be a bool"),
        ({"transforms": ["os.system"]}, "transforms must be a list of"),
        ({"split": {"encoder": "conv1", "core": "__class__.__init__", "classifier": "fc"}}, r"names \['__class__"),
        ({"split": {"encoder": "conv1", "core": "layer1", "classifier": "fc", "layout": "nhwc"}}, "layout must be one"),
        ({"split": {"encoder": "conv1"}}, r"split\['core'\] names \[None\], which the built backbone does not have"),
    ],
)
def test_malformed_recipes_are_refused(change, message):
    data = ModelRecipe(WRN_BUILDER, WRN_KWARGS).to_dict()
    data.update(change)
    with pytest.raises(RecipeError, match=message):  # when it is read, or at the latest when it builds its model
        ModelRecipe.from_dict(data).build()


def test_a_recipe_that_does_not_fit_its_weights(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    model = MIMOWrapper(torchvision.models.resnet18(num_classes=10), 2, preset="mixshare")
    recipe = ModelRecipe.of(model, "torchvision:resnet18", {"num_classes": 10}).to_dict()
    cases = {
        "classes": ({**recipe, "builder_kwargs": {"num_classes": 9}}, "these weights do not fit: .*size mismatch"),
        # a much larger model than the file holds is refused before it is allocated (built on the meta device)
        "huge": ({**recipe, "builder": "torchvision:resnet152"}, r"backbone of [\d,]+ parameters but the checkpoint"),
        "wrong_split": (
            {**recipe, "split": {"encoder": "conv1", "core": ["layer1"], "classifier": "fc"}},
            "do not fit|cannot be wrapped",
        ),
        "nonexistent_module": (
            {**recipe, "split": {"encoder": "conv9", "core": "layer1", "classifier": "fc"}},
            r"names \['conv9'\], which the built backbone does not have",
        ),
    }
    for name, (bad, message) in cases.items():
        path = save_checkpoint(tmp_path / f"{name}.pt", {"model": model.state_dict(), "recipe": bad})
        with pytest.raises(CheckpointError, match=message):
            load_model(path)
        code, err = _run_cli([str(path), "--out", str(tmp_path / "out"), "--no-plots"], capsys)
        line = _one_line(code, err, str(path), "cannot rebuild its model from its recipe")
        assert len(line) < 1200
    assert not (tmp_path / "out").exists()


def test_save_model_errors(tmp_path):
    model = MIMOWrapper(wide_resnet(**WRN_KWARGS), 2, preset="mixshare")
    with pytest.raises(TypeError, match="save_model needs the backbone's builder"):
        save_model(tmp_path / "a.pt", model)
    with pytest.raises(TypeError, match="model must be a MIMOWrapper, but got WideResNet"):
        save_model(tmp_path / "a.pt", wide_resnet(**WRN_KWARGS), builder=WRN_BUILDER, builder_kwargs=WRN_KWARGS)
    recipe = ModelRecipe.of(model, WRN_BUILDER, WRN_KWARGS)
    with pytest.raises(TypeError, match="not both"):
        save_model(tmp_path / "a.pt", model, recipe=recipe, builder=WRN_BUILDER)
    with pytest.raises(ValueError, match=r"extra must not hold \['model'\]"):
        save_model(tmp_path / "a.pt", model, recipe=recipe, extra={"model": 1})
    wrong = r"builds 'heads' as MultiHead\(.*num_classes=100.* has MultiHead\(.*num_classes=10,"
    with pytest.raises(RecipeError, match=wrong):
        save_model(tmp_path / "a.pt", model, builder=WRN_BUILDER, builder_kwargs={"depth": 10, "width": 1})
    with pytest.raises(RecipeError, match="unexpected keyword argument 'widht'"):
        save_model(tmp_path / "a.pt", model, builder=WRN_BUILDER, builder_kwargs={**WRN_KWARGS, "widht": 2})
    assert not list(tmp_path.iterdir())
    # a compiled / DDP-style wrapper around the model is unwrapped; check=False skips the rebuild
    compiled = torch.compile(model, backend="eager")
    save_model(tmp_path / "c.pt", compiled, recipe=recipe, check=False)
    assert check_recipe(model, recipe).preset == "mixshare"


def test_register_builder_errors():
    with pytest.raises(ValueError, match="prefix of the library's builders"):
        register_builder("torchvision:mine", _Net)
    with pytest.raises(ValueError, match="without whitespace"):
        register_builder("my net", _Net)
    with pytest.raises(TypeError, match="builder must be a function"):
        register_builder("tests.bad", 3)  # type: ignore[arg-type]
    handle = register_builder("tests.twice", _Net)
    try:
        with pytest.raises(ValueError, match=r"already registered as 'tests\.twice': pass replace=True"):
            register_builder("tests.twice", _Net)
        register_builder("tests.twice", _Net, replace=True).remove()
        assert "tests.twice" not in builder_names()
    finally:
        handle.remove()


def test_a_builder_returning_no_module_and_a_failing_builder():
    handles = [register_builder("tests.none", lambda: 3), register_builder("tests.fails", lambda: 1 / 0)]
    try:
        with pytest.raises(RecipeError, match=r"returned a int, not an nn\.Module"):
            ModelRecipe("tests.none").build()
        with pytest.raises(RecipeError, match=r"failed with the arguments \{\}: ZeroDivisionError"):
            ModelRecipe("tests.fails").build()
    finally:
        for handle in handles:
            handle.remove()


def test_recipe_of_reads_the_wrapper_settings():
    model = MIMOWrapper(wide_resnet(**WRN_KWARGS), 2, preset="mixmo", encoder_init="aligned", pretrained=True)
    recipe = ModelRecipe.of(model, WRN_BUILDER, WRN_KWARGS)
    assert recipe.overrides == {"encoder_init": "aligned"} and recipe.pretrained is True
    assert ModelRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    rebuilt = recipe.build()
    assert rebuilt.config == model.config and rebuilt.pretrained
