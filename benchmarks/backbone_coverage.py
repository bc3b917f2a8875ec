"""Backbone coverage: does every torchvision and timm classifier wrap, train and start exactly as the backbone?

Not part of the test suite (it builds about 180 models); tests/test_backbones.py checks a fast representative set.

    nice -n 10 python benchmarks/backbone_coverage.py                      # everything (resumes from the JSON)
    python benchmarks/backbone_coverage.py --only torchvision --force      # redo one source
    python benchmarks/backbone_coverage.py --models timm/resnet18d tv/vgg11 # some models (tv = torchvision)
    python benchmarks/backbone_coverage.py --report                        # rewrite docs/backbones.md from the JSON

Models: every builder of ``torchvision.models.list_models(module=torchvision.models)``, and the smallest classifier
(fewest parameters, counted on the meta device; a feature encoder without a head is passed over) of every timm
architecture family (the module that defines it: ``timm.list_modules()``), with random weights, 10 classes and the
smallest input size the model takes among 64, 96, 128, 160 and its default (a fixed-size ViT / Swin is built with
``img_size=64`` where its constructor takes it). A timm family whose smallest classifier has more than 60 M
parameters is built with ``depth=2`` where its constructor takes it (the same code with fewer blocks; the "params"
column says so).

For each model, in its own subprocess (one thread, a time limit, results cached in the JSON after each model):

* **wrap**: ``MIMOWrapper(net, 2, "mixshare")``; a backbone whose head does not average its features (a class
  token, a flattening head) is refused by the unmixing presets with the reason, and is wrapped with
  ``unmix_mode="none"`` instead (recorded in the "unmix" column); any other refusal is recorded with its message;
* **train**: one training step (forward, MixShare loss, backward) on ``(2, 2, C, H, W)`` random inputs: the loss
  and every member's gradients (its encoder copy and its head) must be finite, and every member must get some;
* **exact**: ``MIMOWrapper(net, 2, ..., pretrained=True)`` in eval mode against the backbone:
  ``max |logits - backbone| / max |backbone| <= 1e-5`` (float32);
* **fold**: ``model.fold()`` against the eval forward (same criterion);
* **export**: ``torch.export.export`` of the folded model, run and compared (same criterion).

Writes ``benchmarks/results/backbones.json`` and ``docs/backbones.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixshare_layers.files import write_text  # noqa: E402

JSON_PATH = ROOT / "benchmarks" / "results" / "backbones.json"
DOC_PATH = ROOT / "docs" / "backbones.md"
TOLERANCE = 1e-5
SIZES = (64, 96, 128, 160)
LARGE = 60e6  # parameters above which a timm family's smallest model is built with depth=2 (where it takes it)


# -- the worker (runs in a subprocess) -----------------------------------------------------------------------------
def _build(source: str, name: str):
    """The model with random weights and 10 classes, and the input size it takes (smallest first)."""
    import torch

    errors = []
    if source == "torchvision":
        import torchvision

        candidates: list[tuple[dict, int]] = []
        if name.startswith("vit_"):
            patch = int(name.split("_")[-1])
            candidates = [({"image_size": 4 * patch}, 4 * patch)]
        elif name.startswith("maxvit"):
            candidates = [({"input_size": (s, s)}, s) for s in (112, 224)]
        else:
            candidates = [({}, s) for s in SIZES] + [({}, 224)]
        for kwargs, size in candidates:
            try:
                net = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
                with torch.no_grad():
                    net(torch.randn(1, 3, size, size))
                return net, size
            except Exception as exc:  # a size a model refuses fails in many ways
                errors.append(f"{size}: {type(exc).__name__}: {exc}")
    else:
        import timm

        with torch.device("meta"):  # no memory, no init: the config, and whether it is large
            probe = timm.create_model(name, pretrained=False, num_classes=10)
        cfg = probe.pretrained_cfg or {}
        default = int(cfg.get("input_size", (3, 224, 224))[-1])
        chans = int(getattr(probe, "in_chans", None) or cfg.get("input_size", (3, 224, 224))[0])
        large = sum(p.numel() for p in probe.parameters()) > LARGE
        del probe
        reduced: dict = {}
        if large:  # a family whose smallest model is large: the same code with 2 blocks, where the model takes it
            try:
                with torch.device("meta"):
                    timm.create_model(name, pretrained=False, num_classes=10, depth=2)
                reduced = {"depth": 2}
            except Exception:
                reduced = {}
        if cfg.get("fixed_input_size", False):
            builds = [({"img_size": s}, [s]) for s in (64, 96, 128)] + [({}, [default])]
        else:
            builds = [({}, [s for s in SIZES if s < default] + [default])]
        for kwargs, sizes in builds:
            try:
                torch.manual_seed(0)
                net = timm.create_model(name, pretrained=False, num_classes=10, **kwargs, **reduced).eval()
            except Exception as exc:
                errors.append(f"build {kwargs}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            for size in sizes:
                try:
                    with torch.no_grad():
                        net(torch.randn(1, chans, size, size))
                    net.coverage_config = ", ".join(f"{k}={v}" for k, v in reduced.items())
                    return net, size
                except Exception as exc:
                    errors.append(f"{size} {kwargs}: {type(exc).__name__}: {str(exc)[:200]}")
    raise RuntimeError("could not build or run the backbone at any size: " + " | ".join(errors))


def _relative(a, b) -> float:
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else diff  # an all-zero reference (a zero-initialised head): absolute


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 600 else text[:600] + "..."


def worker(source: str, name: str) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from mixshare_layers import MIMOWrapper, UnsupportedBackboneError

    rec: dict = {"source": source, "name": name}
    t0 = time.perf_counter()
    net, size = _build(source, name)
    rec["params_m"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 3)
    rec["input"] = size
    if getattr(net, "coverage_config", ""):
        rec["config"] = net.coverage_config
    chans = getattr(net, "in_chans", None) or next(
        (m.in_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)), 3
    )
    chans = 3 if source == "torchvision" else chans
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, chans, size, size, generator=gen)
    with torch.no_grad():
        reference = net.eval()(x)
        reference = reference[0] if isinstance(reference, tuple) else reference

    # -- wrap (default: pretrained=False) and one training step ----------------------------------------------------
    overrides: dict = {}
    trained = copy.deepcopy(net)  # the wrapper shares the backbone's modules: train a copy, check the original
    try:
        try:
            model = MIMOWrapper(trained, 2, "mixshare")
        except ValueError as exc:
            if "unmixes the final features" not in str(exc):
                raise
            rec["unmix"] = str(exc).split(" but ", 1)[1].split(". Keep", 1)[0]
            overrides = {"unmix_mode": "none"}
            model = MIMOWrapper(trained, 2, "mixshare", **overrides)
    except UnsupportedBackboneError as exc:
        rec["wraps"] = False
        rec["refusal"] = _first_line(exc)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        return rec
    rec["wraps"] = True
    rec.setdefault("unmix", True)
    rec["layout"] = model.layout + (f" (P={model.num_prefix_tokens})" if model.layout == "tokens" else "")
    rec["pooling"] = model.pooling
    enc = model.encoder
    rec["encoder"] = (
        f"Conv2d {enc.in_channels}->{enc.out_channels} k{enc.kernel_size[0]} s{enc.stride[0]} (fused)"
        if enc.fused
        else type(enc.encoders[0]).__name__ + (" (linear)" if enc.is_linear else "")
    )
    rec["head"] = "Linear (batched)" if model.heads.is_linear else type(model.heads.members[0]).__name__
    try:
        model.train()
        xs = torch.randn(2, 2, chans, size, size, generator=gen)
        labels = torch.randint(10, (2, 2), generator=gen)
        out = model(xs)
        loss = model.make_loss()(out, labels)
        loss.backward()
        bad = []
        if not bool(torch.isfinite(loss)):
            bad.append("loss")
        enc_grads = [enc.weight.grad] if enc.fused else [next(c.parameters()).grad for c in enc.encoders]
        for i in range(2):
            g_enc = enc_grads[0].view(2, -1)[i] if enc.fused else enc_grads[i]
            head_params = [model.heads.weight] if model.heads.is_linear else list(model.heads.members[i].parameters())
            g_head = [p.grad[i] if model.heads.is_linear else p.grad for p in head_params]
            for what, g in [("encoder", g_enc)] + [("head", g) for g in g_head]:
                if g is None:
                    bad.append(f"member {i} {what}: no gradient")
                elif not bool(torch.isfinite(g).all()):
                    bad.append(f"member {i} {what}: non-finite gradient")
        rec["train"] = not bad
        if bad:
            rec["train_error"] = ", ".join(dict.fromkeys(bad))
        rec["loss"] = round(float(loss), 4)
    except Exception as exc:  # any failure is recorded as such
        rec["train"] = False
        rec["train_error"] = _first_line(exc)
    del model, trained

    # -- pretrained=True: exactness, fold, export ------------------------------------------------------------------
    try:
        net.eval()
        model = MIMOWrapper(net, 2, "mixshare", pretrained=True, **overrides).eval()
        with torch.no_grad():
            got = model(x)
        rec["exact_rel"] = max(_relative(got[:, i], reference) for i in range(2))
        rec["exact"] = rec["exact_rel"] <= TOLERANCE
    except Exception as exc:
        rec["exact"] = False
        rec["exact_error"] = _first_line(exc)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        return rec
    try:
        folded = model.fold()
        with torch.no_grad():
            rec["fold_rel"] = _relative(folded(x), got)
        rec["fold"] = rec["fold_rel"] <= TOLERANCE
    except Exception as exc:
        rec["fold"] = False
        rec["fold_error"] = _first_line(exc)
        folded = None
    if folded is not None:
        try:
            exported = torch.export.export(folded, (x,))
            with torch.no_grad():
                rec["export_rel"] = _relative(exported.module()(x), got)
            rec["export"] = rec["export_rel"] <= TOLERANCE
        except Exception as exc:
            rec["export"] = False
            rec["export_error"] = _first_line(exc)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def count_params(names: list[str]) -> dict[str, float]:
    """Parameter counts (millions) of timm models, built on the meta device (no memory, no init)."""
    import timm
    import torch

    counts = {}
    for name in names:
        try:
            with torch.device("meta"):
                net = timm.create_model(name, pretrained=False, num_classes=10)
            counts[name] = sum(p.numel() for p in net.parameters()) / 1e6
        except Exception:  # a model that cannot be built on meta is ranked last
            counts[name] = math.inf
    return counts


def first_classifier(ranked: dict[str, list[str]]) -> dict[str, str]:
    """For each family, its smallest model that is a classifier (timm's API and a classifier with parameters when
    built with 10 classes): a family's smallest model can be a feature encoder (``*_enc``) without a head."""
    import timm
    import torch

    out = {}
    for family, names in ranked.items():
        for name in names:
            try:
                with torch.device("meta"):
                    net = timm.create_model(name, pretrained=False, num_classes=10)
                clf = net.get_classifier()
                clfs = clf if isinstance(clf, (tuple, list)) else (clf,)
                if callable(getattr(net, "forward_head", None)) and any(
                    p.numel() for c in clfs for p in c.parameters()
                ):
                    out[family] = name
                    break
            except Exception:  # not buildable on meta, or no classification API: the next one
                continue
        else:
            out[family] = names[0]
    return out


