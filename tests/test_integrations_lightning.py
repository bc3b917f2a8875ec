"""mixshare_layers.integrations.lightning: the progress callback and the LightningModule, under a real Trainer."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from mixshare_layers import MIMOLoss, MIMOWrapper, SyntheticImageDataset  # noqa: E402
from mixshare_layers.data import synthetic_ood_dataset  # noqa: E402
from mixshare_layers.evaluation import UncertaintyMetrics, ood_detection_metrics, uncertainty_scores  # noqa: E402
from mixshare_layers.evaluation.metrics import EnsembleMetrics  # noqa: E402
from mixshare_layers.integrations.lightning import MIMOLightningModule, MIMOProgress, find_mimo_wrappers  # noqa: E402
from mixshare_layers.models import wide_resnet  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning",  # Lightning's advice (workers, logger, ...) on these toy runs
    "ignore::DeprecationWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",  # Lightning 2.6 against torch 2.14's pytree
)


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    return pl.Trainer(**{**defaults, **kw})


def _data(n: int, train: bool = True, classes: int = 4) -> SyntheticImageDataset:
    return SyntheticImageDataset(n, num_classes=classes, image_size=8, train=train)


def _loader(ds, batch_size: int = 8, shuffle: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def _model(preset: str = "mixshare") -> MIMOWrapper:
    # PyTorch's heads (init="torch"): the calibration tests below scale them so that an untrained model's fitted
    # temperature lies inside the search bounds; the default's He-normal heads would need another factor
    return MIMOWrapper(wide_resnet(10, 1, num_classes=4, init="torch"), 2, preset)


class Recording(MIMOLightningModule):
    """Records the progress the model sees at every training step, and the trainer's step count then."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[float, int, int]] = []
        self.after: list[float] = []  # the progress the forward ran at, read after it

    def training_step(self, batch, batch_idx):
        self.seen.append((float(self.model.progress), self.trainer.global_step, self.trainer.current_epoch))
        loss = super().training_step(batch, batch_idx)
        self.after.append(float(self.model.progress))
        return loss


