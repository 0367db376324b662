"""Masked focal loss and hardness-weighted Dice loss (sparse annotation, see ``app.losses.masked``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses.focal_loss import sigmoid_focal_loss, softmax_focal_loss

from app.losses.masked import MaskedDiceLoss, _MaskedBase, _plain, _safe_div, labelled_mask

__all__ = ["MaskedFocalLoss", "HardnessWeightedDiceLoss", "hardness_weights"]


class MaskedFocalLoss(_MaskedBase):
    """Focal loss ``-alpha_c (1 - p_c)^gamma g_c log p_c`` averaged over labelled voxels and classes.

    Uses MONAI's ``softmax_focal_loss`` / ``sigmoid_focal_loss`` element-wise terms on the full logits,
    then zeroes unlabelled voxels. With nothing ignored this equals MONAI's
    ``FocalLoss(use_softmax=..., to_onehot_y=...)`` with ``reduction="mean"``: the mean over
    ``B x C x voxels`` (here over labelled voxels x C).

    Difference from MONAI: with ``include_background=False`` the softmax still runs over *all*
    classes and only the background term is dropped (MONAI drops the channel before its softmax).

    Args:
        gamma: focusing exponent (0 gives cross-entropy).
        alpha: scalar (``1 - alpha`` for class 0, ``alpha`` for the others, softmax) or per-class weights.
        weight: per-class weights multiplied onto the terms (MONAI ``weight``).
        use_softmax: softmax multi-class focal loss (default); False gives the sigmoid (multi-label) one.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B, C, *spatial)`` terms, 0 where unlabelled).
        ignore_value: label value meaning "unlabelled".
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        weight: Sequence[float] | float | torch.Tensor | None = None,
        reduction: str = "mean",
        use_softmax: bool = True,
        ignore_value: int | None = None,
    ) -> None:
        super().__init__(include_background, to_onehot_y, reduction=reduction, weight=weight, ignore_value=ignore_value)
        self.gamma = float(gamma)
        self.alpha: float | torch.Tensor | None = None
        if isinstance(alpha, (int, float)):
            self.alpha = float(alpha)
        elif alpha is not None:
            self.alpha = torch.as_tensor(alpha)
        self.use_softmax = use_softmax

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        input, target = _plain(input), _plain(target)
        lab = labelled_mask(target, mask, self.ignore_value)
        g = self._target_channels(target, lab, input.shape[1]).to(input.dtype)
        if g.shape != input.shape:
            raise ValueError(f"ground truth has shape {tuple(g.shape)}, prediction {tuple(input.shape)}")
        focal = softmax_focal_loss if self.use_softmax else sigmoid_focal_loss
        dt = torch.promote_types(input.dtype, torch.float32)  # float32 at least (AMP), float64 kept
        loss = focal(input.to(dt), g.to(dt), self.gamma, self.alpha)
        if not self.include_background and input.shape[1] > 1:
            loss = loss[:, 1:]
        m = lab.to(loss.dtype)
        loss = loss * m
        if self.class_weight is not None:
            cw = self.class_weight.to(loss)
            loss = loss * (cw.view(1, -1, *[1] * (loss.ndim - 2)) if cw.ndim else cw)
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        den = m.sum() * loss.shape[1]
        return _safe_div(loss.sum(), den, den > 0)


def hardness_weights(p: torch.Tensor, g: torch.Tensor, lam: float = 0.6) -> torch.Tensor:
    """Per-voxel, per-class hardness weights ``w = lam * |p - g| + (1 - lam)``, detached (no gradient).

    ``p``: probabilities, ``g``: one-hot target, same shape. ``lam`` in ``[0, 1]``: 0 gives plain Dice.
    """
    return (lam * (p - g).abs() + (1.0 - lam)).detach()


class HardnessWeightedDiceLoss(MaskedDiceLoss):
    """Dice loss with voxel-wise hardness weights, over labelled voxels only.

    ``1 - (2 sum w m p g + nr) / (sum w m (p + g) + dr)`` with ``w = lam |p - g| + (1 - lam)``
    (treated as constants, see :func:`hardness_weights`): voxels the network gets wrong count more.
    Takes all ``MaskedDiceLoss`` arguments plus ``lam``; ``lam=0`` reduces to ``MaskedDiceLoss``.
    """

    def __init__(self, *args, lam: float = 0.6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        self.lam = float(lam)

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        p, g, m = self._prepare(input, target, mask)
        valid = self._valid(m)
        w = hardness_weights(p, g, self.lam)
        f = self._from_terms(*self._dice_terms(p, g, m, w), valid.expand(*valid.shape[:-1], p.shape[1]))
        return self._reduce_per_class(self._apply_class_weight(f), valid, p.ndim)
