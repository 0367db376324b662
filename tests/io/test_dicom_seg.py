"""DICOM SEG writing and reading back: geometry round trips on phantoms, UID edge cases, errors.
Reading SEGs of other writers: tests/io/test_seg_read.py; the fast engine vs highdicom: tests/io/test_seg_fast.py."""

from __future__ import annotations

import time

import numpy as np
import pydicom
import pytest
from dicom_phantoms import edit_file, write_enhanced_multiframe, write_phantom_series
from dicom_validation import assert_dciodvfy_clean

from app.errors import ConfigError, DicomError, InputError
from app.io.dicom_series import read_series
from app.io.seg_read import read_seg
from app.io.seg_write import write_seg
from app.io.segments import SegmentSpec
from app.io.volume import SeriesVolume

SPECS = [
    SegmentSpec(1, "box", type_code=("10200004", "SCT", "Liver")),
    SegmentSpec(2, "sphere", type_code=("78961009", "SCT", "Spleen"), color_rgb=(0, 200, 0)),
    SegmentSpec(3, "bar", type_code=("64033007", "SCT", "Kidney")),
]
ALGO = ("phantom_bundle", "0.1.0")


def threshold_model(image_ijk: np.ndarray) -> np.ndarray:
    """A trivial 'model': the phantom's objects sit on value plateaus (see dicom_phantoms)."""
    return ((image_ijk > -800).astype(np.uint8) + (image_ijk > -400) + (image_ijk > 0)).astype(np.uint8)


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_geometry_round_trip(tmp_path, orientation):
    info = write_phantom_series(tmp_path / "ct", orientation=orientation, reverse_file_order=True)
    vol = read_series(tmp_path / "ct")
    labels = threshold_model(vol.array)
    np.testing.assert_array_equal(labels, info.mask_ijk)  # the 'model' is right, so the SEG must be too
    out = write_seg(vol, labels, SPECS, ALGO, tmp_path / "out" / "seg.dcm")
    assert_dciodvfy_clean(out)

    back, affine = read_seg(out, tmp_path / "ct")
    np.testing.assert_array_equal(back, info.mask_ijk)
    np.testing.assert_allclose(affine, info.affine_lps, atol=1e-4)
    back_vol, _ = read_seg(out, vol)
    np.testing.assert_array_equal(back_vol, info.mask_ijk)

    seg = pydicom.dcmread(out)
    src = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in info.files}
    assert seg.StudyInstanceUID == info.study_uid
    assert seg.FrameOfReferenceUID == info.frame_of_reference_uid
    assert seg.SeriesInstanceUID != info.series_uid
    assert seg.SegmentationType == "BINARY"
    refs = seg.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == info.series_uid
    assert {r.ReferencedSOPInstanceUID for r in refs.ReferencedInstanceSequence} == set(src)
    n_frames_expected = sum(
        int((info.mask_ijk[:, :, k] == s.label_value).any()) for s in SPECS for k in range(info.mask_ijk.shape[2])
    )
    assert int(seg.NumberOfFrames) == n_frames_expected  # empty frames omitted
    for item in seg.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in src[uid].ImagePositionPatient],
            atol=1e-6,
        )
    codes = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert codes == {"box": "10200004", "sphere": "78961009", "bar": "64033007"}
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ALGO
    assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"


def test_enhanced_multiframe_source_frames_referenced(tmp_path):
    info = write_enhanced_multiframe(tmp_path / "mf" / "ct.dcm", orientation="oblique", reverse_frame_order=True)
    vol = read_series(tmp_path / "mf")
    out = write_seg(vol, info.mask_ijk, SPECS, ALGO, tmp_path / "seg.dcm")
    assert_dciodvfy_clean(out)
    seg = pydicom.dcmread(out)
    src = pydicom.dcmread(info.files[0])
    nk = info.mask_ijk.shape[2]
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == info.sop_instance_uids[0]
        # frames are stored from the last slice down: source frame f holds slice k = nk - f
        src_ipp = (
            src.PerFrameFunctionalGroupsSequence[int(ref.ReferencedFrameNumber) - 1]
            .PlanePositionSequence[0]
            .ImagePositionPatient
        )
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in src_ipp],
            atol=1e-6,
        )
        k = nk - int(ref.ReferencedFrameNumber)
        seg_no = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        assert (info.mask_ijk[:, :, k] == seg_no).any()
    back, _ = read_seg(out, tmp_path / "mf")
    np.testing.assert_array_equal(back, info.mask_ijk)


