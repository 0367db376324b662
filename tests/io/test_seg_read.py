"""Reading every SEG a user meets onto the right voxels: dcmqi's and pydicom's reference SEGs,
highdicom's BINARY/FRACTIONAL/LABELMAP/overlapping SEGs, and copies edited to look like other
writers (references in the shared functional groups listing all sources as Siemens syngo.via
writes them, no category codes, frames in reverse order, references off by one slice, no
positions, another Frame of Reference) on an asymmetric oblique phantom."""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import TEST_DATA
from dicom_phantoms import write_enhanced_multiframe, write_phantom_series
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from app.errors import DicomError
from app.io.dicom_series import read_series
from app.io.geometry import lps_to_ras, world_to_voxel
from app.io.nifti import load_nifti
from app.io.seg_read import read_seg, seg_to_nifti
from app.io.seg_write import write_seg
from app.io.segments import SegmentSpec

SEGS = TEST_DATA / "dicom_seg_refs" / "dcmqi" / "data" / "segmentations"
PYDICOM_LIVER = TEST_DATA / "dicom_seg_refs" / "pydicom_data_liver"
SPECS = [SegmentSpec(1, "box"), SegmentSpec(2, "sphere"), SegmentSpec(3, "bar")]
ALGO = ("phantom_bundle", "0.1.0")


def _nrrd_on_grid(nrrd: Path, affine_lps: np.ndarray, shape) -> np.ndarray:
    """Place an NRRD label map on a grid by geometry (ITK images are in LPS)."""
    img = sitk.ReadImage(str(nrrd))
    arr = sitk.GetArrayFromImage(img)  # [z, y, x]
    direction = np.array(img.GetDirection()).reshape(3, 3)
    idx_xyz = np.argwhere(arr != 0)[:, ::-1].astype(np.float64)
    vox = world_to_voxel(affine_lps, idx_xyz @ (direction * np.array(img.GetSpacing())).T + np.array(img.GetOrigin()))
    assert np.abs(vox - np.round(vox)).max() < 1e-3, "NRRD grid does not coincide with the reference grid"
    vox = np.round(vox).astype(int)
    out = np.zeros(shape, dtype=np.int32)
    out[vox[:, 0], vox[:, 1], vox[:, 2]] = arr[arr != 0]
    return out


# --- SEGs written by other tools -----------------------------------------------------------------


def test_dcmqi_liver_equals_nrrd():
    ref = read_series(SEGS / "ct-3slice")
    labels, affine = read_seg(SEGS / "liver.dcm", ref)
    expected = _nrrd_on_grid(SEGS / "liver_seg.nrrd", affine, labels.shape)
    assert expected.sum() > 100_000
    np.testing.assert_array_equal(labels, expected)
    own, own_affine = read_seg(SEGS / "liver.dcm", None)  # the SEG's own grid is the same here
    np.testing.assert_allclose(own_affine, affine, atol=1e-3)
    np.testing.assert_array_equal(own, expected)


@pytest.mark.parametrize("name", sorted(p.name for p in PYDICOM_LIVER.glob("*.dcm")))
def test_pydicom_liver_encodings_agree(name):
    ref = read_series(SEGS / "ct-3slice")
    expected, _ = read_seg(SEGS / "liver.dcm", ref)
    labels, _ = read_seg(PYDICOM_LIVER / name, ref)
    np.testing.assert_array_equal(labels, expected)


def test_dcmqi_sparse_labelmap_and_overlaps():
    labels, affine = read_seg(SEGS / "sparse-labelmap-ppv5.dcm", None)
    expected = _nrrd_on_grid(SEGS / "sparse_labelmap_ppv5_seg.nrrd", affine, labels.shape)
    # the NRRD marks the slice the SEG leaves out with padding value 5; the SEG says "not segmented"
    np.testing.assert_array_equal(labels, np.where(expected == 5, 0, expected))
    ref = read_series(SEGS / "ct-3slice")
    with pytest.raises(DicomError, match=r"segments \d and \d overlap in \d+ voxels"):
        read_seg(SEGS / "partial_overlaps.dcm", ref, overlap="error")
    # the NRRDs hold segments {1, 4, 5}, {2} and {3}: each segment's own mask, and the label map
    # in which the higher segment number wins
    parts = [_nrrd_on_grid(SEGS / f"partial_overlaps-{n}.nrrd", ref.affine_lps, ref.shape) for n in (1, 2, 3)]
    expected = {s: np.any([p == s for p in parts], axis=0) for s in (1, 2, 3, 4, 5)}
    masks, _ = read_seg(SEGS / "partial_overlaps.dcm", ref, per_segment=True)
    assert sorted(masks) == [1, 2, 3, 4, 5]
    for s, mask in masks.items():
        assert mask.any() and mask.dtype == bool
        np.testing.assert_array_equal(mask, expected[s])
    assert (expected[1] & expected[2]).any()  # they do overlap
    highest, _ = read_seg(SEGS / "partial_overlaps.dcm", ref)
    np.testing.assert_array_equal(highest, np.max([np.where(expected[s], s, 0) for s in expected], axis=0))


