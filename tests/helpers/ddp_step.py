"""Run under torchrun (2 CPU processes, gloo) or plainly (1 process): one TPC-CMA step on a fixed
global batch; writes losses and parameter gradients to OUT (rank 0)."""

import os
import sys

import torch
import torch.distributed as dist

from cmalign.model.loading import load_model
from cmalign.objective.block_scheduler import BlockScheduler, parameter_blocks
from cmalign.objective.cma_loss import CMAConfig, CMALoss
from cmalign.objective.grad_scheduler import GradScheduler, GradSchedulerConfig
from cmalign.objective.step import TPCCMAStep


def global_batch(tokenizer, n=16):
    g = torch.Generator().manual_seed(123)
    images = torch.randn(n, 3, 32, 32, generator=g)
    words = ["red", "blue", "green", "tiny", "large", "circle", "square", "star"]
    caps = [f"a {words[i % 8]} {words[(i * 3 + 1) % 8]} number {i}" for i in range(n)]
    return images, tokenizer(caps)


def main(out, mode, distribution):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    lm = load_model("cmalign-tiny", None)
    model = lm.model
    images, tokens = global_batch(lm.tokenizer)
    per = images.shape[0] // world
    images, tokens = images[rank * per:(rank + 1) * per], tokens[rank * per:(rank + 1) * per]
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss = CMALoss(CMAConfig(distribution=distribution), rank=rank, world_size=world)
    cfg = GradSchedulerConfig(mode=mode)
    blocks = BlockScheduler(cfg, list(parameter_blocks(model.named_parameters()))) if mode == "block" else None
    step = TPCCMAStep(train_model, loss, GradScheduler(cfg), world, blocks)
    row, d = step(images, tokens, alpha=0.5, autocast=lambda: torch.autocast("cpu", enabled=False),
                  measure_blocks=blocks is not None)
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"row": row, "decision": d.to_log(), "grads": grads,
                    "block_scales": blocks.scales if blocks else None}, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