def test_label_values_map_to_segment_numbers_and_back(tmp_path):
    info = write_phantom_series(tmp_path / "ct")
    vol = read_series(tmp_path / "ct")
    labels = np.where(info.mask_ijk == 1, 7, np.where(info.mask_ijk == 2, 300, 0)).astype(np.uint16)
    specs = [SegmentSpec(300, "sphere"), SegmentSpec(7, "box"), SegmentSpec(9, "absent")]
    out = write_seg(vol, labels, specs, ALGO, tmp_path / "seg.dcm")
    assert_dciodvfy_clean(out)
    seg = pydicom.dcmread(out)
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [
        (1, "box"),
        (2, "absent"),
        (3, "sphere"),
    ]
    back, _ = read_seg(out, vol, segments=specs)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels)
    numbered, _ = read_seg(out, vol)  # without specs: label = segment number
    np.testing.assert_array_equal(numbered, np.where(labels == 7, 1, np.where(labels == 300, 3, 0)))


def test_labelmap_segmentation_type(tmp_path):
    info = write_phantom_series(tmp_path / "ct", orientation="coronal")
    vol = read_series(tmp_path / "ct")
    out = write_seg(vol, info.mask_ijk, SPECS, ALGO, tmp_path / "seg.dcm", segmentation_type="LABELMAP")
    seg = pydicom.dcmread(out)
    assert seg.SegmentationType == "LABELMAP"
    back, _ = read_seg(out, vol)
    np.testing.assert_array_equal(back, info.mask_ijk)


def test_blank_sop_uids_fall_back_to_file_meta(tmp_path):
    info = write_phantom_series(tmp_path / "ct", shape=(16, 12, 6))
    for f in info.files:
        edit_file(f, SOPInstanceUID="", SOPClassUID="")
    vol = read_series(tmp_path / "ct")
    out = write_seg(vol, info.mask_ijk, SPECS, ALGO, tmp_path / "seg.dcm")
    seg = pydicom.dcmread(out)
    refs = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(info.sop_instance_uids)
    assert all(str(d.SOPInstanceUID) == "" for d in vol.datasets)  # caller's headers untouched
    back, _ = read_seg(out, vol)
    np.testing.assert_array_equal(back, info.mask_ijk)


