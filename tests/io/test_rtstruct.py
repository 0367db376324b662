"""RT Structure Set writing: contours on the source slice planes that enclose exactly the label's
voxel centres, references to the source series, dciodvfy-clean."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_phantoms import write_enhanced_multiframe, write_phantom_series
from dicom_validation import assert_dciodvfy_clean
from skimage.measure import points_in_poly

from app.errors import InputError
from app.io.dicom_series import read_series
from app.io.geometry import world_to_voxel
from app.io.rtstruct import mask_to_contours_ij, write_rtstruct

ROIS = {1: "box", 2: "sphere", 3: "bar", 4: "not segmented"}


def _rasterise_even_odd(contours_ij: list[np.ndarray], shape_ij) -> np.ndarray:
    """Voxel centres inside an odd number of contours (how viewers fill nested CLOSED_PLANAR)."""
    ii, jj = np.meshgrid(np.arange(shape_ij[0]), np.arange(shape_ij[1]), indexing="ij")
    centres = np.column_stack([ii.ravel(), jj.ravel()]).astype(np.float64)
    inside = np.zeros(len(centres), dtype=bool)
    for c in contours_ij:
        inside ^= points_in_poly(centres, c)
    return inside.reshape(shape_ij)


def test_mask_to_contours_with_hole_and_diagonal_touch():
    mask = np.zeros((9, 8), dtype=bool)
    mask[1:7, 1:6] = True
    mask[3:5, 2:4] = False  # a hole
    mask[7, 6] = True  # touches the block only diagonally
    contours = mask_to_contours_ij(mask)
    assert len(contours) == 3
    np.testing.assert_array_equal(_rasterise_even_odd(contours, mask.shape), mask)
    assert all(not np.allclose(c[0], c[-1]) for c in contours)  # closing point not repeated


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_contours_on_slices_enclose_label(tmp_path, orientation):
    info = write_phantom_series(tmp_path / "ct", orientation=orientation, reverse_file_order=True)
    vol = read_series(tmp_path / "ct")
    out = write_rtstruct(vol, info.mask_ijk, ROIS, tmp_path / "rt.dcm", algorithm=("bundle", "1.0"))
    assert_dciodvfy_clean(out)
    ds = pydicom.dcmread(out)
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == info.study_uid
    for_ref = ds.ReferencedFrameOfReferenceSequence[0]
    assert for_ref.FrameOfReferenceUID == info.frame_of_reference_uid
    series_ref = for_ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == info.series_uid
    assert {c.ReferencedSOPInstanceUID for c in series_ref.ContourImageSequence} == set(info.sop_instance_uids)

    sop_to_k = {uid: k for k, uid in enumerate(str(d.SOPInstanceUID) for d in vol.datasets)}
    names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    label_of = {name: value for value, name in ROIS.items()}
    for roi in ds.ROIContourSequence:
        value = label_of[names[roi.ReferencedROINumber]]
        per_slice: dict[int, list[np.ndarray]] = {}
        for contour in roi.get("ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            xyz = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            assert len(xyz) == int(contour.NumberOfContourPoints)
            k = sop_to_k[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            ijk = world_to_voxel(info.affine_lps, xyz)
            np.testing.assert_allclose(ijk[:, 2], k, atol=1e-3)  # on the referenced slice's plane
            per_slice.setdefault(k, []).append(ijk[:, :2])
        mask = info.mask_ijk == value
        assert sorted(per_slice) == np.flatnonzero(mask.any(axis=(0, 1))).tolist()
        for k, contours in per_slice.items():
            np.testing.assert_array_equal(_rasterise_even_odd(contours, mask.shape[:2]), mask[:, :, k])
    empty = [r for r in ds.ROIContourSequence if names[r.ReferencedROINumber] == "not segmented"]
    assert len(empty) == 1 and "ContourSequence" not in empty[0]


def test_multiframe_source_references_frames(tmp_path):
    info = write_enhanced_multiframe(tmp_path / "mf" / "ct.dcm", reverse_frame_order=True)
    vol = read_series(tmp_path / "mf")
    out = write_rtstruct(vol, info.mask_ijk, {1: "box", 2: "sphere", 3: "bar"}, tmp_path / "rt.dcm")
    assert_dciodvfy_clean(out)
    ds = pydicom.dcmread(out)
    nk = info.mask_ijk.shape[2]
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            ref = contour.ContourImageSequence[0]
            assert ref.ReferencedSOPInstanceUID == info.sop_instance_uids[0]
            k_from_frame = nk - int(ref.ReferencedFrameNumber)  # frames stored last slice first
            z = world_to_voxel(info.affine_lps, np.asarray([float(v) for v in contour.ContourData[:3]]))[2]
            assert abs(z - k_from_frame) < 1e-3


def test_rtstruct_errors(tmp_path):
    info = write_phantom_series(tmp_path / "ct", shape=(16, 12, 6))
    vol = read_series(tmp_path / "ct")
    with pytest.raises(InputError, match=r"\[3\]"):
        write_rtstruct(vol, info.mask_ijk, {1: "box", 2: "sphere"}, tmp_path / "rt.dcm")
    with pytest.raises(InputError, match="shape"):
        write_rtstruct(vol, info.mask_ijk[:, :, :2], ROIS, tmp_path / "rt.dcm")
    assert not (tmp_path / "rt.dcm").exists()
