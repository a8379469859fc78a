"""Step-time ratio of a TPC-CMA step to a plain ClipLoss step (same model, batch, optimizer).

Both variants run interleaved in one process (A, B, A, B, ...) so machine noise hits both alike;
the figure is the ratio of medians. The TPC-CMA step is measured in phase 3 (α > 0, scheduler on),
where it does the most work. The block scheduler (the default) measures every ``--every`` steps with two
backward passes, so one repeat is a window of ``--every`` steps of each variant (the measuring step first);
``ratio`` compares the windows, ``measuring_step_ratio`` the measuring step alone.

    .venv/bin/python benchmarks/step_overhead.py [--model cmalign-tiny] [--batch 128] [--repeats 15]
    .venv/bin/python benchmarks/step_overhead.py --model ViT-B-32 --batch 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

from cmalign.model.loading import load_model, param_groups
from cmalign.objective.block_scheduler import BlockScheduler, parameter_blocks
from cmalign.objective.cma_loss import CMAConfig, CMALoss
from cmalign.objective.grad_scheduler import GradScheduler, GradSchedulerConfig
from cmalign.objective.step import TPCCMAStep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cmalign-tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--scheduler", default="block")
    ap.add_argument("--every", type=int, default=10, help="block scheduler: measure every this many steps")
    ap.add_argument("--distribution", default="mmd")
    ap.add_argument("--out", default=None,
                    help="JSON result file (default: benchmarks/results/step_overhead-MODEL.json)")
    args = ap.parse_args()

    torch.manual_seed(0)
    lm = load_model(args.model, None)
    model = lm.model.train()
    size = lm.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(args.batch, 3, size, size)
    tokens = lm.tokenizer([f"a caption number {i} about a red square" for i in range(args.batch)])
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-5)
    plain_loss = CMALoss(CMAConfig(distribution=args.distribution))
    sched_cfg = GradSchedulerConfig(mode=args.scheduler, every=args.every)
    blocks = (BlockScheduler(sched_cfg, list(parameter_blocks(model.named_parameters())))
              if args.scheduler == "block" else None)
    cma_step = TPCCMAStep(model, CMALoss(CMAConfig(distribution=args.distribution)), GradScheduler(sched_cfg),
                          blocks=blocks)
    window = args.every if blocks is not None else 1

    def plain(i):
        fi, ft, ls = model(images, tokens)[:3]
        plain_loss.clip(fi, ft, ls).backward()

    def tpc(i):
        cma_step(images, tokens, alpha=0.5, autocast=nullcontext, measure_blocks=i == 0)

    def timed(fn):
        times = []
        for i in range(window):
            t = time.perf_counter()
            fn(i)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        return sum(times), times[0]

    for _ in range(args.warmup):
        timed(plain), timed(tpc)
    t_plain, t_tpc, first_plain, first_tpc = [], [], [], []
    for _ in range(args.repeats):
        for fn, total, first in ((plain, t_plain, first_plain), (tpc, t_tpc, first_tpc)):
            w, f = timed(fn)
            total.append(w)
            first.append(f)
    result = {
        "benchmark": "step_overhead",
        "model": args.model,
        "batch": args.batch,
        "repeats": args.repeats,
        "scheduler": args.scheduler,
        "every": window,
        "distribution": args.distribution,
        "median_plain_window_s": statistics.median(t_plain),
        "median_tpc_cma_window_s": statistics.median(t_tpc),
        "ratio": statistics.median(t_tpc) / statistics.median(t_plain),
        "measuring_step_ratio": statistics.median(first_tpc) / statistics.median(first_plain),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out or Path(__file__).parent / "results" / f"step_overhead-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
