"""DICOM RT Structure Set: a label map as per-slice closed planar contours.

Each label's mask on slice ``k`` is traced with marching squares (``skimage.measure.find_contours``
at level 0.5), so a contour runs half-way between inside and outside voxel centres: every inside
voxel centre is strictly inside the contour set and every outside centre strictly outside, with
holes as nested contours (viewers fill nested CLOSED_PLANAR contours by the even-odd rule).
Points are mapped to LPS mm by the volume's affine and reference the slice they lie on.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from app import __version__
from app.errors import ConfigError, InputError
from app.io.atomic import atomic_path
from app.io.dicom_source import TYPE2_PATIENT_STUDY, check_volume_matches_headers, source_series
from app.io.geometry import voxel_to_world
from app.io.volume import SeriesVolume

logger = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# Referenced SOP Class of RTReferencedStudySequence: Study Component Management (what TPSs write).
_STUDY_REF_CLASS = "1.2.840.10008.3.1.2.3.2"

# Patient and study attributes copied from the source so the structure set joins its study.
_COPIED = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)

_DEFAULT_COLORS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (255, 128, 0),
    (128, 0, 255),
    (0, 128, 255),
    (128, 255, 0),
]


def mask_to_contours_ij(mask_ij: np.ndarray) -> list[np.ndarray]:
    """Closed contours ``(n, 2)`` in voxel coordinates ``(i, j)`` around a 2D boolean mask.

    The closing point is not repeated; exactly collinear points are dropped.
    """
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(np.asarray(mask_ij, dtype=np.float32), 1)  # zero border: every contour closes
    out = []
    for c in find_contours(padded, 0.5):
        c = approximate_polygon(c, tolerance=0) - 1.0
        if len(c) > 1 and np.allclose(c[0], c[-1]):
            c = c[:-1]
        if len(c) >= 3:
            out.append(c)
    return out


def _ds_text(values: np.ndarray) -> list[str]:
    # DS strings are limited to 16 characters; 0.1 micrometre is plenty.
    return [f"{v:.4f}".rstrip("0").rstrip(".") for v in values]


def write_rtstruct(
    volume: SeriesVolume,
    labels_ijk: np.ndarray,
    roi_names: Mapping[int, str],
    output_path: str | Path,
    *,
    structure_set_label: str = "SEGAPP",
    series_description: str = "segapp contours",
    series_number: int = 901,
    manufacturer: str = "segapp",
    algorithm: tuple[str, str] | None = None,
    colors: Mapping[int, tuple[int, int, int]] | None = None,
    allow_generated_uids: bool = False,
) -> Path:
    """Write ``labels_ijk`` (on ``volume``'s grid) as an RT Structure Set referencing the series.

    Args:
        volume: the source series (headers in ``k`` order).
        labels_ijk: integer label map ``[i, j, k]`` with ``volume.shape``; 0 is background.
        roi_names: label value -> ROI name; one ROI each (a label without voxels gets an empty ROI).
            A label present in the map but missing here raises.
        output_path: the file to write (atomically).
        algorithm: ``(name, version)`` recorded as ROIGenerationDescription.
        colors: label value -> RGB display colour (defaults cycle through a fixed palette).
        allow_generated_uids: see :func:`app.io.dicom_source.source_series`.

    Returns:
        ``output_path``. Contours are CLOSED_PLANAR, in LPS mm, one ContourImageSequence item each
        naming the source slice (and frame, for a multi-frame source).
    """
    output_path = Path(output_path)
    labels_ijk = np.asarray(labels_ijk)
    if labels_ijk.shape != volume.shape:
        raise InputError(f"label map shape {labels_ijk.shape} differs from the series shape {volume.shape}")
    if not volume.datasets or len(volume.datasets) != volume.shape[2]:
        raise InputError("the volume needs one DICOM header per slice to write an RT Structure Set")
    if not roi_names:
        raise ConfigError("no ROI names given")
    present = set(np.unique(labels_ijk).tolist()) - {0}
    unknown = sorted(present - set(roi_names))
    if unknown:
        raise InputError(f"label values {unknown} occur in the label map but have no ROI name")
    check_volume_matches_headers(volume)
    src = source_series(volume, allow_generated_uids)
    multiframe = src.multiframe
    first = src.first

    ds = Dataset()
    for kw in _COPIED:
        if kw in first:
            ds[kw] = first[kw]
    for kw in TYPE2_PATIENT_STUDY:
        if kw not in ds:
            setattr(ds, kw, "")
    now = datetime.datetime.now()
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = manufacturer
    ds.SoftwareVersions = f"segapp {__version__}"
    ds.InstanceNumber = 1
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    ds.StructureSetLabel = structure_set_label[:16]
    for_uid = src.frame_of_reference_uid
    ds.FrameOfReferenceUID = for_uid  # Frame of Reference module (part of the IOD since 2020)
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")

    def image_ref(k: int) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = src.sop_class_uids[src.instance_of_slice[k]]
        item.ReferencedSOPInstanceUID = src.sop_instance_uids[src.instance_of_slice[k]]
        if multiframe:
            item.ReferencedFrameNumber = src.frame_numbers[k]
        return item

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = src.series_instance_uid
    series_ref.ContourImageSequence = DicomSequence(
        [image_ref(k) for k in range(volume.shape[2])] if not multiframe else [image_ref(0)]
    )
    if multiframe:  # list every frame of the one source instance
        series_ref.ContourImageSequence[0].ReferencedFrameNumber = list(src.frame_numbers)
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_REF_CLASS
    study_ref.ReferencedSOPInstanceUID = src.study_instance_uid
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    for_ref = Dataset()
    for_ref.FrameOfReferenceUID = for_uid
    for_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([for_ref])

    rois, contours_seq, observations = [], [], []
    n_contours = 0
    for n, (value, name) in enumerate(sorted(roi_names.items()), start=1):
        roi = Dataset()
        roi.ROINumber = n
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = str(name)[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        if algorithm:
            roi.ROIGenerationDescription = f"{algorithm[0]} {algorithm[1]}"[:64]
        rois.append(roi)

        item = Dataset()
        item.ReferencedROINumber = n
        rgb = (colors or {}).get(value, _DEFAULT_COLORS[(n - 1) % len(_DEFAULT_COLORS)])
        item.ROIDisplayColor = [int(c) for c in rgb]
        contour_items = []
        mask = labels_ijk == value
        for k in np.flatnonzero(mask.any(axis=(0, 1))):
            for c_ij in mask_to_contours_ij(mask[:, :, k]):
                ijk = np.column_stack([c_ij, np.full(len(c_ij), float(k))])
                xyz = voxel_to_world(volume.affine_lps, ijk)
                contour = Dataset()
                contour.ContourImageSequence = DicomSequence([image_ref(int(k))])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(xyz)
                contour.ContourData = _ds_text(xyz.reshape(-1))
                contour_items.append(contour)
        n_contours += len(contour_items)
        if contour_items:
            item.ContourSequence = DicomSequence(contour_items)
        contours_seq.append(item)

        obs = Dataset()
        obs.ObservationNumber = n
        obs.ReferencedROINumber = n
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours_seq)
    ds.RTROIObservationsSequence = DicomSequence(observations)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    with atomic_path(output_path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    logger.info("wrote RTSTRUCT with %d ROIs, %d contours", len(rois), n_contours)
    return output_path
