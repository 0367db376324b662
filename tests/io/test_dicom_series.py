"""DICOM series reader: phantom round trips (geometry and values) and the shared real data."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TEST_DATA
from dicom_phantoms import orientation_cosines, write_enhanced_multiframe, write_phantom_series
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from app.errors import DicomError
from app.io.dicom_series import (
    LoadDicomSeriesd,
    load_dicom_as_metatensor,
    read_series,
    scan_folder,
    select_series,
)
from app.io.geometry import voxel_to_world, world_to_voxel

DATA = TEST_DATA

ORIENTATIONS = [
    "axial",
    "sagittal",
    "coronal",
    "oblique",
    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # axial with both in-plane axes reversed
    (0.0, -1.0, 0.0, 0.0, 0.0, -1.0),  # sagittal, negative cosines
    (0.6, -0.8, 0.0, 0.0, 0.0, -1.0),  # double oblique with negative cosines
]


def _check_roundtrip(vol, info, atol: float = 1e-4) -> None:
    assert vol.shape == info.array_ijk.shape
    np.testing.assert_array_equal(vol.array, info.array_ijk)
    np.testing.assert_allclose(vol.affine_lps, info.affine_lps, atol=atol)
    # The marked voxel lands on the phantom's known point, and back.
    np.testing.assert_allclose(voxel_to_world(vol.affine_lps, info.marker_ijk), info.marker_lps, atol=atol)
    np.testing.assert_allclose(world_to_voxel(vol.affine_lps, info.marker_lps), info.marker_ijk, atol=1e-6)


@pytest.mark.parametrize(
    "orientation", ORIENTATIONS, ids=lambda o: o if isinstance(o, str) else "cos" + "_".join(map(str, o))
)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_phantom_roundtrip_orientations(tmp_path, orientation, reverse):
    info = write_phantom_series(tmp_path / "s", orientation=orientation, reverse_file_order=reverse)
    vol = read_series(tmp_path / "s")
    _check_roundtrip(vol, info)
    assert vol.series_instance_uid == info.series_uid
    # Headers come in k order without pixel data; files in k order.
    assert [Path(f) for f in vol.source_files] == info.files
    assert all("PixelData" not in ds for ds in vol.datasets)
    assert vol.frame_numbers == [1] * info.array_ijk.shape[2]
    assert [ds.SOPInstanceUID for ds in vol.datasets] == info.sop_instance_uids


def test_sagittal_axes_mean_what_they_say(tmp_path):
    """Independent of the writer: i runs anterior->posterior (+y), j superior->inferior (-z)."""
    info = write_phantom_series(tmp_path / "s", orientation="sagittal", spacing=(0.5, 0.7, 2.0))
    vol = read_series(tmp_path / "s")
    np.testing.assert_allclose(vol.affine_lps[:3, 0], [0, 0.5, 0], atol=1e-6)
    np.testing.assert_allclose(vol.affine_lps[:3, 1], [0, 0, -0.7], atol=1e-6)
    np.testing.assert_allclose(vol.affine_lps[:3, 2], [-2.0, 0, 0], atol=1e-6)  # (0,1,0) x (0,0,-1) = -x
    np.testing.assert_allclose(vol.spacing, [0.5, 0.7, 2.0], atol=1e-6)
    assert scan_folder(tmp_path / "s")[0].orientation == "sagittal"
    assert info.mask_ijk.max() == 3


@pytest.mark.parametrize("orientation,label", [("axial", "axial"), ("coronal", "coronal"), ("oblique", "oblique")])
def test_orientation_label(tmp_path, orientation, label):
    write_phantom_series(tmp_path, orientation=orientation, shape=(8, 8, 4))
    assert scan_folder(tmp_path)[0].orientation == label


def test_affine_third_column_follows_positions(tmp_path):
    """Sorting uses the normal, not InstanceNumber or file name: reversed files, same result."""
    a = write_phantom_series(tmp_path / "a", orientation="oblique")
    b = write_phantom_series(tmp_path / "b", orientation="oblique", reverse_file_order=True)
    va, vb = read_series(tmp_path / "a"), read_series(tmp_path / "b")
    np.testing.assert_array_equal(va.array, vb.array)
    np.testing.assert_allclose(va.affine_lps, vb.affine_lps, atol=1e-6)
    n = np.cross(*orientation_cosines("oblique"))
    assert np.dot(va.affine_lps[:3, 2], n) > 0  # k increases along row x col
    assert a.files[0].name == "slice0001.dcm" and b.files[0].name == "slice0016.dcm"


def test_rescale_per_slice(tmp_path):
    k = 16
    rescale = [(0.5 + 0.25 * (s % 3), -1000.0 + 10 * s) for s in range(k)]
    info = write_phantom_series(tmp_path, rescale=rescale)
    vol = read_series(tmp_path)
    np.testing.assert_allclose(vol.array, info.array_ijk, rtol=0, atol=1e-3)
    # Slice 1 (slope 0.75, intercept -990) differs from slice 0: per-slice values were used.
    np.testing.assert_allclose(vol.array[:, :, 1], info.stored_ijk[:, :, 1] * 0.75 - 990, atol=1e-3)
    assert vol.array.dtype == np.float32


def test_mr_without_rescale_and_fractional_slope(tmp_path):
    info = write_phantom_series(tmp_path / "mr", modality="MR", rescale=(1.0, 0.0))
    vol = read_series(tmp_path / "mr")
    assert "RescaleSlope" not in vol.datasets[0]
    np.testing.assert_array_equal(vol.array, info.stored_ijk.astype(np.float32))
    info = write_phantom_series(tmp_path / "mr2", modality="MR", rescale=(0.0123, 2.5))
    np.testing.assert_allclose(read_series(tmp_path / "mr2").array, info.array_ijk, rtol=1e-6, atol=1e-4)


def test_monochrome1_is_inverted(tmp_path):
    info = write_phantom_series(tmp_path / "m1", monochrome1=True)
    vol = read_series(tmp_path / "m1")
    assert vol.datasets[0].PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(vol.array, info.array_ijk)
    # Objects stay brighter than the background, as in the MONOCHROME2 phantom.
    assert vol.array[info.mask_ijk == 3].min() > vol.array[info.mask_ijk == 0].max()


@pytest.mark.parametrize(
    "ts",
    [
        RLELossless,
        JPEG2000Lossless,
        JPEGLSLossless,
        DeflatedExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
    ],
    ids=lambda u: u.name,
)
def test_phantom_transfer_syntaxes(tmp_path, ts):
    # 32 x 32 frames at least: openjpeg cannot encode smaller images with its default levels.
    info = write_phantom_series(tmp_path, shape=(40, 36, 6), orientation="oblique", transfer_syntax=ts)
    vol = read_series(tmp_path)
    _check_roundtrip(vol, info)
    assert vol.datasets[0].file_meta.TransferSyntaxUID == ts


@pytest.mark.parametrize("workers", [1, 3])
def test_decode_workers_same_result(tmp_path, workers):
    info = write_phantom_series(tmp_path, reverse_file_order=True)
    _check_roundtrip(read_series(tmp_path, decode_workers=workers), info)


@pytest.mark.parametrize("per_frame", [False, True], ids=["shared_rescale", "per_frame_rescale"])
def test_enhanced_multiframe(tmp_path, per_frame):
    rescale = [(1.0, -1000.0 + s) for s in range(16)] if per_frame else (2.0, -1024.0)
    info = write_enhanced_multiframe(
        tmp_path / "mf.dcm",
        orientation="oblique",
        rescale=rescale,
        per_frame_rescale=per_frame,
        reverse_frame_order=True,
    )
    series = scan_folder(tmp_path)
    assert len(series) == 1 and series[0].multiframe and series[0].n_slices == 16
    vol = read_series(tmp_path)
    _check_roundtrip(vol, info)
    # Frames were stored last slice first, so k=0 is frame 16.
    assert vol.frame_numbers == list(range(16, 0, -1))
    assert len(vol.datasets) == 16 and vol.datasets[0] is vol.datasets[-1]


def test_enhanced_mr_jpeg2000(tmp_path):
    info = write_enhanced_multiframe(
        tmp_path / "mf.dcm", shape=(40, 36, 5), modality="MR", rescale=(1.0, 0.0), transfer_syntax=JPEG2000Lossless
    )
    _check_roundtrip(read_series(tmp_path / "mf.dcm"), info)


def test_single_slice_series_is_allowed(tmp_path):
    info = write_phantom_series(tmp_path, shape=(24, 20, 4))
    for f in info.files[1:]:
        f.unlink()
    vol = read_series(tmp_path)
    assert vol.shape == (24, 20, 1)
    np.testing.assert_array_equal(vol.array[:, :, 0], info.array_ijk[:, :, 0])
    # One slice: the third column is the normal times SliceThickness.
    np.testing.assert_allclose(vol.affine_lps, info.affine_lps, atol=1e-6)


def test_select_series_by_uid_rules_and_size(tmp_path):
    a = write_phantom_series(
        tmp_path / "a",
        shape=(16, 16, 12),
        modality="MR",
        rescale=(1.0, 0.0),
        series_description="T1 axial",
        series_number=3,
    )
    b = write_phantom_series(
        tmp_path / "b",
        shape=(16, 16, 8),
        modality="MR",
        rescale=(1.0, 0.0),
        series_description="FLAIR",
        series_number=4,
        study_uid=a.study_uid,
    )
    c = write_phantom_series(tmp_path / "c", shape=(16, 16, 20), modality="CT", study_uid=a.study_uid, series_number=5)
    series = scan_folder(tmp_path)
    assert {s.uid for s in series} == {a.series_uid, b.series_uid, c.series_uid}

    s, why = select_series(series, series_uid=b.series_uid)
    assert s.uid == b.series_uid and why == f"chosen by --series-uid {b.series_uid}"
    s, why = select_series(series, rules={"modality": ["MR"], "min_slices": 10})
    assert s.uid == a.series_uid and why.startswith("only series matching modality MR with >= 10 slices")
    s, why = select_series(series, rules={"modality": "MR"})
    assert s.uid == a.series_uid and why.startswith("largest of 2 series matching modality MR")
    s, why = select_series(series, rules={"description_regex": "flair"})
    assert s.uid == b.series_uid
    s, why = select_series(series)
    assert s.uid == c.series_uid and "largest of 3 image series" in why
    vol = read_series(tmp_path, rules={"modality": ["MR"], "description_regex": "^T1"})
    assert vol.shape == (16, 16, 12) and vol.selection_reason.startswith("only series matching")


def test_non_image_objects_are_listed_not_selected(tmp_path):
    img = write_phantom_series(tmp_path / "img", shape=(8, 8, 4))
    seg = write_phantom_series(tmp_path / "seg", shape=(8, 8, 6))
    from dicom_phantoms import edit_file

    for f in seg.files:
        edit_file(f, Modality="SEG")
    series = scan_folder(tmp_path)
    assert sorted(s.is_image for s in series) == [False, True]
    assert read_series(tmp_path).series_instance_uid == img.series_uid  # the bigger SEG is not an image
    with pytest.raises(DicomError, match="is a SEG object, not an image series"):
        read_series(tmp_path, series_uid=seg.series_uid)


def test_metatensor_loader_and_dict_transform(tmp_path):
    info = write_phantom_series(tmp_path, orientation="coronal")
    image, vol = load_dicom_as_metatensor(tmp_path)
    assert tuple(image.shape) == (1, *info.array_ijk.shape)
    np.testing.assert_allclose(image.affine.numpy(), vol.affine_ras, atol=1e-6)
    np.testing.assert_allclose(image.affine.numpy()[:2], -info.affine_lps[:2], atol=1e-4)  # LPS -> RAS flips x, y
    assert image.meta["series_instance_uid"] == info.series_uid
    assert torch.equal(image[0], torch.as_tensor(info.array_ijk))
    d = LoadDicomSeriesd(keys="image")({"image": str(tmp_path), "other": 1})
    assert tuple(d["image"].shape) == (1, 24, 20, 16) and d["image_volume"].series_instance_uid == info.series_uid
    assert d["other"] == 1


# --------------------------------------------------------------------------- real data


def test_totalseg_jpeg2000_ct_matches_reference_nifti():
    folder = DATA / "totalseg_example" / "ct_dicom"
    series = scan_folder(folder)
    assert len(series) == 1 and series[0].uid == "" and series[0].key == "noUID#1" and series[0].n_slices == 20
    vol = read_series(folder)
    ref = nib.load(DATA / "totalseg_example" / "example_seg_dicom.nii.gz")
    assert vol.shape == ref.shape == (512, 512, 20)
    # The reference NIfTI stores the same voxel grid with j reversed: compare physical grids.
    flip_j = np.array([[1, 0, 0, 0], [0, -1, 0, 511], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_allclose(vol.affine_ras @ flip_j, ref.affine, atol=1e-3)
    np.testing.assert_allclose(vol.spacing, [0.9765625, 0.9765625, 2.0], atol=1e-6)
    # Sane HU: air at -1024, bone up to ~2000, body tissue inside the reference segmentation.
    assert vol.array.min() == -1024 and 1000 < vol.array.max() < 4000
    seg = np.asarray(ref.dataobj)[:, ::-1, :]  # onto our grid
    assert (vol.array[seg > 0] > -300).mean() > 0.95
    assert (vol.array[seg == 0] > -300).mean() < 0.5


def test_mixed_mr_study_splits_into_two_series():
    folder = DATA / "mr_dicom_study_mixed"
    series = scan_folder(folder)
    assert sorted(s.description for s in series) == ["FLAIR_reg", "T1post"]
    assert all(s.n_slices == 4 and s.orientation == "oblique" and not s.split_note for s in series)
    for s in series:
        vol = read_series(folder, series_uid=s.uid)
        assert vol.shape == (512, 512, 4)
        assert vol.series_instance_uid == s.uid
        assert {ds.SeriesDescription for ds in vol.datasets} == {s.description}
        assert vol.selection_reason == f"chosen by --series-uid {s.uid}"
        np.testing.assert_allclose(vol.spacing[:2], [0.4297, 0.4297], atol=1e-6)
        np.testing.assert_allclose(vol.spacing[2], 6.5, atol=0.01)
    # Without a UID both match equally: the tie is broken deterministically and said so.
    vol = read_series(folder, rules={"modality": ["MR"], "min_slices": 3})
    assert "largest of 2 series matching modality MR" in vol.selection_reason and "tie" in vol.selection_reason


def test_transfer_syntax_files_decode_identically():
    folder = DATA / "dicom_transfer_syntaxes" / "In"
    ref = read_series(folder / "1.dcm")  # explicit VR little endian
    # A Siemens mosaic of 35 64x64 tiles: unpacked into its slices (tests/io/test_mosaic.py checks
    # the voxels and affine against dcm2niix).
    assert ref.shape == (64, 64, 35) and ref.array.max() > 0
    syntaxes = set()
    for n in range(2, 10):
        vol = read_series(folder / f"{n}.dcm")
        syntaxes.add(str(vol.datasets[0].file_meta.TransferSyntaxUID))
        np.testing.assert_array_equal(vol.array, ref.array, err_msg=f"{n}.dcm")
        np.testing.assert_allclose(vol.affine_lps, ref.affine_lps, atol=1e-6)
    assert len(syntaxes) == 6
    # The nine files share one SeriesInstanceUID but differ in SeriesNumber: nine stacks.
    series = scan_folder(folder)
    assert len(series) == 9 and all("#" in s.key and s.split_note for s in series)
    assert all(s.mosaic and s.n_slices == 35 and (s.rows, s.columns) == (64, 64) for s in series)


@pytest.mark.parametrize("study,shape", [("Study1", (35, 51, 32)), ("Study2", (36, 48, 35)), ("Study3", (34, 50, 40))])
def test_mr_dicom_series_load(study, shape):
    vol = read_series(DATA / "mr_dicom_series" / study)
    assert vol.shape == shape
    np.testing.assert_allclose(vol.spacing, [1, 1, 1], atol=1e-6)
    assert vol.array.max() > vol.array.min()


def test_decode_speed_jpeg2000_logged(caplog):
    """Times serial vs threaded decoding of the 20-slice JPEG 2000 CT (reported, loosely bounded)."""
    folder = DATA / "totalseg_example" / "ct_dicom"
    times = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        vol = read_series(folder, decode_workers=workers)
        times[workers] = time.perf_counter() - t0
    assert vol.shape == (512, 512, 20)
    assert max(times.values()) < 30  # generous: 20 slices decode in well under a second normally
    logging.getLogger(__name__).info("JPEG 2000 20 slices: %s", times)


def test_junk_and_dicomdir_are_skipped(tmp_path, caplog):
    info = write_phantom_series(tmp_path / "series", shape=(8, 8, 5))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    _write_dicomdir(tmp_path / "DICOMDIR")
    with caplog.at_level(logging.DEBUG, logger="app.io.dicom_scan"):
        vol = read_series(tmp_path)
    assert vol.shape == (8, 8, 5)
    assert not any("notes.txt" in f for f in vol.source_files)
    assert "notes.txt" in caplog.text and "not a DICOM file" in caplog.text
    assert "DICOMDIR (media directory)" in caplog.text
    assert len(scan_folder(tmp_path)) == 1
    assert sorted(Path(f) for f in vol.source_files) == sorted(info.files)


def _write_dicomdir(path: Path) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.FileSetID = "TEST"
    ds.DirectoryRecordSequence = []
    ds.save_as(path, enforce_file_format=True)