def test_seg_to_nifti(tmp_path):
    out = seg_to_nifti(SEGS / "liver.dcm", SEGS / "ct-3slice", tmp_path / "liver.nii.gz")
    data, affine_ras = load_nifti(out)
    ref = read_series(SEGS / "ct-3slice")
    np.testing.assert_allclose(affine_ras, lps_to_ras(ref.affine_lps), atol=1e-5)
    expected, _ = read_seg(SEGS / "liver.dcm", ref)
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(data, expected)


@pytest.mark.parametrize("size", ["23x38x3", "24x38x3"])  # 23 x 38: frames start mid-byte
@pytest.mark.parametrize("source", ["image", "multiframe"])
def test_dcmqi_small_segs_on_single_and_multiframe_series(size, source):
    vol = read_series(SEGS / size / source)
    labels, affine = read_seg(SEGS / size / "seg" / "label.seg", vol)
    expected = _nrrd_on_grid(SEGS / size / "nrrd" / "label.nrrd", affine, labels.shape)
    assert expected.sum() > 50
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("name", ["ppv5", "noppv"])
def test_dcmqi_labelmap_seg_covering_part_of_the_series(name):
    vol = read_series(SEGS / "24x38x3" / "image")
    labels, affine = read_seg(SEGS / f"sparse-labelmap-{name}.dcm", vol)
    expected = _nrrd_on_grid(SEGS / f"sparse_labelmap_{name}_seg.nrrd", affine, labels.shape)
    # ppv5: the NRRD marks the slice the SEG leaves out with the padding value 5; the SEG says "not segmented"
    np.testing.assert_array_equal(labels, np.where(expected == 5, 0, expected))
    assert int(pydicom.dcmread(SEGS / f"sparse-labelmap-{name}.dcm").NumberOfFrames) < vol.shape[2]  # partial


# --- SEGs written by highdicom in each variant ------------------------------------------------------


@pytest.fixture
def phantom(tmp_path):
    info = write_phantom_series(tmp_path / "ct", orientation="oblique", reverse_file_order=True)
    vol = read_series(tmp_path / "ct")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in info.files]  # k order
    return info, vol, sources


def _descriptions(n: int) -> list:
    algo = hd.AlgorithmIdentificationSequence(name="t", family=codes.cid7162.ArtificialIntelligence, version="1")
    return [
        hd.seg.SegmentDescription(
            segment_number=s,
            segment_label=f"s{s}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type="AUTOMATIC",
            algorithm_identification=algo,
        )
        for s in range(1, n + 1)
    ]


def _highdicom_seg(sources, pixel_array, seg_type, n_segments, out: Path, **kwargs) -> Path:
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=seg_type,
        segment_descriptions=_descriptions(n_segments),
        series_instance_uid=generate_uid(),
        series_number=5,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="t",
        manufacturer_model_name="t",
        software_versions="1",
        device_serial_number="1",
        **kwargs,
    )
    seg.save_as(out)
    return out


def _frames(volume_ijk: np.ndarray) -> np.ndarray:
    """[i, j, k(, segment)] -> highdicom's [frame k, row j, column i(, segment)]."""
    return np.ascontiguousarray(
        np.swapaxes(volume_ijk, 0, 2) if volume_ijk.ndim == 3 else volume_ijk.transpose(2, 1, 0, 3)
    )


def _overlapping_masks(mask: np.ndarray) -> list[np.ndarray]:
    return [mask > 0, mask == 2, mask == 3]  # segment 1 covers all objects, 2 and 3 lie inside it


def test_highdicom_binary_overlapping_segments(tmp_path, phantom, caplog):
    info, vol, sources = phantom
    masks = _overlapping_masks(info.mask_ijk)
    out = _highdicom_seg(sources, _frames(np.stack(masks, axis=-1)), "BINARY", 3, tmp_path / "overlap.dcm")
    assert pydicom.dcmread(out).SegmentsOverlap in ("YES", "UNDEFINED")
    per, _ = read_seg(out, vol, per_segment=True)
    assert sorted(per) == [1, 2, 3]
    for s, m in zip((1, 2, 3), masks):
        np.testing.assert_array_equal(per[s], m)
    with caplog.at_level(logging.WARNING, logger="app.io.seg_read"):
        labels, _ = read_seg(out, vol)
    np.testing.assert_array_equal(labels, info.mask_ijk)  # higher segment number wins: 2, 3 over 1
    assert "higher segment number wins" in caplog.text
    with pytest.raises(DicomError, match="segments 1 and 2 overlap"):
        read_seg(out, vol, overlap="error")


