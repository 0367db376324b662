"""Load network weights without running code: ``torch.load(weights_only=True)`` only.

Accepted: a plain state dict (``models/model.pt`` of MONAI bundles), a segapp training checkpoint
(``{"network": state_dict, ...}``), MONAI's ``CheckpointSaver`` files (``{"model": state_dict}``) and
``{"state_dict": ...}``. A pickle that would construct arbitrary Python objects is refused before
anything in it runs; so is a TorchScript archive (use its bundle's ``model.pt``).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from app.errors import InputError

WRAPPER_KEYS = ("network", "model", "state_dict")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> object:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", str(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            raise InputError(
                "a TorchScript archive, not a state dict: give the bundle's models/model.pt", str(path)
            ) from exc
        if "unsupported global" in str(exc).lower():  # torch's safe unpickler met a callable it does not allow
            raise InputError(
                "refusing to load: the checkpoint holds pickled Python objects that could run code "
                "(only tensors and plain containers are loaded)",
                str(path),
            ) from exc
        raise InputError("cannot read checkpoint (not a PyTorch state dict file)", str(path)) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # torn, truncated or foreign file
        raise InputError(
            f"cannot read checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})", str(path)
        ) from exc


def state_dict_of(obj: object, path: str | Path) -> Mapping[str, torch.Tensor]:
    """The network state dict inside a loaded checkpoint (see the module docstring for the layouts)."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise InputError(
        f"no network state dict in this checkpoint (expected a state dict, or one under {', '.join(WRAPPER_KEYS)})",
        str(path),
    )


def load_network_weights(network: torch.nn.Module, path: str | Path, device: torch.device | str = "cpu") -> None:
    """Load a checkpoint's state dict into ``network`` (strict), a clear error when it does not fit."""
    state = state_dict_of(load_checkpoint(path, device), path)
    inner = getattr(network, "module", None)  # DDP / DataParallel wrap the network
    target = inner if isinstance(inner, torch.nn.Module) else network
    try:
        target.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise InputError(
            f"checkpoint does not fit this bundle's network: {str(exc).splitlines()[0]}", str(path)
        ) from exc


class WeightsLoader:
    """Ignite handler for evaluation configs: load network weights when the engine starts."""

    def __init__(self, path: str, network: torch.nn.Module):
        self.path, self.network = path, network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        device = next(self.network.parameters()).device
        load_network_weights(self.network, self.path, device)