def test_blank_study_uid_refused_unless_allowed(tmp_path):
    info = write_phantom_series(tmp_path / "ct", shape=(16, 12, 6))
    for f in info.files:
        edit_file(f, StudyInstanceUID="")
    vol = read_series(tmp_path / "ct")
    with pytest.raises(DicomError, match="blank StudyInstanceUID"):
        write_seg(vol, info.mask_ijk, SPECS, ALGO, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()
    out = write_seg(vol, info.mask_ijk, SPECS, ALGO, tmp_path / "seg.dcm", allow_generated_uids=True)
    again = write_seg(vol, info.mask_ijk, SPECS, ALGO, tmp_path / "seg2.dcm", allow_generated_uids=True)
    uid = pydicom.dcmread(out).StudyInstanceUID
    assert uid and uid == pydicom.dcmread(again).StudyInstanceUID  # derived, so stable


def test_write_errors(tmp_path):
    info = write_phantom_series(tmp_path / "ct", shape=(16, 12, 6))
    vol = read_series(tmp_path / "ct")
    with pytest.raises(InputError, match=r"label values \[3\]"):
        write_seg(vol, info.mask_ijk, SPECS[:2], ALGO, tmp_path / "a.dcm")
    with pytest.raises(InputError, match="shape"):
        write_seg(vol, info.mask_ijk[:, :, :3], SPECS, ALGO, tmp_path / "a.dcm")
    with pytest.raises(ConfigError, match="unique"):
        write_seg(vol, info.mask_ijk, SPECS + [SegmentSpec(1, "dup")], ALGO, tmp_path / "a.dcm")
    with pytest.raises(ConfigError):
        write_seg(
            vol, info.mask_ijk, [SegmentSpec(1, "x", type_code=("1", "SCT"))] + SPECS[1:], ALGO, tmp_path / "a.dcm"
        )
    shifted = SeriesVolume(vol.array, vol.affine_lps @ np.diag([1, 1, -1, 1.0]), vol.datasets, vol.frame_numbers)
    with pytest.raises(InputError, match="no longer matches"):
        write_seg(shifted, info.mask_ijk, SPECS, ALGO, tmp_path / "a.dcm")
    assert not (tmp_path / "a.dcm").exists()
    with pytest.raises(ConfigError):
        SegmentSpec.from_dict({"label_name": "no value"})
    assert SegmentSpec.from_dict({"label_value": 4, "label_name": "x", "type_code": ["1", "SCT", "X"]}).type_code == (
        "1",
        "SCT",
        "X",
    )


def test_read_errors(tmp_path):
    info = write_phantom_series(tmp_path / "ct", shape=(16, 12, 6))
    with pytest.raises(DicomError, match="not a DICOM SEG"):
        read_seg(info.files[0], tmp_path / "ct")
    # same frame of reference, other spacing: the frames' positions are off its grid
    other = write_phantom_series(
        tmp_path / "other",
        shape=(16, 12, 6),
        spacing=(1.0, 1.0, 2.0),
        frame_of_reference_uid=info.frame_of_reference_uid,
    )
    vol = read_series(tmp_path / "ct")
    out = write_seg(vol, info.mask_ijk, SPECS, ALGO, tmp_path / "seg.dcm")
    with pytest.raises(DicomError, match="does not lie on the reference grid"):
        read_seg(out, read_series(tmp_path / "other"))
    assert other.files  # the other series exists and was read
    # another frame of reference: positions mean nothing there and no frame references its slices
    write_phantom_series(tmp_path / "unrelated", shape=(16, 12, 6))
    with pytest.raises(DicomError, match="Frame of Reference differs"):
        read_seg(out, read_series(tmp_path / "unrelated"))
    with pytest.raises(ConfigError, match="overlap"):
        read_seg(out, vol, overlap="max")
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(DicomError):
        read_seg(tmp_path / "junk.dcm", None)


@pytest.mark.slow
def test_write_speed_512x512x300(tmp_path):
    """Issue 5 size: 512 x 512 x 300 with three labels over ~60 slices (headers only)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage, generate_uid

    study, series, frame_ref = generate_uid(), generate_uid(), generate_uid()
    headers = []
    for k in range(300):
        d = Dataset()
        d.SOPClassUID, d.SOPInstanceUID = CTImageStorage, generate_uid()
        d.StudyInstanceUID, d.SeriesInstanceUID, d.FrameOfReferenceUID = study, series, frame_ref
        d.PatientName, d.PatientID, d.Modality = "Test^Speed", "P", "CT"
        d.StudyDate, d.StudyTime, d.StudyID, d.AccessionNumber, d.ReferringPhysicianName = (
            "20240101",
            "000000",
            "1",
            "",
            "",
        )
        d.PatientBirthDate, d.PatientSex = "", ""
        d.Rows = d.Columns = 512
        d.PixelSpacing, d.SliceThickness = [0.8, 0.8], 1.0
        d.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        d.ImagePositionPatient = [-200, -200, -300 + k]
        headers.append(d)
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    affine[:3, 3] = [-200, -200, -300]
    vol = SeriesVolume(np.zeros((512, 512, 300), np.float32), affine, headers, [1] * 300)
    labels = np.zeros(vol.shape, np.uint8)
    labels[100:250, 100:300, 100:160] = 1
    labels[260:400, 150:350, 110:170] = 2
    labels[50:90, 300:450, 120:150] = 3
    t0 = time.perf_counter()
    out = write_seg(vol, labels, SPECS, ALGO, tmp_path / "big.dcm")
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    back, _ = read_seg(out, vol)
    read_s = time.perf_counter() - t0
    print(f"write_seg {write_s:.2f} s, read_seg {read_s:.2f} s")
    assert int(pydicom.dcmread(out, stop_before_pixels=True).NumberOfFrames) == 60 + 60 + 30
    np.testing.assert_array_equal(back, labels)
    assert write_s < 60 and read_s < 60  # generous: catches pathological slow paths only


def test_laterality_modifier_is_written_in_the_property_type(tmp_path):
    info = write_phantom_series(tmp_path / "ct", shape=(16, 16, 8))
    vol = read_series(tmp_path / "ct")
    specs = [
        SegmentSpec(
            1, "kidney_left", type_code=("64033007", "SCT", "Kidney"), type_modifier_code=("7771000", "SCT", "Left")
        ),
        SegmentSpec(2, "sphere"),
        SegmentSpec(3, "bar"),
    ]
    path = write_seg(vol, info.mask_ijk, specs, ("t", "1"), tmp_path / "s.dcm")
    assert_dciodvfy_clean(path)
    seg = pydicom.dcmread(path)
    first, second = seg.SegmentSequence[0], seg.SegmentSequence[1]
    (modifier,) = first.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
    assert (modifier.CodeValue, modifier.CodingSchemeDesignator, modifier.CodeMeaning) == ("7771000", "SCT", "Left")
    assert "SegmentedPropertyTypeModifierCodeSequence" not in second.SegmentedPropertyTypeCodeSequence[0]
    assert second.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert SegmentSpec.from_dict(
        {"label_value": 1, "label_name": "x", "type_modifier_code": ["24028007", "SCT", "Right"]}
    ).type_modifier_code == ("24028007", "SCT", "Right")