def test_progress_follows_optimizer_steps():
    torch.manual_seed(0)
    module = Recording(_model(), batch_repetition=1)
    trainer = _trainer(max_epochs=3)
    trainer.fit(module, _loader(_data(32), shuffle=True))
    total = 3 * 4
    assert [p for p, _, _ in module.seen] == pytest.approx([k / total for k in range(total)])
    # with gradient accumulation, progress counts optimizer steps
    module = Recording(_model(), batch_repetition=1)
    trainer = _trainer(max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(module, _loader(_data(32)))
    assert [p for p, _, _ in module.seen] == pytest.approx([step / 4 for _, step, _ in module.seen])
    assert sorted({step for _, step, _ in module.seen}) == [0, 1, 2, 3]
    # max_steps shorter than the epochs: the schedule ends at max_steps
    module = Recording(_model(), batch_repetition=1)
    _trainer(max_epochs=10, max_steps=5).fit(module, _loader(_data(32)))
    assert [p for p, _, _ in module.seen] == pytest.approx([k / 5 for k in range(5)])


def test_progress_per_epoch_and_without_the_callback():
    module = Recording(_model(), batch_repetition=1, progress="epoch")
    _trainer(max_epochs=4).fit(module, _loader(_data(16)))
    assert [p for p, _, _ in module.seen] == pytest.approx([e / 4 for _, _, e in module.seen])
    module = Recording(_model(), batch_repetition=1, progress=None)
    module.model.set_progress(0.5)
    _trainer(max_epochs=1).fit(module, _loader(_data(16)))
    assert {p for p, _, _ in module.seen} == {0.5}


def test_a_wrapper_counting_its_own_steps_is_left_alone():
    model = _model()
    if not hasattr(model, "set_total_steps"):
        pytest.skip("this MIMOWrapper has no total-steps mode")
    model.set_total_steps(4)
    module = Recording(model, batch_repetition=1)  # adds MIMOProgress
    _trainer(max_epochs=2).fit(module, _loader(_data(16)))
    assert module.after == pytest.approx([0.0, 0.25, 0.5, 0.75])  # its own count, not overwritten


def test_callback_on_any_lightning_module_and_its_errors():
    class Plain(pl.LightningModule):  # a user's own module holding a wrapper somewhere inside
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.ModuleDict({"net": _model()})

        def training_step(self, batch, batch_idx):
            net = self.inner["net"]
            xs, ys = net.make_batcher()(batch[0], batch[1])
            return net.make_loss()(net(xs), ys)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Plain()
    assert find_mimo_wrappers(module) == [module.inner["net"]]
    _trainer(max_epochs=2, callbacks=[MIMOProgress()]).fit(module, _loader(_data(16)))
    assert float(module.inner["net"].progress) == pytest.approx(3 / 4)  # set before the last of 4 steps

    class Empty(Plain):
        def __init__(self) -> None:
            pl.LightningModule.__init__(self)
            self.lin = torch.nn.Linear(3, 2)

    with pytest.raises(ValueError, match="MIMOProgress found no MIMOWrapper in the Empty being trained"):
        _trainer(max_epochs=1, callbacks=[MIMOProgress()]).fit(Empty(), _loader(_data(16)))
    endless = SimpleNamespace(estimated_stepping_batches=float("inf"), global_step=0)
    with pytest.raises(ValueError, match="needs a finite number of training steps, but the trainer estimates inf"):
        MIMOProgress().progress(endless)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="granularity='epoch'\\) needs the trainer's max_epochs, but it is -1"):
        MIMOProgress("epoch").progress(SimpleNamespace(max_epochs=-1, current_epoch=0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="granularity must be one of 'step', 'epoch'"):
        MIMOProgress("batch")


def test_training_step_is_the_batcher_and_the_preset_loss():
    model = _model("mixmo")
    module = MIMOLightningModule(model, batch_repetition=2)
    x, y = torch.rand(6, 3, 8, 8), torch.randint(4, (6,))
    model.set_progress(0.3)
    torch.manual_seed(1)
    module.log = lambda *a, **k: None  # no trainer attached
    loss = module.training_step((x, y), 0)
    torch.manual_seed(1)
    xs, ys = model.make_batcher(2)(x, y)
    out = model(xs)
    assert torch.equal(loss, model.make_loss()(out, ys))
    assert torch.equal(loss, MIMOLoss(rebalance_root=3.0)(out, ys))  # MixMo's rebalancing, from the preset


def test_validation_and_test_metrics_equal_the_library():
    torch.manual_seed(0)
    model = _model()
    module = MIMOLightningModule(model, batch_repetition=2, rule="logit")
    trainer = _trainer(max_epochs=1)
    val, test = _data(24, train=False), _data(20, train=False)
    ood = synthetic_ood_dataset(test, 12)
    trainer.fit(module, _loader(_data(32), shuffle=True), _loader(val))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    model.eval()
    with torch.no_grad():
        val_logits = torch.cat([model(x) for x, _ in _loader(val)])
        test_logits = torch.cat([model(x) for x, _ in _loader(test)])
        ood_logits = torch.cat([model(x) for x, _ in _loader(ood)])
    ref = EnsembleMetrics(2, "logit")
    ref.update(val_logits, val.targets)
    expected = ref.compute()
    for key in ("ensemble_acc", "nll", "ece", "brier", "disagreement", "mean_individual_acc"):
        assert logged[f"val/{key}"] == pytest.approx(expected[key], abs=1e-6)
    assert [logged["val/individual_acc/0"], logged["val/individual_acc/1"]] == pytest.approx(expected["individual_acc"])

    results = trainer.test(module, dataloaders=[_loader(test), _loader(ood)], verbose=False)
    merged = {k: v for r in results for k, v in r.items()}
    ref_u = UncertaintyMetrics(2, 4, "logit")
    ref_u.update(test_logits, test.targets)
    expected_u = ref_u.compute()
    for key in ("ensemble_acc", "nll", "adaptive_ece", "classwise_ece", "aurc", "mutual_information"):
        assert merged[f"test/{key}"] == pytest.approx(expected_u[key], abs=1e-6)
    scores = uncertainty_scores(ood_logits, "logit")["mutual_information"].double()
    ood_ref = ood_detection_metrics(ref_u.scores()["mutual_information"], scores)
    for key in ("auroc", "aupr", "fpr95"):
        assert merged[f"test/ood1/mutual_information/{key}"] == pytest.approx(float(ood_ref[key]), abs=1e-6)


def test_optimizer_and_scheduler_factories():
    seen = {}

    def schedule(opt, total):
        seen["total"] = total
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total)

    module = MIMOLightningModule(
        _model(), batch_repetition=1, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), lr_scheduler=schedule
    )
    trainer = _trainer(max_epochs=2)
    trainer.fit(module, _loader(_data(16)))
    assert seen["total"] == 4
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 4 / 4))  # stepped every optimizer step
    default = MIMOLightningModule(_model()).configure_optimizers()
    assert isinstance(default, torch.optim.SGD) and default.defaults["nesterov"] and default.defaults["lr"] == 0.025


