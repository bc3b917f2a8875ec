"""Where the time of one training step goes: MIMOWrapper(WRN-28-2, M=2, "mixshare") vs the plain WRN-28-2.

    python benchmarks/profile_step.py --device cuda      # kernel launches and CPU time per step, top ops of each

Prints, for each model, the number of kernels launched (CUDA) or ops run (CPU) per step, the wall time per step, and
the operators with the most self CPU time, so the extra cost of the MIMO step can be attributed (launch overhead vs
work). A diagnostic companion of ``benchmarks/run.py`` stage c; it writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixshare_layers import MIMOLoss, MIMOWrapper
from mixshare_layers.models import wide_resnet


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows, m = 64, 2
    mimo = MIMOWrapper(wide_resnet(28, 2, num_classes=100), m, "mixshare").to(device).train()
    plain = wide_resnet(28, 2, num_classes=100).to(device).train()
    loss_fn = MIMOLoss(mimo.config.rebalance_root)
    opt_m = torch.optim.SGD(mimo.parameters(), lr=0.025, momentum=0.9, nesterov=True, weight_decay=6e-4)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.025, momentum=0.9, nesterov=True, weight_decay=6e-4)
    xm, ym = torch.randn(rows, m, 3, 32, 32, device=device), torch.randint(100, (rows, m), device=device)
    xp, yp = torch.randn(rows, 3, 32, 32, device=device), torch.randint(100, (rows,), device=device)

    def step_mimo() -> None:
        opt_m.zero_grad(set_to_none=True)
        loss_fn(mimo(xm), ym).backward()
        opt_m.step()

    def step_plain() -> None:
        opt_p.zero_grad(set_to_none=True)
        F.cross_entropy(plain(xp), yp).backward()
        opt_p.step()

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
        print(f"== {name}: {wall * 1e3:.3f} ms/step unprofiled, {kernels / args.steps:.0f} CUDA kernels/step, "
              f"{ops / args.steps:.0f} top-level aten ops/step")  # fmt: skip
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
