"""mixshare_layers benchmarks: one command, a JSON and a Markdown table (never part of the test suite).

    flock /tmp/mixshare_cpu.lock python benchmarks/run.py                      # CPU, 2 threads, everything
    python benchmarks/run.py --device cuda --out benchmarks/results/gpu        # on a GPU (adds the bandwidth stage)
    python benchmarks/run.py --only a,b --quick                                # a subset, fewer repeats
    python benchmarks/run.py --only c,d,v --threads 1 --clock cpu             # a busy CPU: timed by CPU time

Stages, each compared side by side in this process, interleaved, median of repeats:

a. mask sampling + mixing, B=128, M=2, 16x32x32: ours vs a naive MixMo-style baseline (a Python loop with numpy
   boxes, full masks built on the CPU and copied over, mixing through M materialised masked copies); the mixing alone
   vs one memory pass over the same bytes (``torch.add`` of the two encodings).
b. unmix + pool, forward + backward: fused (two sums) vs materialising M masked copies; time and peak memory, for
   C = 128 and 640 at 8x8 (WRN-28-2 / WRN-28-10 final maps), M = 2 and 4, B = 128.
c. one training step (forward, loss, backward, SGD) of MIMOWrapper(WRN-28-2, M=2, "mixshare") vs the plain WRN-28-2
   on the same number of rows (B = 64).
d. eval latency of the folded model vs the unfolded MIMOWrapper vs the plain WRN-28-2, B = 1 and B = 256.
v. the same for a vision transformer (needs timm): one training step (AdamW) of MIMOWrapper(ViT-Tiny, M=2,
   "mixshare") vs the plain ViT-Tiny on the same 64 rows, and eval latency folded / unfolded / plain at B = 1 and 64.
   ViT-Tiny is timm's ``vit_tiny_patch16_224`` (12 blocks, width 192, 3 heads, 5.4 M parameters) on 32x32 images
   with 4x4 patches (an 8x8 grid of 64 tokens), no class token, average pooling of the patch tokens.
bw (CUDA only). measured copy bandwidth of the card, and the bandwidth achieved by the fused mixing and unmixing
   kernels (forward and backward) at large sizes.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the allocation/free events recorded by
``torch.profiler`` (profile_memory=True), summed in time order. Both are measured above what is alive before the call.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixshare_layers import MIMOLoss, MIMOWrapper  # noqa: E402
from mixshare_layers.files import write_text  # noqa: E402
from mixshare_layers.functional import mix, sample_mix_params, unmix_pool  # noqa: E402
from mixshare_layers.models import wide_resnet  # noqa: E402

ROWS: list[dict] = []
COMPILE_STEP = False  # --compile-step: stage c also times both models compiled (inductor) inside CUDA graphs
ENCODER_PATHS: list[str] = []  # --encoder-paths: stage c's CUDA-graph rows for each way of running the encoders
# --clock cpu: time CPU runs by the process's CPU time instead of the wall clock. On a machine shared with other jobs
# the wall time of a call includes the time the process waited for a core; its CPU time does not (with --threads 1,
# where every op runs on the calling thread, it is the time the work took).
CLOCK: Callable[[], float] = time.perf_counter


# -- helpers -------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions called in turn within every repeat.

    Python's cyclic garbage collector is off while timing (as in ``timeit``): a collection triggered by one function's
    allocations would otherwise land in whichever call happens to run next.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    gc.collect()
    gc.disable()
    try:
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                sync(device)
                t0 = CLOCK()
                fn()
                sync(device)
                times[name].append(CLOCK() - t0)
    finally:
        gc.enable()
    return {k: statistics.median(v) for k, v in times.items()}


# glibc returns every freed block above 128 KiB to the kernel by default, so each new multi-MiB tensor is fresh pages
# and the first touch of every page is a fault: on the 2-core VM that dominated the CPU timings (one torch.add of
# two 8 MiB encodings took 0.24 ms or 2.6 ms from run to run). Keeping freed memory in the heap (what a caching
# allocator such as jemalloc or tcmalloc does) makes the timings repeatable; run() re-executes itself with these set.
STEADY_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # glibc's maximum: blocks up to 32 MiB come from the heap
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TOP_PAD_": str(256 * 2**20),
}


def steady_allocator() -> None:
    """Re-execute this script with :data:`STEADY_MALLOC` in the environment (Linux only; once)."""
    if sys.platform != "linux" or all(k in os.environ for k in STEADY_MALLOC) or os.environ.get("BENCH_NO_REEXEC"):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC, "BENCH_NO_REEXEC": "1"})


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def row(stage: str, case: str, metric: str, ours: float, base: float | None, base_name: str, target: str,
        met: bool | None, unit: str = "ms") -> None:  # fmt: skip
    ratio = None if base is None or base == 0 else ours / base
    ROWS.append({"stage": stage, "case": case, "metric": metric, "ours": ours, "baseline": base,
                 "baseline_name": base_name, "ratio": ratio, "target": target, "met": met, "unit": unit})  # fmt: skip
    r = "" if ratio is None else f" ratio {ratio:.3f}"
    print(f"[{stage}] {case} {metric}: ours {ours:.4g} {unit} vs {base_name} {base if base is not None else '-'}{r}"
          f" target {target} {'' if met is None else ('MET' if met else 'MISSED')}", flush=True)  # fmt: skip


# -- (a) mask sampling + mixing -------------------------------------------------------------------------------------
def naive_masks(batch: int, m: int, h: int, w: int, alpha: float, rng, device: torch.device) -> torch.Tensor:
    """MixMo's public recipe: per sample, numpy λ and box, a full (M, H, W) mask built in numpy and shipped as a
    float16 CPU tensor (as its DataLoader workers do); the batch collated, copied to the device and cast back."""
    import numpy as np

    owner = rng.integers(m)
    per_sample = []
    for _ in range(batch):
        lam = rng.beta(alpha, alpha)
        cut = math.sqrt(lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = rng.integers(h), rng.integers(w)
        y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        box = np.zeros((h, w), dtype=np.float32)
        box[y0:y1, x0:x1] = 1.0
        mask = np.stack([box if i == owner else (1.0 - box) / (m - 1) for i in range(m)])
        per_sample.append(torch.from_numpy(mask).half())
    return torch.stack(per_sample).to(device).float()  # collate, copy, cast: (B, M, H, W)


def stage_a(device: torch.device, reps: int) -> None:
    import numpy as np

    b, m, c, h, w = 128, 2, 16, 32, 32
    rng = np.random.default_rng(0)
    e = torch.randn(b, m, c, h, w, device=device)
    info = sample_mix_params(b, m, h, w, cutmix_prob=1.0, device=device)

    def ours_sample():
        return sample_mix_params(b, m, h, w, cutmix_prob=1.0, device=device)

    def naive_sample():
        return naive_masks(b, m, h, w, 2.0, rng, device)

    masks = naive_sample()
    t = interleaved({"ours": ours_sample, "naive": naive_sample}, device, reps, 3)
    speedup = t["naive"] / t["ours"]
    row("a", f"B={b} M={m} {c}x{h}x{w}", "mask sampling", t["ours"] * 1e3, t["naive"] * 1e3,
        "naive numpy loop + copy", ">= 20x faster", speedup >= 20)  # fmt: skip
    # the same two, each timed over 20 consecutive calls (warm caches) in alternating blocks: call by call, the
    # sampler's few dozen small ops run cold after the naive loop has evicted them, which is most of their cost
    t = _timed_launches({"ours": ours_sample, "naive": naive_sample}, device, reps, n=20)
    speedup = t["naive"] / t["ours"]
    row("a", f"B={b} M={m} {c}x{h}x{w}", "mask sampling (blocks of 20 calls)", t["ours"] * 1e3, t["naive"] * 1e3,
        "naive numpy loop + copy", ">= 20x faster", speedup >= 20)  # fmt: skip

    def ours_mix():
        return mix(e, info)

    def one_pass():
        return torch.add(e[:, 0], e[:, 1])

    def naive_mix():
        return m * (masks[:, :, None] * e).sum(dim=1)

    t = interleaved({"ours": ours_mix, "add": one_pass, "naive": naive_mix}, device, reps * 4, 10)
    ratio = t["ours"] / t["add"]
    row("a", f"B={b} M={m} {c}x{h}x{w}", "mixing", t["ours"] * 1e3, t["add"] * 1e3, "torch.add (1 pass)",
        "<= 1.25x", ratio <= 1.25)  # fmt: skip
    row("a", f"B={b} M={m} {c}x{h}x{w}", "mixing", t["ours"] * 1e3, t["naive"] * 1e3, "materialised masks",
        "info", None)  # fmt: skip


# -- (b) unmix + pool ------------------------------------------------------------------------------------------------
def materialised_pool(features: torch.Tensor, info, strength: float = 0.0) -> torch.Tensor:
    """M masked copies of the map, then masked averages (what the fused op avoids)."""
    h, w = features.shape[-2:]
    masks = info.faded(strength).masks_at(h, w, dtype=features.dtype)[:, :, None]  # (B, M, 1, h, w)
    filtered = masks * features[:, None]  # (B, M, C, h, w)
    return filtered.sum(dim=(-2, -1)) / masks.sum(dim=(-2, -1)).clamp_min(1e-12)


def stage_b(device: torch.device, reps: int) -> None:
    b, h, w = 128, 8, 8
    for c in (128, 640):
        for m in (2, 4):
            info = sample_mix_params(b, m, 32, 32, cutmix_prob=1.0, device=device)
            f = torch.randn(b, c, h, w, device=device, requires_grad=True)
            grad = torch.randn(b, m, c, device=device)

            def fused(f=f, info=info, grad=grad):
                (g,) = torch.autograd.grad(unmix_pool(f, info), f, grad)
                return g

            def naive(f=f, info=info, grad=grad):
                (g,) = torch.autograd.grad(materialised_pool(f, info), f, grad)
                return g

            torch.testing.assert_close(fused(), naive(), rtol=1e-4, atol=1e-5)
            t = interleaved({"fused": fused, "naive": naive}, device, reps, 3)
            case = f"B={b} C={c} {h}x{w} M={m}"
            row("b", case, "time fwd+bwd", t["fused"] * 1e3, t["naive"] * 1e3, "materialised", "info", None)
            p_f, p_n = peak_bytes(fused, device), peak_bytes(naive, device)
            row("b", case, "peak memory fwd+bwd", p_f / 2**20, p_n / 2**20, "materialised",
                f"<= 1/{m} (+10%)", p_f <= p_n / m * 1.1, unit="MiB")  # fmt: skip


# -- (c) training step -----------------------------------------------------------------------------------------------
def vit_tiny(num_classes: int = 100) -> torch.nn.Module:
    """timm's ViT-Tiny (12 blocks, width 192, 3 heads) on 32x32 images with 4x4 patches, averaging its patch tokens."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                             num_classes=num_classes, global_pool="avg", class_token=False)  # fmt: skip