def test_highdicom_fractional(tmp_path, phantom):
    info, vol, sources = phantom
    mask = info.mask_ijk
    halo = np.zeros(mask.shape, bool)
    halo[1:-1, 1:-1, 1:-1] = True
    prob = np.stack([np.where(mask == s, 0.8, np.where(halo & (mask == 0), 0.4, 0.0)) for s in (1, 2, 3)], axis=-1)
    out = _highdicom_seg(sources, _frames(prob.astype(np.float32)), "FRACTIONAL", 3, tmp_path / "frac.dcm")
    ds = pydicom.dcmread(out)
    assert ds.SegmentationType == "FRACTIONAL" and int(ds.MaximumFractionalValue) == 255
    labels, _ = read_seg(out, vol)  # 0.8 x 255 is inside, 0.4 x 255 (the halo) is not
    np.testing.assert_array_equal(labels, mask)
    loose, _ = read_seg(out, vol, fractional_threshold=0.3, per_segment=True)
    np.testing.assert_array_equal(loose[1], (mask == 1) | (halo & (mask == 0)))


def test_highdicom_labelmap(tmp_path, phantom, caplog):
    info, vol, sources = phantom
    out = _highdicom_seg(sources, _frames(info.mask_ijk), "LABELMAP", 3, tmp_path / "labelmap.dcm")
    assert pydicom.dcmread(out).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    labels, _ = read_seg(out, vol)
    np.testing.assert_array_equal(labels, info.mask_ijk)
    per, _ = read_seg(out, vol, per_segment=True)
    assert sorted(per) == [1, 2, 3]  # the background segment 0 is not a mask
    for s in (1, 2, 3):
        np.testing.assert_array_equal(per[s], info.mask_ijk == s)

    def drop_segment_3(ds):
        ds.SegmentSequence = [s for s in ds.SegmentSequence if int(s.SegmentNumber) != 3]

    undescribed = _edited(out, tmp_path / "undescribed.dcm", drop_segment_3)
    with caplog.at_level(logging.WARNING, logger="app.io.seg_read"):
        labels, _ = read_seg(undescribed, vol)
    np.testing.assert_array_equal(labels, np.where(info.mask_ijk == 3, 0, info.mask_ijk))
    assert "undescribed segments [3]" in caplog.text


# --- copies edited to look like other writers ----------------------------------------------------


def _edited(src: Path, out: Path, edit) -> Path:
    ds = pydicom.dcmread(src)
    edit(ds)
    ds.save_as(out)
    return out


def _siemens_like(ds: Dataset, sources: list[Dataset]) -> None:
    """Derivation references moved to the shared functional groups, listing every source image;
    no SegmentedPropertyCategoryCodeSequence."""
    template = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
    deriv = Dataset()
    deriv.DerivationCodeSequence = template.DerivationCodeSequence
    refs = []
    for s in sources:
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = s.SOPClassUID, s.SOPInstanceUID
        r.PurposeOfReferenceCodeSequence = template.SourceImageSequence[0].PurposeOfReferenceCodeSequence
        refs.append(r)
    deriv.SourceImageSequence = refs
    ds.SharedFunctionalGroupsSequence[0].DerivationImageSequence = [deriv]
    for seg in ds.SegmentSequence:
        del seg.SegmentedPropertyCategoryCodeSequence


def _reverse_frames(ds: Dataset) -> None:
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)[::-1]
    ds.PerFrameFunctionalGroupsSequence = list(ds.PerFrameFunctionalGroupsSequence)[::-1]
    ds.PixelData = np.packbits(frames.reshape(-1).astype(bool), bitorder="little").tobytes()


def _refs_off_by_one(ds: Dataset, sources: list[Dataset]) -> None:
    uids = [str(s.SOPInstanceUID) for s in sources]
    for item in ds.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        ref.ReferencedSOPInstanceUID = uids[(uids.index(ref.ReferencedSOPInstanceUID) + 1) % len(uids)]


def _no_positions(ds: Dataset) -> None:
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence


def _other_frame_of_reference(ds: Dataset) -> None:
    ds.FrameOfReferenceUID = generate_uid()
    for item in ds.PerFrameFunctionalGroupsSequence:  # positions now mean nothing: make them wrong too
        pos = item.PlanePositionSequence[0]
        pos.ImagePositionPatient = [float(v) + 100.0 for v in pos.ImagePositionPatient]


