"""Segmentation losses that truly ignore unlabelled voxels (sparse annotation).

MONAI's ``MaskedDiceLoss`` multiplies the *logits* by the mask before ``DiceLoss`` applies softmax
and one-hot (``monai/losses/spatial_mask.py``): masked voxels become logits 0, i.e. uniform
probabilities that still enter every Dice sum, so ignored voxels are not ignored. Here the
activation is applied first and every sum (intersection, predicted and ground-truth volumes, the
cross-entropy average) runs over labelled voxels only. Consequences, all tested:

* the gradient with respect to the logits is exactly 0 at ignored voxels;
* with nothing ignored each loss equals its dense MONAI / torch counterpart;
* a batch item (or a whole batch) without a labelled voxel contributes 0 loss and 0 gradient
  (never NaN), and is left out of the batch mean.

Calling convention (all losses)::

    loss = loss_fn(logits, target)                 # e.g. MONAI SupervisedTrainer: ignore_value only
    loss = loss_fn(logits, target, mask=labelled)  # explicit mask, ANDed with ignore_value

``logits``: ``(B, C, *spatial)`` raw network output. ``target``: ``(B, 1, *spatial)`` integer labels
(float tensors holding integers are fine) or ``(B, C, *spatial)`` one-hot / multi-label.
``mask``: ``(B, 1, *spatial)`` bool or float, nonzero = labelled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import overload

import torch
import torch.nn.functional as F
from monai.networks.utils import one_hot
from torch import nn

from app.errors import InputError

__all__ = [
    "labelled_mask",
    "MaskedDiceLoss",
    "MaskedTverskyLoss",
    "MaskedCrossEntropyLoss",
    "MaskedDiceCELoss",
]


@overload
def _plain(x: torch.Tensor) -> torch.Tensor: ...
@overload
def _plain(x: None) -> None: ...
def _plain(x: torch.Tensor | None) -> torch.Tensor | None:
    """Drop MONAI MetaTensor metadata (keeps autograd); losses need plain tensors only."""
    if x is not None and hasattr(x, "as_tensor"):
        return x.as_tensor()
    return x


def labelled_mask(
    target: torch.Tensor, mask: torch.Tensor | None = None, ignore_value: int | None = None
) -> torch.Tensor:
    """Boolean ``(B, 1, *spatial)`` map of labelled voxels: ``mask != 0`` AND ``target != ignore_value``.

    For a multi-channel target a voxel is ignored when any channel holds ``ignore_value``.
    """
    lab = torch.ones((target.shape[0], 1, *target.shape[2:]), dtype=torch.bool, device=target.device)
    if ignore_value is not None:
        lab = lab & (target != ignore_value).all(dim=1, keepdim=True)
    if mask is not None:
        mask = _plain(mask)
        if mask.ndim == target.ndim - 1:  # (B, *spatial) -> (B, 1, *spatial)
            mask = mask.unsqueeze(1)
        if mask.shape[1] != 1 or mask.shape[2:] != target.shape[2:] or mask.shape[0] != target.shape[0]:
            raise InputError(f"mask shape {tuple(mask.shape)} does not match target shape {tuple(target.shape)}")
        lab = lab & (mask != 0).to(lab.device)
    return lab


def _check_reduction(reduction: str, allowed: Sequence[str] = ("mean", "sum", "none")) -> str:
    reduction = str(getattr(reduction, "value", reduction))
    if reduction not in allowed:
        raise ValueError(f"Unsupported reduction: {reduction}, available options are {list(allowed)}.")
    return reduction


def _safe_div(num: torch.Tensor, den: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``valid``, else 0; the denominator is replaced by 1 where invalid so
    that neither the value nor the (unused) gradient branch can become inf/NaN."""
    den = torch.where(valid, den, torch.ones_like(den))
    return torch.where(valid, num / den, torch.zeros_like(num))


