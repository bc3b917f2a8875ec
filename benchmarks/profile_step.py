"""Where the time of one training step goes: MIMOWrapper(backbone, M=2, "mixshare") vs the plain backbone.

    python benchmarks/profile_step.py --device cuda      # kernel launches and CPU time per step, top ops of each
    python benchmarks/profile_step.py --model vit        # ViT-Tiny (timm) instead of WRN-28-2

Prints, for each model, the number of kernels launched (CUDA) or ops run (CPU) per step, the wall time per step, and
the operators with the most self CPU time, so the extra cost of the MIMO step can be attributed (launch overhead vs
work). A diagnostic companion of ``benchmarks/run.py`` stages c and v; it writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run import MODEL_NAMES, StepPair  # benchmarks/run.py (this script's directory is on sys.path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--model", choices=sorted(MODEL_NAMES), default="wrn", help="wrn: WRN-28-2; vit: ViT-Tiny")
    args = parser.parse_args()
    device = torch.device(args.device)
    pair = StepPair(device, model=args.model)
    step_mimo, step_plain = pair.step_mimo, pair.step_plain

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, step in (("mimo", step_mimo), ("plain", step_plain)):
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) / args.steps
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        events = prof.events()
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        ops = sum(1 for e in events if e.name.startswith("aten::") and (e.cpu_parent is None))
        print(f"== {MODEL_NAMES[args.model]} {name}: {wall * 1e3:.3f} ms/step unprofiled, "
              f"{kernels / args.steps:.0f} CUDA kernels/step, "
              f"{ops / args.steps:.0f} top-level aten ops/step")  # fmt: skip
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