# -- the driver ----------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    return env


def _run_python(code: str, timeout: float) -> tuple[int | None, str, str]:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return None, "", ""
    return proc.returncode, proc.stdout, proc.stderr


def _save(data: dict) -> None:
    write_text(JSON_PATH, json.dumps(data, indent=1, sort_keys=True))


def _load() -> dict:
    if JSON_PATH.exists():
        return json.loads(JSON_PATH.read_text())
    return {"models": {}, "timm_params": {}}


def torchvision_models() -> list[tuple[str, str]]:
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        family = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        out.append((name, family))
    return sorted(out, key=lambda item: (item[1], item[0]))


def timm_models(data: dict, timeout: float) -> list[tuple[str, str]]:
    import timm
    from timm.models import _registry

    by_family: dict[str, list[str]] = {}
    for name in timm.list_models():
        by_family.setdefault(_registry._model_to_module[name], []).append(name)
    counts = data.setdefault("timm_params", {})
    missing = [n for names in by_family.values() for n in names if n not in counts]
    for start in range(0, len(missing), 50):
        chunk = missing[start : start + 50]
        code = f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.backbone_coverage import "
        code += f"count_params; print(json.dumps(count_params({chunk!r})))"
        rc, out, _ = _run_python(code, timeout)
        got = json.loads(out.strip().splitlines()[-1]) if rc == 0 and out.strip() else {}
        for name in chunk:
            counts[name] = got.get(name, math.inf) if got.get(name) is not None else math.inf
        _save(data)
        print(f"counted parameters of {min(start + 50, len(missing))}/{len(missing)} timm models", flush=True)
    choice = data.setdefault("timm_choice", {})
    ranked = {f: sorted(names, key=lambda n: (counts.get(n, math.inf), n)) for f, names in by_family.items()}
    todo = {f: r for f, r in ranked.items() if f not in choice}
    if todo:
        code = f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.backbone_coverage import "
        code += f"first_classifier; print(json.dumps(first_classifier({todo!r})))"
        rc, out, _ = _run_python(code, timeout * 4)
        if rc == 0 and out.strip():
            choice.update(json.loads(out.strip().splitlines()[-1]))
        _save(data)
    return [(choice.get(f) or ranked[f][0], f) for f in sorted(ranked)]


