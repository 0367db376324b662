"""Resample a channel-first volume from one voxel grid to another, given both affines.

Used to put predictions back on the exact source grid: for every *target* voxel we compute where it
lies in the *source* grid (``inv(affine_src) @ affine_dst``) and interpolate there, in one
``grid_sample`` pass on whatever device the data is on. Both affines must be in the same world frame
(both RAS or both LPS); the frame cancels out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def target_to_source_voxel(affine_src: np.ndarray, affine_dst: np.ndarray) -> np.ndarray:
    """4x4 map from target voxel indices to source voxel indices."""
    return np.linalg.inv(np.asarray(affine_src, np.float64)) @ np.asarray(affine_dst, np.float64)


def _grid(m: np.ndarray, src_shape: Sequence[int], dst_shape: Sequence[int], k0: int, k1: int,
          device: torch.device) -> torch.Tensor:
    """Normalised sampling grid (1, K, J, I, 3) for target slices k0:k1, in grid_sample's (x=z-last) order."""
    m_t = torch.as_tensor(m, dtype=torch.float64, device=device)
    i = torch.arange(dst_shape[0], dtype=torch.float64, device=device)
    j = torch.arange(dst_shape[1], dtype=torch.float64, device=device)
    k = torch.arange(k0, k1, dtype=torch.float64, device=device)
    ii, jj, kk = torch.meshgrid(i, j, k, indexing="ij")  # (I, J, K)
    pts = torch.stack([ii, jj, kk], dim=-1) @ m_t[:3, :3].T + m_t[:3, 3]  # source voxel coords
    size = torch.as_tensor(list(src_shape), dtype=torch.float64, device=device)
    # align_corners=True: index 0 -> -1, index n-1 -> +1 (n == 1 maps everything to 0)
    norm = torch.where(size > 1, 2.0 * pts / (size - 1).clamp(min=1) - 1.0, torch.zeros_like(pts))
    # grid_sample's input is (N, C, D=I, H=J, W=K); its grid's last dim is ordered (W, H, D) = (k, j, i)
    return norm.flip(-1).unsqueeze(0).float()


def resample_to_grid(data: torch.Tensor, affine_src: np.ndarray, affine_dst: np.ndarray,
                     dst_shape: Sequence[int], mode: str = "bilinear", padding_mode: str = "zeros",
                     slab: int | None = None) -> torch.Tensor:
    """Resample ``data`` (C, I, J, K) on ``affine_src`` onto the grid (``affine_dst``, ``dst_shape``).

    Args:
        data: channel-first volume on the source grid (any float dtype; ints only with ``nearest``).
        affine_src: 4x4 voxel->world of ``data``.
        affine_dst: 4x4 voxel->world of the target grid, same world frame as ``affine_src``.
        dst_shape: target spatial shape ``(I, J, K)``.
        mode: ``bilinear`` (trilinear in 3D) for images/probabilities, ``nearest`` for labels.
        padding_mode: value outside the source field: ``zeros`` | ``border`` | ``reflection``.
        slab: process this many target slices (along K) at a time to bound memory (None: all).

    Returns:
        (C, *dst_shape) tensor on ``data``'s device and dtype.
    """
    m = target_to_source_voxel(affine_src, affine_dst)
    dst_shape = tuple(int(s) for s in dst_shape)
    src = data.unsqueeze(0)
    work = src if src.is_floating_point() else src.float()
    slab = slab or dst_shape[2]
    out = torch.empty((data.shape[0], *dst_shape), dtype=data.dtype, device=data.device)
    for k0 in range(0, dst_shape[2], slab):
        k1 = min(k0 + slab, dst_shape[2])
        grid = _grid(m, data.shape[1:], dst_shape, k0, k1, data.device).to(work.dtype if work.dtype != torch.float16 else torch.float32)
        # grid_sample wants (N, C, D, H, W) with the grid indexed (N, D', H', W', 3): use (I, J, K) as (D, H, W)
        res = F.grid_sample(work.float() if work.dtype == torch.float16 else work, grid,
                            mode=mode, padding_mode=padding_mode, align_corners=True)
        out[:, :, :, k0:k1] = res[0].to(data.dtype)
    return out


def is_identity(affine_src: np.ndarray, affine_dst: np.ndarray, src_shape, dst_shape, atol: float = 1e-5) -> bool:
    """True when the two grids coincide, so resampling can be skipped."""
    return tuple(src_shape) == tuple(dst_shape) and np.allclose(target_to_source_voxel(affine_src, affine_dst), np.eye(4), atol=atol)