MODELS = {"wrn": lambda: wide_resnet(28, 2, num_classes=100), "vit": vit_tiny}
MODEL_NAMES = {"wrn": "WRN-28-2", "vit": "ViT-Tiny"}


class StepPair:
    """Two training steps on the same 64 rows: MIMOWrapper(backbone, M=2, "mixshare") and the plain backbone, with
    the backbone's usual optimiser: WRN-28-2 (stage c) with the paper's SGD, ViT-Tiny (stage v) with AdamW (also used
    by benchmarks/profile_step.py)."""

    def __init__(self, device: torch.device, rows: int = 64, m: int = 2, model: str = "wrn") -> None:
        torch.manual_seed(0)
        self.mimo = MIMOWrapper(MODELS[model](), m, "mixshare").to(device).train()
        self.plain = MODELS[model]().to(device).train()
        self.mimo.set_progress(0.05)
        self.loss_fn = MIMOLoss()  # the preset's weights, from the output
        if model == "vit":
            adamw = {"lr": 1e-3, "weight_decay": 0.05}
            self.opt_m: torch.optim.Optimizer = torch.optim.AdamW(self.mimo.parameters(), **adamw)
            self.opt_p: torch.optim.Optimizer = torch.optim.AdamW(self.plain.parameters(), **adamw)
        else:
            sgd = {"lr": 0.025, "momentum": 0.9, "nesterov": True, "weight_decay": 6e-4}
            self.opt_m = torch.optim.SGD(self.mimo.parameters(), **sgd)
            self.opt_p = torch.optim.SGD(self.plain.parameters(), **sgd)
        self.xm = torch.randn(rows, m, 3, 32, 32, device=device)
        self.ym = torch.randint(100, (rows, m), device=device)
        self.xp = torch.randn(rows, 3, 32, 32, device=device)
        self.yp = torch.randint(100, (rows,), device=device)

    def step_mimo(self, model: Callable | None = None) -> None:
        """One step of the MIMO model (or of ``model``, e.g. its compiled version)."""
        self.opt_m.zero_grad(set_to_none=True)
        self.loss_fn((model or self.mimo)(self.xm), self.ym).backward()
        self.opt_m.step()

    def step_plain(self, model: Callable | None = None) -> None:
        """One step of the plain model (or of ``model``)."""
        self.opt_p.zero_grad(set_to_none=True)
        F.cross_entropy((model or self.plain)(self.xp), self.yp).backward()
        self.opt_p.step()


