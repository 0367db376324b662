"""Reproducible randomness that survives a restart.

Rather than restoring a pickled RNG state (which misses DataLoader workers and the per-transform
``RandomState`` objects MONAI keeps), every epoch reseeds everything from ``(seed, epoch, rank)``.
A run resumed at epoch ``e`` therefore draws exactly what the uninterrupted run drew in epoch ``e``.
"""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from monai.transforms import Randomizable
from monai.utils import set_determinism


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 31-bit seed that differs per epoch and per rank."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + int(rank) * 104_729) % (2**31 - 1)


def rng_state() -> dict:
    """Snapshot of torch's global RNG (stored in checkpoints for the record, as a tensor so the file
    loads with ``weights_only=True``; resume reseeds from ``(seed, epoch)``)."""
    return {"torch": torch.get_rng_state()}


class EpochSeedHandler:
    """Ignite handler: reseed global RNGs, the random transforms and the loader at each epoch start.

    Args:
        seed: the run's seed.
        transforms: transforms (e.g. a MONAI Compose, or a BatchAugment) whose random state to reset.
        rank: this process' rank under DDP (different ranks draw different augmentations).
        deterministic: also ask cuDNN/torch for deterministic algorithms where the hardware allows.
    """

    def __init__(self, seed: int = 0, transforms=None, rank: int = 0, deterministic: bool = True):
        self.seed = int(seed)
        self.transforms = [
            t for t in (transforms if isinstance(transforms, (list, tuple)) else [transforms]) if t is not None
        ]
        self.rank = int(rank)
        self.deterministic = deterministic

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        s = epoch_seed(self.seed, engine.state.epoch, self.rank)
        set_determinism(seed=s, use_deterministic_algorithms=None)
        if self.deterministic and torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        for t in self.transforms:
            if isinstance(t, Randomizable) or hasattr(t, "set_random_state"):
                t.set_random_state(seed=s)
