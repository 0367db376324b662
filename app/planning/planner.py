"""Network topology, patch and batch size from the data and a memory budget (nnU-Net's planner).

nnU-Net (Isensee et al., Nature Methods 2021) sizes the 3D U-Net to the data and the GPU:

* the **patch** starts as a box of 256³ voxels shaped like the physical aspect of the voxels
  (``1 / spacing``), clipped to the median image size at the target spacing, and as many 2×
  poolings are used as keep the coarsest feature map at least ``min_feature_map`` (4) voxels on every
  axis (here the same number on every axis: segapp's ``UNet3D`` pools isotropically); the patch is
  rounded up to a multiple of ``2 ** pools``;
* while the estimated training memory exceeds the budget, the axis whose patch is largest relative
  to the median size is shortened by one pooling step (and the poolings recomputed);
* the **batch** is at least 2, then as large as the budget allows, but never covering more than 5 %
  of the data set's voxels in one step;
* the **width** starts at 32 channels and doubles per level (capped at 320, as nnU-Net); when even a
  quarter of the median patch does not fit, the width is halved (down to ``min_base_features``).

:func:`estimate_training_bytes` counts what autograd keeps for ``UNet3D``'s backward pass (each
convolution block saves its convolution, normalisation and activation outputs; max-pooling its
indices; the decoder its concatenations; the loss a few class maps), plus weights, gradients and
the optimiser's state. ``bench/plan_memory.py`` prints it against the measured peak.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from app.errors import ConfigError

__all__ = ["NetworkPlan", "estimate_training_bytes", "plan_network", "unet_features"]

GIB = 1024**3


def unet_features(base: int, levels: int, max_channels: int = 320) -> list[int]:
    """``UNet3D`` ``features`` (first convolution per level; the second doubles it) for a base width."""
    return [int(min(base * 2**i, max_channels // 2)) for i in range(levels)]


def _unet_params(in_ch: int, classes: int, features: Sequence[int], deep_supervision: bool) -> int:
    """Parameter count of ``app.networks.unet3d.UNet3D`` (3×3×3 convs with bias; MONAI's instance norm
    has no affine parameters)."""

    def conv(i: int, o: int, k: int = 27) -> int:
        return i * o * k + o

    n, ch, skips = 0, in_ch, []
    for f in features:
        n += conv(ch, f) + conv(f, 2 * f)
        ch = 2 * f
        skips.append(ch)
    for s in reversed(skips[:-1]):
        n += ch * ch * 8 + ch  # transposed 2×2×2
        n += conv(ch + s, s) + conv(s, s)
        ch = s
    n += ch * classes + classes
    if deep_supervision:
        n += sum(s * classes + classes for s in list(reversed(skips[:-1]))[1:-1])
    return n


def estimate_training_bytes(
    patch_size: Sequence[int],
    batch_size: int,
    features: Sequence[int],
    in_channels: int = 1,
    num_classes: int = 2,
    deep_supervision: bool = True,
    activation_bytes: int = 4,
    optimizer_states: int = 1,
) -> int:
    """Estimated peak memory (bytes) of one ``UNet3D`` training step.

    Args:
        patch_size: voxels per axis; batch_size: patches per step.
        features: ``UNet3D`` features (first convolution per level).
        activation_bytes: 4 (float32) or 2 (AMP's float16 activations on CUDA).
        optimizer_states: tensors of state per weight (SGD with momentum 1, Adam 2).

    Returns:
        Activations kept for the backward pass (``batch_size`` × the per-voxel channel count × voxels
        × ``activation_bytes``; max-pool indices are int64) plus float32 weights, gradients and
        optimiser state.
    """
    v0 = math.prod(int(p) for p in patch_size)
    levels = len(features)
    floats = 2 * in_channels * v0  # the batch and its augmented copy
    ints = 0
    ch = in_channels
    for lvl, f in enumerate(features):
        v = v0 / 8**lvl
        floats += 3 * (f + 2 * f) * v  # conv, norm and ReLU outputs of both convolutions
        ch = 2 * f
        if lvl < levels - 1:
            floats += ch * v / 8  # pooled output
            ints += ch * v / 8  # its argmax indices (int64)
    for lvl in range(levels - 2, -1, -1):  # decoder, coarse to fine
        v = v0 / 8**lvl
        skip = 2 * features[lvl]
        floats += ch * v + (ch + skip) * v  # transposed-conv output and the concatenation
        floats += 3 * (skip + skip) * v
        ch = skip
    heads = (levels - 2) if deep_supervision and levels > 2 else 0
    floats += (1 + heads) * num_classes * v0 * 6  # logits, upsampled heads, softmax/one-hot/CE buffers
    activations = batch_size * (floats * activation_bytes + ints * 8)
    weights = _unet_params(in_channels, num_classes, features, deep_supervision) * 4 * (2 + optimizer_states)
    return int(activations + weights)


@dataclass
class NetworkPlan:
    """The planner's choice. ``patch_size`` in voxels (RAS-oriented array axes), memory in bytes."""

    patch_size: list[int]
    batch_size: int
    features: list[int]
    pools: int
    estimated_bytes: int
    budget_bytes: int
    median_shape: list[float]
    batch_cap_5_percent: int

    def as_dict(self) -> dict:
        d = asdict(self)
        d["estimated_gib"] = round(self.estimated_bytes / GIB, 3)
        d["budget_gib"] = round(self.budget_bytes / GIB, 3)
        return d


def _pools(patch: Sequence[int], min_feature_map: int, max_pools: int) -> int:
    return max(1, min(max_pools, *(int(math.floor(math.log2(max(p, 1) / min_feature_map))) for p in patch)))


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(value / multiple - 1e-9)) * multiple)