def run(args: argparse.Namespace) -> None:
    data = _load()
    entries: list[tuple[str, str, str]] = []
    if args.only in (None, "torchvision"):
        entries += [("torchvision", n, f) for n, f in torchvision_models()]
    if args.only in (None, "timm"):
        entries += [("timm", n, f) for n, f in timm_models(data, args.timeout)]
    if args.only is None and not args.models:  # the full selection: the report lists these models only
        data["selected"] = [f"{source}/{name}" for source, name, _ in entries]
    if args.models:
        wanted = {m.replace("tv/", "torchvision/") for m in args.models}
        entries = [e for e in entries if f"{e[0]}/{e[1]}" in wanted]
    start = time.perf_counter()
    for k, (source, name, family) in enumerate(entries, 1):
        key = f"{source}/{name}"
        if key in data["models"] and not args.force:
            continue
        code = f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.backbone_coverage import worker; "
        code += f"print('@@' + json.dumps(worker({source!r}, {name!r})))"
        t = time.perf_counter()
        rc, out, err = _run_python(code, args.timeout)
        lines = [line for line in out.splitlines() if line.startswith("@@")]
        if rc is None:
            rec = {"source": source, "name": name, "wraps": None, "error": f"timed out after {args.timeout:g} s"}
        elif rc != 0 or not lines:
            tail = (err.strip().splitlines() or ["(no output)"])[-1]
            rec = {"source": source, "name": name, "wraps": None, "error": f"worker failed (exit {rc}): {tail[:500]}"}
        else:
            rec = json.loads(lines[-1][2:])
        rec["family"] = family
        rec["wall_s"] = round(time.perf_counter() - t, 1)
        data["models"][key] = rec
        _save(data)
        status = "ok" if rec.get("exact") and rec.get("train") and rec.get("fold") and rec.get("export") else "--"
        print(f"[{k}/{len(entries)}] {key} ({family}) {status} {rec['wall_s']}s", flush=True)
    data["meta"] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "run_seconds_this_invocation": round(time.perf_counter() - start, 1),
    }
    try:
        import timm
        import torch
        import torchvision

        data["meta"].update(torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__)
    except ImportError:
        pass
    _save(data)
    write_report(data)


