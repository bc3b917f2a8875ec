"""``evaluate_uncertainty``: one call for the evaluation an uncertainty paper reports, clean, OOD and under shift."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_real
from ..vocabulary import ENSEMBLE_RULES, TEMPERATURE_MODES
from ._common import all_gather_cat
from .accumulator import UncertaintyMetrics
from .metrics import ECE_BINS
from .ood import ood_detection_metrics
from .scores import UNCERTAINTY_SCORES, uncertainty_scores
from .shift import CORRUPTIONS, SEVERITIES, corrupt
from .temperature import fit_temperature

__all__ = [
    "METRIC_UNITS",
    "calibration_under_shift",
    "evaluate_uncertainty",
    "flatten_report",
    "shift_cells",
]

#: The unit of every metric of a report (one convention per kind of quantity).
METRIC_UNITS: Mapping[str, str] = MappingProxyType(
    {
        "count": "samples",
        "ensemble_acc": "fraction",
        "individual_acc": "fraction",
        "mean_individual_acc": "fraction",
        "disagreement": "fraction",
        "mean_confidence": "fraction",
        "ece": "fraction",
        "adaptive_ece": "fraction",
        "classwise_ece": "fraction",
        "aurc": "fraction",
        "auroc": "fraction",
        "aupr": "fraction",
        "fpr95": "fraction",
        "nll": "nats per sample",
        "entropy": "nats per sample",
        "mutual_information": "nats per sample",
        "expected_entropy": "nats per sample",
        "brier": "per sample, summed over classes, in [0, 2]",
        "temperature": "dimensionless",
    }
)

Data = Any  # an iterable of batches, a pair of tensors (images, labels), or (OOD) a tensor of images


def _as_float_images(x: Tensor, name: str, check: bool) -> Tensor:
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if not x.is_floating_point():
        raise TypeError(f"{name}: images must be uint8 or floating point in [0, 1], but got dtype {x.dtype}")
    if check and x.numel():
        lo, hi = torch.aminmax(x.detach())
        if float(lo) < -1e-3 or float(hi) > 1.0 + 1e-3:
            raise ValueError(
                f"{name}: images must lie in [0, 1] (or be uint8) so that corruptions see pixel values, but they span "
                f"[{float(lo):.3g}, {float(hi):.3g}]: pass un-normalised images and the normalisation as preprocess="
            )
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _batches(
    data: Data, name: str, batch_size: int, device: torch.device, labelled: bool
) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
    """Yield ``(images in [0, 1] on device, labels or None, global index)``."""
    if isinstance(data, Tensor):
        items: Iterable[Any] = (data[i : i + batch_size] for i in range(0, data.shape[0], batch_size))
    elif isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x_all, y_all = data
        if x_all.shape[0] != y_all.shape[0]:
            raise ValueError(f"{name}: {x_all.shape[0]} images but {y_all.shape[0]} labels")
        items = ((x_all[i : i + batch_size], y_all[i : i + batch_size]) for i in range(0, x_all.shape[0], batch_size))
    elif isinstance(data, Iterable):
        items = data
    elif isinstance(data, torch.utils.data.Dataset):  # map-style: (image, label) items
        items = torch.utils.data.DataLoader(data, batch_size=batch_size)
    else:
        raise TypeError(
            f"{name} must be an iterable of (images, labels) batches (e.g. a DataLoader), a map-style Dataset of "
            f"(image, label), a pair of tensors (images, labels) or, for OOD data, a tensor of images, but got "
            f"{type(data).__name__}"
        )
    offset = 0
    for i, item in enumerate(items):
        if isinstance(item, Tensor):
            x, y = item, None
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
            x = item[0]
            y = item[1] if len(item) > 1 and isinstance(item[1], Tensor) else None
        else:
            raise TypeError(f"{name}: a batch must be images or (images, labels, ...), but got {type(item).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name}: images must have shape (B, C, H, W), but got {tuple(x.shape)}")
        if labelled and y is None:
            raise ValueError(f"{name}: the batches must hold labels, (images, labels)")
        x = _as_float_images(x.to(device, non_blocking=True), name, check=i == 0)
        index = torch.arange(offset, offset + x.shape[0], device=device)
        offset += x.shape[0]
        yield x, (None if y is None else y.to(device, non_blocking=True)), index


def _logits(model: nn.Module, x: Tensor, preprocess: Callable[[Tensor], Tensor] | None) -> Tensor:
    out = model(preprocess(x) if preprocess is not None else x)
    out = getattr(out, "logits", out)
    if not isinstance(out, Tensor) or out.dim() not in (2, 3):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits (B, M, K) (or (B, K) for one network), but returned {shape}")
    out = out.unsqueeze(1) if out.dim() == 2 else out
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def _mean_metrics(dicts: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of every float metric over ``dicts`` (the shifts of one severity, or all of them)."""
    keys = [k for k, v in dicts[0].items() if isinstance(v, float) and k not in ("temperature",)]
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in keys}


