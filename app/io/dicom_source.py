"""The source series of a derived DICOM object (SEG, RT Structure Set): check that a volume still
matches its headers, and collect (and repair) the UIDs and header a derived object references.

Both the SEG and the RTSTRUCT writers use these. Nothing here edits the caller's datasets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid

from app.errors import DicomError, InputError
from app.io.geometry import voxel_spacing
from app.io.volume import SeriesVolume

logger = logging.getLogger(__name__)

# Patient/study attributes of type 2 that a derived object copies from its source; absent ones are added empty.
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_PIXEL_DATA = 0x7FE00010
# tags as BaseTag: pydicom's lookups then skip converting the key (a third of their time, per slice)
_IPP, _IOP, _PER_FRAME = BaseTag(0x00200032), BaseTag(0x00200037), BaseTag(0x52009230)


def _tag(keyword: str) -> BaseTag:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return BaseTag(tag)


def _text(ds: Dataset, tag: BaseTag) -> str:
    try:
        value = ds[tag].value  # not ds.get: its checks cost a third of the lookup, 1500 lookups a series
    except KeyError:
        return ""
    return "" if value is None else str(value).strip()


def meta_uid(ds: Dataset, keyword: str, meta_keyword: str) -> str:
    """``ds.<keyword>``, or the file meta's ``<meta_keyword>`` when the former is blank ('' if both are)."""
    value = _text(ds, _tag(keyword))
    if not value and getattr(ds, "file_meta", None) is not None:
        value = _text(ds.file_meta, _tag(meta_keyword))
    return value


def frame_ipp_iop(ds: Dataset, frame: int = 1) -> tuple[np.ndarray | None, np.ndarray | None]:
    """ImagePositionPatient (LPS mm) and ImageOrientationPatient of one frame (1-based) of a legacy
    or enhanced header; None where absent."""
    ipp = ds.get(_IPP)  # by tag: keyword lookups cost more than the rest when called per slice
    iop = ds.get(_IOP)
    ipp = None if ipp is None else ipp.value
    iop = None if iop is None else iop.value
    if _PER_FRAME in ds:
        pf = ds[_PER_FRAME].value[frame - 1]
        shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        for group in (pf, shared):
            if ipp is None and "PlanePositionSequence" in group:
                ipp = group.PlanePositionSequence[0].get("ImagePositionPatient")
            if iop is None and "PlaneOrientationSequence" in group:
                iop = group.PlaneOrientationSequence[0].get("ImageOrientationPatient")
    return (
        None if ipp is None else np.asarray([float(v) for v in ipp]),
        None if iop is None else np.asarray([float(v) for v in iop]),
    )


def _ipp_iop_numbers(ds: Dataset, frame: int) -> list[float] | None:
    """The 3 + 6 numbers of a frame's ImagePositionPatient (LPS mm) and ImageOrientationPatient
    (:func:`frame_ipp_iop`'s), None where absent or of the wrong length."""
    ipp, iop = ds.get(_IPP), ds.get(_IOP)
    if ipp is not None and iop is not None:  # a legacy header: frame_ipp_iop's answer without its arrays
        p, o = ipp.value, iop.value
        if isinstance(p, MultiValue) and isinstance(o, MultiValue) and len(p) == 3 and len(o) == 6:
            return [*map(float, p), *map(float, o)]
    position, orientation = frame_ipp_iop(ds, frame)
    if position is None or orientation is None or position.shape != (3,) or orientation.shape != (6,):
        return None
    return [*position.tolist(), *orientation.tolist()]