def stage_c(device: torch.device, reps: int) -> None:
    rows, m = 64, 2
    pair = StepPair(device, rows, m)
    step_mimo, step_plain = pair.step_mimo, pair.step_plain
    t = interleaved({"mimo": step_mimo, "plain": step_plain}, device, max(reps, 20), 3)
    limit = 1.03 if device.type == "cuda" else 1.05
    ratio = t["mimo"] / t["plain"]
    case = f"WRN-28-2 M={m} mixshare, B={rows} rows"
    row("c", case, "train step (eager)", t["mimo"] * 1e3, t["plain"] * 1e3, "plain WRN-28-2", f"<= {limit}",
        ratio <= limit)  # fmt: skip
    if device.type != "cuda":
        return
    # The same two steps, each recorded whole (forward, loss, backward, SGD) in one CUDA graph and replayed: at 64
    # rows a WRN-28-2 step is bound by kernel-launch latency, which the graphs remove for both models. The MIMO step
    # is capturable because nothing in it synchronises with the host (the mix is drawn on the GPU, in the graph).
    from mixshare_layers import multi_encoder

    plain_graph = capture_step(step_plain, device)
    default_path = multi_encoder.CUDA_TRAIN_PATH
    try:
        for path in ENCODER_PATHS or [default_path]:
            multi_encoder.CUDA_TRAIN_PATH = path  # how the M first convolutions run (see MultiEncoder)
            t = interleaved({"mimo": capture_step(step_mimo, device), "plain": plain_graph}, device,
                            max(reps, 20) * 2, 3)  # fmt: skip
            ratio = t["mimo"] / t["plain"]
            label = "" if path == default_path else f" [encoder path {path}]"
            row("c", case + label, "train step (CUDA graph)", t["mimo"] * 1e3, t["plain"] * 1e3,
                "plain WRN-28-2 (CUDA graph)", f"<= {limit}", ratio <= limit)  # fmt: skip
    finally:
        multi_encoder.CUDA_TRAIN_PATH = default_path
    if not COMPILE_STEP:
        return
    # Both models compiled by inductor (which fuses the MIMO step's small elementwise ops: the mix sampling, the
    # pooling arithmetic, the loss weights), then each whole step recorded in a CUDA graph as above.
    t0 = time.perf_counter()
    mimo_c, plain_c = torch.compile(pair.mimo), torch.compile(pair.plain)

    def step_mimo_c():
        pair.step_mimo(mimo_c)

    def step_plain_c():
        pair.step_plain(plain_c)

    fns = {"mimo": capture_step(step_mimo_c, device), "plain": capture_step(step_plain_c, device)}
    print(f"[c] compiled and captured both steps in {time.perf_counter() - t0:.0f} s", flush=True)
    t = interleaved(fns, device, max(reps, 20) * 2, 3)
    ratio = t["mimo"] / t["plain"]
    row("c", case, "train step (compiled + CUDA graph)", t["mimo"] * 1e3, t["plain"] * 1e3,
        "plain WRN-28-2 (compiled + CUDA graph)", f"<= {limit}", ratio <= limit)  # fmt: skip


