"""Per-sample intensity augmentation of a whole batch on its device (image only).

The operations mirror MONAI's array transforms so that the same numbers mean the same thing:

* scale (``RandScaleIntensity``): ``x * (1 + f)``
* shift (``RandShiftIntensity``): ``x + o``
* gamma (``RandAdjustContrast``): ``((x - min) / (max - min + eps)) ** g * (max - min) + min``, with
  ``min``/``max`` over the whole sample (all channels)
* noise (``RandGaussianNoise`` with ``sample_std=True``): ``x + N(0, s^2)``, ``s ~ U(0, std)``

Each takes per-sample parameters of shape ``(B,)`` and a boolean ``(B,)`` mask of the samples it
applies to; unselected samples are returned bit-for-bit unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["apply_scale_shift", "apply_gamma", "apply_gaussian_noise"]

_EPS = 1e-7  # MONAI's RandAdjustContrast epsilon


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` parameters as ``(B, 1, 1, ...)`` on ``like``'s device, float32."""
    shape = (values.shape[0],) + (1,) * (like.ndim - 1)
    return values.to(device=like.device, dtype=torch.float32, non_blocking=True).view(shape)


def apply_scale_shift(
    image: torch.Tensor,
    scale_factor: torch.Tensor,
    scale_on: torch.Tensor,
    shift_offset: torch.Tensor,
    shift_on: torch.Tensor,
) -> torch.Tensor:
    """``x * (1 + f) + o`` per sample.

    Args:
        image: ``(B, C, X, Y, Z)`` float32 tensor.
        scale_factor: ``(B,)`` factor ``f`` (dimensionless); ignored where ``scale_on`` is False.
        scale_on: ``(B,)`` bool, CPU.
        shift_offset: ``(B,)`` additive offset (image intensity units); ignored where ``shift_on`` is False.
        shift_on: ``(B,)`` bool, CPU.
    """
    if bool(scale_on.any()):
        mult = torch.where(scale_on, 1.0 + scale_factor, torch.ones_like(scale_factor))
        image = image * _per_sample(mult, image)
    if bool(shift_on.any()):
        add = torch.where(shift_on, shift_offset, torch.zeros_like(shift_offset))
        image = image + _per_sample(add, image)
    return image


def apply_gamma(image: torch.Tensor, gamma: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """MONAI's ``RandAdjustContrast`` per sample (min/max over each sample's channels and voxels).

    Args:
        image: ``(B, C, X, Y, Z)`` float32 tensor.
        gamma: ``(B,)`` exponents (dimensionless).
        on: ``(B,)`` bool, CPU: samples to change; the others are left untouched.
    """
    if not bool(on.any()):
        return image
    idx = torch.nonzero(on).flatten()
    idx_dev = idx.to(image.device, non_blocking=True)
    sub = image.index_select(0, idx_dev)
    dims = tuple(range(1, image.ndim))
    lo = sub.amin(dim=dims, keepdim=True)
    rng = sub.amax(dim=dims, keepdim=True) - lo
    g = _per_sample(gamma[idx], sub)
    # clamp: rounding can make (x - lo) a hair negative, and a negative base to a fractional power is NaN
    sub = ((sub - lo) / (rng + _EPS)).clamp_min(0.0).pow(g) * rng + lo
    return image.index_copy(0, idx_dev, sub)


def apply_gaussian_noise(
    image: torch.Tensor, std: torch.Tensor, on: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Add zero-mean Gaussian noise with a per-sample standard deviation.

    Args:
        image: ``(B, C, X, Y, Z)`` float32 tensor.
        std: ``(B,)`` noise standard deviation (image intensity units).
        on: ``(B,)`` bool, CPU.
        generator: a generator on ``image.device`` (noise is drawn there, never copied from the host).
    """
    if not bool(on.any()):
        return image
    idx = torch.nonzero(on).flatten()
    idx_dev = idx.to(image.device, non_blocking=True)
    sub = image.index_select(0, idx_dev)
    noise = torch.randn(sub.shape, generator=generator, device=sub.device, dtype=sub.dtype)
    sub = sub + noise * _per_sample(std[idx], sub)
    return image.index_copy(0, idx_dev, sub)
