"""``prepare_batch`` for MONAI engines that augments the batch after it reaches the device.

Used in a bundle as::

    "prepare_batch": {"_target_": "app.training.prepare_batch.AugmentPrepareBatch",
                      "augment": {"_target_": "app.transforms.batch_augment.BatchAugment",
                                  "prob_elastic": 0.2, ...}}

``SupervisedTrainer`` calls ``prepare_batch(batchdata, device, non_blocking, **to_kwargs)`` and
unpacks ``(image, label)``. The interface returns only those two, so augmented ``extra_keys`` maps
(ignore masks, weights) are written back into ``batchdata`` (on the device), where handlers and
``engine.state.batch`` see them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch

from app.errors import InputError
from app.transforms.batch_augment import BatchAugment

__all__ = ["AugmentPrepareBatch"]

logger = logging.getLogger(__name__)


class AugmentPrepareBatch(PrepareBatch):
    """Move a dict batch to the device (one copy per tensor), then apply a :class:`BatchAugment`.

    Args:
        augment: the device-side augmentation; None only moves the batch (like MONAI's default).
        image_key: batch key of the ``(B, C, X, Y, Z)`` image.
        label_key: batch key of the label; a batch without it gives ``label=None``.
        extra_keys: keys of further ``(B, *, X, Y, Z)`` maps resampled like the label.
    """

    def __init__(
        self,
        augment: BatchAugment | None = None,
        image_key: str = "image",
        label_key: str = "label",
        extra_keys: Sequence[str] = (),
    ):
        self.augment = augment
        self.image_key = image_key
        self.label_key = label_key
        self.extra_keys = tuple(extra_keys)

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(image, label)`` on ``device``; ``kwargs`` go to ``Tensor.to`` (e.g. ``memory_format``)."""
        if not isinstance(batchdata, Mapping):
            raise InputError(f"AugmentPrepareBatch expects a dict batch, got {type(batchdata).__name__}")
        missing = [k for k in (self.image_key, *self.extra_keys) if k not in batchdata]
        if missing:
            raise InputError(f"AugmentPrepareBatch: batch has no key(s) {missing}; it has {sorted(batchdata)}")

        def move(t: torch.Tensor) -> torch.Tensor:
            # from pinned host memory this copy is asynchronous with non_blocking=True
            return t.to(device=device, non_blocking=non_blocking, **kwargs)

        image = move(batchdata[self.image_key])
        label = batchdata.get(self.label_key)
        label = move(label) if isinstance(label, torch.Tensor) else None
        extra = {k: move(batchdata[k]) for k in self.extra_keys}
        if self.augment is None:
            for k, v in extra.items():
                batchdata[k] = v
            return image, label
        image, label, extra = self.augment(image, label, extra)
        for k, v in extra.items():
            batchdata[k] = v
        return image, label

    def __repr__(self) -> str:
        return (
            f"AugmentPrepareBatch(augment={self.augment!r}, image_key={self.image_key!r}, label_key={self.label_key!r})"
        )