def capture_step(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """Record ``step`` (a whole training step on static tensors) in a CUDA graph; returns its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream (cuDNN choices, optimizer state), as torch asks
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


# -- (d) eval latency ------------------------------------------------------------------------------------------------
def stage_d(device: torch.device, reps: int) -> None:
    torch.manual_seed(0)
    mimo = MIMOWrapper(wide_resnet(28, 2, num_classes=100), 2, "mixshare").to(device).eval()
    folded = mimo.fold()
    plain = wide_resnet(28, 2, num_classes=100).to(device).eval()
    for batch in (1, 256):
        x = torch.randn(batch, 3, 32, 32, device=device)
        n = reps * 3 if batch == 1 else max(5, reps // 2)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), mimo(x), rtol=1e-4, atol=1e-4)
            fns = {"folded": lambda x=x: folded(x), "unfolded": lambda x=x: mimo(x), "plain": lambda x=x: plain(x)}
            t = interleaved(fns, device, n, 3)
        case = f"WRN-28-2 M=2, B={batch}"
        row("d", case, "eval latency folded", t["folded"] * 1e3, t["plain"] * 1e3, "plain WRN-28-2", "<= 1.02",
            t["folded"] / t["plain"] <= 1.02)  # fmt: skip
        row("d", case, "eval latency unfolded", t["unfolded"] * 1e3, t["plain"] * 1e3, "plain WRN-28-2", "info", None)


# -- (v) a vision transformer ------------------------------------------------------------------------------------------
def stage_v(device: torch.device, reps: int) -> None:
    rows, m = 64, 2
    pair = StepPair(device, rows, m, model="vit")
    t = interleaved({"mimo": pair.step_mimo, "plain": pair.step_plain}, device, max(reps, 20), 3)
    limit = 1.03 if device.type == "cuda" else 1.05
    ratio = t["mimo"] / t["plain"]
    row("v", f"ViT-Tiny M={m} mixshare, B={rows} rows", "train step (eager)", t["mimo"] * 1e3, t["plain"] * 1e3,
        "plain ViT-Tiny", f"<= {limit}", ratio <= limit)  # fmt: skip
    del pair
    torch.manual_seed(0)
    mimo = MIMOWrapper(vit_tiny(), m, "mixshare").to(device).eval()
    folded = mimo.fold()
    plain = vit_tiny().to(device).eval()
    for batch in (1, 64):
        x = torch.randn(batch, 3, 32, 32, device=device)
        n = reps * 3 if batch == 1 else max(5, reps // 2)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), mimo(x), rtol=1e-4, atol=1e-4)
            fns = {"folded": lambda x=x: folded(x), "unfolded": lambda x=x: mimo(x), "plain": lambda x=x: plain(x)}
            t = interleaved(fns, device, n, 3)
        case = f"ViT-Tiny M={m}, B={batch}"
        row("v", case, "eval latency folded", t["folded"] * 1e3, t["plain"] * 1e3, "plain ViT-Tiny", "<= 1.02",
            t["folded"] / t["plain"] <= 1.02)  # fmt: skip
        row("v", case, "eval latency unfolded", t["unfolded"] * 1e3, t["plain"] * 1e3, "plain ViT-Tiny", "info", None)


# -- (bw) bandwidth on CUDA -------------------------------------------------------------------------------------------
def stage_bw(device: torch.device, reps: int) -> None:
    if device.type != "cuda":
        print("[bw] skipped: CUDA only", flush=True)
        return
    copy_bw = _copy_bandwidth(device, reps)
    row("bw", "1 GiB float32", "copy bandwidth", copy_bw / 1e9, None, "-", "reference", None, unit="GB/s")
    _mix_bandwidth(device, reps, copy_bw)
    _unmix_bandwidth(device, reps, copy_bw)
    # the kernels' tile size and warp count, swept (info rows beside the defaults)
    from mixshare_layers.functional._triton import ops as tops

    names = ("_MIX_TILE", "_MIX_WARPS", "_UNMIX_TILE", "_UNMIX_WARPS", "_UNMIX_BWD_TILE", "_UNMIX_BWD_WARPS")
    default = {k: getattr(tops, k) for k in names}
    try:
        for tile, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8)]:
            for k in names:
                setattr(tops, k, tile if k.endswith("TILE") else warps)
            _mix_bandwidth(device, reps, copy_bw, note=f" [tile {tile}, {warps} warps]")
            _unmix_bandwidth(device, reps, copy_bw, note=f" [tile {tile}, {warps} warps]")
    finally:
        for k, v in default.items():
            setattr(tops, k, v)


def _copy_bandwidth(device: torch.device, reps: int) -> float:
    src = torch.empty(256 * 2**20, device=device)  # 1 GiB of float32
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src)}, device, reps, 3)["copy"]
    return 2 * src.numel() * 4 / t  # bytes read + written per second


def _timed_launches(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, n: int = 10) -> dict:
    """Seconds per call: each timing sample runs ``fn`` ``n`` times back to back (one synchronisation per sample)."""

    def batch(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                fn()

        return run

    t = interleaved({k: batch(fn) for k, fn in fns.items()}, device, reps, 2)
    return {k: v / n for k, v in t.items()}


def _mix_bandwidth(device: torch.device, reps: int, copy_bw: float, note: str = "") -> None:
    from mixshare_layers.functional.backend import triton_ops

    ops = triton_ops()
    b, m, c, h, w = 256, 2, 64, 64, 64
    e = torch.randn(b, m, c, h, w, device=device)
    info = sample_mix_params(b, m, h, w, cutmix_prob=1.0, device=device)
    out = torch.empty(b, c, h, w, device=device)
    g = torch.randn_like(out)
    grad_e = torch.empty_like(e)
    args = (info.boxes, info.inside, info.outside, h, w, float(m))
    t = _timed_launches({"fwd": lambda: ops.launch_mix(e, *args, out),
                         "bwd": lambda: ops.launch_mix_backward(g, *args, grad_e),
                         "call": lambda: mix(e, info)}, device, reps)  # fmt: skip
    moved = (m + 1) * out.numel() * 4  # forward: M maps read, one written; backward: one read, M written
    case = f"mix B={b} M={m} {c}x{h}x{w} fp32{note}"
    for key, metric in (("fwd", "mix fwd kernel bandwidth"), ("bwd", "mix bwd kernel bandwidth")):
        bw = moved / t[key]
        row("bw", case, metric, bw / 1e9, copy_bw / 1e9, "copy", ">= 60% of copy", bw >= 0.6 * copy_bw, unit="GB/s")
    if not note:
        row("bw", case, "mix() call bandwidth", moved / t["call"] / 1e9, copy_bw / 1e9, "copy", "info", None,
            unit="GB/s")  # fmt: skip


def _unmix_bandwidth(device: torch.device, reps: int, copy_bw: float, note: str = "") -> None:
    from mixshare_layers.functional.backend import triton_ops

    ops = triton_ops()
    b, c, h, w = 256, 640, 32, 32
    f = torch.randn(b, c, h, w, device=device)
    info = sample_mix_params(b, 2, 32, 32, cutmix_prob=1.0, device=device)
    pooled = torch.empty(b, 2, c, device=device)
    gp = torch.randn(b, 2, c, device=device)
    grad_f = torch.empty_like(f)
    args = (info.boxes, info.inside, info.outside, None, h, w, c, True)
    t = _timed_launches({"fwd": lambda: ops.launch_unmix_pool(f, *args, pooled),
                         "bwd": lambda: ops.launch_unmix_pool_backward(gp, *args, grad_f),
                         "call": lambda: unmix_pool(f, info)}, device, reps)  # fmt: skip
    moved = f.numel() * 4  # forward: the map read once; backward: its gradient written once
    case = f"unmix B={b} C={c} {h}x{w} fp32{note}"
    for key, metric in (("fwd", "unmix fwd kernel bandwidth"), ("bwd", "unmix bwd kernel bandwidth")):
        bw = moved / t[key]
        row("bw", case, metric, bw / 1e9, copy_bw / 1e9, "copy", ">= 60% of copy", bw >= 0.6 * copy_bw, unit="GB/s")
    if not note:
        row("bw", case, "unmix_pool() call bandwidth", moved / t["call"] / 1e9, copy_bw / 1e9, "copy", "info", None,
            unit="GB/s")  # fmt: skip


# -- output -----------------------------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}  # fmt: skip
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
                           platform.processor())  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def markdown(meta: dict) -> str:
    lines = [f"Machine: {meta.get('gpu') or meta.get('cpu')}, torch {meta['torch']}, device {meta['device']}, "
             f"{meta['threads']} threads, backend {meta['backend']}, clock {meta.get('clock', 'wall')}", "",
             "| stage | case | metric | ours | baseline | ratio | target | met |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in ROWS:
        base = "-" if r["baseline"] is None else f"{r['baseline']:.4g} {r['unit']} ({r['baseline_name']})"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['stage']} | {r['case']} | {r['metric']} | {r['ours']:.4g} {r['unit']} | {base} | {ratio} "
                     f"| {r['target']} | {met} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--only", default="a,b,c,d,v,bw", help="comma-separated stages among a,b,c,d,v,bw")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, not for the record)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: time by the process's CPU time (CPU only; shared machine, --threads 1)")  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for results.json/.md")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--encoder-paths", default="",
                        help="stage c on CUDA: MultiEncoder paths among grouped,dense,split")  # fmt: skip
    parser.add_argument("--compile-step", action="store_true",
                        help="stage c on CUDA: also both models compiled by inductor inside CUDA graphs")  # fmt: skip
    args = parser.parse_args()
    steady_allocator()
    global CLOCK, COMPILE_STEP, ENCODER_PATHS
    COMPILE_STEP = args.compile_step
    ENCODER_PATHS = [p.strip() for p in args.encoder_paths.split(",") if p.strip()]
    device = torch.device(args.device)
    if args.clock == "cpu":
        if device.type != "cpu":
            parser.error(f"--clock cpu times CPU runs; with --device {args.device} use the wall clock")
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    reps = 5 if args.quick else 20
    stages = {"a": stage_a, "b": stage_b, "c": stage_c, "d": stage_d, "v": stage_v, "bw": stage_bw}
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in stages]
    if unknown:
        parser.error(f"--only: unknown stage(s) {unknown}; valid: {', '.join(stages)}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    meta = machine(device)
    meta["backend"] = os.environ.get("MIXSHARE_BACKEND", "auto")
    meta["malloc"] = {k: os.environ.get(k) for k in STEADY_MALLOC}
    meta["clock"] = "process CPU time" if args.clock == "cpu" else "wall"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    failures: list[str] = []
    for name in wanted:
        try:
            stages[name](device, reps if name not in ("c", "v") or not args.quick else 3)
        except Exception as exc:  # keep the other stages running; the failure is reported and in the exit status
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        # written after every stage, so a run stopped by a time limit still leaves the stages it finished
        payload = {"machine": meta, "rows": ROWS, "failures": failures}
        write_text(out / f"results{suffix}.json", json.dumps(payload, indent=2))
        write_text(out / f"results{suffix}.md", markdown(meta))
    print("\n" + markdown(meta))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
