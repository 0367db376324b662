"""Hostile NIfTI headers: each is refused by ``inspect_nifti`` / ``load_nifti`` with one exact line naming the
file, before any voxel is allocated; honest files (gzip with several members included) still load."""

from __future__ import annotations

import gzip
import os
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from nifti_mutations import BASE_SHAPE, base_array, base_image, nifti_bytes, oblique_affine

from app.errors import EnvError, InputError
from app.io.nifti import inspect_nifti, load_nifti

SFORM = "the voxel-to-world affine from the sform (srow_x/y/z)"


def _write(tmp_path, name, edits=(), gz=False, cut=None, img=None):
    p = tmp_path / name
    p.write_bytes(nifti_bytes(img if img is not None else base_image(), edits, gz, cut))
    return p


def _refused(path, error=InputError) -> str:
    with pytest.raises(error) as info:
        load_nifti(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    return msg[len(f"{path}: ") :]


def test_the_base_file_loads_on_its_grid(tmp_path):
    for gz in (False, True):
        p = _write(tmp_path, "ok.nii.gz" if gz else "ok.nii", gz=gz)
        arr, aff = load_nifti(p)
        np.testing.assert_array_equal(arr, base_array())
        np.testing.assert_allclose(aff, oblique_affine(), atol=1e-5)
        info = inspect_nifti(p)
        assert info.shape == BASE_SHAPE and info.affine_source == "sform" and info.compressed == gz


@pytest.mark.parametrize(
    ("name", "edits", "message"),
    [
        (
            "2d.nii",
            [("dim", 0, 2)],
            "a 2D image (shape (11, 9)); segapp segments 3D volumes",
        ),
        (
            "zero_axis.nii",
            [("dim", 2, 0)],
            "the header declares an axis of length zero or less (shape (11, 0, 7))",
        ),
        (
            "negative_axis.nii",
            [("dim", 3, -7)],
            "the header declares an axis of length zero or less (shape (11, 9, -7))",
        ),
        (
            "5d.nii",
            [("dim", 0, 5), ("dim", 4, 1), ("dim", 5, 2)],
            "a 5D image (shape (11, 9, 7, 1, 2)); segapp reads 3D volumes (or 4D with one)",
        ),
        (
            "complex.nii",
            [("datatype", 0, 32), ("bitpix", 0, 64), ("dim", 3, 1)],
            "voxel type complex64 is not supported (integer or real voxels only)",
        ),
        (
            "rgb.nii",
            [("datatype", 0, 128), ("bitpix", 0, 24), ("dim", 3, 1)],
            "voxel type RGB is not supported (integer or real voxels only)",
        ),
        (
            "nan_sform.nii",
            [("srow_y", 1, float("nan"))],
            f"{SFORM} holds NaN or Inf",
        ),
        (
            "inf_sform.nii",
            [("srow_z", 3, float("inf"))],
            f"{SFORM} holds NaN or Inf",
        ),
        (
            "singular_sform.nii",  # the third voxel axis along the first
            [("srow_x", 2, 1.0), ("srow_y", 2, 0.0), ("srow_z", 2, 0.0), ("srow_x", 0, 1.0)]
            + [("srow_y", 0, 0.0), ("srow_z", 0, 0.0)],
            f"{SFORM} is singular (voxel size 1, 0.9, 1 mm; its axes do not span 3D)",
        ),
        (
            "nan_pixdim.nii",  # no sform or qform: nibabel's affine from pixdim (it sets a 0 to 1, not a NaN)
            [("sform_code", 0, 0), ("qform_code", 0, 0), ("pixdim", 2, float("nan"))],
            "the voxel-to-world affine from pixdim (no sform or qform code) holds NaN or Inf",
        ),
        (
            "nan_quaternion.nii",
            [("sform_code", 0, 0), ("quatern", 1, float("nan"))],
            "the voxel-to-world affine from the qform (quatern_*, qoffset_*, pixdim) holds NaN or Inf",
        ),
        (
            "huge_voxels.nii",
            [("srow_x", 0, 1e5), ("srow_y", 0, 0.0), ("srow_z", 0, 0.0)],
            "implausible voxel size 1e+05, 0.9, 2.1 mm from the sform (srow_x/y/z) (expected 0.0001 to 10000 mm)",
        ),
        (
            "bad_datatype.nii",
            [("datatype", 0, 1234)],
            "not a readable NIfTI file (data code 1234 not recognized)",
        ),
        (
            "inf_intercept.nii",
            [("scl_slope", 0, 2.0), ("scl_inter", 0, float("inf"))],
            "not a readable NIfTI file (Valid slope but invalid intercept inf)",
        ),
        (
            "bad_magic.nii",
            [("magic", 0, b"xxxx")],
            None,  # nibabel's words: checked by prefix below
        ),
    ],
)
def test_malformed_header_is_one_exact_line(tmp_path, name, edits, message):
    p = _write(tmp_path, name, edits)
    got = _refused(p)
    if message is None:
        assert got.startswith("not a readable NIfTI file (Cannot work out file type of")
    else:
        assert got == message


def test_30000_cubed_voxels_in_a_400_byte_file_is_refused_without_allocating(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    raw = bytearray(nifti_bytes(img, [("dim", i, 30000) for i in (1, 2, 3)]))
    raw += b"\0" * (400 - len(raw))
    p = tmp_path / "huge.nii"
    p.write_bytes(bytes(raw[:400]))
    tracemalloc.start()
    try:
        got = _refused(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == (
        "the header declares 30000 x 30000 x 30000 voxels of int16 (54.0 TB from byte 352) but the file has "
        "400 bytes (truncated, or a wrong header)"
    )
    assert peak < 50_000_000  # nothing near the declared size was allocated

    gz = tmp_path / "huge.nii.gz"
    gz.write_bytes(gzip.compress(bytes(raw[:400])))
    size = os.path.getsize(gz)
    assert _refused(gz) == (
        "the header declares 30000 x 30000 x 30000 voxels of int16 (54.0 TB from byte 352), more than a "
        f"{size} bytes gzip file can hold (truncated, or a wrong header)"
    )


def test_uncompressed_file_cut_short_or_pointing_past_its_end(tmp_path):
    full = len(nifti_bytes(base_image()))
    p = _write(tmp_path, "cut.nii", cut=0.7)
    assert _refused(p) == (
        f"the header declares 11 x 9 x 7 voxels of int16 (1.4 kB from byte 352) but the file has {int(full * 0.7)} "
        "bytes (truncated, or a wrong header)"
    )
    p = _write(tmp_path, "offset.nii", [("vox_offset", 0, 1e6)])
    assert _refused(p) == (
        f"the header declares 11 x 9 x 7 voxels of int16 (1.4 kB from byte 1000000) but the file has {full} "
        "bytes (truncated, or a wrong header)"
    )


def test_truncated_gzip_is_named_before_nibabel_reads_it(tmp_path):
    p = _write(tmp_path, "cut.nii.gz", gz=True, cut=0.6)
    assert _refused(p) == (
        "truncated or corrupt gzip file (Compressed file ended before the end-of-stream marker was reached)"
    )


def test_complete_gzip_of_a_short_file_is_refused(tmp_path):
    raw = nifti_bytes(base_image())
    p = tmp_path / "short.nii.gz"
    p.write_bytes(gzip.compress(raw[:-500]))  # a valid gzip stream, 500 bytes of voxels missing
    assert _refused(p) == (
        f"the header declares 11 x 9 x 7 voxels of int16 (1.4 kB from byte 352) but the file decompresses to "
        f"{len(raw) - 500} bytes (truncated, or a wrong header)"
    )


def test_multi_member_gzip_is_not_refused(tmp_path):
    raw = nifti_bytes(base_image())
    p = tmp_path / "members.nii.gz"
    p.write_bytes(gzip.compress(raw[:700]) + gzip.compress(raw[700:]))  # as bgzip and concatenation write
    arr, _ = load_nifti(p)
    np.testing.assert_array_equal(arr, base_array())


def test_not_a_nifti_file(tmp_path):
    p = tmp_path / "notes.nii.gz"
    p.write_text("not an image")
    assert _refused(p) == "not a gzip file, though its name ends in .gz (Not a gzipped file (b'no'))"
    p = tmp_path / "notes.nii"
    p.write_text("not an image")
    assert _refused(p).startswith("not a readable NIfTI file (")
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    assert _refused(empty).startswith("not a readable NIfTI file (")


def test_memory_budget_is_checked_before_loading(tmp_path):
    p = _write(tmp_path, "ok.nii")
    with pytest.raises(EnvError) as info:
        load_nifti(p, max_bytes=999)
    assert str(info.value) == (
        f"{p}: 11 x 9 x 7 voxels need 2.8 kB in memory as float32, more than the 999 bytes allowed "
        "(free memory, or SEGAPP_MEMORY_LIMIT)"
    )
    assert info.value.exit_code == 4