def check_volume_matches_headers(volume: SeriesVolume) -> np.ndarray:
    """Guard against a volume whose array/affine no longer match its headers (resampled, reordered):
    a derived object's frames or contours would then land on the wrong slices.

    Returns:
        ``(K, 3)`` the source ImagePositionPatient (LPS mm) of every slice ``k``.

    Raises:
        DicomError: a slice without position/orientation, or a Siemens mosaic (its slices are tiles of
        one image, which a SEG frame or an RTSTRUCT contour cannot reference). InputError: the affine
        disagrees with a slice's position (by more than a quarter slice) or orientation.
    """
    if volume.tile_numbers:
        raise DicomError(
            "a Siemens mosaic: its slices are tiles of one image, which DICOM SEG frames and RTSTRUCT contours "
            "cannot reference; write NIfTI instead (--format nifti)",
            path=volume.source_files[0] if volume.source_files else None,
        )
    affine = np.asarray(volume.affine_lps, dtype=np.float64)
    spacing = voxel_spacing(affine)
    n = len(volume.datasets)
    table = np.empty((n, 9))
    for k, ds in enumerate(volume.datasets):
        row = _ipp_iop_numbers(ds, volume.frame_numbers[k] if volume.frame_numbers else 1)
        if row is None:
            raise DicomError(f"source slice {k} has no valid ImagePositionPatient/ImageOrientationPatient")
        table[k] = row
    positions, orientations = table[:, :3], table[:, 3:]
    expect = affine[:3, 3] + np.arange(n)[:, None] * affine[:3, 2]
    off = np.linalg.norm(positions - expect, axis=1) > 0.25 * spacing[2] + 1e-3
    if off.any():
        k = int(np.argmax(off))
        raise InputError(
            f"volume slice {k} is at {expect[k].round(3).tolist()} mm but its source header says "
            f"{positions[k].round(3).tolist()}; the volume no longer matches its DICOM headers"
        )
    axes = np.concatenate([affine[:3, 0] / spacing[0], affine[:3, 1] / spacing[1]])
    bad = np.abs(orientations - axes).max(axis=1) > 1e-3
    if bad.any():
        raise InputError(f"volume axes do not follow the source slice {int(np.argmax(bad))}'s ImageOrientationPatient")
    return positions


@dataclass
class SourceSeries:
    """The UIDs and header a derived object needs of its source series (repaired, see
    :func:`source_series`).

    Attributes:
        instances: the distinct source instances (the volume's datasets, not copied), first-seen order.
        instance_of_slice: for each slice ``k``, its index into ``instances``.
        frame_numbers: for each slice ``k``, its 1-based frame number in its instance.
        sop_class_uids, sop_instance_uids: per instance (blank ones taken from the file meta).
        study_instance_uid, series_instance_uid, frame_of_reference_uid: of the whole series
            (derived when blank and allowed).
        first: a copy of the first instance's header without pixel data, with the UIDs above, a
            blank SpecificCharacterSet removed and missing type 2 patient/study attributes added empty.
        multiframe: one enhanced multi-frame instance holds all slices.
        source_files: as ``SeriesVolume.source_files`` (for messages).
    """

    instances: list[Dataset]
    instance_of_slice: list[int]
    frame_numbers: list[int]
    sop_class_uids: list[str]
    sop_instance_uids: list[str]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    first: Dataset
    multiframe: bool
    source_files: list[str] = field(default_factory=list)


