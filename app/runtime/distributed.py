"""Process-group helpers for DDP under ``torchrun`` (NCCL on GPUs, gloo on CPUs).

Every helper is a no-op in a single process (``WORLD_SIZE`` unset or 1), so one bundle config serves
both: ``wrap`` returns the plain model, ``rank`` is 0, ``finalize`` does nothing.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Global rank (``RANK``, set by torchrun); 0 in a single process. Reading it starts nothing:
    the process group is joined by :func:`init` (a train config's ``initialize``) or :func:`wrap`."""
    return int(os.environ.get("RANK", "0"))


def init() -> None:
    """Join the torchrun process group once (NCCL when CUDA is available, else gloo)."""
    if world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)


def local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK``, set by torchrun); picks the GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def wrap(model: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` under torchrun with ``WORLD_SIZE > 1``, else ``model`` itself.

    Args:
        model: the network, already on ``device``.
        device: its device; a CUDA device becomes DDP's single ``device_ids`` entry, CPU (gloo) takes none.

    DDP broadcasts rank 0's weights on construction, so all ranks start equal. Checkpoint code reaches the
    plain network through ``.module`` (see ``unwrap``).
    """
    if world_size() <= 1:
        return model
    init()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "cuda":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device], output_device=device)
    return torch.nn.parallel.DistributedDataParallel(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DDP (or DataParallel) wrapper; the model itself otherwise."""
    return (
        model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else model
    )


def finalize() -> None:
    """Leave the process group at the end of a run (the bundle's ``finalize`` section)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
