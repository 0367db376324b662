"""NIfTI in and out: label maps and images as ``(array_ijk, affine_ras)``, written atomically."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from app.errors import InputError
from app.io.atomic import atomic_path


def save_nifti(array_ijk: np.ndarray, affine_ras: np.ndarray, output_path: str | Path, *, dtype=None) -> Path:
    """Save ``array_ijk`` with its voxel->RAS (mm) affine as NIfTI (``.nii`` or ``.nii.gz``).

    Both sform and qform are set (code 1, scanner anatomical) so every reader sees the same grid.
    """
    array_ijk = np.asarray(array_ijk)
    if array_ijk.ndim not in (3, 4):
        raise InputError(f"NIfTI output needs a 3D or 4D array, got shape {array_ijk.shape}")
    if dtype is not None:
        array_ijk = array_ijk.astype(dtype, copy=False)
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    img = nib.Nifti1Image(array_ijk, affine_ras)
    img.set_sform(affine_ras, code=1)
    img.set_qform(affine_ras, code=1)
    img.header.set_xyzt_units("mm")
    output_path = Path(output_path)
    with atomic_path(output_path) as tmp:
        nib.save(img, str(tmp))
    return output_path


def save_labels_nifti(labels_ijk: np.ndarray, affine_ras: np.ndarray, output_path: str | Path) -> Path:
    """Save an integer label map: uint8, or uint16 when a label exceeds 255."""
    labels_ijk = np.asarray(labels_ijk)
    if labels_ijk.dtype != bool and not np.issubdtype(labels_ijk.dtype, np.integer):
        raise InputError(f"a label map must be integer, got {labels_ijk.dtype}")
    top = int(labels_ijk.max()) if labels_ijk.size else 0
    if labels_ijk.size and int(labels_ijk.min()) < 0:
        raise InputError("a label map cannot hold negative labels")
    return save_nifti(labels_ijk, affine_ras, output_path, dtype=np.uint8 if top < 256 else np.uint16)


def load_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI file as ``(array_ijk, affine_ras)`` (data scaled by scl_slope/inter when set;
    integer files without scaling keep their integer type)."""
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise InputError(f"not a readable NIfTI file: {exc}", str(path)) from exc
    # the array proxy holds scl_slope/inter (nibabel clears them in the loaded header)
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    if np.issubdtype(img.get_data_dtype(), np.integer) and slope == 1.0 and inter == 0.0:
        array = np.asarray(img.dataobj)
    else:
        array = img.get_fdata(dtype=np.float32)
    return array, np.asarray(img.affine, dtype=np.float64)