def source_series(volume: SeriesVolume, allow_generated_uids: bool = False) -> SourceSeries:
    """Collect what a SEG or RTSTRUCT references of ``volume``'s series, repairing what can be repaired.

    Blank SOPInstanceUID/SOPClassUID (as left by some anonymisers) are taken from the file meta
    (MediaStorageSOPInstanceUID/ClassUID), which names the same instance. Blank Study/Series/Frame
    of Reference UIDs cannot be recovered: that raises, unless ``allow_generated_uids`` (then a
    UID derived from the source SOP Instance UIDs is used, the same on every run, and the derived
    object references a study/series no PACS holds; a warning is logged).

    Raises:
        InputError: no headers, or not one header per slice. DicomError: an instance without
        SOP UIDs, blank series-level UIDs (unless allowed), slices of different series.
    """
    if not volume.datasets:
        raise InputError("the volume carries no DICOM headers; a derived DICOM object needs its source series")
    if len(volume.datasets) != volume.shape[2]:
        raise InputError(f"{len(volume.datasets)} headers for {volume.shape[2]} slices")
    index: dict[int, int] = {}
    instances: list[Dataset] = []
    of_slice: list[int] = []
    for ds in volume.datasets:
        if id(ds) not in index:
            index[id(ds)] = len(instances)
            instances.append(ds)
        of_slice.append(index[id(ds)])
    multiframe = len(instances) == 1 and int(instances[0].get("NumberOfFrames", 1) or 1) > 1
    if not multiframe and len(instances) != volume.shape[2]:
        raise InputError(f"{len(instances)} distinct source headers for {volume.shape[2]} slices")
    frames = [int(f) for f in volume.frame_numbers] if volume.frame_numbers else [1] * volume.shape[2]

    uids: dict[str, list[str]] = {}
    from_meta: set[str] = set()
    for kw, meta_kw in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"), ("SOPClassUID", "MediaStorageSOPClassUID")):
        tag, meta_tag = _tag(kw), _tag(meta_kw)
        values = []
        for n, ds in enumerate(instances):
            value = _text(ds, tag)
            if not value:
                meta = getattr(ds, "file_meta", None)
                value = _text(meta, meta_tag) if meta is not None else ""
                if not value:
                    where = volume.source_files[n] if n < len(volume.source_files) else f"slice {n}"
                    raise DicomError(
                        f"source header has no {kw} (nor file meta {meta_kw}); it cannot be referenced", where
                    )
                from_meta.add(kw)
            values.append(value)
        uids[kw] = values
    for kw in sorted(from_meta):
        logger.warning("source %s blank in (some) datasets; using the file meta's value", kw)

    series_level: dict[str, str] = {}
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        tag = _tag(kw)
        found = {_text(d, tag) for d in instances}
        if "" in found:
            if not allow_generated_uids:
                raise DicomError(
                    f"source series has a blank {kw}: an object written for it could not reference its source "
                    "faithfully (pass allow_generated_uids=True to write one with a derived UID anyway)",
                    volume.source_files[0] if volume.source_files else None,
                )
            uid = generate_uid(entropy_srcs=[kw, *uids["SOPInstanceUID"]])  # same sources -> same UID on every run
            logger.warning("source %s is blank; the derived object uses the derived UID %s", kw, uid)
            series_level[kw] = uid
        elif len(found) > 1:
            raise DicomError(f"source slices disagree on {kw}; not one series")
        else:
            series_level[kw] = found.pop()

    fixed = {"SOPInstanceUID": uids["SOPInstanceUID"][0], "SOPClassUID": uids["SOPClassUID"][0], **series_level}
    return SourceSeries(
        instances=instances,
        instance_of_slice=of_slice,
        frame_numbers=frames,
        sop_class_uids=uids["SOPClassUID"],
        sop_instance_uids=uids["SOPInstanceUID"],
        study_instance_uid=series_level["StudyInstanceUID"],
        series_instance_uid=series_level["SeriesInstanceUID"],
        frame_of_reference_uid=series_level["FrameOfReferenceUID"],
        first=_repaired_header(instances[0], fixed),
        multiframe=multiframe,
        source_files=list(volume.source_files),
    )


def _repaired_header(ds: Dataset, uids: dict[str, str]) -> Dataset:
    """A copy of ``ds`` (elements shared, pixel data dropped) with ``uids`` set and the repairs of
    :class:`SourceSeries` ``first`` applied."""
    new = Dataset()
    for elem in ds:
        if elem.tag != _PIXEL_DATA:  # derived objects only need the header
            new.add(elem)
    new.file_meta = getattr(ds, "file_meta", FileMetaDataset())
    if "SpecificCharacterSet" in new and not new.SpecificCharacterSet:
        del new.SpecificCharacterSet  # blank = default repertoire; highdicom rejects ''
    for kw in TYPE2_PATIENT_STUDY:  # type 2 (may be empty, must be present); some exports drop them
        if kw not in new:
            new[kw] = DataElement(_tag(kw), pydicom.datadict.dictionary_VR(kw), None)
    for kw, value in uids.items():
        if str(ds.get(kw, "")) != value:
            # replace, not assign: the element object is shared with the caller's dataset
            new[kw] = DataElement(_tag(kw), "UI", value)
    return new


def prepare_source_headers(volume: SeriesVolume, allow_generated_uids: bool = False) -> list[Dataset]:
    """Repaired copies of the distinct source headers (first-seen order), as highdicom wants its
    ``source_images``: see :func:`source_series` for the repairs."""
    src = source_series(volume, allow_generated_uids)
    series_level = {
        "StudyInstanceUID": src.study_instance_uid,
        "SeriesInstanceUID": src.series_instance_uid,
        "FrameOfReferenceUID": src.frame_of_reference_uid,
    }
    return [
        _repaired_header(
            ds, {"SOPInstanceUID": src.sop_instance_uids[n], "SOPClassUID": src.sop_class_uids[n], **series_level}
        )
        for n, ds in enumerate(src.instances)
    ]
