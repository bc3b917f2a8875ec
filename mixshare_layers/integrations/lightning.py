"""Lightning integration: a callback driving ``set_progress`` and a LightningModule for MIMO training.

Needs Lightning 2 (``pip install "mixshare-layers[lightning]"``, the unified ``lightning`` package).

* :class:`MIMOProgress`: before every training batch, sets the progress of every
  :class:`~mixshare_layers.MIMOWrapper` of the LightningModule to ``global_step / estimated_stepping_batches``
  (optimizer steps done over the steps of the whole fit), which drives fadeout unmixing and the CutMix ramp.
  Works with any LightningModule (torch-uncertainty's routines included).
* :class:`MIMOLightningModule`: training rows from :class:`~mixshare_layers.MIMOBatcher` (batch repetition,
  per-member shuffles, the preset's input repetition), the preset's :class:`~mixshare_layers.MIMOLoss`, evaluation
  of the ensemble with per-member accuracies, disagreement, NLL, ECE, Brier and, in ``test``, the uncertainty
  metrics and OOD detection of :mod:`mixshare_layers.evaluation`; at the end of every validation epoch it fits the
  model's temperatures on the logits the validation saw (``calibrate=True``), so the checkpoints carry them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_int, check_real
from ..evaluation import (
    UNCERTAINTY_SCORES,
    UncertaintyMetrics,
    fit_temperature,
    ood_detection_metrics,
    uncertainty_scores,
)
from ..evaluation._common import all_gather_cat
from ..evaluation.metrics import EnsembleMetrics
from ..vocabulary import ENSEMBLE_RULES, PROGRESS_GRANULARITIES
from ..wrapper import MIMOWrapper
from ._optional import missing

try:
    import lightning.pytorch as pl
except ImportError as exc:  # tested with the package blocked (tests/test_import.py)
    raise missing("lightning.pytorch", "lightning", __name__, exc) from exc

__all__ = ["PROGRESS_GRANULARITIES", "MIMOLightningModule", "MIMOProgress", "find_mimo_wrappers"]


def find_mimo_wrappers(module: nn.Module) -> list[MIMOWrapper]:
    """Every :class:`~mixshare_layers.MIMOWrapper` inside ``module`` (itself included), each once."""
    return [m for m in module.modules() if isinstance(m, MIMOWrapper)]


class MIMOProgress(pl.Callback):
    """Drive :meth:`MIMOWrapper.set_progress` from the trainer, so fadeout and the CutMix ramp follow training.

    Before every training batch, the progress of every :class:`~mixshare_layers.MIMOWrapper` in the
    LightningModule becomes ``min(1, global_step / estimated_stepping_batches)`` (``granularity="step"``: optimizer
    steps, so gradient accumulation and ``max_steps`` are accounted for, and a resumed fit continues where it
    stopped) or ``current_epoch / max_epochs`` (``"epoch"``, the paper's per-epoch schedule). A wrapper whose
    progress already drives itself from its own step counter (the total-steps mode of ``MIMOWrapper``, where the
    library has it) is left alone.

    Args:
        granularity: ``"step"`` or ``"epoch"``.

    Example:
        >>> callback = MIMOProgress()
        >>> callback
        MIMOProgress(granularity='step')
    """

    def __init__(self, granularity: str = "step") -> None:
        super().__init__()
        self.granularity = check_choice("granularity", granularity, PROGRESS_GRANULARITIES)

    def __repr__(self) -> str:
        return f"MIMOProgress(granularity={self.granularity!r})"

    def progress(self, trainer: pl.Trainer) -> float:
        """The progress in ``[0, 1]`` at the trainer's current step (or epoch)."""
        if self.granularity == "epoch":
            total = trainer.max_epochs
            if total is None or total <= 0:
                raise ValueError(
                    f"MIMOProgress(granularity='epoch') needs the trainer's max_epochs, but it is {total}; set "
                    "max_epochs or use granularity='step'"
                )
            return min(1.0, trainer.current_epoch / total)
        total_steps = trainer.estimated_stepping_batches
        if not 0 < total_steps < float("inf"):
            raise ValueError(
                f"MIMOProgress needs a finite number of training steps, but the trainer estimates {total_steps}: "
                "set max_epochs or max_steps"
            )
        return min(1.0, trainer.global_step / total_steps)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrappers = find_mimo_wrappers(pl_module)
        if not wrappers:
            raise ValueError(f"MIMOProgress found no MIMOWrapper in the {type(pl_module).__name__} being trained")
        driven = [w for w in wrappers if not getattr(w, "_steps_drive_progress", False)]
        if driven:
            p = self.progress(trainer)
            for wrapper in driven:
                wrapper.set_progress(p)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply(trainer, pl_module)


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.025, momentum=0.9, nesterov=True, weight_decay=6e-4)