def plan_network(
    median_shape: Sequence[float],
    num_cases: int,
    budget_bytes: int,
    *,
    in_channels: int = 1,
    num_classes: int = 2,
    base_features: int = 32,
    min_base_features: int = 4,
    max_channels: int = 320,
    min_batch: int = 2,
    max_dataset_fraction: float = 0.05,
    min_feature_map: int = 4,
    max_pools: int = 5,
    max_patch: int = 256,
    spacing: Sequence[float] | None = None,
    deep_supervision: bool = True,
    activation_bytes: int = 2,
    optimizer_states: int = 1,
) -> NetworkPlan:
    """Patch, batch and ``UNet3D`` features for images of ``median_shape`` voxels and a memory budget.

    See the module docstring for the rules. ``activation_bytes=2`` plans for AMP on a GPU (the
    bundles autocast on CUDA); use 4 for float32 training (CPU). ``spacing`` (mm, the target
    spacing) shapes the starting box; without it the box is a cube.

    Raises:
        ConfigError: when even the smallest patch at the smallest width does not fit the budget.
    """
    median = [float(s) for s in median_shape]
    if len(median) != 3 or min(median) <= 0:
        raise ConfigError(f"median shape must be three positive sizes, got {median_shape!r}")
    if budget_bytes <= 0:
        raise ConfigError(f"the memory budget must be positive, got {budget_bytes / 2**30:g} GiB", "--gpu-memory")

    def est(patch: Sequence[int], batch: int, feats: Sequence[int]) -> int:
        return estimate_training_bytes(
            patch, batch, feats, in_channels, num_classes, deep_supervision, activation_bytes, optimizer_states
        )

    inv = [1.0 / float(s) for s in (spacing or (1.0, 1.0, 1.0))]
    scale = (256.0**3 / math.prod(inv)) ** (1.0 / 3.0)  # nnU-Net's start: 256^3 voxels, physical aspect
    full = [min(max(m, 1.0), scale * i, float(max_patch)) for m, i in zip(median, inv)]
    base = int(base_features)
    while True:
        size = list(full)
        while True:
            pools = _pools([int(round(s)) for s in size], min_feature_map, max_pools)
            step = 2**pools
            patch = [_round_up(s, step) for s in size]
            feats = unet_features(base, pools + 1, max_channels)
            if est(patch, min_batch, feats) <= budget_bytes:
                break
            ratios = [p / m for p, m in zip(patch, median)]
            axis = max(range(3), key=lambda a: (ratios[a], patch[a]))
            if math.prod(patch) <= 0.25 * math.prod(full) or patch[axis] - step < min_feature_map * 2:
                patch = []
                break
            size[axis] = patch[axis] - step
        if patch:
            break
        if base <= min_base_features:
            raise ConfigError(
                f"{budget_bytes / GIB:.3g} GiB does not fit a batch of {min_batch} patches at "
                f"{min_base_features} base features; give more memory",
                "--gpu-memory",
            )
        base = max(min_base_features, base // 2)
    cap = max(min_batch, int(max_dataset_fraction * num_cases * math.prod(median) / math.prod(patch)))
    batch = min_batch
    while batch < cap and est(patch, batch + 1, feats) <= budget_bytes:
        batch += 1
    return NetworkPlan(
        patch_size=[int(p) for p in patch],
        batch_size=int(batch),
        features=[int(f) for f in feats],
        pools=int(pools),
        estimated_bytes=est(patch, batch, feats),
        budget_bytes=int(budget_bytes),
        median_shape=median,
        batch_cap_5_percent=int(cap),
    )