@pytest.mark.parametrize(
    "writer, expected_log",
    [
        (
            "siemens_like",
            (
                "placed by plane position in the series' frame of reference (its source references are "
                "in the shared functional groups"
            ),
        ),
        ("reversed_frames", "placed by plane position"),
        ("refs_off_by_one", "reference a different slice than their position says; placed by position"),
        ("no_positions", "placed by their per-frame source reference"),
        ("other_frame_of_reference", "frames are placed by reference only"),
    ],
)
def test_segs_of_other_writers_land_on_the_right_voxels(tmp_path, phantom, caplog, writer, expected_log):
    info, vol, sources = phantom
    ours = write_seg(vol, info.mask_ijk, SPECS, ALGO, tmp_path / "ours.dcm")
    edit = {
        "siemens_like": lambda ds: _siemens_like(ds, sources),
        "reversed_frames": _reverse_frames,
        "refs_off_by_one": lambda ds: _refs_off_by_one(ds, sources),
        "no_positions": _no_positions,
        "other_frame_of_reference": _other_frame_of_reference,
    }[writer]
    theirs = _edited(ours, tmp_path / f"{writer}.dcm", edit)
    with caplog.at_level(logging.INFO, logger="app.io.seg_read"):
        labels, affine = read_seg(theirs, vol)
    np.testing.assert_array_equal(labels, info.mask_ijk)
    np.testing.assert_allclose(affine, info.affine_lps, atol=1e-6)
    assert expected_log in caplog.text
    named, _ = read_seg(theirs, tmp_path / "ct", segments=SPECS)  # from the folder, labels by name
    np.testing.assert_array_equal(named, info.mask_ijk)


def test_siemens_like_seg_to_nifti_and_own_grid(tmp_path, phantom):
    """The case ``segapp seg2nifti`` refused ("frame 2 references source slice 0 but its position puts it at
    slice 1")."""
    info, vol, sources = phantom
    ours = write_seg(vol, info.mask_ijk, SPECS, ALGO, tmp_path / "ours.dcm")
    theirs = _edited(ours, tmp_path / "siemens.dcm", lambda ds: _siemens_like(ds, sources))
    assert "SegmentedPropertyCategoryCodeSequence" not in pydicom.dcmread(theirs).SegmentSequence[0]
    data, _ = load_nifti(seg_to_nifti(theirs, tmp_path / "ct", tmp_path / "seg.nii.gz"))
    np.testing.assert_array_equal(data, info.mask_ijk)
    own, own_affine = read_seg(theirs, None)  # no reference: the frames' own grid, a sub-box of the series'
    k0 = int(np.flatnonzero(info.mask_ijk.any(axis=(0, 1)))[0])
    np.testing.assert_allclose(own_affine[:3, :3], info.affine_lps[:3, :3], atol=1e-6)
    np.testing.assert_allclose(own_affine[:3, 3], info.affine_lps[:3, 3] + k0 * info.affine_lps[:3, 2], atol=1e-4)
    np.testing.assert_array_equal(own, info.mask_ijk[:, :, k0 : k0 + own.shape[2]])


def test_enhanced_source_and_partial_coverage(tmp_path):
    info = write_enhanced_multiframe(tmp_path / "mf" / "ct.dcm", orientation="sagittal", reverse_frame_order=True)
    vol = read_series(tmp_path / "mf")
    part = info.mask_ijk.copy()
    part[:, :, : part.shape[2] // 2] = 0  # the SEG covers only the upper half of the series
    out = write_seg(vol, part, SPECS, ALGO, tmp_path / "seg.dcm")
    refs_off = _edited(out, tmp_path / "off.dcm", lambda ds: _shift_frame_numbers(ds, vol.shape[2]))
    for path in (out, refs_off):
        labels, _ = read_seg(path, vol)
        np.testing.assert_array_equal(labels, part)


def _shift_frame_numbers(ds: Dataset, n: int) -> None:
    for item in ds.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        ref.ReferencedFrameNumber = int(ref.ReferencedFrameNumber) % n + 1


def test_unplaceable_frames_raise(tmp_path, phantom):
    info, vol, sources = phantom
    ours = write_seg(vol, info.mask_ijk, SPECS, ALGO, tmp_path / "ours.dcm")

    def no_position_no_reference(ds):
        _no_positions(ds)
        _siemens_like(ds, sources)

    bad = _edited(ours, tmp_path / "bad.dcm", no_position_no_reference)
    with pytest.raises(DicomError, match="neither a position nor a reference"):
        read_seg(bad, vol)

    def off_grid(ds):
        pos = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
        pos.ImagePositionPatient = [float(v) + 0.37 for v in pos.ImagePositionPatient]

    with pytest.raises(DicomError, match="frame 1 .* does not lie on the reference grid"):
        read_seg(_edited(ours, tmp_path / "off.dcm", off_grid), vol)
