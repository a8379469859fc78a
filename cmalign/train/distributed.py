"""Where and how precisely `fit` computes: the torchrun process group, the device, and mixed precision.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain ``python`` start is one process. Every rank must agree
on these choices before anything is built, so they are made first and carried as plain values.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cmalign.errors import ConfigError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def device_kind(name: str) -> str:
    """'cuda' or 'cpu': what ``--device NAME`` will run on (picks the process-group backend)."""
    return "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"


def init_distributed(device_kind: str) -> DistEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} asked for, but torch sees no CUDA device")
        if name == "cuda":
            name = f"cuda:{env.local_rank}"
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    """(autocast context factory, GradScaler or None, precision); AMP only on CUDA, bf16 by default there."""
    if precision == "auto":
        precision = "amp_bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return (lambda: nullcontext()), None, "fp32"
    if device.type != "cuda":
        raise ConfigError(f"precision '{precision}' needs a CUDA device; use fp32 on {device}")
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler, precision