def test_module_errors():
    with pytest.raises(TypeError, match="model must be a MIMOWrapper, but got Linear"):
        MIMOLightningModule(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="progress must be one of 'step', 'epoch'"):
        MIMOLightningModule(_model(), progress="always")
    with pytest.raises(TypeError, match="optimizer must be callable"):
        MIMOLightningModule(_model(), optimizer=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rule must be one of 'prob', 'logit'"):
        MIMOLightningModule(_model(), rule="mean")
    with pytest.raises(TypeError, match="calibrate must be a bool, but got 'yes'"):
        MIMOLightningModule(_model(), calibrate="yes")  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = MIMOLightningModule(_model())
    assert [type(c).__name__ for c in module.configure_callbacks()] == ["MIMOProgress"]


# ---------------------------------------------------------------------------------------------------------------
# calibration at the end of every validation epoch
# ---------------------------------------------------------------------------------------------------------------
def _seen(loader, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of the first ``batches`` batches of ``loader``."""
    pairs = [b for _, b in zip(range(batches), loader, strict=False)]
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def _calibrated_copy(model: MIMOWrapper, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The temperatures ``MIMOWrapper.calibrate`` fits on these images, leaving ``model`` untouched."""
    other = copy.deepcopy(model)
    fitted = other.calibrate(images, labels, batch_size=8)
    assert other.temperature.tolist() == pytest.approx([fitted["prob"], fitted["logit"]], rel=1e-7)
    return other.temperature


def test_validation_fits_the_temperature_calibrate_fits_on_the_batches_it_saw():
    torch.manual_seed(0)
    model = _model()
    with torch.no_grad():  # an untrained core's features barely vary: larger heads bring T inside the bounds
        model.heads.weight.mul_(20.0)
    module = MIMOLightningModule(model, batch_repetition=1)
    images = _data(40, train=False).data.float() / 255
    g = torch.Generator().manual_seed(1)
    labels = model.predict(images).argmax(1)  # right, except for a third of random labels: T inside the bounds
    labels = torch.where(torch.rand(40, generator=g) < 1 / 3, torch.randint(0, 4, (40,), generator=g), labels)
    val = _loader(torch.utils.data.TensorDataset(images, labels))
    trainer = _trainer(limit_val_batches=3)  # 24 of the 40 images
    trainer.validate(module, val, verbose=False)
    expected = _calibrated_copy(model, *_seen(val, 3))
    assert torch.equal(model.temperature, expected)  # the same logits, the same float64 search
    assert (model.temperature < 0.5).all()  # still under-confident members
    logged = trainer.callback_metrics
    assert float(logged["val/temperature/prob"]) == pytest.approx(float(expected[0]), rel=1e-6)
    assert float(logged["val/temperature/logit"]) == pytest.approx(float(expected[1]), rel=1e-6)
    assert not torch.allclose(expected, _calibrated_copy(model, images, labels))  # it did not use the rest
    before = model.temperature.clone()
    trainer.validate(module, val, verbose=False)  # deterministic: the same data gives the same bits
    assert torch.equal(model.temperature, before)
    off = MIMOLightningModule(_model(), calibrate=False)
    _trainer().validate(off, val, verbose=False)
    assert torch.equal(off.model.temperature, torch.ones(2))
    assert "val/temperature/prob" not in _trainer().callback_metrics


def test_every_checkpoint_holds_the_temperature_of_its_own_weights(tmp_path):
    class SeesTraining(MIMOLightningModule):
        def on_train_start(self) -> None:
            self.at_start = self.model.temperature.clone()  # after the sanity check

    torch.manual_seed(0)
    module = SeesTraining(_model(), batch_repetition=1)
    val_loader = _loader(_data(24, train=False))
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    trainer = _trainer(max_epochs=2, enable_checkpointing=True, callbacks=[saver], num_sanity_val_steps=2)
    trainer.fit(module, _loader(_data(32), shuffle=True), val_loader)
    assert torch.equal(module.at_start, torch.ones(2))  # the sanity check fitted nothing
    images, labels = _seen(val_loader, 3)
    temperatures = []
    for epoch in (0, 1):
        state = torch.load(tmp_path / f"epoch={epoch}.ckpt", weights_only=True)["state_dict"]
        restored = MIMOLightningModule(_model(), calibrate=False)
        restored.load_state_dict(state)  # strict: the buffer is part of the module's state
        temperature = restored.model.temperature
        assert torch.equal(temperature, _calibrated_copy(restored.model, images, labels))
        temperatures.append(temperature)
    assert not torch.equal(temperatures[0], temperatures[1])
    assert torch.equal(temperatures[1], module.model.temperature)
    restored.model.eval()
    assert torch.equal(restored.model.predict(images), module.model.predict(images))
