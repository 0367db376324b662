"""Siemens mosaics are unpacked into their slices (hostile input: read as one tiled 2D slice before)."""

from __future__ import annotations

import logging
import re
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import TEST_DATA
from dicom_phantoms import PATIENT_ID, csa_header, edit_file, write_mosaic

from app.errors import DicomError
from app.io.csa import CsaError, csa_floats, csa_image_header, parse_csa
from app.io.dicom_scan import scan, scan_folder
from app.io.dicom_series import read_series

MOSAIC_IN = TEST_DATA / "dicom_transfer_syntaxes" / "In"
MOSAIC_REF = TEST_DATA / "dicom_transfer_syntaxes" / "Ref" / "1.nii"


def _on_reference_grid(vol_array: np.ndarray, vol_affine_ras: np.ndarray, ref_affine: np.ndarray):
    """Our volume re-indexed onto the reference's voxel axes (permutation/flips only), and its affine."""
    ours = nib.orientations.io_orientation(vol_affine_ras)
    theirs = nib.orientations.io_orientation(ref_affine)
    transform = nib.orientations.ornt_transform(ours, theirs)
    array = nib.orientations.apply_orientation(vol_array, transform)
    affine = vol_affine_ras @ nib.orientations.inv_ornt_aff(transform, vol_array.shape)
    return array, affine


@pytest.mark.parametrize("n", range(1, 10))
def test_real_siemens_mosaic_equals_dcm2niix(n):
    """Each of the nine transfer syntaxes of the Trio mosaic gives dcm2niix's 64x64x35 volume."""
    ref = nib.load(MOSAIC_REF)
    vol = read_series(MOSAIC_IN / f"{n}.dcm")
    assert vol.shape == (64, 64, 35)
    array, affine = _on_reference_grid(vol.array, vol.affine_ras, ref.affine)
    np.testing.assert_array_equal(array, np.asarray(ref.dataobj).astype(np.float32))
    np.testing.assert_allclose(affine, ref.affine, atol=0.01)
    np.testing.assert_allclose(vol.spacing, [3.25, 3.25, 3.6], atol=1e-6)  # SpacingBetweenSlices, not 3 mm thickness
    assert vol.tile_numbers == list(range(1, 36))  # CSA normal along row x col: tiles in stored order


def test_real_mosaic_scan_lists_slices_not_one_image():
    series = scan_folder(MOSAIC_IN / "1.dcm")
    assert len(series) == 1
    s = series[0]
    assert s.mosaic and s.n_slices == 35 and (s.columns, s.rows) == (64, 64)
    assert "35 slice(s) (mosaic) | 64x64" in s.summary()


def test_csa_parser_agrees_with_nibabel():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel.nicom warns that its DICOM readers are experimental
        from nibabel.nicom import csareader
    ds = pydicom.dcmread(MOSAIC_IN / "1.dcm", stop_before_pixels=True)
    ours = parse_csa(csa_image_header(ds))
    theirs = csareader.get_csa_header(ds)["tags"]
    assert set(ours) == set(theirs) and len(ours) > 50
    for name, tag in theirs.items():
        items = [str(v) for v in tag["items"]]
        if tag["vr"] in ("FD", "FL", "DS", "IS", "SL", "UL", "US", "SS") and items:
            assert csa_floats(ours, name) == pytest.approx([float(v) for v in items]), name
        else:
            assert ours[name] == items, name
    assert csa_floats(ours, "NumberOfImagesInMosaic") == [35.0]


@pytest.mark.parametrize(
    "data", [b"", b"SV10", b"SV10\4\3\2\1" + b"\xff" * 8, b"XXXX" * 10, csa_header({"A": ["1"]})[:-3]]
)
def test_csa_parser_refuses_damage(data):
    with pytest.raises(CsaError):
        parse_csa(data)


@pytest.mark.parametrize("direction", [1, -1], ids=["csa_normal_along", "csa_normal_against"])
@pytest.mark.parametrize(
    "orientation", ["axial", "oblique", (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)], ids=["axial", "oblique", "sagittal"]
)
def test_synthetic_mosaic_with_csa(tmp_path, direction, orientation):
    info = write_mosaic(tmp_path, orientation=orientation, direction=direction)
    vol = read_series(tmp_path)
    assert vol.shape == (10, 12, 7)
    np.testing.assert_array_equal(vol.array, info.array_ijk)
    np.testing.assert_allclose(vol.affine_lps, info.affine_lps, atol=1e-4)
    # CSA normal against row x col: the last tile is the first slice along the normal.
    assert vol.tile_numbers == (list(range(1, 8)) if direction > 0 else list(range(7, 0, -1)))


def test_synthetic_mosaic_with_only_the_siemens_tag(tmp_path, caplog):
    info = write_mosaic(tmp_path, csa=False)
    with caplog.at_level(logging.WARNING, logger="app.io.mosaic"):
        vol = read_series(tmp_path)
    np.testing.assert_array_equal(vol.array, info.array_ijk)
    np.testing.assert_allclose(vol.affine_lps, info.affine_lps, atol=1e-4)
    assert "without a CSA SliceNormalVector" in caplog.text