# -- the report ----------------------------------------------------------------------------------------------------
def _ok(rec: dict) -> bool:
    return bool(rec.get("wraps") and rec.get("train") and rec.get("exact") and rec.get("fold") and rec.get("export"))


def _mark(value: object) -> str:
    return "yes" if value is True else ("**no**" if value is False else "-")


def _rel(rec: dict, key: str) -> str:
    value = rec.get(f"{key}_rel")
    return "-" if value is None else f"{value:.0e}"


def _why(rec: dict) -> str:
    for key in ("refusal", "error", "train_error", "exact_error", "fold_error", "export_error"):
        if rec.get(key):
            return str(rec[key]).replace("|", "\\|").replace("\n", " ")
    if rec.get("exact") is False:
        return f"logits differ by {rec.get('exact_rel', float('nan')):.1e} of their scale"
    return ""


def _unmix(rec: dict) -> str:
    if rec.get("unmix") is True:
        return "yes"
    if not rec.get("wraps"):
        return "-"
    return "no: " + str(rec.get("unmix")).replace("|", "\\|")


# the page's section on how each split draws its copies (written by hand, kept by every rewrite)
INITIALISERS = """## Initialisers

Without pretrained weights a wrapper draws its independent encoder copies and its M heads afresh; each built-in split
draws them with its backbone's own initialiser (the split's `reinit`, `mixshare_layers/adapters/inits.py`), and
redraws every layer of a copy: each submodule first gets its `reset_parameters()` (a head's LayerNorm back to 1 / 0),
then the family's rules.

| backbone | convolutions | linear layers | norms |
|---|---|---|---|
| the library's WRN | its `init`: PyTorch's defaults (`"torch"`), or truncated He-normal, fan-in, zero bias (`"mixmo"`) | the same | BatchNorm 1 / 0; any other layer PyTorch's |
| torchvision ResNet | Kaiming-normal, fan-out, ReLU | PyTorch's | BatchNorm / GroupNorm 1 / 0 |
| torchvision RegNet | normal, std `sqrt(2 / (k k C_out))` | N(0, 0.01), zero bias | BatchNorm 1 / 0 |
| torchvision EfficientNet | Kaiming-normal, fan-out, zero bias | uniform `+-1 / sqrt(out)`, zero bias | 1 / 0 |
| torchvision MobileNet v2 / v3 | Kaiming-normal, fan-out, zero bias | N(0, 0.01), zero bias | 1 / 0 |
| torchvision MNASNet | Kaiming-normal, fan-out, ReLU, zero bias | Kaiming-uniform, fan-out, gain 1, zero bias | BatchNorm 1 / 0 |
| torchvision ConvNeXt | truncated normal, std 0.02, zero bias | the same | PyTorch's (1 / 0) |
| torchvision DenseNet | Kaiming-normal, fan-in | PyTorch's weight, zero bias | BatchNorm 1 / 0 |
| torchvision SqueezeNet | Kaiming-uniform, fan-in, zero bias; the classifier's N(0, 0.01) | - | - |
| torchvision VGG | Kaiming-normal, fan-out, ReLU, zero bias | N(0, 0.01), zero bias | BatchNorm 1 / 0 |
| torchvision GoogLeNet / Inception v3 | truncated normal (cut at +-2), std 0.01 / 0.1 (a layer's `stddev` where set) | the same | BatchNorm 1 / 0 |
| torchvision MaxViT | N(0, 0.02), zero bias | N(0, 0.02), zero bias | BatchNorm 1 / 0 |
| torchvision Swin | PyTorch's | truncated normal, std 0.02, zero bias | PyTorch's |
| torchvision ViT | patch projection truncated normal, std `sqrt(1 / fan_in)`, zero bias (a conv stem PyTorch's) | `pre_logits` the same; the final `head` zeros | PyTorch's |
| torchvision ShuffleNet v2 / AlexNet | PyTorch's | PyTorch's | PyTorch's |
| timm | timm's own functions for the model, in order: `get_init_weights_vit` of its `weight_init_mode` (ViT, Swin, ViT-relpos, NaFlexViT: linear layers truncated normal, std 0.02, zero bias), `efficientnet_init_weights` (EfficientNet, MobileNet v3 / v5, MixNet...), the model's `_init_weights(module)` method, its timm module's `_init_weights(module, name)` (ConvNeXt, RegNet, ResNet v2, CSPNet, ByobNet...), timm ResNet's convolution rule; otherwise PyTorch's defaults (the split's `reinit.source` says which) | | |

`pretrained=True` copies the backbone's first layer and head instead, so the wrapper starts as exactly the backbone.
`MultiHead.reset_parameters()` redraws the heads with the same initialiser.
"""  # noqa: E501 (a markdown table, one row a line)