@torch.no_grad()
def evaluate_uncertainty(
    model: nn.Module,
    test: Data,
    *,
    ood: Data | Mapping[str, Data] | None = None,
    val: Data | None = None,
    temperature: float | None = None,
    temperature_mode: str = "ensemble",
    temperature_bounds: tuple[float, float] = (0.05, 20.0),
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    rule: str = "prob",
    preprocess: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    seed: int = 0,
    num_bins: int = ECE_BINS,
) -> dict[str, Any]:
    """Evaluate an ensemble's predictions and uncertainty: clean, against OOD sets, under corruptions.

    The model runs in eval mode (its mode is restored afterwards), once on the validation split (when given), once
    on the test set, once on every OOD set and once per corruption and severity of the test set (corrupted on the
    fly, on ``device``, by :func:`~mixshare_layers.evaluation.corrupt`, deterministic from ``seed`` and each image's
    position in the test set). Every metric is :class:`~mixshare_layers.evaluation.UncertaintyMetrics`' (units in
    :data:`METRIC_UNITS`: fractions, nats). The report's keys:

    - ``"clean"``: the test set's metrics (:meth:`UncertaintyMetrics.compute`);
    - ``"ood"``: ``{set: {score: {"auroc", "aupr", "fpr95"}}}`` for the scores of
      :data:`~mixshare_layers.evaluation.UNCERTAINTY_SCORES`, in-distribution = the clean test set;
    - ``"shift"``: ``{corruption: {severity: metrics}}``; ``"shift_by_severity"``: ``{severity: mean over the
      corruptions}``; ``"shift_mean"``: the mean over every corruption and severity (float metrics only);
    - ``"calibrated"``: the same five entries at the fitted / given / model's temperature (absent without one);
    - ``"temperature"`` (``None`` without one), ``"temperature_source"`` (``"val"``, ``"given"``, ``"model"`` or
      ``None``), ``"temperature_mode"``, ``"rule"``, ``"num_subnetworks"``, ``"seed"``, ``"units"``
      (:data:`METRIC_UNITS`).

    Args:
        model: returns logits ``(B, M, K)`` in eval mode (a :class:`~mixshare_layers.MIMOWrapper`), or ``(B, K)``
            for a single network (M = 1).
        test: labelled test data: an iterable of ``(images, labels)`` batches (a ``DataLoader``, iterated once per
            pass, in a fixed order), a map-style ``Dataset`` of ``(image, label)`` or a pair of tensors
            ``(images, labels)``, the last two cut into ``batch_size`` batches.
            Images are uint8 or floats in ``[0, 1]``, *not normalised*: the corruptions act on pixel values.
        ood: OOD data (labels, if any, are ignored): data as ``test`` or a tensor of images, or a mapping from a
            name to such data for several sets (a single set is named ``"ood"``).
        val: labelled validation data (never the test set) to fit the temperature on, as ``test``.
        temperature: a temperature to use instead of fitting one; ``None`` with ``val``: fitted by
            :func:`~mixshare_layers.evaluation.fit_temperature`; ``None`` without ``val``: the model's own for
            ``rule`` when it holds fitted ones (``MIMOWrapper.calibrate``, a ``temperature`` buffer not all ones)
            and ``temperature_mode="ensemble"`` (the mode it was fitted in), else no calibrated results.
        temperature_mode: ``"ensemble"`` (``T`` divides the ensemble's log-probabilities after ``rule``) or
            ``"members"`` (``T`` divides every member's logits).
        temperature_bounds: the search interval of the fit (a warning says when the optimum lies on its edge).
        corruptions: families of :data:`mixshare_layers.evaluation.shift.CORRUPTIONS` to evaluate (``()``: none).
        severities: severities among 1..5.
        rule: the ensemble rule of every metric: ``"prob"`` (mean of the member probabilities, MIMO and
            torch-uncertainty) or ``"logit"`` (mean of the logits, MixMo).
        preprocess: applied to the ``[0, 1]`` images (after any corruption) before the model, e.g. the dataset's
            normalisation.
        batch_size: batch size when data are given as tensors or a ``Dataset``.
        device: where the model runs and the metrics live (default: the model's device).
        seed: seed of the corruptions.
        num_bins: bins of the calibration errors and of the reliability diagram.

    Returns:
        The report, a JSON-serialisable dict (its keys are listed above).

    In a ``torch.distributed`` run where every process evaluates its own shard, the results gather every shard
    (corruption positions then count the images of each process separately).

    Example:
        >>> from mixshare_layers import MIMOWrapper, SyntheticImageDataset
        >>> from mixshare_layers.models import wide_resnet
        >>> model = MIMOWrapper(wide_resnet(10, 1, num_classes=4), num_subnetworks=2, preset="mixshare")
        >>> test = SyntheticImageDataset(40, num_classes=4, train=False)
        >>> report = evaluate_uncertainty(
        ...     model, (test.data, test.targets), ood=test.data.flip(-2), corruptions=["contrast"], severities=[5]
        ... )
        >>> sorted(report["ood"]["ood"]["mutual_information"])
        ['aupr', 'auroc', 'fpr95']
        >>> 0.0 <= report["shift"]["contrast"][5]["ensemble_acc"] <= 1.0
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}")
    check_choice("rule", rule, ENSEMBLE_RULES)
    check_choice("temperature_mode", temperature_mode, TEMPERATURE_MODES)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    if isinstance(corruptions, str):
        corruptions = (corruptions,)
    for c in corruptions:
        check_choice("corruptions", c, CORRUPTIONS)
    severities = tuple(severities)
    for s in severities:
        if isinstance(s, bool) or not isinstance(s, int) or s not in SEVERITIES:
            raise ValueError(f"severities must be integers in 1..{len(SEVERITIES)}, but got {s!r}")
    source = "given" if temperature is not None else "val" if val is not None else None
    if temperature is not None:
        temperature = check_real("temperature", temperature, low=0.0, low_inclusive=False)
    elif val is None and temperature_mode == "ensemble":
        temperature = _model_temperature(model, rule)
        source = None if temperature is None else "model"
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if ood is None:
        ood_sets: dict[str, Data] = {}
    elif isinstance(ood, Mapping):
        ood_sets = dict(ood)
        for key in ood_sets:
            if not isinstance(key, str):
                raise TypeError(f"the names of the OOD sets must be strings, but got {key!r}")
    else:
        ood_sets = {"ood": ood}

    was_training = model.training
    model.eval()
    try:
        return _evaluate(
            model, test, ood_sets, val, temperature, temperature_mode, temperature_bounds, corruptions, severities,
            rule, preprocess, batch_size, device, seed, num_bins,
        ) | {"temperature_source": source}  # fmt: skip
    finally:
        model.train(was_training)


def _model_temperature(model: nn.Module, rule: str) -> float | None:
    """The temperature a calibrated model keeps for ``rule`` (``MIMOWrapper.calibrate``, also on a folded model);
    ``None`` when it has none or they are all ones (never fitted)."""
    stored = getattr(model, "temperature", None)
    if not isinstance(stored, Tensor) or stored.shape != (len(ENSEMBLE_RULES),) or bool((stored == 1).all()):
        return None
    return float(stored[ENSEMBLE_RULES.index(rule)])


def _evaluate(
    model: nn.Module,
    test: Data,
    ood_sets: dict[str, Data],
    val: Data | None,
    temperature: float | None,
    temperature_mode: str,
    temperature_bounds: tuple[float, float],
    corruptions: Sequence[str],
    severities: tuple[int, ...],
    rule: str,
    preprocess: Callable[[Tensor], Tensor] | None,
    batch_size: int,
    device: torch.device,
    seed: int,
    num_bins: int,
) -> dict[str, Any]:
    if temperature is None and val is not None:
        logits_list, labels_list = [], []
        for x, y, _ in _batches(val, "val", batch_size, device, labelled=True):
            logits_list.append(_logits(model, x, preprocess))
            labels_list.append(y)
        if not logits_list:
            raise ValueError("val holds no batch")
        val_logits = all_gather_cat(torch.cat(logits_list))
        val_labels = all_gather_cat(torch.cat(labels_list))  # type: ignore[arg-type]
        temperature = fit_temperature(val_logits, val_labels, rule, mode=temperature_mode, bounds=temperature_bounds)
    temps = [1.0] if temperature is None else [1.0, float(temperature)]

    def run(corruption: str | None, severity: int) -> list[UncertaintyMetrics]:
        accs: list[UncertaintyMetrics] = []
        for x, y, index in _batches(test, "test", batch_size, device, labelled=True):
            if corruption is not None:
                x = corrupt(x, corruption, severity, seed=seed, index=index)
            logits = _logits(model, x, preprocess)
            if not accs:
                m, k = logits.shape[1], logits.shape[2]
                accs = [
                    UncertaintyMetrics(
                        m, k, rule, temperature=t, temperature_mode=temperature_mode, num_bins=num_bins, device=device
                    )
                    for t in temps
                ]
            for acc in accs:
                acc.update(logits, y)  # type: ignore[arg-type]
        if not accs:
            raise ValueError("test holds no batch")
        for acc in accs:
            acc.sync()
        return accs

    clean = run(None, 0)
    reports: list[dict[str, Any]] = [{"clean": acc.compute()} for acc in clean]
    num_subnetworks = clean[0].num_subnetworks

    for name, data in ood_sets.items():
        per_temp: list[dict[str, list[Tensor]]] = [{s: [] for s in UNCERTAINTY_SCORES} for _ in temps]
        for x, _, _ in _batches(data, f"ood[{name!r}]", batch_size, device, labelled=False):
            logits = _logits(model, x, preprocess)
            if logits.shape[1:] != (num_subnetworks, clean[0].num_classes):
                raise ValueError(f"OOD set {name!r}: logits of shape {tuple(logits.shape)} do not match the test set's")
            for i, t in enumerate(temps):
                scores = uncertainty_scores(logits, rule, temperature=t, temperature_mode=temperature_mode)
                for s in UNCERTAINTY_SCORES:
                    per_temp[i][s].append(scores[s])
        for i, acc in enumerate(clean):
            id_scores = acc.scores()
            result = {}
            for s in UNCERTAINTY_SCORES:
                if not per_temp[i][s]:
                    raise ValueError(f"OOD set {name!r} holds no batch")
                ood_scores = all_gather_cat(torch.cat(per_temp[i][s]).to(id_scores[s].dtype))
                result[s] = {k: float(v) for k, v in ood_detection_metrics(id_scores[s], ood_scores).items()}
            reports[i].setdefault("ood", {})[name] = result

    for rep in reports:
        rep.update(ood=rep.get("ood", {}), shift={}, shift_by_severity={}, shift_mean={})
    all_shifts: list[list[dict[str, Any]]] = [[] for _ in temps]
    by_severity: list[dict[int, list[dict[str, Any]]]] = [{s: [] for s in severities} for _ in temps]
    for corruption in corruptions:
        for severity in severities:
            for i, acc in enumerate(run(corruption, severity)):
                metrics = acc.compute()
                reports[i]["shift"].setdefault(corruption, {})[severity] = metrics
                all_shifts[i].append(metrics)
                by_severity[i][severity].append(metrics)
    for i, rep in enumerate(reports):
        if all_shifts[i]:
            rep["shift_mean"] = _mean_metrics(all_shifts[i])
            rep["shift_by_severity"] = {s: _mean_metrics(v) for s, v in by_severity[i].items()}

    out: dict[str, Any] = dict(reports[0])
    if temperature is not None:
        out["calibrated"] = reports[1]
    out.update(
        temperature=None if temperature is None else float(temperature),
        temperature_mode=temperature_mode,
        rule=rule,
        num_subnetworks=num_subnetworks,
        seed=seed,
        units=dict(METRIC_UNITS),
    )
    return out


def flatten_report(
    report: Mapping[str, Any], *, sep: str = "/", skip: Sequence[str] = ("reliability", "units")
) -> dict[str, Any]:
    """One level of ``"a/b/c"`` keys for a report of :func:`evaluate_uncertainty` (e.g. for a CSV row).

    Lists become ``key/0``, ``key/1``, ...; keys named in ``skip`` (at any depth) are left out; NaN stays NaN.

    Example:
        >>> flatten_report({"clean": {"nll": 0.5, "individual_acc": [0.8, 0.7]}, "shift": {"blur": {5: {"nll": 1.0}}}})
        {'clean/nll': 0.5, 'clean/individual_acc/0': 0.8, 'clean/individual_acc/1': 0.7, 'shift/blur/5/nll': 1.0}
    """
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                if str(k) in skip:
                    continue
                walk(f"{prefix}{sep}{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)):
            for j, v in enumerate(value):
                walk(f"{prefix}{sep}{j}", v)
        else:
            flat[prefix] = value

    walk("", report)
    return flat


def shift_cells(report: Mapping[str, Any]) -> list[tuple[str, Any, Mapping[str, Any]]]:
    """The cells of a report (or of its ``"calibrated"`` part) in table order, as ``(shift, severity, metrics)``:
    ``("clean", 0, ...)``, each corruption and severity, the mean per severity (``("mean", s, ...)``) and over all
    (``("mean", "all", ...)``, when there is one)."""
    out: list[tuple[str, Any, Mapping[str, Any]]] = [("clean", 0, report["clean"])]
    for corruption, by_severity in report["shift"].items():
        out += [(corruption, severity, m) for severity, m in by_severity.items()]
    out += [("mean", severity, m) for severity, m in report["shift_by_severity"].items()]
    if report["shift_mean"]:
        out.append(("mean", "all", report["shift_mean"]))
    return out


def calibration_under_shift(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """ECE and NLL under every shift of an :func:`evaluate_uncertainty` report, raw and at its temperature.

    One row per shift, in the report's order: ``clean`` (severity 0), each corruption at each severity, then
    ``mean`` over the corruptions at each severity and over all (severity ``"all"``). A row is ``{"shift",
    "severity", "ece", "nll", "calibrated_ece", "calibrated_nll"}``: ECE a fraction, NLL in nats; the calibrated
    pair comes from ``report["calibrated"]`` (the temperature fitted on the validation split, given, or stored in
    the model: ``report["temperature_source"]``) and is ``None`` when the report has no temperature.

    Example:
        >>> m = lambda ece, nll: {"ece": ece, "nll": nll}
        >>> rep = {"clean": m(0.1, 0.5), "shift": {"blur": {5: m(0.3, 1.2)}}, "shift_by_severity": {}, "shift_mean": {}}
        >>> cal = {**rep, "clean": m(0.02, 0.4), "shift": {"blur": {5: m(0.1, 1.0)}}}
        >>> rows = calibration_under_shift({**rep, "calibrated": cal})
        >>> [(r["shift"], r["severity"], r["ece"], r["calibrated_ece"]) for r in rows]
        [('clean', 0, 0.1, 0.02), ('blur', 5, 0.3, 0.1)]
    """

    cells = shift_cells
    calibrated = report.get("calibrated")
    tempered = cells(calibrated) if calibrated is not None else None
    rows = []
    for i, (name, severity, m) in enumerate(cells(report)):
        c = tempered[i][2] if tempered is not None else None
        rows.append(
            {
                "shift": name,
                "severity": severity,
                "ece": m["ece"],
                "nll": m["nll"],
                "calibrated_ece": None if c is None else c["ece"],
                "calibrated_nll": None if c is None else c["nll"],
            }
        )
    return rows