class MIMOLightningModule(pl.LightningModule):
    """Train and evaluate a :class:`~mixshare_layers.MIMOWrapper` with Lightning.

    Training: every ``(images, labels)`` batch becomes M-input rows by the model's batcher
    (:meth:`MIMOWrapper.make_batcher`: batch repetition, a shuffle per member, the preset's input repetition), the
    loss is the preset's :class:`~mixshare_layers.MIMOLoss` (:meth:`MIMOWrapper.make_loss`: MixMo's rebalanced
    weights or MixShare's plain ratios, from the batch's mix), and :class:`MIMOProgress` is added to the trainer's
    callbacks (``progress=``). Logged: ``train/loss``, ``train/progress``.

    Validation: the ensemble's metrics of :class:`~mixshare_layers.evaluation.EnsembleMetrics`, gathered over
    processes before they are computed: ``val/ensemble_acc``, ``val/mean_individual_acc``,
    ``val/individual_acc/<i>`` for every member, ``val/disagreement``, ``val/nll``, ``val/ece``, ``val/brier``.

    Calibration (``calibrate=True``): the validation steps keep the members' logits they compute anyway, and at the
    end of the validation epoch the model's ``temperature`` buffer gets, for each ensemble rule, the temperature
    minimising the NLL of ``softmax(log p_ens / T)`` on them, gathered over processes: what
    :meth:`MIMOWrapper.calibrate` would fit on the same images and labels, without a second pass of the model.
    Logged: ``val/temperature/prob``, ``val/temperature/logit``. It is done at every validation epoch's end rather
    than once at the end of the fit, so that every checkpoint Lightning saves after a validation (``ModelCheckpoint``
    saves after this hook) holds the temperatures of its own weights, the best-k ones included; the fit costs a few
    hundred float64 passes over the ``(N, M, K)`` logits, nothing beside a validation of the model. The sanity-check
    validation (a few batches before training) fits nothing.

    Test: dataloader 0 is the labelled in-distribution test set and gives ``test/...`` with, besides the above,
    ``adaptive_ece``, ``classwise_ece``, ``aurc``, ``mean_confidence``, ``entropy``, ``mutual_information``,
    ``expected_entropy`` (:class:`~mixshare_layers.evaluation.UncertaintyMetrics`); every further test dataloader
    is an OOD set (labels ignored) and gives ``test/ood<j>/<score>/{auroc,aupr,fpr95}`` for the scores of
    :data:`~mixshare_layers.evaluation.UNCERTAINTY_SCORES`. Every value is a fraction or nats (never percent); all
    use the ensemble rule ``rule``.

    Args:
        model: the network to train.
        batch_repetition: b, how many times each image appears per member in a step (the paper uses 2).
        transform: batched augmentation of the repeated batch, on device (each repeated copy augmented on its own).
        optimizer: ``params -> Optimizer``; default: SGD, lr 0.025, Nesterov momentum 0.9, weight decay 6e-4 (the
            paper's recipe for 64 rows per step with b = 2).
        lr_scheduler: ``(optimizer, total_steps) -> LRScheduler``, stepped every optimizer step (``total_steps``
            from ``trainer.estimated_stepping_batches``); default: none.
        rule: ensemble rule of the metrics, ``"prob"`` (mean of member probabilities) or ``"logit"`` (MixMo).
        label_smoothing: of the loss.
        progress: granularity of the :class:`MIMOProgress` callback this module adds (``"step"`` or ``"epoch"``);
            ``None`` to drive the progress yourself. It replaces a ``MIMOProgress`` given to the trainer.
        calibrate: fit the model's temperatures at the end of every validation epoch (see above); ``False`` leaves
            the ``temperature`` buffer as it is.

    Shape:
        - Batches: ``(images (B, C, H, W), labels (B,))``; ``forward``: as the model's.

    Example:
        >>> from mixshare_layers.models import wide_resnet
        >>> module = MIMOLightningModule(MIMOWrapper(wide_resnet(10, 1, num_classes=10), 2), batch_repetition=2)
        >>> module.batcher
        MIMOBatcher(num_subnetworks=2, batch_repetition=2, input_repetition=0.1)
    """

    def __init__(
        self,
        model: MIMOWrapper,
        *,
        batch_repetition: int = 2,
        transform: Callable[[Tensor], Tensor] | None = None,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None,
        rule: str = "prob",
        label_smoothing: float = 0.0,
        progress: str | None = "step",
        calibrate: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, MIMOWrapper):
            raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
        self.model = model
        repetition = check_int("batch_repetition", batch_repetition, minimum=1)
        self.batcher = model.make_batcher(repetition, transform=transform)
        self.criterion = model.make_loss(check_real("label_smoothing", label_smoothing, low=0.0, high=1.0))
        self.rule = check_choice("rule", rule, ENSEMBLE_RULES)
        if progress is not None:
            check_choice("progress", progress, PROGRESS_GRANULARITIES)
        self.progress_granularity = progress
        self.calibrate = check_bool("calibrate", calibrate)
        for name, fn in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, but got {type(fn).__name__}")
        self.optimizer_factory = optimizer or _default_optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._val: EnsembleMetrics | None = None
        self._calibration: tuple[list[Tensor], list[Tensor]] | None = None  # a validation's logits and labels
        self._test: UncertaintyMetrics | None = None
        self._ood_scores: dict[int, dict[str, list[Tensor]]] = {}

    # ---------------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Any:
        return self.model(x)

    def configure_callbacks(self) -> Sequence[pl.Callback] | pl.Callback:
        return [] if self.progress_granularity is None else [MIMOProgress(self.progress_granularity)]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.model.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not 0 < total < float("inf"):
            raise ValueError(f"lr_scheduler needs a finite number of training steps, but the trainer estimates {total}")
        scheduler = self.lr_scheduler_factory(optimizer, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]
        xs, ys = self.batcher(images, labels)  # (B * b, M, C, H, W), (B * b, M)
        loss = self.criterion(self.model(xs), ys)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/progress", self.model.progress)
        return loss

    # ---------------------------------------------------------------------------------------------------------
    def _eval_logits(self, images: Tensor) -> Tensor:
        logits = self.model(images)
        assert isinstance(logits, Tensor)  # eval mode: (B, M, K)
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    def on_validation_epoch_start(self) -> None:
        self._val = EnsembleMetrics(self.model.num_subnetworks, self.rule, device=self.device)
        self._calibration = ([], []) if self.calibrate and not self.trainer.sanity_checking else None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        assert self._val is not None
        logits = self._eval_logits(batch[0])
        self._val.update(logits, batch[1])
        if self._calibration is not None:
            self._calibration[0].append(logits)
            self._calibration[1].append(batch[1])

    def on_validation_epoch_end(self) -> None:
        assert self._val is not None
        self._val.all_reduce()
        self._log_metrics("val", self._val.compute())
        self._val = None
        if self._calibration is not None:
            self._fit_temperatures(*self._calibration)
            self._calibration = None

    def _fit_temperatures(self, logits: list[Tensor], labels: list[Tensor]) -> None:
        """Store in the model, for each rule, the temperature fitted on the validation's logits of every process."""
        if not logits:
            return
        all_logits = all_gather_cat(torch.cat(logits))
        all_labels = all_gather_cat(torch.cat([y.to(all_logits.device) for y in labels]))
        fitted = [fit_temperature(all_logits, all_labels, rule) for rule in ENSEMBLE_RULES]  # what calibrate fits
        self.model.temperature.copy_(torch.tensor(fitted))
        for rule, t in zip(ENSEMBLE_RULES, fitted, strict=True):
            self.log(f"val/temperature/{rule}", t, add_dataloader_idx=False)

    def on_test_epoch_start(self) -> None:
        m, k = self.model.num_subnetworks, self.model.num_classes
        if k is None:
            raise ValueError(
                "the model's heads do not tell their number of classes (a head without an nn.Linear or nn.Conv2d "
                "layer); give the MultiHead a num_classes (MultiHead.from_module(..., num_classes=K))"
            )
        self._test = UncertaintyMetrics(m, k, self.rule, device=self.device)
        self._ood_scores = {}

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        assert self._test is not None
        logits = self._eval_logits(batch[0] if isinstance(batch, (tuple, list)) else batch)
        if dataloader_idx == 0:
            self._test.update(logits, batch[1])
            return
        scores = uncertainty_scores(logits, self.rule)
        store = self._ood_scores.setdefault(dataloader_idx, {s: [] for s in UNCERTAINTY_SCORES})
        for s in UNCERTAINTY_SCORES:
            store[s].append(scores[s])

    def on_test_epoch_end(self) -> None:
        assert self._test is not None
        self._test.sync()
        out = self._test.compute()
        self._log_metrics("test", out)
        id_scores = self._test.scores()
        for j, store in sorted(self._ood_scores.items()):
            for s in UNCERTAINTY_SCORES:
                ood = all_gather_cat(torch.cat(store[s]).to(id_scores[s].dtype))
                for name, value in ood_detection_metrics(id_scores[s], ood).items():
                    self.log(f"test/ood{j}/{s}/{name}", float(value), add_dataloader_idx=False)
        self._test, self._ood_scores = None, {}

    def _log_metrics(self, prefix: str, out: dict[str, Any]) -> None:
        for key, value in out.items():
            if key == "individual_acc":
                for i, acc in enumerate(value):
                    self.log(f"{prefix}/individual_acc/{i}", float(acc), add_dataloader_idx=False)
            elif isinstance(value, float) and key != "temperature":
                self.log(f"{prefix}/{key}", value, prog_bar=key == "ensemble_acc", add_dataloader_idx=False)
