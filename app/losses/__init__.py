"""Losses for sparse (partially labelled) segmentation targets: ignored voxels are truly ignored.

See ``app.losses.masked`` for the calling convention ``loss(logits, target, mask=None)``.
"""

from app.losses.hardness import HardnessWeightedDiceLoss, MaskedFocalLoss, hardness_weights
from app.losses.masked import (
    MaskedCrossEntropyLoss,
    MaskedDiceCELoss,
    MaskedDiceLoss,
    MaskedTverskyLoss,
    labelled_mask,
)

__all__ = [
    "MaskedDiceLoss",
    "MaskedCrossEntropyLoss",
    "MaskedDiceCELoss",
    "MaskedFocalLoss",
    "MaskedTverskyLoss",
    "HardnessWeightedDiceLoss",
    "hardness_weights",
    "labelled_mask",
]
