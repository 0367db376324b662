"""Process-group helpers for DDP under ``torchrun`` (NCCL on GPUs, gloo on CPUs)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Global rank; initialises the process group on first use when launched by torchrun."""
    if world_size() > 1:
        init()
    return int(os.environ.get("RANK", "0"))


def init() -> None:
    """Join the torchrun process group once (NCCL when CUDA is available, else gloo)."""
    if world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)


def finalize() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
