"""NIfTI reading: scaled integer files give float32 values, unscaled integer files keep their type."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from app.io.nifti import load_nifti


def test_scl_slope_inter_applied_in_float32_and_plain_integers_kept(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    affine = np.diag([0.5, -0.7, 2.0, 1.0])
    scaled = nib.Nifti1Image(data, affine)
    scaled.header.set_slope_inter(2.0, -1.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "plain.nii.gz")

    arr, aff = load_nifti(tmp_path / "scaled.nii.gz")
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr, data * 2.0 - 1.0)
    np.testing.assert_allclose(aff, affine)
    arr, _ = load_nifti(tmp_path / "plain.nii.gz")
    assert arr.dtype == np.int16
    np.testing.assert_array_equal(arr, data)
