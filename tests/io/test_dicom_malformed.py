"""Malformed DICOM input: every case must raise a DicomError naming the file/folder and the problem,
never read a silently wrong volume, and never leak patient data into logs or messages."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_phantoms import PATIENT_ID, PATIENT_NAME, edit_file, write_enhanced_multiframe, write_phantom_series
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, RLELossless, generate_uid

from app.errors import ConfigError, DicomError
from app.io.dicom_series import read_series, read_series_info, scan_folder

SHAPE = (8, 8, 6)  # small and fast; slices are slice0001..slice0006, 1.5 mm apart


def _series(folder: Path, **kw):
    kw.setdefault("shape", SHAPE)
    return write_phantom_series(folder, **kw)


def _ds(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


# Each case: build a bad input under tmp_path, return (path to read, read kwargs, regex, name that
# must appear in the message).


def case_truncated_pixel_data(tmp):
    info = _series(tmp)
    data = info.files[2].read_bytes()
    info.files[2].write_bytes(data[:-50])
    return tmp, {}, r"cannot decode pixel data \(file truncated\?\).*less than expected", "slice0003.dcm"


def case_truncated_header(tmp):
    info = _series(tmp)
    info.files[2].write_bytes(info.files[2].read_bytes()[:400])
    return (
        tmp,
        {},
        r"missing slice\(s\).*slice0002\.dcm.*slice0004\.dcm.*1 damaged DICOM file\(s\) were skipped",
        "slice0003.dcm",
    )


def case_only_junk(tmp):
    (tmp / "readme.txt").write_text("not dicom")
    (tmp / "image.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    return tmp, {}, r"no DICOM files found among 2 file\(s\).*not a DICOM file", str(tmp)


def case_empty_folder(tmp):
    return tmp, {}, r"folder contains no files", str(tmp)


def case_nonexistent_path(tmp):
    return tmp / "nope", {}, r"does not exist", "nope"


def case_missing_pixel_data(tmp):
    info = _series(tmp)
    ds = _ds(info.files[3])
    del ds.PixelData
    ds.save_as(info.files[3])
    return tmp, {}, r"no pixel data \(7FE0,0010\)", "slice0004.dcm"


def case_missing_slice(tmp):
    info = _series(tmp)
    info.files[3].unlink()
    return (
        tmp,
        {},
        r"1 missing between \S*slice0003\.dcm at -27\.750 mm and \S*slice0005\.dcm at -24\.750 mm",
        "slice0005.dcm",
    )


def case_duplicate_position(tmp):
    info = _series(tmp)
    ds = _ds(info.files[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp / "copy.dcm")
    return tmp, {}, r"duplicate slice positions.*both at -27\.750 mm", "slice0003.dcm"


def case_unsupported_transfer_syntax(tmp):
    info = _series(tmp)
    ds = _ds(info.files[1])
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(info.files[1], enforce_file_format=True)
    return (
        tmp,
        {},
        r"unsupported transfer syntax MPEG2 Main Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\)",
        "slice0002.dcm",
    )


def case_mixed_orientation_in_one_uid(tmp):
    # One middle slice in another plane (10 degrees): split off as its own stack, which leaves a gap.
    info = _series(tmp)
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    edit_file(info.files[2], ImageOrientationPatient=[c, s, 0, -s, c, 0])
    return tmp, {}, r"missing slice.*holds 2 stacks that differ in image plane", "slice0004.dcm"


def case_inconsistent_rows_columns(tmp):
    info = _series(tmp)
    ds = _ds(info.files[2])
    ds.Rows = 4
    ds.PixelData = ds.PixelData[: 4 * 8 * 2]
    ds.save_as(info.files[2])
    return tmp, {}, r"missing slice.*differ in image plane, Rows x Columns.*8x4", "slice0004.dcm"


def case_inconsistent_pixel_spacing(tmp):
    info = _series(tmp)
    edit_file(info.files[4], PixelSpacing=["0.95", "0.8"])
    return tmp, {}, r"inconsistent PixelSpacing in one series: \[0\.95, 0\.8\] mm here", "slice0005.dcm"


def case_gantry_tilt(tmp):
    info = _series(tmp)
    for k, f in enumerate(info.files):  # every slice shifted 0.4 mm posterior per step (~15 deg)
        ipp = info.affine_lps[:3, 3] + k * info.affine_lps[:3, 2] + [0, 0.4 * k, 0]
        edit_file(f, ImagePositionPatient=[f"{v:.4f}" for v in ipp])
    return tmp, {}, r"gantry/detector tilt: .*tilted by 14\.9\d deg", "slice0006.dcm"


def case_uneven_spacing(tmp):
    info = _series(tmp)
    ipp = info.affine_lps[:3, 3] + 5.6 * info.affine_lps[:3, 2]  # last slice 0.6 steps further
    edit_file(info.files[5], ImagePositionPatient=[f"{v:.4f}" for v in ipp])
    return tmp, {}, r"uneven slice spacing: steps from 1\.500 to 2\.400 mm", "slice0006.dcm"


def case_missing_image_position(tmp):
    info = _series(tmp)
    edit_file(info.files[1], ImagePositionPatient=None)
    return tmp, {}, r"missing ImagePositionPatient \(0020,0032\)", "slice0002.dcm"


def case_missing_image_orientation(tmp):
    info = _series(tmp)
    edit_file(info.files[4], ImageOrientationPatient=None)
    return tmp, {}, r"missing ImageOrientationPatient \(0020,0037\)", "slice0005.dcm"


def case_missing_pixel_spacing(tmp):
    info = _series(tmp)
    edit_file(info.files[0], PixelSpacing=None)
    return tmp, {}, r"missing PixelSpacing \(0028,0030\)", "slice0001.dcm"


def case_bad_orientation_vectors(tmp):
    info = _series(tmp)
    for f in info.files:
        edit_file(f, ImageOrientationPatient=[1, 0, 0, 1, 0, 0])
    return tmp, {}, r"is not two orthogonal unit vectors", "slice0001.dcm"


def case_no_series_matches_rules(tmp):
    info = _series(tmp)
    return (
        tmp,
        {"rules": {"modality": ["MR"], "min_slices": 10}},
        (
            rf"no image series matches modality MR with >= 10 slices; available series:\n  {info.series_uid} \| CT "
            r"\| 'phantom' \| 6 slice\(s\) \| 8x8 \| axial"
        ),
        str(tmp),
    )


def case_unknown_series_uid(tmp):
    _series(tmp)
    return tmp, {"series_uid": "1.2.3.4"}, r"no series with UID 1\.2\.3\.4; available series:", str(tmp)


def case_corrupt_jpeg2000(tmp):
    info = _series(tmp, shape=(40, 36, 4), transfer_syntax=JPEG2000Lossless)
    _corrupt_first_frame(info.files[1])
    return tmp, {}, r"cannot decode pixel data \(JPEG 2000 Image Compression \(Lossless Only\)", "slice0002.dcm"


def case_corrupt_rle(tmp):
    info = _series(tmp, transfer_syntax=RLELossless)
    _corrupt_first_frame(info.files[1], keep=8)
    return tmp, {}, r"cannot decode pixel data \(RLE Lossless", "slice0002.dcm"


def case_only_non_image_objects(tmp):
    info = _series(tmp)
    for f in info.files:
        edit_file(f, Modality="SEG")
    return tmp, {}, r"no DICOM image series found \(only: SEG\)", str(tmp)


def case_colour_image(tmp):
    info = _series(tmp)
    edit_file(info.files[0], PhotometricInterpretation="PALETTE COLOR")
    return tmp, {}, r"PhotometricInterpretation PALETTE COLOR: only greyscale", "slice0001.dcm"


def case_enhanced_frame_without_position(tmp):
    write_enhanced_multiframe(tmp / "mf.dcm", shape=SHAPE)
    ds = _ds(tmp / "mf.dcm")
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    ds.save_as(tmp / "mf.dcm")
    return tmp, {}, r"frame 3: missing ImagePositionPatient .*\(PlanePositionSequence\)", "mf.dcm"


def case_split_uid_with_equal_stacks(tmp):
    # Two planes of equal size under one UID: asking for the UID is ambiguous.
    a = _series(tmp / "a", shape=(8, 8, 4))
    _series(tmp / "b", shape=(8, 8, 4), orientation="sagittal", series_uid=a.series_uid, study_uid=a.study_uid)
    return (
        tmp,
        {"series_uid": a.series_uid},
        rf"series UID {a.series_uid} holds 2 stacks .*{a.series_uid}#1 .*{a.series_uid}#2 .*pass one of their keys",
        str(tmp),
    )


def _corrupt_first_frame(path: Path, keep: int = 20) -> None:
    ds = _ds(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:keep] + b"\xff" * 40])
    ds.save_as(path)


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_raises_clear_dicom_error(tmp_path, case):
    folder = tmp_path / case
    folder.mkdir()
    path, kwargs, pattern, name = CASES[case](folder)
    with pytest.raises(DicomError) as exc_info:
        read_series(path, **kwargs)
    message = str(exc_info.value)
    assert re.search(pattern, message, re.DOTALL), message
    assert name in message
    assert "Doe" not in message and PATIENT_ID not in message


def test_there_are_enough_cases():
    assert len(CASES) >= 16


def test_junk_file_is_skipped_when_a_series_remains(tmp_path, caplog):
    info = _series(tmp_path)
    (tmp_path / "junk.dcm").write_bytes(b"this is not dicom at all" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "Thumbs.db").write_bytes(bytes(300))
    with caplog.at_level(logging.DEBUG, logger="app.io"):
        vol = read_series(tmp_path)
    np.testing.assert_array_equal(vol.array, info.array_ijk)
    assert sorted(Path(f).name for f in vol.source_files) == [f.name for f in info.files]
    assert "junk.dcm: not a DICOM file" in caplog.text and "Thumbs.db" in caplog.text


def test_split_off_edge_slice_is_reported_in_reason(tmp_path):
    """A scout-like extra image in another plane under the same UID: the main stack is read, and the
    selection reason says what was left out (nothing silent)."""
    info = _series(tmp_path, shape=(8, 8, 6))
    extra = tmp_path / "scout.dcm"
    shutil.copy(info.files[0], extra)
    edit_file(extra, ImageOrientationPatient=[0, 1, 0, 0, 0, -1], SOPInstanceUID=generate_uid())
    vol = read_series(tmp_path, series_uid=info.series_uid)
    np.testing.assert_array_equal(vol.array, info.array_ijk)
    assert f"used the largest, {info.series_uid}#1, 6 slices" in vol.selection_reason
    assert "holds 2 stacks" in vol.selection_reason
    # The other stack is selectable by its key.
    assert read_series(tmp_path, series_uid=f"{info.series_uid}#2").shape == (8, 8, 1)


def test_inconsistent_rows_inside_handmade_series(tmp_path):
    """read_series_info re-checks what the scan split on (for callers that build SeriesInfo)."""
    a = _series(tmp_path / "a", shape=(8, 8, 4))
    _series(tmp_path / "b", shape=(8, 6, 4), series_uid=a.series_uid)
    parts = scan_folder(tmp_path)
    assert len(parts) == 2
    merged = parts[0]
    merged.files += parts[1].files
    merged.headers += parts[1].headers
    with pytest.raises(DicomError, match=r"inconsistent Rows/Columns in one series: 8x(6 here, 8x8|8 here, 8x6) in"):
        read_series_info(merged)


def test_bad_rules_are_a_config_error(tmp_path):
    _series(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown series selection rule\(s\) \['modalities'\]"):
        read_series(tmp_path, rules={"modalities": ["CT"]})


def test_no_patient_data_in_logs_or_errors(tmp_path, caplog):
    assert PATIENT_NAME == "Doe^Jane" and PATIENT_ID == "PID-12345"
    messages = []
    with caplog.at_level(logging.DEBUG):
        good = tmp_path / "good"
        _series(good)
        (good / "junk.txt").write_text("x")
        read_series(good)
        for case in (
            "missing_slice",
            "duplicate_position",
            "gantry_tilt",
            "no_series_matches_rules",
            "unknown_series_uid",
            "truncated_header",
            "corrupt_rle",
        ):
            folder = tmp_path / case
            folder.mkdir()
            path, kwargs, _, _ = CASES[case](folder)
            with pytest.raises(DicomError) as exc_info:
                read_series(path, **kwargs)
            messages.append(str(exc_info.value))
    text = caplog.text + "\n".join(messages)
    assert "selected series" in caplog.text  # logging did happen
    for secret in ("Doe", "Jane", "PID-12345"):
        assert secret not in text