def test_synthetic_mosaic_with_thickness_only(tmp_path, caplog):
    info = write_mosaic(tmp_path, spacing_attribute="SliceThickness")
    with caplog.at_level(logging.WARNING, logger="app.io.mosaic"):
        vol = read_series(tmp_path)
    np.testing.assert_allclose(vol.affine_lps, info.affine_lps, atol=1e-4)
    assert "slice spacing from SliceThickness" in caplog.text


def _refusal(folder) -> str:
    with pytest.raises(DicomError) as exc_info:
        read_series(folder)
    message = str(exc_info.value)
    assert "\n" not in message and PATIENT_ID not in message and "Doe" not in message
    return message


def test_mosaic_without_count_is_refused(tmp_path):
    write_mosaic(tmp_path, csa=False, siemens_tag=False)
    message = _refusal(tmp_path)
    assert re.fullmatch(
        r".*mosaic0001\.dcm: Siemens MOSAIC image without NumberOfImagesInMosaic \(no CSA image "
        r"header \(0029,1010\) value and no \(0019,100A\)\): cannot unpack its slices",
        message,
    ), message


def test_mosaic_counts_that_disagree_are_refused(tmp_path):
    write_mosaic(tmp_path, csa_count=9)
    assert "CSA NumberOfImagesInMosaic 9 disagrees with (0019,100A) 7" in _refusal(tmp_path)


def test_mosaic_that_does_not_divide_is_refused(tmp_path):
    write_mosaic(tmp_path, csa_count=16, siemens_tag=False)  # 4x4 grid of a 30x36 image
    assert "does not divide into a 4x4 grid of tiles (16 images" in _refusal(tmp_path)


def test_mosaic_with_damaged_csa_is_refused(tmp_path):
    info = write_mosaic(tmp_path)
    ds = pydicom.dcmread(info.files[0])
    ds.get_private_item(0x0029, 0x10, "SIEMENS CSA HEADER").value = b"SV10\4\3\2\1" + b"\x05" * 40
    ds.save_as(info.files[0])
    assert "damaged CSA image header (0029,1010)" in _refusal(tmp_path)


def test_mosaic_with_csa_normal_off_the_plane_is_refused(tmp_path):
    info = write_mosaic(tmp_path, orientation="axial")
    ds = pydicom.dcmread(info.files[0])
    ds.get_private_item(0x0029, 0x10, "SIEMENS CSA HEADER").value = csa_header(
        {"NumberOfImagesInMosaic": ["7"], "SliceNormalVector": ["0.0", "0.2", "0.98"]}
    )
    ds.save_as(info.files[0])
    assert "CSA SliceNormalVector [0.0, 0.2, 0.98] is not along the image plane's normal" in _refusal(tmp_path)


@pytest.mark.parametrize("value", ["0", "-3.6", "nan"])
def test_mosaic_with_bad_spacing_is_refused(tmp_path, value):
    info = write_mosaic(tmp_path)
    edit_file(info.files[0], SpacingBetweenSlices=value)
    assert f"SpacingBetweenSlices must be a finite positive spacing in mm, found '{value}'" in _refusal(tmp_path)


def test_fmri_mosaics_are_volumes_of_a_4d_series(tmp_path):
    info = write_mosaic(tmp_path, n_volumes=3, direction=-1)
    result = scan(tmp_path)
    keys = [s.key for s in result.series]
    assert keys == [f"{info.series_uid}#vol{v}" for v in (1, 2, 3)]
    assert all(s.n_slices == 7 and s.volume_attribute == "AcquisitionNumber" for s in result.series)
    with pytest.raises(
        DicomError,
        match=rf"series {info.series_uid} is 4D: 3 volume\(s\) \(by AcquisitionNumber\) of "
        rf"7 slice\(s\) each; .*--series-uid {info.series_uid}#volN \(series_uid=; "
        r"N = 1\.\.3\).*or --volume N \(volume=N\)",
    ):
        read_series(tmp_path, scan=result)
    for v in (1, 2, 3):
        vol = read_series(tmp_path, series_uid=f"{info.series_uid}#vol{v}", scan=result)
        np.testing.assert_array_equal(vol.array, info.array_ijk + 50 * (v - 1))
        np.testing.assert_allclose(vol.affine_lps, info.affine_lps, atol=1e-4)
        assert vol.source_files == [str(info.files[v - 1])] * 7
    vol = read_series(tmp_path, volume=2, scan=result)
    np.testing.assert_array_equal(vol.array, info.array_ijk + 50)


def test_seg_and_rtstruct_of_a_mosaic_are_refused_in_one_line(real_data, tmp_path):
    from app.errors import DicomError
    from app.io.rtstruct import write_rtstruct
    from app.io.seg_write import write_seg
    from app.io.segments import SegmentSpec

    vol = read_series(real_data / "dicom_transfer_syntaxes" / "In" / "1.dcm")
    labels = (vol.array > vol.array.mean()).astype(np.uint8)
    with pytest.raises(DicomError, match="Siemens mosaic.*--format nifti"):
        write_seg(vol, labels, [SegmentSpec(1, "x")], ("t", "1"), tmp_path / "s.dcm")
    with pytest.raises(DicomError, match="Siemens mosaic"):
        write_rtstruct(vol, labels, {1: "x"}, tmp_path / "r.dcm")
    assert not list(tmp_path.iterdir())