class _MaskedBase(nn.Module):
    """Shared handling: activation, one-hot of the target, background removal and the mask."""

    class_weight: torch.Tensor | None  # a registered buffer

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        ignore_value: int | None = None,
        batch: bool = False,
        reduction: str = "mean",
        weight: Sequence[float] | float | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if other_act is not None and not callable(other_act):
            raise TypeError(f"other_act must be None or callable but is {type(other_act).__name__}.")
        if int(sigmoid) + int(softmax) + int(other_act is not None) > 1:
            raise ValueError("Incompatible values: more than 1 of [sigmoid=True, softmax=True, other_act is not None].")
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.ignore_value = None if ignore_value is None else int(ignore_value)
        self.batch = batch
        self.reduction = _check_reduction(reduction)
        w = torch.as_tensor(weight, dtype=torch.float32) if weight is not None else None
        if w is not None and bool((w < 0).any()):
            raise ValueError("class weights must be >= 0.")
        self.register_buffer("class_weight", w)

    # -- pieces -------------------------------------------------------------------------------
    def _activate(self, input: torch.Tensor) -> torch.Tensor:
        if self.sigmoid:
            return torch.sigmoid(input)
        if self.softmax and input.shape[1] > 1:
            return torch.softmax(input, 1)
        if self.other_act is not None:
            return self.other_act(input)
        return input

    def _target_channels(self, target: torch.Tensor, lab: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Target as ``(B, C, *spatial)`` float; ignored voxels hold class 0 (they are masked anyway)."""
        if self.to_onehot_y and n_classes > 1:
            if target.shape[1] != 1:
                raise InputError(f"to_onehot_y needs a (B, 1, ...) label target, got shape {tuple(target.shape)}")
            labels = class_indices(target, lab, n_classes)
            return one_hot(labels, num_classes=n_classes, dtype=torch.float32)
        target = torch.where(lab, target, torch.zeros_like(target))
        return target.float()

    def _prepare(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None):
        """Returns probabilities ``p``, target ``g`` (both ``(B, C', *spatial)``) and the float
        labelled map ``m`` ``(B, 1, *spatial)``, after removing the background channel if asked."""
        input, target = _plain(input), _plain(target)
        if input.ndim != target.ndim:
            raise InputError(f"input {tuple(input.shape)} and target {tuple(target.shape)} differ in dimensions")
        lab = labelled_mask(target, mask, self.ignore_value)
        p = self._activate(input)
        g = self._target_channels(target, lab, input.shape[1])
        if not self.include_background and input.shape[1] > 1:
            p, g = p[:, 1:], g[:, 1:]
        if g.shape != p.shape:
            raise InputError(f"ground truth has shape {tuple(g.shape)}, prediction {tuple(p.shape)}")
        return p, g.to(p.dtype), lab.to(p.dtype)

    def _axes(self, ndim: int) -> list[int]:
        axes = list(range(2, ndim))
        return [0] + axes if self.batch else axes

    def _valid(self, m: torch.Tensor) -> torch.Tensor:
        """Which items have at least one labelled voxel: ``(B, 1)``, or ``(1,)`` with ``batch``."""
        return m.sum(dim=self._axes(m.ndim)) > 0

    def _apply_class_weight(self, f: torch.Tensor) -> torch.Tensor:
        if self.class_weight is None:
            return f
        cw = self.class_weight.to(f)
        if cw.ndim > 0 and cw.numel() != f.shape[-1]:
            raise ValueError(
                f"{cw.numel()} class weights for {f.shape[-1]} classes (without the background class when "
                "include_background=False)."
            )
        return f * cw

    def _reduce_per_class(self, f: torch.Tensor, valid: torch.Tensor, ndim: int) -> torch.Tensor:
        """Reduce ``(B, C)`` / ``(C,)`` per-class losses; items without labels are left out of the mean."""
        f = torch.where(valid, f, torch.zeros_like(f))
        if self.reduction == "sum":
            return f.sum()
        if self.reduction == "none":
            lead = [1, f.shape[-1]] if self.batch else list(f.shape)
            return f.view(lead + [1] * (ndim - 2))
        n_valid = valid.expand_as(f).sum().clamp(min=1)
        return f.sum() / n_valid


def class_indices(target: torch.Tensor, lab: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Integer labels ``(B, 1, *spatial)`` with unlabelled voxels set to 0 (so one-hot/CE accept them).

    Raises InputError when a labelled voxel holds a value outside ``[0, n_classes)``.
    """
    labels = torch.where(lab, target, torch.zeros_like(target))
    labels = labels.round().long() if labels.is_floating_point() else labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        bad = labels[(labels < 0) | (labels >= n_classes)].unique()[:5].tolist()
        raise InputError(
            f"label values {bad} are outside [0, {n_classes}) for a {n_classes}-channel prediction "
            "(set ignore_value for unlabelled voxels)"
        )
    return labels


class MaskedDiceLoss(_MaskedBase):
    """Dice loss over labelled voxels only (MONAI ``DiceLoss`` arguments).

    Per item ``b`` and class ``c``: ``1 - (2 sum m p g + smooth_nr) / (sum m p^o + sum m g^o + smooth_dr)``
    with ``m`` the labelled map, ``p`` the probabilities, ``g`` the one-hot target and ``o = 2`` when
    ``squared_pred`` (else 1). ``batch=True`` sums over the batch before dividing. ``jaccard`` gives
    the soft IoU ``(2 tp + nr) / (2 (|p| + |g| - tp) + dr)`` like MONAI.

    Args:
        include_background: keep channel 0 in the score.
        to_onehot_y: target is ``(B, 1, ...)`` class indices to be one-hot encoded.
        sigmoid / softmax / other_act: activation applied to the logits (at most one).
        squared_pred: squared terms in the denominator.
        jaccard: soft Jaccard instead of Dice.
        reduction: ``"mean"`` (over labelled items and classes), ``"sum"`` or ``"none"``.
        smooth_nr, smooth_dr: numerator / denominator smoothing constants (dimensionless).
        batch: reduce over the batch before dividing.
        weight: per-class weights of the Dice terms (as MONAI's ``weight``).
        ignore_value: label value meaning "unlabelled" (e.g. 255).
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | torch.Tensor | None = None,
        ignore_value: int | None = None,
    ) -> None:
        super().__init__(
            include_background, to_onehot_y, sigmoid, softmax, other_act, ignore_value, batch, reduction, weight
        )
        self.squared_pred = squared_pred
        self.jaccard = jaccard
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)

    def _dice_terms(
        self, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, w: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked (optionally voxel-weighted) intersection and volumes, reduced over ``_axes``."""
        axes = self._axes(p.ndim)
        mw = m if w is None else m * w
        tp = (mw * p * g).sum(dim=axes)
        ps = (mw * (p * p if self.squared_pred else p)).sum(dim=axes)
        gs = (mw * (g * g if self.squared_pred else g)).sum(dim=axes)
        return tp, ps, gs

    def _from_terms(self, tp: torch.Tensor, ps: torch.Tensor, gs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        num = 2.0 * tp + self.smooth_nr
        den = (2.0 * (ps + gs - tp) if self.jaccard else ps + gs) + self.smooth_dr
        return 1.0 - _safe_div(num, den, valid & (den != 0))

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        p, g, m = self._prepare(input, target, mask)
        valid = self._valid(m)
        f = self._from_terms(*self._dice_terms(p, g, m), valid.expand(*valid.shape[:-1], p.shape[1]))
        return self._reduce_per_class(self._apply_class_weight(f), valid, p.ndim)


class MaskedTverskyLoss(_MaskedBase):
    """Tversky loss over labelled voxels (MONAI ``TverskyLoss`` arguments).

    ``1 - (tp + nr) / (tp + alpha fp + beta fn + dr)`` with ``tp = sum m p g``,
    ``fp = sum m p (1 - g)``, ``fn = sum m (1 - p) g``. ``alpha`` weighs false positives, ``beta``
    false negatives; ``alpha = beta = 0.5`` is the Dice loss.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        alpha: float = 0.5,
        beta: float = 0.5,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        ignore_value: int | None = None,
    ) -> None:
        super().__init__(include_background, to_onehot_y, sigmoid, softmax, other_act, ignore_value, batch, reduction)
        self.alpha, self.beta = float(alpha), float(beta)
        self.smooth_nr, self.smooth_dr = float(smooth_nr), float(smooth_dr)

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        p, g, m = self._prepare(input, target, mask)
        axes = self._axes(p.ndim)
        tp = (m * p * g).sum(dim=axes)
        fp = (m * p * (1 - g)).sum(dim=axes)
        fn = (m * (1 - p) * g).sum(dim=axes)
        den = tp + self.alpha * fp + self.beta * fn + self.smooth_dr
        valid = self._valid(m)
        vf = valid.expand(*valid.shape[:-1], p.shape[1]) & (den != 0)
        f = 1.0 - _safe_div(tp + self.smooth_nr, den, vf)
        return self._reduce_per_class(f, valid, p.ndim)


class MaskedCrossEntropyLoss(nn.Module):
    """Cross-entropy averaged over labelled voxels, with optional class weights and voxel weights.

    ``loss = sum_i m_i v_i c_{t_i} CE_i / sum_i m_i c_{t_i}`` where ``m`` is the labelled map, ``v``
    the per-voxel weight map passed to ``forward`` (dimensionless; ignored voxels may have any weight)
    and ``c`` the class weights.
    Without voxel weights this is exactly ``torch.nn.CrossEntropyLoss(weight=c)`` restricted to labelled
    voxels. A one-channel prediction uses binary cross-entropy with logits (target 0/1).

    Args:
        weight: per-class weights ``c`` (length C), as ``torch.nn.CrossEntropyLoss``'s ``weight``.
        reduction: ``"mean"`` (as above), ``"sum"`` (numerator only) or ``"none"`` (``(B, 1, *spatial)``
            per-voxel losses, 0 where unlabelled).
        label_smoothing: as in ``torch.nn.CrossEntropyLoss`` (multi-class only).
        ignore_value: label value meaning "unlabelled".
    """

    class_weight: torch.Tensor | None  # a registered buffer

    def __init__(
        self,
        weight: Sequence[float] | torch.Tensor | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        ignore_value: int | None = None,
    ) -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.label_smoothing = float(label_smoothing)
        self.ignore_value = None if ignore_value is None else int(ignore_value)
        w = torch.as_tensor(weight, dtype=torch.float32) if weight is not None else None
        self.register_buffer("class_weight", w)

    def voxel_losses(self, input: torch.Tensor, target: torch.Tensor, lab: torch.Tensor):
        """Per-voxel CE ``(B, 1, *spatial)`` and the per-voxel class weight ``c_{t_i}`` (or None)."""
        n = input.shape[1]
        if n == 1:  # binary: BCE with logits, class weight = pos_weight like MONAI's DiceCELoss
            t = torch.where(lab, target, torch.zeros_like(target)).to(input.dtype)
            pw = self.class_weight.to(input) if self.class_weight is not None else None
            return F.binary_cross_entropy_with_logits(input, t, reduction="none", pos_weight=pw), None
        cw = self.class_weight.to(input) if self.class_weight is not None else None
        if target.shape[1] == 1:
            labels = class_indices(target, lab, n)[:, 0]
            ce = F.cross_entropy(input, labels, weight=cw, reduction="none", label_smoothing=self.label_smoothing)
            # torch has already multiplied by c_{t_i}; report it for the normaliser
            return ce.unsqueeze(1), (cw[labels].unsqueeze(1) if cw is not None else None)
        # probability / one-hot targets (B, C, ...)
        t = torch.where(lab, target, torch.zeros_like(target)).to(input.dtype)
        ce = F.cross_entropy(input, t, weight=cw, reduction="none", label_smoothing=self.label_smoothing)
        return ce.unsqueeze(1), None

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``weight``: optional per-voxel weight map ``(B, 1, *spatial)`` (dimensionless)."""
        input, target, weight = _plain(input), _plain(target), _plain(weight)
        lab = labelled_mask(target, mask, self.ignore_value)
        ce, cw_vox = self.voxel_losses(input, target, lab)
        m = lab.to(ce.dtype)
        num_map = ce * m if weight is None else ce * m * weight.to(ce)
        if self.reduction == "none":
            return num_map
        num = num_map.sum()
        if self.reduction == "sum":
            return num
        den = (m if cw_vox is None else m * cw_vox).sum()
        return _safe_div(num, den, den > 0)


class MaskedDiceCELoss(nn.Module):
    """``lambda_dice * MaskedDiceLoss + lambda_ce * MaskedCrossEntropyLoss`` (MONAI ``DiceCELoss`` arguments).

    Bundle configs build it as
    ``{"_target_": "app.losses.MaskedDiceCELoss", "to_onehot_y": true, "softmax": true, "ignore_value": 255}``.
    ``weight`` (class weights) goes to both terms as in MONAI; the per-voxel ``weight`` of ``forward``
    only to the cross-entropy. A one-channel prediction uses binary cross-entropy.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
        ignore_value: int | None = None,
    ) -> None:
        super().__init__()
        reduction = _check_reduction(reduction, ("mean", "sum"))
        if lambda_dice < 0.0 or lambda_ce < 0.0:
            raise ValueError("lambda_dice and lambda_ce should be no less than 0.0.")
        dice_weight = weight
        if weight is not None and not include_background:
            dice_weight = torch.as_tensor(weight)[1:]
        self.dice = MaskedDiceLoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            squared_pred=squared_pred,
            jaccard=jaccard,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            weight=dice_weight,
            ignore_value=ignore_value,
        )
        self.ce = MaskedCrossEntropyLoss(
            weight=weight, reduction=reduction, label_smoothing=label_smoothing, ignore_value=ignore_value
        )
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``weight``: optional per-voxel weight map ``(B, 1, *spatial)`` for the cross-entropy term."""
        if input.ndim != target.ndim:
            raise InputError(
                f"input {tuple(input.shape)} and target {tuple(target.shape)} differ in dimensions; "
                "give the target as (B, 1, ...) labels"
            )
        if target.shape[1] not in (1, input.shape[1]):
            raise InputError(f"target has {target.shape[1]} channels, prediction {input.shape[1]}")
        total = input.new_zeros(())
        if self.lambda_dice:
            total = total + self.lambda_dice * self.dice(input, target, mask)
        if self.lambda_ce:
            total = total + self.lambda_ce * self.ce(input, target, mask, weight)
        return _plain(total)
