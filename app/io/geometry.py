"""Affines and frames.

``LPS`` is DICOM's patient frame (x to the patient's left, y posterior, z superior), ``RAS`` is the
NIfTI/MONAI frame. Both are in millimetres. An affine maps a voxel index ``(i, j, k, 1)`` to a point.
"""

from __future__ import annotations

import numpy as np

# Flipping x and y converts LPS <-> RAS (the matrix is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Voxel->LPS affine to voxel->RAS affine (same voxel grid)."""
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)


def ras_to_lps(affine_ras: np.ndarray) -> np.ndarray:
    """Voxel->RAS affine to voxel->LPS affine (same voxel grid)."""
    return LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along i, j, k (the column norms of the affine's 3x3 part)."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Map voxel indices ``(..., 3)`` to world points ``(..., 3)`` in the affine's frame."""
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Map world points ``(..., 3)`` to (fractional) voxel indices ``(..., 3)``."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    xyz = np.asarray(xyz, dtype=np.float64)
    return xyz @ inv[:3, :3].T + inv[:3, 3]


def same_grid(affine_a: np.ndarray, shape_a, affine_b: np.ndarray, shape_b, atol: float = 1e-4) -> bool:
    """True when two (affine, shape) pairs describe the same voxel grid within ``atol`` mm."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=atol)
