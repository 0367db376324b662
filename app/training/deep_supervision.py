"""The deep-supervision loss for networks that stack their levels (``UNet3D(deep_supervision=True)``).

A deeply supervised network returns ``(B, L, C, X, Y, Z)`` in training mode (level 0 the full
resolution, the others upsampled to it). :class:`StackedDeepSupervisionLoss` splits the level axis
and hands the list to MONAI's ``DeepSupervisionLoss`` with nnU-Net's weights (halving per level,
normalised to sum 1); an ordinary ``(B, C, X, Y, Z)`` output is scored by the plain loss, so the same
config trains with and without deep supervision.
"""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss
from torch.nn.modules.loss import _Loss

from app.networks.unet3d import deep_supervision_weights

__all__ = ["StackedDeepSupervisionLoss"]


class StackedDeepSupervisionLoss(_Loss):
    """Weighted sum of ``loss`` over the level axis of a stacked deep-supervision output.

    Args:
        loss: the per-level loss, e.g. MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``.
        weights: per-level weights, finest first; default nnU-Net's ``1, 1/2, 1/4, ...`` normalised.
    """

    def __init__(self, loss: _Loss, weights: list[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = list(weights) if weights is not None else None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.ndim != target.ndim + 1:  # no level axis: an eval-mode or plain network
            return self.loss(input, target)
        levels = list(torch.unbind(input, dim=1))
        weights = self.weights if self.weights is not None else deep_supervision_weights(len(levels))
        return DeepSupervisionLoss(self.loss, weights=weights)(levels, target)
