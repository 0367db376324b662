"""Synthetic DICOM series for tests: an asymmetric phantom with known voxels, mask and geometry.

The phantom holds three labelled objects on a small ramp background, placed so that any flip,
transpose or one-voxel shift of the grid changes the voxels:

* label 1: an off-centre box,
* label 2: a sphere in another corner,
* label 3: an L-shaped bar (one long arm along ``i``, a short arm along ``k``).

``write_phantom_series`` writes it as a classic single-frame CT/MR Image Storage series (one file
per slice); ``write_enhanced_multiframe`` writes it as one Enhanced CT/MR Image Storage object with
functional groups. Both return a ``PhantomInfo`` with the ground truth (``array_ijk``,
``mask_ijk``, ``affine_lps``, files, UIDs). Other test modules import these helpers.

Example::

    info = write_phantom_series(tmp_path / "ct", orientation="oblique", reverse_file_order=True)
    vol = read_series(tmp_path / "ct")
    np.testing.assert_array_equal(vol.array, info.array_ijk)
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-12345"

# Named orientations as (row cosine, column cosine) in LPS.
_NAMED_ORIENTATIONS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}

# Encoders that pydicom can run on this machine (Dataset.compress); deflate is a file-level syntax.
_COMPRESSED = {
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
}


@dataclass
class PhantomInfo:
    """Ground truth of a written phantom.

    Attributes:
        folder: the folder the files were written to.
        files: the written files in slice (``k``) order, for an enhanced object the one file.
        array_ijk: voxel values in modality units (after rescale; MONOCHROME2 sense), float32,
            indexed ``[i, j, k]``.
        stored_ijk: the integer values as stored in the files (before rescale/inversion).
        mask_ijk: uint8 labels on the same grid (0 background, 1 box, 2 sphere, 3 L-bar).
        affine_lps: 4x4 voxel -> LPS (mm) affine.
        marker_ijk: one voxel that is unique in the volume (the box's first corner).
        marker_lps: that voxel's centre in LPS (mm).
        study_uid, series_uid, frame_of_reference_uid: the UIDs written.
        sop_instance_uids: per file, in ``files`` order.
        row_cos, col_cos: the direction cosines written to ImageOrientationPatient.
    """

    folder: Path
    files: list[Path]
    array_ijk: np.ndarray
    stored_ijk: np.ndarray
    mask_ijk: np.ndarray
    affine_lps: np.ndarray
    marker_ijk: tuple[int, int, int]
    marker_lps: np.ndarray
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str] = field(default_factory=list)
    row_cos: np.ndarray = field(default_factory=lambda: np.zeros(3))
    col_cos: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cos, self.col_cos)


def orientation_cosines(orientation: str | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(row_cos, col_cos) for a named orientation ("axial", "sagittal", "coronal", "oblique") or
    for 6 explicit cosines (normalised, made orthogonal)."""
    if isinstance(orientation, str):
        if orientation == "oblique":
            # A rotation with several negative cosines (about 20, -35 and 25 degrees).
            rot = _rotation(np.deg2rad(20.0), np.deg2rad(-35.0), np.deg2rad(25.0))
            return rot[:, 0], rot[:, 1]
        if orientation not in _NAMED_ORIENTATIONS:
            raise ValueError(f"unknown orientation {orientation!r}")
        row, col = _NAMED_ORIENTATIONS[orientation]
        return np.array(row, dtype=np.float64), np.array(col, dtype=np.float64)
    cos = np.asarray(orientation, dtype=np.float64)
    if cos.shape != (6,):
        raise ValueError("explicit orientation needs 6 direction cosines")
    row = cos[:3] / np.linalg.norm(cos[:3])
    col = cos[3:] - np.dot(cos[3:], row) * row
    return row, col / np.linalg.norm(col)


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def phantom_arrays(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(stored-value ramp+objects as int32, uint8 mask) for a grid ``shape`` (I, J, K >= 4)."""
    ni, nj, nk = shape
    if min(shape) < 4:
        raise ValueError("phantom needs at least 4 voxels along each axis")
    i, j, k = np.meshgrid(np.arange(ni), np.arange(nj), np.arange(nk), indexing="ij")
    mask = np.zeros(shape, dtype=np.uint8)
    # Box: off-centre towards low i, high j.
    mask[ni // 8 : ni // 8 + ni // 4, nj // 2 : nj // 2 + nj // 3, nk // 4 : nk // 4 + max(2, nk // 3)] = 1
    # Sphere: towards high i, low j, high k.
    ci, cj, ck = 0.7 * ni, 0.25 * nj, 0.65 * nk
    r = 0.18 * min(shape)
    mask[(i - ci) ** 2 + (j - cj) ** 2 + (k - ck) ** 2 <= r**2] = 2
    # L-bar: long arm along i at low k, short arm up along k at its high-i end.
    bj = nj - 3
    mask[ni // 4 : ni - 2, bj : bj + 2, 1:3] = 3
    mask[ni - 4 : ni - 2, bj : bj + 2, 1 : max(4, nk // 2)] = 3
    # Background ramp (different weights per axis) so that even empty regions are asymmetric.
    stored = (i + 3 * j + 7 * k) % 97
    stored = stored + np.choose(mask, [0, 400, 800, 1200])
    return stored.astype(np.int32), mask


def _base_dataset(
    path: Path,
    sop_class: str,
    sop_uid: str,
    transfer_syntax: str,
    modality: str,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    patient_name: str,
    patient_id: str,
    series_description: str,
    series_number: int,
) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)  # compress() switches it later if asked
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime.datetime(2024, 1, 2, 3, 4, 5)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "segapp-tests"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "phantom study"
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _geometry(shape, spacing, orientation, origin_lps):
    row, col = orientation_cosines(orientation)
    normal = np.cross(row, col)
    affine = np.eye(4)
    affine[:3, 0] = row * spacing[0]
    affine[:3, 1] = col * spacing[1]
    affine[:3, 2] = normal * spacing[2]
    affine[:3, 3] = np.asarray(origin_lps, dtype=np.float64)
    return row, col, affine


def _stored_for_file(values_ij: np.ndarray, monochrome1: bool) -> np.ndarray:
    """One slice [i, j] -> the [row, col] int16 array written (MONOCHROME1: inverted in 16 bits)."""
    out = values_ij.T.astype(np.int16)
    if monochrome1:
        out = (-1 - out.astype(np.int32)).astype(np.int16)  # smallest+largest of int16 = -1
    return np.ascontiguousarray(out)


def _ds_str(x: float) -> str:
    """A DS value string (max 16 chars) that keeps as much precision as DS allows."""
    for digits in range(10, 2, -1):
        s = f"{x:.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{x:.3g}"


def _save(ds: FileDataset, path: Path, transfer_syntax: str) -> None:
    ts = UID(transfer_syntax)
    if ts in _COMPRESSED:
        ds.compress(ts)  # JPEG 2000 (openjpeg) needs frames of at least 32 x 32
    elif ts == ExplicitVRBigEndian:
        # pydicom writes OW bytes as they are: swap them ourselves for big endian.
        pix = np.frombuffer(ds.PixelData, dtype="<i2")
        ds.PixelData = pix.astype(">i2").tobytes()
        ds.file_meta.TransferSyntaxUID = ts
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)
        return
    else:
        ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)


def write_phantom_series(
    folder: str | Path,
    *,
    shape: tuple[int, int, int] = (24, 20, 16),
    spacing: tuple[float, float, float] = (0.8, 0.9, 1.5),
    orientation: str | Sequence[float] = "axial",
    origin_lps: Sequence[float] = (-10.25, 20.5, -30.75),
    reverse_file_order: bool = False,
    modality: str = "CT",
    rescale: tuple[float, float] | Sequence[tuple[float, float]] = (1.0, -1024.0),
    transfer_syntax: str = ExplicitVRLittleEndian,
    monochrome1: bool = False,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_name: str = PATIENT_NAME,
    patient_id: str = PATIENT_ID,
    series_description: str = "phantom",
    series_number: int = 1,
    file_prefix: str = "slice",
) -> PhantomInfo:
    """Write the phantom as a single-frame CT or MR Image Storage series, one file per slice.

    Args:
        folder: output folder (created).
        shape: grid size ``(I, J, K)``: ``I`` = Columns, ``J`` = Rows, ``K`` = number of files.
        spacing: voxel size in mm along ``i, j, k`` (PixelSpacing = ``[spacing[1], spacing[0]]``).
        orientation: "axial", "sagittal", "coronal", "oblique" or 6 direction cosines (row, column).
        origin_lps: centre of voxel (0, 0, 0) in LPS mm (ImagePositionPatient of slice 0).
        reverse_file_order: number files (and InstanceNumber) from the last slice down.
        modality: "CT" or "MR".
        rescale: ``(slope, intercept)`` for all slices, or one pair per slice. MR with (1, 0)
            writes no rescale attributes.
        transfer_syntax: UID; RLE, JPEG-LS and JPEG 2000 lossless are compressed with pydicom,
            deflate/implicit/big endian are written by pydicom as file syntaxes.
        monochrome1: write MONOCHROME1 (stored values inverted within int16).
        series_uid, study_uid, frame_of_reference_uid: UIDs (generated when ``None``).

    Returns:
        PhantomInfo with the ground truth.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError("modality must be CT or MR")
    ni, nj, nk = shape
    stored, mask = phantom_arrays(shape)
    per_slice = _per_slice_rescale(rescale, nk)
    array = np.empty(shape, dtype=np.float32)
    for k, (slope, intercept) in enumerate(per_slice):
        array[:, :, k] = (stored[:, :, k] * np.float64(slope) + np.float64(intercept)).astype(np.float32)
    row, col, affine = _geometry(shape, spacing, orientation, origin_lps)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage

    files: list[Path] = []
    sop_uids: list[str] = []
    for k in range(nk):
        number = nk - k if reverse_file_order else k + 1
        path = folder / f"{file_prefix}{number:04d}.dcm"
        sop_uid = generate_uid()
        ds = _base_dataset(
            path,
            sop_class,
            sop_uid,
            transfer_syntax,
            modality,
            study_uid,
            series_uid,
            for_uid,
            patient_name,
            patient_id,
            series_description,
            series_number,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [_ds_str(v) for v in affine[:3, 3] + k * affine[:3, 2]]
        ds.ImageOrientationPatient = [_ds_str(v) for v in (*row, *col)]
        ds.PixelSpacing = [_ds_str(spacing[1]), _ds_str(spacing[0])]
        ds.SliceThickness = _ds_str(spacing[2])
        ds.SliceLocation = _ds_str(float(np.dot(affine[:3, 3] + k * affine[:3, 2], np.cross(row, col))))
        ds.Rows, ds.Columns = nj, ni
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
        slope, intercept = per_slice[k]
        if modality == "CT":
            ds.KVP = "120"
            ds.AcquisitionNumber = 1
            ds.RescaleType = "HU"
        else:
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.EchoTime = "3.1"
            ds.RepetitionTime = "8.2"
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = "3"
        if modality == "CT" or (slope, intercept) != (1.0, 0.0):
            ds.RescaleSlope = _ds_str(slope)
            ds.RescaleIntercept = _ds_str(intercept)
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        pix = _stored_for_file(stored[:, :, k], monochrome1)
        ds.PixelData = pix.tobytes()
        _save(ds, path, transfer_syntax)
        files.append(path)
        sop_uids.append(sop_uid)

    return _info(folder, files, array, stored, mask, affine, study_uid, series_uid, for_uid, sop_uids, row, col)


def _per_slice_rescale(rescale, nk: int) -> list[tuple[float, float]]:
    arr = np.asarray(rescale, dtype=np.float64)
    if arr.shape == (2,):
        return [(float(arr[0]), float(arr[1]))] * nk
    if arr.shape != (nk, 2):
        raise ValueError("rescale must be (slope, intercept) or one pair per slice")
    return [(float(s), float(b)) for s, b in arr]


def _info(folder, files, array, stored, mask, affine, study_uid, series_uid, for_uid, sop_uids, row, col):
    marker = tuple(int(v) for v in np.argwhere(mask == 1)[0])
    marker_lps = affine[:3, :3] @ np.asarray(marker, dtype=np.float64) + affine[:3, 3]
    return PhantomInfo(
        folder=folder,
        files=files,
        array_ijk=array,
        stored_ijk=stored,
        mask_ijk=mask,
        affine_lps=affine,
        marker_ijk=marker,
        marker_lps=marker_lps,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=for_uid,
        sop_instance_uids=sop_uids,
        row_cos=row,
        col_cos=col,
    )


def write_enhanced_multiframe(
    path: str | Path,
    *,
    shape: tuple[int, int, int] = (24, 20, 16),
    spacing: tuple[float, float, float] = (0.8, 0.9, 1.5),
    orientation: str | Sequence[float] = "axial",
    origin_lps: Sequence[float] = (-10.25, 20.5, -30.75),
    reverse_frame_order: bool = True,
    modality: str = "CT",
    rescale: tuple[float, float] | Sequence[tuple[float, float]] = (1.0, -1024.0),
    per_frame_rescale: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_name: str = PATIENT_NAME,
    patient_id: str = PATIENT_ID,
) -> PhantomInfo:
    """Write the phantom as one Enhanced CT/MR Image Storage object (multi-frame).

    Geometry goes in the functional groups: PixelMeasures, PlaneOrientation and (unless
    ``per_frame_rescale``) PixelValueTransformation shared; PlanePosition per frame. With
    ``reverse_frame_order`` the frames are stored from the last slice down (the reader must sort).
    Same arguments as ``write_phantom_series`` otherwise; ``path`` is the file to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    modality = modality.upper()
    ni, nj, nk = shape
    stored, mask = phantom_arrays(shape)
    per_slice = _per_slice_rescale(rescale, nk)
    if not per_frame_rescale and len(set(per_slice)) > 1:
        raise ValueError("different rescale per slice needs per_frame_rescale=True")
    array = np.empty(shape, dtype=np.float32)
    for k, (slope, intercept) in enumerate(per_slice):
        array[:, :, k] = (stored[:, :, k] * np.float64(slope) + np.float64(intercept)).astype(np.float32)
    row, col, affine = _geometry(shape, spacing, orientation, origin_lps)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    sop_class = EnhancedCTImageStorage if modality == "CT" else EnhancedMRImageStorage
    sop_uid = generate_uid()
    ds = _base_dataset(
        path,
        sop_class,
        sop_uid,
        transfer_syntax,
        modality,
        study_uid,
        series_uid,
        for_uid,
        patient_name,
        patient_id,
        "phantom enhanced",
        1,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = nj, ni
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = nk
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionDateTime = "20240102030405"
    ds.DimensionOrganizationType = "3D"

    def value_transform(slope: float, intercept: float) -> Dataset:
        item = Dataset()
        item.RescaleSlope = _ds_str(slope)
        item.RescaleIntercept = _ds_str(intercept)
        item.RescaleType = "HU" if modality == "CT" else "US"
        return item

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [_ds_str(spacing[1]), _ds_str(spacing[0])]
    measures.SliceThickness = _ds_str(spacing[2])
    measures.SpacingBetweenSlices = _ds_str(spacing[2])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    plane_or = Dataset()
    plane_or.ImageOrientationPatient = [_ds_str(v) for v in (*row, *col)]
    shared.PlaneOrientationSequence = DicomSequence([plane_or])
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = DicomSequence([value_transform(*per_slice[0])])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    order = list(range(nk))[::-1] if reverse_frame_order else list(range(nk))
    per_frame = []
    frames = []
    for k in order:
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [_ds_str(v) for v in affine[:3, 3] + k * affine[:3, 2]]
        item.PlanePositionSequence = DicomSequence([pos])
        fc = Dataset()
        fc.StackID = "1"
        fc.InStackPositionNumber = k + 1
        fc.DimensionIndexValues = [k + 1]
        item.FrameContentSequence = DicomSequence([fc])
        if per_frame_rescale:
            item.PixelValueTransformationSequence = DicomSequence([value_transform(*per_slice[k])])
        per_frame.append(item)
        frames.append(_stored_for_file(stored[:, :, k], False))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    _save(ds, path, transfer_syntax)
    return _info(path.parent, [path], array, stored, mask, affine, study_uid, series_uid, for_uid, [sop_uid], row, col)


def edit_file(path: str | Path, **attributes) -> None:
    """Rewrite a DICOM file with some attributes changed (``None`` deletes the attribute)."""
    ds = pydicom.dcmread(path)
    for name, value in attributes.items():
        if value is None:
            if name in ds:
                delattr(ds, name)
        else:
            setattr(ds, name, value)
    ds.save_as(path)


# --------------------------------------------------------------------------- Siemens mosaics


def csa_header(tags: dict[str, Sequence[str]]) -> bytes:
    """A Siemens CSA header in the SV10 layout (as syngo writes it) holding ``tags`` (name -> item strings)."""
    import struct

    out = bytearray(b"SV10\x04\x03\x02\x01" + struct.pack("<II", len(tags), 77))
    for name, items in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(items), b"DS\0\0", 3, len(items), 77)
        for item in items:
            data = item.encode() + b"\0"
            out += struct.pack("<4i", len(data), len(data), 77, len(data)) + data + b"\0" * (-len(data) % 4)
    return bytes(out)


def write_mosaic(
    folder: str | Path,
    *,
    shape: tuple[int, int, int] = (10, 12, 7),
    spacing: tuple[float, float, float] = (2.5, 2.0, 3.6),
    orientation: str | Sequence[float] = "oblique",
    origin_lps: Sequence[float] = (-60.5, 40.25, -20.75),
    direction: int = 1,
    csa: bool = True,
    siemens_tag: bool = True,
    csa_count: int | None = None,
    n_volumes: int = 1,
    spacing_attribute: str = "SpacingBetweenSlices",
    series_uid: str | None = None,
    study_uid: str | None = None,
) -> PhantomInfo:
    """Write the phantom as Siemens mosaic MR images: ``n_volumes`` files (AcquisitionNumber 1..),
    each holding all ``K`` slices as tiles of one ``grid x grid`` image, ``grid = ceil(sqrt(K))``.

    The geometry is written the way the scanner defines it, independently of any reader's formula:
    tile ``t`` (row-major in the mosaic) is the slice at ``origin + t * spacing * direction * n``
    (``n = row_cos x col_cos``; ``direction`` is the sign of the CSA SliceNormalVector), and
    ImagePositionPatient is the corner of a ``grid*rows x grid*cols`` image with the same pixel
    spacing whose centre is the centre of tile 0.

    Args:
        shape: ``(I, J, K)`` of one slice stack: I = tile columns, J = tile rows, K = slices.
        spacing: column spacing, row spacing, slice spacing (mm).
        direction: +1 (tiles along ``row_cos x col_cos``) or -1 (against it).
        csa: write the CSA image header (NumberOfImagesInMosaic, SliceNormalVector).
        siemens_tag: write (0019,100A) NumberOfImagesInMosaic.
        csa_count: the CSA's NumberOfImagesInMosaic when it should differ from K.
        n_volumes: files (time points); volume ``v`` (1-based) stores the phantom + 50 * (v - 1).
        spacing_attribute: "SpacingBetweenSlices" (also writes SliceThickness 0.8 x spacing) or
            "SliceThickness" (only that).

    Returns:
        PhantomInfo of volume 1 on the reader's grid (``k`` along ``row_cos x col_cos``): voxels,
        affine; ``files`` = the volume files in AcquisitionNumber order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ni, nj, nk = shape
    grid = int(np.ceil(np.sqrt(nk)))
    stored, mask = phantom_arrays(shape)  # [i, j, t]: tile t holds slice t in stored order
    row, col = orientation_cosines(orientation)
    normal = np.cross(row, col)
    dc, dr, dz = spacing
    origin = np.asarray(origin_lps, dtype=np.float64)
    centre0 = origin + row * dc * (ni - 1) / 2 + col * dr * (nj - 1) / 2
    ipp = centre0 - row * dc * (grid * ni - 1) / 2 - col * dr * (grid * nj - 1) / 2
    # Truth on the reader's grid: k increases along +normal.
    order = list(range(nk)) if direction > 0 else list(range(nk))[::-1]
    first_slice = origin + order[0] * dz * direction * normal
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = row * dc, col * dr, normal * dz, first_slice
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = generate_uid()
    files, sops = [], []
    for v in range(n_volumes):
        path = folder / f"mosaic{v + 1:04d}.dcm"
        sop = generate_uid()
        ds = _base_dataset(
            path,
            MRImageStorage,
            sop,
            ExplicitVRLittleEndian,
            "MR",
            study_uid,
            series_uid,
            for_uid,
            PATIENT_NAME,
            PATIENT_ID,
            "ep2d_bold mosaic",
            7,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
        ds.Manufacturer = "SIEMENS"
        ds.InstanceNumber = v + 1
        ds.AcquisitionNumber = v + 1
        ds.ImagePositionPatient = [_ds_str(x) for x in ipp]
        ds.ImageOrientationPatient = [_ds_str(x) for x in (*row, *col)]
        ds.PixelSpacing = [_ds_str(dr), _ds_str(dc)]
        if spacing_attribute == "SpacingBetweenSlices":
            ds.SpacingBetweenSlices = _ds_str(dz)
            ds.SliceThickness = _ds_str(0.8 * dz)
        else:
            ds.SliceThickness = _ds_str(dz)
        ds.Rows, ds.Columns = grid * nj, grid * ni
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.EchoTime, ds.RepetitionTime, ds.EchoNumbers = "30", "2000", 1
        if siemens_tag:
            ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0A, "US", nk)
        if csa:
            tags = {
                "NumberOfImagesInMosaic": [str(csa_count if csa_count is not None else nk)],
                "SliceNormalVector": [f"{x:.8f}" for x in normal * direction],
                "ImaCoilString": ["HEA;HEP"],
            }
            ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "OB", csa_header(tags))
        tiled = np.zeros((grid * nj, grid * ni), dtype=np.uint16)
        for t in range(nk):
            r0, c0 = (t // grid) * nj, (t % grid) * ni
            tiled[r0 : r0 + nj, c0 : c0 + ni] = (stored[:, :, t] + 50 * v).T
        ds.PixelData = tiled.tobytes()
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(sop)
    array = stored[:, :, order].astype(np.float32)
    return _info(
        folder,
        files,
        array,
        stored[:, :, order],
        mask[:, :, order],
        affine,
        study_uid,
        series_uid,
        for_uid,
        sops,
        row,
        col,
    )