def write_report(data: dict) -> None:
    selected = data.get("selected")  # models measured earlier but no longer selected (a family's choice) are left out
    models = {k: v for k, v in data["models"].items() if selected is None or k in selected}
    lines = [
        "# Backbones",
        "",
        "Which backbones wrap, train and start exactly as themselves, measured by `benchmarks/backbone_coverage.py` "
        "on every torchvision classification builder and the smallest classifier of every timm architecture family "
        "(random weights, 10 classes, M = 2, preset `mixshare`; the JSON is `benchmarks/results/backbones.json`). "
        "A timm family whose smallest classifier has over 60 M parameters is built with `depth=2` (the params "
        "column says so): the same code with fewer blocks.",
        "",
        "Columns: **train**: one training step with a finite loss and finite gradients in every member; "
        "**exact**: `pretrained=True` eval logits equal the backbone's (max abs difference / logit scale, "
        f"<= {TOLERANCE:g} in float32); **fold**: `model.fold()` equals the eval forward; **export**: "
        "`torch.export` of the folded model runs and equals it; **unmix**: the unmixing presets apply (the head "
        'averages the features), else the reason, and the model is wrapped with `unmix_mode="none"`. '
        "How the splits are found: [timm](how-to/timm.md), [torchvision](how-to/torchvision.md).",
        "",
    ]
    meta = data.get("meta", {})
    for source in ("torchvision", "timm"):
        recs = sorted(
            (r for r in models.values() if r["source"] == source), key=lambda r: (r.get("family", ""), r["name"])
        )
        if not recs:
            continue
        good = sum(_ok(r) for r in recs)
        unit = "builders" if source == "torchvision" else "families (the smallest classifier of each)"
        lines += [
            f"## {source}",
            "",
            f"**{good} / {len(recs)} {unit} ({100 * good / len(recs):.0f} %) wrap, train, and fold and export "
            "exactly.**",
            "",
            "| model | family | params (M) | input | layout | pooling | encoder | head | train | exact | fold | "
            "export | unmix | notes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in recs:
            lines.append(
                f"| `{r['name']}` | {r.get('family', '')} | {r.get('params_m', '-')}"
                f"{' (' + r['config'] + ')' if r.get('config') else ''} | {r.get('input', '-')} | "
                f"{r.get('layout', '-')} | {r.get('pooling', '-')} | {r.get('encoder', '-')} | {r.get('head', '-')} | "
                f"{_mark(r.get('train'))} | {_mark(r.get('exact'))} {_rel(r, 'exact')} | "
                f"{_mark(r.get('fold'))} | {_mark(r.get('export'))} | {_unmix(r)} | {_why(r)} |"
            )
        failures = [r for r in recs if not _ok(r)]
        lines += ["", f"Exceptions ({len(failures)}):" if failures else "No exception.", ""]
        for r in failures:
            lines.append(f"* `{r['name']}`: {_why(r) or 'see the table'}")
        lines.append("")
    seconds = sum(r.get("wall_s", 0.0) for r in models.values())
    lines += [*INITIALISERS.splitlines(), ""]
    lines += [
        "## How this was measured",
        "",
        f"Machine: {meta.get('machine', '?')}; torch {meta.get('torch', '?')}, torchvision "
        f"{meta.get('torchvision', '?')}, timm {meta.get('timm', '?')}. Each model runs in its own subprocess with one "
        f"thread under `nice`; the models took {seconds / 60:.0f} minutes in all (sum of the per-model wall times; "
        "choosing each timm family's smallest classifier first counts the parameters of every timm model on the "
        "meta device, about an hour on this machine, once: the counts are cached in the JSON).",
        "",
        "```bash",
        "nice -n 10 python benchmarks/backbone_coverage.py          # resumes from the JSON; --force redoes",
        "python benchmarks/backbone_coverage.py --report            # rewrites this page from the JSON",
        "```",
        "",
    ]
    write_text(DOC_PATH, "\n".join(lines))
    print(f"wrote {DOC_PATH.relative_to(ROOT)} (from {JSON_PATH.relative_to(ROOT)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["torchvision", "timm"], help="one source only")
    parser.add_argument("--models", nargs="*", help="run these models only (e.g. timm/resnet18d tv/vgg11)")
    parser.add_argument("--force", action="store_true", help="redo models already in the JSON")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model (default 900)")
    parser.add_argument("--report", action="store_true", help="only rewrite docs/backbones.md from the JSON")
    args = parser.parse_args()
    if args.report:
        write_report(_load())
        return
    run(args)


if __name__ == "__main__":
    main()
