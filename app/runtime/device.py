"""Pick the compute device: ``auto`` takes CUDA when present and falls back to the CPU."""

from __future__ import annotations

import logging

import torch

from app.errors import ConfigError
from app.runtime import distributed

log = logging.getLogger(__name__)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> torch.device; a clear error when CUDA is asked for but absent.

    Under torchrun (``LOCAL_RANK`` set) ``auto``/``cuda`` pick this rank's GPU.
    """
    if isinstance(name, torch.device):
        return name
    name = str(name).strip().lower()
    local_rank = distributed.local_rank()
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                "CUDA was requested but no CUDA device is available (use --device cpu or auto)", "--device"
            )
        if name == "cuda":
            return torch.device(f"cuda:{local_rank}")
        idx = int(name.split(":", 1)[1])
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"{name} requested but only {torch.cuda.device_count()} CUDA device(s) exist", "--device")
        return torch.device(name)
    raise ConfigError(f"unknown device {name!r} (expected auto, cpu, cuda or cuda:N)", "--device")
