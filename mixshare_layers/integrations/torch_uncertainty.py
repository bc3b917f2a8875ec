"""torch-uncertainty integration: a :class:`~mixshare_layers.MIMOWrapper` as one of torch-uncertainty's ensembles.

Needs torch-uncertainty 0.13 (``pip install "mixshare-layers[torch-uncertainty]"``, which brings Lightning,
torchmetrics and scikit-learn with it).

torch-uncertainty's ``ClassificationRoutine`` treats an ensemble of M estimators through one layout: in training,
its ``format_batch_fn`` turns a batch into ``(M * B, C, H, W)`` inputs and ``(M * B,)`` targets, member ``i``'s rows
in block ``i`` ("estimator-major"), and the model returns ``(M * B, K)`` logits in the same layout, fed with the
targets to the routine's loss; in evaluation, the model gets ``(B, C, H, W)`` and returns ``(M * B, K)``, which the
routine rearranges as ``"(m b) k -> b m k"`` and averages as *probabilities* (so every metric it reports uses the
``"prob"`` ensemble rule). The pieces below speak that layout:

* :class:`TorchUncertaintyMIMO`: the model. Training input ``(M * B, C, H, W)`` -> rows ``(B, M, C, H, W)`` (row
  ``r`` holds the ``r``-th image of every block), logits ``(M * B, K)``; eval input ``(B, C, H, W)`` -> the one-pass
  ensemble's logits ``(M * B, K)``. It keeps the mix of its last training batch for the loss.
* :class:`TorchUncertaintyBatchFormat`: the ``format_batch_fn``: the model's :class:`~mixshare_layers.MIMOBatcher`
  (batch repetition, a shuffle per member, the preset's input repetition, optional on-device augmentation of each
  repeated copy), in estimator-major layout. torch-uncertainty's own ``MIMOBatchFormat`` works as well.
* :class:`TorchUncertaintyMIMOLoss`: the preset's :class:`~mixshare_layers.MIMOLoss` (MixMo's rebalanced weights,
  MixShare's plain ratios) on those logits and targets, weighted by the mix of the model's last training batch.
  Like the library's loss, it *sums* the members' mean cross-entropies; torch-uncertainty's usual
  ``CrossEntropyLoss`` on the ``M * B`` rows is the mean, M times smaller (for weights of 1): learning rates of the
  library's recipe carry over, those tuned with the mean are M times too large here.
* :class:`MIMOClassificationRoutine`: a ``ClassificationRoutine`` built from the three, with ``is_ensemble=True``,
  which also adds :class:`~mixshare_layers.integrations.lightning.MIMOProgress` to the trainer (progress per step
  from ``global_step / estimated_stepping_batches``). With a plain ``ClassificationRoutine``, pass
  ``MIMOProgress()`` in the ``TUTrainer``'s callbacks.

Calibration goes through torch-uncertainty's own ``TemperatureScaler`` (``torch_uncertainty.post_processing``), which
divides one network's logits by ``T``. :class:`EnsembleLogits` presents the ensemble as such a network: its
"logits" are the ensemble's log-probabilities under a rule, so the scaler's ``softmax(log p_ens / T)`` is the
library's tempered ensemble (``mode="ensemble"`` of :func:`~mixshare_layers.evaluation.fit_temperature`): for
``rule="prob"`` the temperature divides the log of the mean of the members' probabilities (what torch-uncertainty's
routines average), for ``rule="logit"`` the mean of the members' logits (classic temperature scaling).

* :func:`fit_temperature_scaler`: fits their scaler (LBFGS on the NLL) and stores its temperature in the model's
  ``temperature`` buffer, which ``predict``, ``fold``, ``save_model`` and ``evaluate_uncertainty`` then use;
* :func:`to_temperature_scaler`: their scaler holding the model's stored temperature (e.g. from
  ``MIMOWrapper.calibrate``), for torch-uncertainty code that takes a ``TemperatureScaler``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import einops
import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_ndim, check_real
from ..functional.ensemble import ensemble_log_probs, from_estimator_major, to_estimator_major
from ..mix_info import MixInfo
from ..vocabulary import ENSEMBLE_RULES, PROGRESS_GRANULARITIES
from ..wrapper import MIMOOutput, MIMOWrapper
from ._optional import require

_tu_routines = require("torch_uncertainty.routines", "torch-uncertainty", __name__)
_tu_post_processing = require("torch_uncertainty.post_processing", "torch-uncertainty", __name__)
from .lightning import MIMOProgress  # noqa: E402  (after the check that names the extra)

ClassificationRoutine: Any = _tu_routines.ClassificationRoutine
TemperatureScaler: Any = _tu_post_processing.TemperatureScaler

__all__ = [
    "EnsembleLogits",
    "MIMOClassificationRoutine",
    "TorchUncertaintyBatchFormat",
    "TorchUncertaintyMIMO",
    "TorchUncertaintyMIMOLoss",
    "fit_temperature_scaler",
    "to_temperature_scaler",
]


class TorchUncertaintyMIMO(nn.Module):
    """A :class:`~mixshare_layers.MIMOWrapper` in torch-uncertainty's estimator-major ensemble layout.

    Args:
        model: the wrapped network (its parameters are this module's).

    Attributes:
        num_estimators: M, torch-uncertainty's name for the number of members.

    Shape:
        - Training: ``(M * B, C, H, W)``, block ``i`` holding member ``i``'s B images -> logits ``(M * B, K)``.
        - Eval: ``(B, C, H, W)`` -> logits ``(M * B, K)``, block ``i`` member ``i``'s predictions.

    Example:
        >>> from mixshare_layers.models import wide_resnet
        >>> net = TorchUncertaintyMIMO(MIMOWrapper(wide_resnet(10, 1, num_classes=10), 2))
        >>> net(torch.randn(2 * 4, 3, 32, 32)).shape  # training: 4 rows of 2 images
        torch.Size([8, 10])
        >>> _ = net.eval()
        >>> net(torch.randn(4, 3, 32, 32)).shape
        torch.Size([8, 10])
    """

    def __init__(self, model: MIMOWrapper) -> None:
        super().__init__()
        if not isinstance(model, MIMOWrapper):
            raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
        self.model = model
        self.num_estimators = model.num_subnetworks
        self._last: tuple[Tensor, MixInfo] | None = None  # the last training logits and their mix

    @property
    def num_classes(self) -> int:
        k = self.model.num_classes
        if k is None:
            raise ValueError(
                "the model's heads do not tell their number of classes (a head without an nn.Linear or nn.Conv2d "
                "layer); give the MultiHead a num_classes (MultiHead.from_module(..., num_classes=K))"
            )
        return k

    def forward(self, x: Tensor) -> Tensor:
        m = self.num_estimators
        check_ndim("x", x, 4, "(M * B, C, H, W) in training, (B, C, H, W) in eval")
        if not self.training:
            logits = self.model(x)
            assert isinstance(logits, Tensor)
            return to_estimator_major(logits)
        if x.shape[0] % m:
            raise ValueError(
                f"in training the input must be estimator-major (M * B, C, H, W) with M={m} (see "
                f"TorchUncertaintyBatchFormat), but got {x.shape[0]} rows, not a multiple of {m}"
            )
        rows = einops.rearrange(x, "(m b) c h w -> b m c h w", m=m)
        out = self.model(rows)
        assert isinstance(out, MIMOOutput)
        logits = to_estimator_major(out.logits)
        self._last = (logits, out.mix_info)
        return logits

    def pop_mix(self, logits: Tensor) -> MixInfo | None:
        """The mix of the training batch that produced ``logits`` (forgotten afterwards), ``None`` in eval mode.

        Raises:
            ValueError: in training mode, when ``logits`` are not the output of the last training forward.
        """
        last, self._last = self._last, None
        if last is not None and last[0] is logits:
            return last[1]
        if not self.training:
            return None
        raise ValueError(
            "the loss must receive the logits of the model's latest training forward (it weighs the members by "
            "that batch's mix ratios); got other logits"
        )


class TorchUncertaintyBatchFormat(nn.Module):
    """torch-uncertainty's ``format_batch_fn`` for a :class:`~mixshare_layers.MIMOWrapper`: MIMO training rows,
    estimator-major.

    Args:
        model: the network (for M and the preset's input repetition), or its :class:`TorchUncertaintyMIMO`.
        batch_repetition: b, how many times each image appears per member.
        transform: batched augmentation of the ``(B * b, C, H, W)`` repeated batch (each copy augmented on its
            own), on device.
        generator: optional ``torch.Generator`` on the data's device.

    Shape:
        - Input: ``(images (B, C, H, W), labels (B,))``.
        - Output: ``(M * B * b, C, H, W)`` and ``(M * B * b,)``: block ``i`` is member ``i``'s B * b images.

    Example:
        >>> from mixshare_layers.models import wide_resnet
        >>> fmt = TorchUncertaintyBatchFormat(MIMOWrapper(wide_resnet(10, 1, num_classes=10), 2), batch_repetition=2)
        >>> x, y = fmt((torch.randn(4, 3, 32, 32), torch.arange(4)))
        >>> x.shape, y.shape
        (torch.Size([16, 3, 32, 32]), torch.Size([16]))
    """

    def __init__(
        self,
        model: MIMOWrapper | TorchUncertaintyMIMO,
        batch_repetition: int = 1,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        wrapper = model.model if isinstance(model, TorchUncertaintyMIMO) else model
        if not isinstance(wrapper, MIMOWrapper):
            raise TypeError(f"model must be a MIMOWrapper or a TorchUncertaintyMIMO, but got {type(model).__name__}")
        self.batcher = wrapper.make_batcher(
            check_int("batch_repetition", batch_repetition, minimum=1), transform=transform, generator=generator
        )

    def extra_repr(self) -> str:
        return repr(self.batcher)

    def forward(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        images, labels = batch[0], batch[1]
        xs, ys = self.batcher(images, labels)  # (B * b, M, C, H, W), (B * b, M)
        return einops.rearrange(xs, "b m ... -> (m b) ..."), einops.rearrange(ys, "b m -> (m b)")


class TorchUncertaintyMIMOLoss(nn.Module):
    """The preset's :class:`~mixshare_layers.MIMOLoss` on torch-uncertainty's estimator-major logits and targets.

    The members are weighted by the mix of the model's last training batch (MixMo's rebalancing, MixShare's plain
    ratios, or 1 each, as the preset says); the model is referenced, not owned (its parameters are not this
    module's). In eval mode, with no mix, every weight is 1.

    Args:
        model: the :class:`TorchUncertaintyMIMO` whose logits this loss receives.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.

    Shape:
        - ``logits``: ``(M * B, K)``; ``targets``: ``(M * B,)``; output: a scalar (the sum over members of their
          mean cross-entropy).

    Example:
        >>> from mixshare_layers.models import wide_resnet
        >>> net = TorchUncertaintyMIMO(MIMOWrapper(wide_resnet(10, 1, num_classes=10), 2, "mixmo"))
        >>> criterion = TorchUncertaintyMIMOLoss(net)
        >>> criterion(net(torch.randn(8, 3, 32, 32)), torch.randint(10, (8,))).shape
        torch.Size([])
    """

    def __init__(self, model: TorchUncertaintyMIMO, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not isinstance(model, TorchUncertaintyMIMO):
            raise TypeError(f"model must be a TorchUncertaintyMIMO, but got {type(model).__name__}")
        object.__setattr__(self, "_source", model)  # a reference, not a submodule
        self.criterion = model.model.make_loss(check_real("label_smoothing", label_smoothing, low=0.0, high=1.0))

    @property
    def source(self) -> TorchUncertaintyMIMO:
        """The model whose mix the loss reads."""
        source: TorchUncertaintyMIMO = self.__dict__["_source"]
        return source

    def extra_repr(self) -> str:
        return f"num_estimators={self.source.num_estimators}"

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        m = self.source.num_estimators
        info = self.source.pop_mix(logits)
        check_ndim("logits", logits, 2, "(M * B, K)")
        if targets.shape != (logits.shape[0],):
            raise ValueError(
                f"targets must have shape (M * B,) = ({logits.shape[0]},) to match logits of shape "
                f"{tuple(logits.shape)}, but got {tuple(targets.shape)}"
            )
        rows = from_estimator_major(logits, m)  # (B, M, K)
        labels = einops.rearrange(targets, "(m b) -> b m", m=m)
        return self.criterion(rows, labels, info)


class MIMOClassificationRoutine(ClassificationRoutine):
    """torch-uncertainty's ``ClassificationRoutine`` for a :class:`~mixshare_layers.MIMOWrapper`.

    Builds :class:`TorchUncertaintyMIMO`, :class:`TorchUncertaintyBatchFormat` and :class:`TorchUncertaintyMIMOLoss`
    around ``model`` and passes them, with ``is_ensemble=True`` and the model's number of classes, to
    ``ClassificationRoutine``; everything else of that routine (metrics, OOD and shift evaluation, logging, its
    ``optim_recipe``) is unchanged. Adds :class:`~mixshare_layers.integrations.lightning.MIMOProgress` to the
    trainer's callbacks.

    Args:
        model: the network.
        batch_repetition: b of the batch format.
        transform: batched on-device augmentation of the repeated batch.
        label_smoothing: of the loss.
        progress: granularity of the progress callback (``"step"``, ``"epoch"``), ``None`` for none.
        **routine_kwargs: ``ClassificationRoutine``'s other arguments (``optim_recipe``, ``eval_ood``,
            ``ood_criterion``, ``eval_shift``, ``log_plots``, ...).

    Example:
        >>> from mixshare_layers.models import wide_resnet
        >>> routine = MIMOClassificationRoutine(
        ...     MIMOWrapper(wide_resnet(10, 1, num_classes=10), 2), eval_ood=True, ood_criterion="mutual_information"
        ... )
        >>> routine.is_ensemble, routine.num_classes
        (True, 10)
    """

    def __init__(
        self,
        model: MIMOWrapper,
        *,
        batch_repetition: int = 1,
        transform: Callable[[Tensor], Tensor] | None = None,
        label_smoothing: float = 0.0,
        progress: str | None = "step",
        **routine_kwargs: Any,
    ) -> None:
        for key in ("num_classes", "loss", "is_ensemble", "format_batch_fn"):
            if key in routine_kwargs:
                raise TypeError(f"MIMOClassificationRoutine sets {key} itself; do not pass it")
        if progress is not None:
            check_choice("progress", progress, PROGRESS_GRANULARITIES)
        net = TorchUncertaintyMIMO(model)
        super().__init__(
            model=net,
            num_classes=model.num_classes,
            loss=TorchUncertaintyMIMOLoss(net, label_smoothing=label_smoothing),
            is_ensemble=True,
            format_batch_fn=TorchUncertaintyBatchFormat(net, batch_repetition, transform=transform),
            **routine_kwargs,
        )
        self.progress_granularity = progress

    def configure_callbacks(self) -> Any:
        return [] if self.progress_granularity is None else [MIMOProgress(self.progress_granularity)]


# ---------------------------------------------------------------------------------------------------------------
# calibration with torch-uncertainty's TemperatureScaler
# ---------------------------------------------------------------------------------------------------------------
class EnsembleLogits(nn.Module):
    """A :class:`~mixshare_layers.MIMOWrapper`'s ensemble as one network's logits, for torch-uncertainty's scalers.

    Returns ``log p_ens``, the ensemble's log-probabilities under ``rule``
    (:func:`~mixshare_layers.functional.ensemble_log_probs`): logits whose softmax is the ensemble, so that a
    ``TemperatureScaler`` around this module gives ``softmax(log p_ens / T)``, the library's tempered ensemble.

    Args:
        model: the network (its parameters are this module's); it must be in eval mode when this module is called.
        rule: ``"prob"`` (mean of member probabilities, as torch-uncertainty's routines ensemble) or ``"logit"``.

    Shape:
        - Input: ``(B, C, H, W)``; output: ``(B, K)``.

    Example:
        >>> from mixshare_layers.models import wide_resnet
        >>> net = EnsembleLogits(MIMOWrapper(wide_resnet(10, 1, num_classes=10), 2).eval())
        >>> net(torch.randn(4, 3, 32, 32)).detach().exp().sum(-1)  # log-probabilities
        tensor([1.0000, 1.0000, 1.0000, 1.0000])
    """

    def __init__(self, model: MIMOWrapper, rule: str = "prob") -> None:
        super().__init__()
        if not isinstance(model, MIMOWrapper):
            raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
        self.model = model
        self.rule = check_choice("rule", rule, ENSEMBLE_RULES)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}"

    def forward(self, x: Tensor) -> Tensor:
        if self.model.training:
            raise ValueError("EnsembleLogits needs its model in eval mode (call .eval()): it is in training mode")
        logits = self.model(x)
        assert isinstance(logits, Tensor)  # eval mode: (B, M, K)
        return ensemble_log_probs(logits, self.rule)


def _device(model: MIMOWrapper) -> torch.device:
    return model.temperature.device


@torch.no_grad()
def _store(model: MIMOWrapper, rule: str, temperature: float) -> None:
    model.temperature[ENSEMBLE_RULES.index(rule)] = temperature


def fit_temperature_scaler(model: MIMOWrapper, dataloader: Any, rule: str = "prob", **scaler_kwargs: Any) -> Any:
    """Fit torch-uncertainty's ``TemperatureScaler`` on the ensemble and keep its temperature in the model.

    The scaler wraps :class:`EnsembleLogits` (``model`` in eval mode while it fits; its mode is restored), so it
    fits the ``T`` of ``softmax(log p_ens / T)`` by its LBFGS on the NLL, the function
    :meth:`MIMOWrapper.calibrate` minimises by a float64 golden-section search; the two agree to the precision of
    torch-uncertainty's float32 LBFGS. The temperature goes into ``model.temperature`` for ``rule`` only (the other
    rule's is left as it is).

    Args:
        model: the network.
        dataloader: held-out ``(images, labels)`` batches (never the test set), as the scaler's ``fit`` takes them.
        rule: the ensemble rule the temperature is for: ``"prob"`` or ``"logit"``.
        **scaler_kwargs: ``TemperatureScaler``'s ``init_temperature``, ``lr``, ``max_iter``, ``eps``.

    Returns:
        The fitted ``TemperatureScaler`` (on the model's device).

    Raises:
        ValueError: the scaler's temperature is not a positive finite number (torch-uncertainty only logs it).
    """
    if not isinstance(model, MIMOWrapper):
        raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
    check_choice("rule", rule, ENSEMBLE_RULES)
    for key in ("model", "device"):
        if key in scaler_kwargs:
            raise TypeError(f"fit_temperature_scaler sets the scaler's {key} itself; do not pass it")
    scaler = TemperatureScaler(EnsembleLogits(model, rule), device=_device(model), **scaler_kwargs)
    was_training = model.training
    model.eval()
    try:
        scaler.fit(dataloader, progress=False)
    finally:
        model.train(was_training)
    t = float(scaler.temperature[0].detach())
    if not 0.0 < t < float("inf"):
        raise ValueError(
            f"torch-uncertainty's TemperatureScaler converged to temperature {t} on this data; nothing was stored "
            "(try another lr or max_iter, or MIMOWrapper.calibrate)"
        )
    _store(model, rule, t)
    return scaler


def to_temperature_scaler(model: MIMOWrapper, rule: str = "prob") -> Any:
    """torch-uncertainty's ``TemperatureScaler`` holding the model's stored temperature for ``rule``.

    The scaler wraps :class:`EnsembleLogits`: ``scaler(x).softmax(-1)`` is ``model.predict(x, rule)`` (model in
    eval mode). It counts as fitted (``trained``) when the stored temperature is not 1, i.e. after
    :meth:`MIMOWrapper.calibrate` or :func:`fit_temperature_scaler`.

    Example:
        >>> from mixshare_layers.models import wide_resnet
        >>> model = MIMOWrapper(wide_resnet(10, 1, num_classes=10), 2).eval()
        >>> model.temperature.fill_(0.5)
        tensor([0.5000, 0.5000])
        >>> scaler = to_temperature_scaler(model)
        >>> float(scaler.temperature[0].detach()), scaler.trained
        (0.5, True)
    """
    if not isinstance(model, MIMOWrapper):
        raise TypeError(f"model must be a MIMOWrapper, but got {type(model).__name__}")
    t = float(model.temperature[ENSEMBLE_RULES.index(check_choice("rule", rule, ENSEMBLE_RULES))])
    scaler = TemperatureScaler(EnsembleLogits(model, rule), init_temperature=t, device=_device(model))
    scaler.trained = t != 1.0
    return scaler
