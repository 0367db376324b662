"""The fast SEG engine writes the object highdicom's ``Segmentation`` writes: every attribute, the
frame order, the per-frame functional groups and the pixel data agree, for phantoms in every
orientation, enhanced multi-frame sources, odd frame sizes, one or many segments; the output is
dciodvfy-clean and reads back equal with highdicom and with our reader."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_phantoms import write_enhanced_multiframe, write_phantom_series
from dicom_validation import assert_dciodvfy_clean
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.sequence import Sequence as DicomSequence
from seg_compare import assert_same_seg, seg_differences

from app.errors import ConfigError, InputError
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


def _write_both(tmp_path, vol, labels, specs=SPECS, **kwargs):
    fast = write_seg(vol, labels, specs, ALGO, tmp_path / "fast.dcm", engine="fast", **kwargs)
    ref = write_seg(vol, labels, specs, ALGO, tmp_path / "hd.dcm", engine="highdicom", **kwargs)
    return fast, ref


def _k_against_normal(vol: SeriesVolume, labels: np.ndarray) -> tuple[SeriesVolume, np.ndarray]:
    """``vol`` and ``labels`` with ``k`` reversed: ``k`` then runs against row x column (headers and affine agree)."""
    affine = vol.affine_lps.copy()
    affine[:3, 3] = vol.affine_lps[:3, 3] + (vol.shape[2] - 1) * vol.affine_lps[:3, 2]
    affine[:3, 2] *= -1
    return SeriesVolume(vol.array[:, :, ::-1], affine, vol.datasets[::-1], vol.frame_numbers[::-1]), labels[:, :, ::-1]


def _highdicom_volume(path) -> np.ndarray:
    import highdicom as hd

    seg = hd.seg.segread(path)
    return seg.get_volume(combine_segments=True).array  # highdicom's volume: [slice, row, column]


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_fast_engine_equals_highdicom(tmp_path, orientation):
    info = write_phantom_series(tmp_path / "ct", orientation=orientation, reverse_file_order=True)
    vol = read_series(tmp_path / "ct")
    fast_path, ref_path = _write_both(tmp_path, vol, info.mask_ijk)
    fast, _ = assert_same_seg(fast_path, ref_path)
    assert_dciodvfy_clean(fast_path)
    # frame positions are the source slices' positions, frames referencing the slice they lie on
    src = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in info.files}
    for item in fast.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert item.PlanePositionSequence[0].ImagePositionPatient == src[uid].ImagePositionPatient
    back, _ = read_seg(fast_path, vol)
    np.testing.assert_array_equal(back, info.mask_ijk)
    np.testing.assert_array_equal(_highdicom_volume(fast_path), _highdicom_volume(ref_path))


def test_fast_engine_enhanced_multiframe_source(tmp_path):
    info = write_enhanced_multiframe(tmp_path / "mf" / "ct.dcm", orientation="oblique", reverse_frame_order=True)
    vol = read_series(tmp_path / "mf")
    fast_path, ref_path = _write_both(tmp_path, vol, info.mask_ijk)
    fast, _ = assert_same_seg(fast_path, ref_path)
    assert_dciodvfy_clean(fast_path)
    assert {
        int(i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for i in fast.PerFrameFunctionalGroupsSequence
    } <= set(range(1, info.mask_ijk.shape[2] + 1))
    back, _ = read_seg(fast_path, vol)
    np.testing.assert_array_equal(back, info.mask_ijk)


@pytest.mark.parametrize(
    "case",
    [
        "odd_frame_size",
        "one_segment",
        "implicit_vr",
        "keep_empty",
        "empty_map",
        "label_values",
        "bool_map",
        "gap_between_slices",
        "k_against_normal",
        "frame_order_layout",
        "whole_frame",
        "odd_length",
    ],
)
def test_fast_engine_variants_equal_highdicom(tmp_path, case):
    shape = (23, 19, 9) if case == "odd_frame_size" else (24, 20, 16)  # 23 x 19: frames start mid-byte
    shape = (8, 5, 5) if case == "odd_length" else shape  # 5 frames of 5 bytes: PixelData padded to 26
    info = write_phantom_series(tmp_path / "ct", shape=shape, orientation="oblique")
    vol = read_series(tmp_path / "ct")
    labels, specs, kwargs = info.mask_ijk, SPECS, {}
    if case == "odd_length":
        labels, specs = info.mask_ijk, [SegmentSpec(int(v), f"s{v}") for v in np.unique(info.mask_ijk)[1:2]]
        labels = np.where(labels == specs[0].label_value, labels, 0)
        kwargs = {"omit_empty_frames": False}
    elif case == "one_segment" or case == "bool_map":
        labels, specs = info.mask_ijk == 2, [SPECS[1]]
        labels = labels if case == "bool_map" else labels.astype(np.uint8) * 2
        specs = [SegmentSpec(1 if case == "bool_map" else 2, "sphere")]
    elif case == "implicit_vr":
        kwargs = {"transfer_syntax_uid": pydicom.uid.ImplicitVRLittleEndian}
    elif case == "keep_empty":
        kwargs = {"omit_empty_frames": False}
    elif case == "empty_map":
        labels = np.zeros_like(info.mask_ijk)
    elif case == "label_values":  # label values other than 1..N, wider dtype, a described label absent
        labels = np.where(info.mask_ijk == 1, 7, np.where(info.mask_ijk == 2, 300, 0)).astype(np.int32)
        specs = [SegmentSpec(300, "sphere"), SegmentSpec(7, "box"), SegmentSpec(9, "absent")]
    elif case == "gap_between_slices":  # labelled slices not consecutive
        labels = info.mask_ijk.copy()
        labels[:, :, 5:9] = 0
    elif case == "k_against_normal":
        vol, labels = _k_against_normal(vol, info.mask_ijk)
    elif case == "frame_order_layout":  # [i, j, k] as a view of a [k, j, i] array, as read_series returns
        labels = np.ascontiguousarray(info.mask_ijk.transpose(2, 1, 0)).transpose(2, 1, 0)
    elif case == "whole_frame":  # labels in the first and last rows and columns: the box is the whole frame
        labels = info.mask_ijk.copy()
        labels[0, 0, 3], labels[-1, -1, 3] = 1, 3
    fast_path, ref_path = _write_both(tmp_path, vol, labels, specs, **kwargs)
    fast, ref = assert_same_seg(fast_path, ref_path)
    assert fast.file_meta.TransferSyntaxUID == ref.file_meta.TransferSyntaxUID
    assert_dciodvfy_clean(fast_path)
    if case != "empty_map":
        back, _ = read_seg(fast_path, vol, segments=specs)
        np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize("k_against_normal", [False, True])
@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_the_frames_made_ahead_are_used_and_a_missed_forecast_changes_nothing(
    tmp_path, monkeypatch, orientation, k_against_normal
):
    """write_seg starts the frames on a thread before it reads the headers, in the plane order the
    affine foretells: on a volume that matches its headers that is their order, so build_binary_seg
    does not make the frames again; a forecast that misses costs a second making, not a different SEG."""
    import app.io.seg_fast as seg_fast
    import app.io.seg_write as seg_write

    info = write_phantom_series(tmp_path / "ct", orientation=orientation, reverse_file_order=True)
    vol, labels = read_series(tmp_path / "ct"), info.mask_ijk
    if k_against_normal:
        vol, labels = _k_against_normal(vol, labels)
    made_again: list[tuple] = []
    make = seg_fast.binary_frames
    monkeypatch.setattr(seg_fast, "binary_frames", lambda *args: made_again.append(args) or make(*args))
    ref = write_seg(vol, labels, SPECS, ALGO, tmp_path / "hd.dcm", engine="highdicom")
    assert_same_seg(write_seg(vol, labels, SPECS, ALGO, tmp_path / "fast.dcm", engine="fast"), ref)
    assert made_again == []
    foretell = seg_write.expected_plane_order
    monkeypatch.setattr(seg_write, "expected_plane_order", lambda affine, nk: foretell(affine, nk)[::-1])
    assert_same_seg(write_seg(vol, labels, SPECS, ALGO, tmp_path / "missed.dcm", engine="fast"), ref)
    assert len(made_again) == 1


def test_fast_engine_refuses_undescribed_labels_and_unsupported_variants(tmp_path):
    info = write_phantom_series(tmp_path / "ct", shape=(16, 12, 6))
    vol = read_series(tmp_path / "ct")
    with pytest.raises(InputError, match=r"label values \[3\]"):
        write_seg(vol, info.mask_ijk, SPECS[:2], ALGO, tmp_path / "a.dcm", engine="fast")
    with pytest.raises(ConfigError, match="fast engine writes BINARY"):
        write_seg(vol, info.mask_ijk, SPECS, ALGO, tmp_path / "a.dcm", engine="fast", segmentation_type="LABELMAP")
    assert not (tmp_path / "a.dcm").exists()
    # auto picks highdicom for what the fast engine does not write (JPEG 2000 needs >= 32 pixels a side)
    info = write_phantom_series(tmp_path / "ct32", shape=(40, 36, 6))
    vol = read_series(tmp_path / "ct32")
    out = write_seg(
        vol, info.mask_ijk, SPECS, ALGO, tmp_path / "j2k.dcm", transfer_syntax_uid=pydicom.uid.JPEG2000Lossless
    )
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    np.testing.assert_array_equal(read_seg(out, vol)[0], info.mask_ijk)


def test_compare_helper_sees_differences(tmp_path):
    """The comparison the tests above rely on reports a changed attribute and a changed frame."""
    info = write_phantom_series(tmp_path / "ct", shape=(16, 12, 6))
    vol = read_series(tmp_path / "ct")
    fast_path, ref_path = _write_both(tmp_path, vol, info.mask_ijk)
    ds = pydicom.dcmread(fast_path)
    ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient[2] += 1
    ds.SegmentSequence[0].SegmentLabel = "other"
    ds.SharedFunctionalGroupsSequence = DicomSequence([])
    problems = seg_differences(ds, pydicom.dcmread(ref_path))
    assert any("PlanePositionSequence[0].ImagePositionPatient" in p for p in problems)
    assert any("SegmentLabel" in p for p in problems)
    assert any("SharedFunctionalGroupsSequence" in p for p in problems)


@pytest.mark.parametrize(
    "value",
    [
        pydicom.valuerep.DSfloat("-250.000"),  # a source header's string, kept as written
        pydicom.valuerep.DSfloat(" 12.5 "),
        pydicom.valuerep.DSfloat("1.234567890123456789", validation_mode=pydicom.config.IGNORE),  # too long
        pydicom.valuerep.DSfloat(0.1 + 0.2, auto_format=True),
        0.1 + 0.2,
        -1.0e-7,
        123456789012345.6,
        -1.0e20,
        3,
        np.float64(-88.40000000000001),
        "7.25",
        " 1.000000000000000001 ",
    ],
)
def test_ds_value_text_is_what_highdicom_writes(value):
    from pydicom.valuerep import DS

    from app.io.seg_fast import ds_value_text

    assert ds_value_text(value) == str(DS(value, auto_format=True))


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False), st.booleans())
def test_ds_value_text_of_any_number(number, as_header_string):
    from pydicom.valuerep import DS, DSfloat

    from app.io.seg_fast import ds_value_text

    value = DSfloat(repr(number), validation_mode=pydicom.config.IGNORE) if as_header_string else number
    assert ds_value_text(value) == str(DS(value, auto_format=True))


def test_segment_texts_beyond_ascii_are_written_in_the_source_character_set(tmp_path):
    """The encoded SegmentSequence is reused only for ASCII texts; a label in Latin-1 (the phantom's
    ISO_IR 100) goes through pydicom with the SEG's character set, as highdicom writes it."""
    from app.io.seg_fast import encoded_segment_sequence

    info = write_phantom_series(tmp_path / "ct", shape=(16, 12, 6), orientation="oblique")
    vol = read_series(tmp_path / "ct")
    specs = [SegmentSpec(1, "Lébér", type_code=("10200004", "SCT", "Liver")), SPECS[1], SPECS[2]]
    assert encoded_segment_sequence(tuple(specs), ALGO, False) is None
    # codes given as lists (no cache key): written all the same
    listed = [SegmentSpec(1, "box", type_code=["10200004", "SCT", "Liver"]), SPECS[1], SPECS[2]]  # type: ignore[arg-type]
    assert_same_seg(*_write_both(tmp_path / "listed", vol, info.mask_ijk, listed))
    assert encoded_segment_sequence(tuple(SPECS), ALGO, False) == encoded_segment_sequence(tuple(SPECS), ALGO, False)
    fast_path, ref_path = _write_both(tmp_path, vol, info.mask_ijk, specs)
    fast, _ = assert_same_seg(fast_path, ref_path)
    assert fast.SpecificCharacterSet == "ISO_IR 100" and fast.SegmentSequence[0].SegmentLabel == "Lébér"
    assert_dciodvfy_clean(fast_path)
