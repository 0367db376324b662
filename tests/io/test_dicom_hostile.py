"""Hostile input (issue "Hostile input and faults"): each case gives exactly the behaviour asserted here.

Mosaics are in ``test_mosaic.py``; the fuzzing properties in ``test_dicom_fuzz.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_phantoms import (
    PATIENT_ID,
    PATIENT_NAME,
    edit_file,
    write_enhanced_multiframe,
    write_phantom_series,
)
from pydicom.uid import JPEG2000Lossless, generate_uid

from app.errors import ConfigError, DicomError
from app.io.dicom_scan import describe_series, list_series, scan, select_series
from app.io.dicom_series import read_series

SHAPE = (8, 8, 6)


def _refused(path, **kwargs) -> str:
    """The one-line DicomError message read_series gives (first line for listings); no patient data."""
    with pytest.raises(DicomError) as exc_info:
        read_series(path, **kwargs)
    message = str(exc_info.value)
    for secret in (PATIENT_NAME, "Doe", "Jane", PATIENT_ID):
        assert secret not in message
    return message


# --------------------------------------------------------------------------- 2. frame counts


def test_enhanced_number_of_frames_below_functional_groups_and_pixels(tmp_path):
    write_enhanced_multiframe(tmp_path / "mf.dcm", shape=(8, 8, 16))
    edit_file(tmp_path / "mf.dcm", NumberOfFrames=12)
    message = _refused(tmp_path)
    assert message == (
        f"{tmp_path / 'mf.dcm'}: NumberOfFrames is 12 but the per-frame functional groups describe 16 "
        "frame(s) and the pixel data holds 16 frame(s): refusing to guess which is right"
    )


def test_enhanced_pixel_data_with_fewer_frames(tmp_path):
    write_enhanced_multiframe(tmp_path / "mf.dcm", shape=(8, 8, 16))
    ds = pydicom.dcmread(tmp_path / "mf.dcm")
    ds.PixelData = ds.PixelData[: 8 * 8 * 2 * 12]
    ds.save_as(tmp_path / "mf.dcm")
    assert _refused(tmp_path).endswith(
        "mf.dcm: NumberOfFrames is 16 but the per-frame functional groups describe 16 "
        "frame(s) and the pixel data holds 12 frame(s): refusing to guess which is right"
    )


def test_enhanced_jpeg2000_frame_count_from_offset_table(tmp_path):
    write_enhanced_multiframe(tmp_path / "mf.dcm", shape=(40, 36, 6), transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(tmp_path / "mf.dcm")
    ds.NumberOfFrames = 5
    del ds.PerFrameFunctionalGroupsSequence[5]
    ds.save_as(tmp_path / "mf.dcm")
    assert (
        "NumberOfFrames is 5 but the per-frame functional groups describe 5 frame(s) and the pixel data holds 6"
        in _refused(tmp_path)
    )


# --------------------------------------------------------------------------- 3. several patients / studies


def _two_studies(tmp_path: Path, same_patient: bool = False, same_study: bool = False):
    a = write_phantom_series(
        tmp_path / "a", shape=(8, 8, 10), modality="MR", rescale=(1.0, 0.0), series_description="T1 sag"
    )
    b = write_phantom_series(
        tmp_path / "b",
        shape=(8, 8, 6),
        modality="MR",
        rescale=(1.0, 0.0),
        series_description="FLAIR",
        study_uid=a.study_uid if same_study else None,
        patient_name=PATIENT_NAME if same_patient else "Roe^Richard",
        patient_id=PATIENT_ID if same_patient else "PID-99999",
    )
    return a, b


def test_two_patients_two_studies_are_refused_with_a_listing(tmp_path):
    a, b = _two_studies(tmp_path)
    message = _refused(tmp_path)
    first, *listing = message.splitlines()
    assert first == (
        f"{tmp_path}: the folder holds image series of 2 studies and 2 patients: refusing to pick one; "
        "pass --study-uid (study_uid=) or --series-uid (series_uid=) to choose; choices:"
    )
    text = "\n".join(listing)
    assert f"study {a.study_uid} (1 series):" in text and f"study {b.study_uid} (1 series):" in text
    assert f"{a.series_uid} | MR | 'T1 sag' | 10 slice(s) | 8x8 | axial" in text
    assert f"{b.series_uid} | MR | 'FLAIR' | 6 slice(s) | 8x8 | axial" in text
    assert "Roe" not in message and "PID-99999" not in message
    # Either UID chooses.
    assert read_series(tmp_path, study_uid=b.study_uid).series_instance_uid == b.series_uid
    assert read_series(tmp_path, series_uid=b.series_uid).series_instance_uid == b.series_uid
    assert "Roe" not in read_series(tmp_path, study_uid=a.study_uid).selection_reason


def test_one_patient_two_studies_is_refused(tmp_path):
    _two_studies(tmp_path, same_patient=True)
    assert "the folder holds image series of 2 studies: refusing to pick one" in _refused(tmp_path)


def test_two_patients_in_one_study_is_refused_even_with_the_study(tmp_path):
    a, b = _two_studies(tmp_path, same_study=True)
    assert "the folder holds image series of 2 patients" in _refused(tmp_path)
    message = _refused(tmp_path, study_uid=a.study_uid)
    assert message.splitlines()[0].endswith(
        f"study {a.study_uid} holds image series of 2 patients: refusing to pick "
        "one; pass --series-uid (series_uid=) to choose; choices:"
    )
    assert read_series(tmp_path, series_uid=b.series_uid).shape == (8, 8, 6)


def test_unknown_study_uid_lists_what_is_there(tmp_path):
    _a, _ = _two_studies(tmp_path)
    assert _refused(tmp_path, study_uid="1.2.3").startswith(f"{tmp_path}: no series in study 1.2.3; available series:")


def test_list_series_rows_carry_no_patient_data(tmp_path):
    a, b = _two_studies(tmp_path)
    rows = list_series(scan(tmp_path).series)
    assert [(r["study_uid"], r["key"], r["modality"], r["description"], r["n_slices"]) for r in rows] == sorted(
        [(a.study_uid, a.series_uid, "MR", "T1 sag", 10), (b.study_uid, b.series_uid, "MR", "FLAIR", 6)]
    )
    assert PATIENT_ID not in repr(rows) and "Doe" not in repr(rows) and "PID-99999" not in repr(rows)


# --------------------------------------------------------------------------- 4. spacings, affines, values


def _one_bad(tmp_path, **attrs) -> str:
    info = write_phantom_series(tmp_path, shape=SHAPE)
    edit_file(info.files[2], **attrs)
    return _refused(tmp_path)


@pytest.mark.parametrize("value,shown", [(["-0.9", "0.8"], r"\[-0\.9, 0\.8\]"), (["0.9", "0"], r"\[0\.9, 0\.0\]")])
def test_non_positive_pixel_spacing(tmp_path, value, shown):
    message = _one_bad(tmp_path, PixelSpacing=value)
    assert re.fullmatch(rf".*slice0003\.dcm: PixelSpacing must be two positive spacings in mm, found {shown}", message)


def test_nan_pixel_spacing(tmp_path):
    message = _one_bad(tmp_path, PixelSpacing=["nan", "0.8"])
    assert re.fullmatch(r".*slice0003\.dcm: PixelSpacing must hold 2 finite numbers, found \[nan, 0\.8\]", message), (
        message
    )


@pytest.mark.parametrize("name", ["RescaleSlope", "RescaleIntercept"])
def test_non_finite_rescale(tmp_path, name):
    assert re.fullmatch(
        rf".*slice0003\.dcm: {name} must be a finite number, found 'inf'", _one_bad(tmp_path, **{name: "inf"})
    )


@pytest.mark.parametrize("name", ["SliceThickness", "SpacingBetweenSlices"])
@pytest.mark.parametrize("value", ["0", "-2.5", "nan"])
def test_bad_slice_spacing_of_a_single_slice(tmp_path, name, value):
    info = write_phantom_series(tmp_path, shape=SHAPE)
    for f in info.files[1:]:
        f.unlink()
    edit_file(info.files[0], **{name: value})
    message = _refused(tmp_path)
    assert re.fullmatch(
        rf".*slice0001\.dcm: {name} must be a finite positive slice spacing in mm, found '{value}'", message
    ), message


def test_bad_slice_thickness_is_harmless_when_positions_give_the_spacing(tmp_path):
    info = write_phantom_series(tmp_path, shape=SHAPE)
    for f in info.files:
        edit_file(f, SliceThickness="-1")
    np.testing.assert_allclose(read_series(tmp_path).affine_lps, info.affine_lps, atol=1e-4)


def test_singular_affine(tmp_path):
    info = write_phantom_series(tmp_path, shape=SHAPE)
    for f in info.files:
        edit_file(f, PixelSpacing=["1e-12", "1e-12"])
    message = _refused(tmp_path)
    assert re.fullmatch(
        r".*slice0001\.dcm: the voxel-to-patient affine is singular \(determinant 1\.5e-24 mm\^3\): "
        r"\[\[.*\]\]",
        message,
    ), message


def test_overflowing_affine(tmp_path):
    info = write_phantom_series(tmp_path, shape=SHAPE)
    for f in info.files:
        edit_file(f, PixelSpacing=["1e300", "1e300"])
    assert re.fullmatch(
        r".*slice0001\.dcm: the voxel-to-patient affine is degenerate \(determinant inf mm\^3\): "
        r"\[\[.*\]\]",
        _refused(tmp_path),
    )


def test_non_finite_affine_backstop():
    """Every input is checked finite before the affine is built; the affine is checked again anyway."""
    from pydicom.dataset import Dataset

    from app.io.dicom_geometry import Slice, affine_lps

    s = Slice(
        file="x.dcm",
        frame=1,
        header=Dataset(),
        ipp=np.zeros(3),
        iop=np.array([1.0, 0, 0, 0, 1, 0]),
        pixel_spacing=np.array([np.inf, 1.0]),
        rows=2,
        columns=2,
        slope=1.0,
        intercept=0.0,
    )
    with pytest.raises(DicomError, match=r"^x\.dcm: the voxel-to-patient affine is not finite: "):
        affine_lps([s])


def test_position_far_from_the_origin(tmp_path):
    assert re.fullmatch(
        r".*slice0003\.dcm: ImagePositionPatient \[0\.0, 0\.0, 1\.7e\+308\] lies more than 1e\+06 mm "
        r"from the patient origin",
        _one_bad(tmp_path, ImagePositionPatient=["0", "0", "1.7e308"]),
    )


def test_infinite_position(tmp_path):
    assert re.fullmatch(
        r".*slice0003\.dcm: ImagePositionPatient must hold 3 finite numbers, found \[0, inf, 0\]",
        _one_bad(tmp_path, ImagePositionPatient=["0", "inf", "0"]),
    )


# --------------------------------------------------------------------------- 5. 4D and multi-echo


def _write_volumes(folder: Path, tags: list[dict], shape=SHAPE, modality="CT"):
    """One phantom stack per entry of ``tags`` (same series, same positions), each entry's attributes
    written to all its files; stack ``v`` is rescaled by intercept ``-1024 + 100 * v``."""
    uid, study, frame = generate_uid(), generate_uid(), generate_uid()
    infos = []
    for v, attrs in enumerate(tags):
        info = write_phantom_series(
            folder,
            shape=shape,
            series_uid=uid,
            study_uid=study,
            frame_of_reference_uid=frame,
            file_prefix=f"v{v + 1:02d}_",
            modality=modality,
            rescale=(1.0, -1024.0 + 100 * v),
        )
        for f in info.files:
            edit_file(f, **attrs)
        infos.append(info)
    return uid, infos


def test_4d_series_lists_volumes_and_refuses_to_guess(tmp_path):
    uid, infos = _write_volumes(tmp_path, [{"TemporalPositionIdentifier": v} for v in (3, 1, 2)])
    result = scan(tmp_path)
    assert [s.key for s in result.series] == [f"{uid}#vol{v}" for v in (1, 2, 3)]
    assert all(s.group_key == uid and s.volume_attribute == "TemporalPositionIdentifier" for s in result.series)
    advice = (
        f"series {uid} is 4D: 3 volume(s) (by TemporalPositionIdentifier) of 6 slice(s) each; select one stack: "
        f"--series-uid {uid}#volN (series_uid=; N = 1..3), e.g. --series-uid {uid}#vol1, or --volume N (volume=N)"
    )
    assert _refused(tmp_path, scan=result) == f"{tmp_path}: {advice}"
    assert _refused(tmp_path, series_uid=uid, scan=result) == f"{tmp_path}: {advice}"
    # TemporalPositionIdentifier 1 was written second (v02_ files, intercept -924).
    vol = read_series(tmp_path, series_uid=f"{uid}#vol1", scan=result)
    np.testing.assert_array_equal(vol.array, infos[1].array_ijk)
    np.testing.assert_allclose(vol.affine_lps, infos[1].affine_lps, atol=1e-4)
    vol = read_series(tmp_path, volume=3, scan=result)
    np.testing.assert_array_equal(vol.array, infos[0].array_ijk)
    assert f"volume 3 of {uid}: {uid}#vol3" in vol.selection_reason
    vol = read_series(tmp_path, series_uid=uid, volume=2, scan=result)
    np.testing.assert_array_equal(vol.array, infos[2].array_ijk)
    assert _refused(tmp_path, volume=4, scan=result).startswith(f"{tmp_path}: series {uid} has volumes 1..3, not 4;")
    listing = describe_series(result.series)
    assert listing == (
        f"  {uid}#volN (N = 1..3; 3 volume(s) (by TemporalPositionIdentifier) of 6 slice(s) each) | "
        "CT | 'phantom' | 6 slice(s) | 8x8 | axial"
    )


def test_dwi_volumes_by_b_value_and_direction(tmp_path):
    tags = [
        {"DiffusionBValue": b, "DiffusionGradientOrientation": d}
        for b, d in ((1000, [0, 1, 0]), (0, [0, 0, 0]), (1000, [1, 0, 0]))
    ]
    uid, infos = _write_volumes(tmp_path, tags, modality="MR")
    result = scan(tmp_path)
    assert [s.volume_attribute for s in result.series] == ["DiffusionBValue/DiffusionGradientOrientation"] * 3
    # b = 0 first, then the b = 1000 directions in a fixed order.
    np.testing.assert_array_equal(read_series(tmp_path, volume=1, scan=result).array, infos[1].array_ijk)
    assert f"--series-uid {uid}#volN (series_uid=; N = 1..3)" in _refused(tmp_path, scan=result)


def test_multi_echo_field_map(tmp_path):
    uid, infos = _write_volumes(
        tmp_path, [{"EchoNumbers": 2, "EchoTime": "7.38"}, {"EchoNumbers": 1, "EchoTime": "4.92"}], modality="MR"
    )
    result = scan(tmp_path)
    assert [s.key for s in result.series] == [f"{uid}#echo1", f"{uid}#echo2"]
    message = _refused(tmp_path, scan=result)
    assert message == (
        f"{tmp_path}: series {uid} is multi-echo: 2 echo(es) (EchoNumbers 1, 2) of 6 slice(s) each; "
        f"select one stack: --series-uid {uid}#echoE (series_uid=; E = 1, 2), e.g. --series-uid "
        f"{uid}#echo1"
    )
    np.testing.assert_array_equal(
        read_series(tmp_path, series_uid=f"{uid}#echo2", scan=result).array, infos[0].array_ijk
    )
    assert "--volume does not apply" in _refused(tmp_path, volume=1, scan=result)


def test_multi_echo_4d(tmp_path):
    tags = [{"EchoNumbers": e, "TemporalPositionIdentifier": t} for t in (1, 2) for e in (1, 2)]
    uid, infos = _write_volumes(tmp_path, tags, modality="MR")
    result = scan(tmp_path)
    assert [s.key for s in result.series] == [f"{uid}#echo{e}#vol{t}" for e in (1, 2) for t in (1, 2)]
    message = _refused(tmp_path, scan=result)
    assert f"series {uid} is 4D and multi-echo" in message
    assert f"--series-uid {uid}#echoE#volN (series_uid=; E = 1, 2, N = 1, 2)" in message
    assert f"or --series-uid {uid}#echo1 with --volume N (volume=N)" in message
    assert (
        f"(--volume 2 leaves 2); select one stack: --series-uid {uid}#echoE#vol2 (series_uid=; E = 1, 2)"
        in _refused(tmp_path, volume=2, scan=result)
    )
    vol = read_series(tmp_path, series_uid=f"{uid}#echo2", volume=2, scan=result)
    np.testing.assert_array_equal(vol.array, infos[3].array_ijk)
    vol = read_series(tmp_path, series_uid=f"{uid}#echo1#vol2", scan=result)
    np.testing.assert_array_equal(vol.array, infos[2].array_ijk)


def test_repeated_positions_nothing_tells_apart_stay_duplicates(tmp_path):
    _write_volumes(tmp_path, [{}, {}])  # same AcquisitionNumber, no temporal/echo attributes
    assert "duplicate slice positions (6 pair(s))" in _refused(tmp_path)


def test_per_slice_acquisition_numbers_are_not_volumes(tmp_path):
    uid, _infos = _write_volumes(tmp_path, [{}, {}])
    for n, f in enumerate(sorted(tmp_path.glob("*.dcm"))):  # every image its own AcquisitionNumber
        edit_file(f, AcquisitionNumber=n + 1)
    assert [s.key for s in scan(tmp_path).series] == [uid]
    assert "duplicate slice positions" in _refused(tmp_path)


def test_volume_of_a_3d_series(tmp_path):
    write_phantom_series(tmp_path, shape=SHAPE)
    assert read_series(tmp_path, volume=1).shape == SHAPE
    assert "is one 3D volume: --volume 2 does not apply" in _refused(tmp_path, volume=2)
    with pytest.raises(ConfigError, match="volume must be a positive integer"):
        select_series(scan(tmp_path).series, volume=0)
