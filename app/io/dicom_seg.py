"""DICOM Segmentation (SEG) objects: write a label map as a SEG, read a SEG back onto a grid.

Writing uses highdicom (``BINARY`` by default: one segment per described label, empty frames
omitted, every frame referencing its source slice and carrying the source slice's
ImagePositionPatient). Reading decodes the frames with pydicom (plus two small decoders for
encodings pydicom 3 cannot handle, see :func:`_decode_frames`) and places every frame on the
reference grid by its geometry, cross-checked against the source instance it references.

Index order: label maps are ``[i, j, k]`` (column, row, slice); a SEG frame is ``[row, column]``,
so frame ``k`` is ``labels_ijk[:, :, k].T``.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from app import __version__
from app.errors import ConfigError, DicomError, InputError
from app.io.atomic import atomic_path
from app.io.geometry import voxel_spacing, world_to_voxel
from app.io.volume import SeriesVolume

logger = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
# Supplement 244 "Deflated Image Frame Compression": each frame is a raw RFC 1951 deflate stream.
DEFLATED_IMAGE_FRAME = "1.2.840.10008.1.2.8.1"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

Code3 = tuple[str, str, str]  # (code value, coding scheme designator, code meaning)


@dataclass(frozen=True)
class SegmentSpec:
    """One label of a label map, described for DICOM.

    Attributes:
        label_value: voxel value of this label in the label map (> 0).
        label_name: human-readable name (SegmentLabel), e.g. ``"liver"``.
        category_code: SegmentedPropertyCategory as ``(value, scheme, meaning)``,
            e.g. ``("123037004", "SCT", "Anatomical Structure")``.
        type_code: SegmentedPropertyType, e.g. ``("10200004", "SCT", "Liver")``.
        color_rgb: optional display colour, 0-255 per channel.
    """

    label_value: int
    label_name: str
    category_code: Code3 = ("123037004", "SCT", "Anatomical Structure")
    type_code: Code3 = ("85756007", "SCT", "Tissue")
    color_rgb: tuple[int, int, int] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> SegmentSpec:
        """Build from bundle metadata: keys ``label_value``, ``label_name``, ``category_code``,
        ``type_code`` (each a 3-item list) and optional ``color_rgb``."""
        try:
            return cls(
                label_value=int(d["label_value"]),
                label_name=str(d["label_name"]),
                category_code=tuple(d.get("category_code", cls.category_code)),  # type: ignore[arg-type]
                type_code=tuple(d.get("type_code", cls.type_code)),  # type: ignore[arg-type]
                color_rgb=tuple(d["color_rgb"]) if d.get("color_rgb") else None,  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad segment description {d!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _code(c: Code3, what: str):
    from highdicom.sr import CodedConcept

    if len(c) != 3 or not all(isinstance(x, str) and x for x in c):
        raise ConfigError(f"{what} must be (value, scheme, meaning) strings, got {c!r}")
    return CodedConcept(value=c[0], scheme_designator=c[1], meaning=c[2])


def _meta_uid(ds: Dataset, keyword: str, meta_keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    if not value and getattr(ds, "file_meta", None) is not None:
        value = str(ds.file_meta.get(meta_keyword, "") or "").strip()
    return value


# Patient/study attributes of type 2 that a SEG copies from its source; absent ones are added empty.
_TYPE2_PATIENT_STUDY = (
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


def _source_headers(volume: SeriesVolume, allow_generated_uids: bool) -> list[Dataset]:
    """Unique source headers (k order) with the UIDs a SEG needs to reference them.

    Blank SOPInstanceUID/SOPClassUID (as left by some anonymisers) are taken from the file meta
    (MediaStorageSOPInstanceUID/ClassUID), which names the same instance. Blank Study/Series/Frame
    of Reference UIDs cannot be recovered: that raises, unless ``allow_generated_uids`` (then a
    UID derived from the source SOP Instance UIDs is used and the SEG references a study/series
    no PACS holds; a warning is logged).
    """
    unique: list[Dataset] = []
    seen: set[int] = set()
    for ds in volume.datasets:
        if id(ds) not in seen:
            seen.add(id(ds))
            unique.append(ds)
    fixed: list[Dataset] = []
    from_meta: set[str] = set()
    for n, ds in enumerate(unique):
        new = Dataset()
        for elem in ds:
            if elem.tag != 0x7FE00010:  # PixelData: highdicom only needs the header
                new.add(elem)
        new.file_meta = getattr(ds, "file_meta", Dataset())
        if "SpecificCharacterSet" in new and not new.SpecificCharacterSet:
            del new.SpecificCharacterSet  # blank = default repertoire; highdicom rejects ''
        for kw in _TYPE2_PATIENT_STUDY:  # type 2 (may be empty, must be present); some exports drop them
            if kw not in new:
                new[kw] = DataElement(pydicom.datadict.tag_for_keyword(kw), pydicom.datadict.dictionary_VR(kw), None)
        where = volume.source_files[n] if n < len(volume.source_files) else f"slice {n}"
        for kw, meta_kw in (
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
            ("SOPClassUID", "MediaStorageSOPClassUID"),
        ):
            value = _meta_uid(ds, kw, meta_kw)
            if not value:
                raise DicomError(
                    f"source header has no {kw} (nor file meta {meta_kw}); a SEG cannot reference it", where
                )
            if value != str(ds.get(kw, "")):
                from_meta.add(kw)
                # replace, not assign: the element object is shared with the caller's dataset
                new[kw] = DataElement(pydicom.datadict.tag_for_keyword(kw), "UI", value)
        fixed.append(new)
    for kw in sorted(from_meta):
        logger.warning("source %s blank in (some) datasets; using the file meta's value", kw)
    sop_uids = [str(d.SOPInstanceUID) for d in fixed]
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(d.get(kw, "") or "").strip() for d in fixed}
        if values == {""} or "" in values:
            if not allow_generated_uids:
                raise DicomError(
                    f"source series has a blank {kw}: a SEG written for it could not reference its source "
                    "faithfully (pass allow_generated_uids=True to write one with a derived UID anyway)",
                    volume.source_files[0] if volume.source_files else None,
                )
            uid = generate_uid(entropy_srcs=[kw, *sop_uids])  # same sources -> same UID on every run
            logger.warning("source %s is blank; the SEG uses the derived UID %s", kw, uid)
            for d in fixed:
                d[kw] = DataElement(pydicom.datadict.tag_for_keyword(kw), "UI", uid)
        elif len(values) > 1:
            raise DicomError(f"source slices disagree on {kw}; not one series")
    return fixed


def _check_volume_matches_headers(volume: SeriesVolume) -> None:
    """Guard against a volume whose array/affine no longer match its headers (resampled, reordered):
    the SEG's frames would then be written at the wrong slices."""
    affine = np.asarray(volume.affine_lps, dtype=np.float64)
    spacing = voxel_spacing(affine)
    for k, ds in enumerate(volume.datasets):
        frame = volume.frame_numbers[k] if volume.frame_numbers else 1
        ipp, iop = _frame_ipp_iop(ds, frame)
        if ipp is None or iop is None:
            raise DicomError(f"source slice {k} has no ImagePositionPatient/ImageOrientationPatient")
        expect = affine[:3, 3] + k * affine[:3, 2]
        if np.linalg.norm(ipp - expect) > 0.25 * spacing[2] + 1e-3:
            raise InputError(
                f"volume slice {k} is at {expect.round(3).tolist()} mm but its source header says "
                f"{ipp.round(3).tolist()}; the volume no longer matches its DICOM headers"
            )
        if not np.allclose(affine[:3, 0] / spacing[0], iop[:3], atol=1e-3) or not np.allclose(
            affine[:3, 1] / spacing[1], iop[3:], atol=1e-3
        ):
            raise InputError(f"volume axes do not follow the source slice {k}'s ImageOrientationPatient")


def _frame_ipp_iop(ds: Dataset, frame: int = 1) -> tuple[np.ndarray | None, np.ndarray | None]:
    """ImagePositionPatient and ImageOrientationPatient of one frame (legacy or enhanced header)."""
    ipp = ds.get("ImagePositionPatient")
    iop = ds.get("ImageOrientationPatient")
    if "PerFrameFunctionalGroupsSequence" in ds:
        pf = ds.PerFrameFunctionalGroupsSequence[frame - 1]
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


def write_seg(
    volume: SeriesVolume,
    labels_ijk: np.ndarray,
    segments: Sequence[SegmentSpec],
    algorithm: tuple[str, str],
    output_path: str | Path,
    *,
    series_description: str = "segapp segmentation",
    series_number: int = 900,
    instance_number: int = 1,
    manufacturer: str = "segapp",
    manufacturer_model_name: str = "segapp",
    device_serial_number: str = "0",
    segmentation_type: Literal["BINARY", "LABELMAP"] = "BINARY",
    transfer_syntax_uid: str = pydicom.uid.ExplicitVRLittleEndian,
    omit_empty_frames: bool = True,
    allow_generated_uids: bool = False,
    workers: int = 0,
    content_label: str = "SEGAPP",
) -> Path:
    """Write ``labels_ijk`` (on ``volume``'s grid) as a DICOM SEG next to its source series.

    Args:
        volume: the source series (headers in ``k`` order; for an enhanced multi-frame source,
            ``frame_numbers`` say which frame each slice is).
        labels_ijk: integer label map ``[i, j, k]`` with ``volume.shape``; 0 is background.
        segments: one :class:`SegmentSpec` per label to write; each becomes one segment (numbered
            1..N in order of ``label_value``). A label present in the map but not described raises.
        algorithm: ``(name, version)`` of the model/bundle (AlgorithmIdentification, family
            "Artificial Intelligence").
        output_path: the SEG file to write (atomically).
        segmentation_type: ``"BINARY"`` (default, what viewers read) or ``"LABELMAP"`` (Label Map
            Segmentation Storage, 2024; highdicom adds a background segment 0; dicom3tools'
            dciodvfy here does not know that IOD yet and reports errors on it).
        transfer_syntax_uid: e.g. Explicit VR Little Endian (default) or RLE/JPEG 2000 lossless.
        omit_empty_frames: leave out frames with no voxel of their segment (smaller, faster).
        allow_generated_uids: see :func:`_source_headers`; default False raises on blank
            Study/Series/FrameOfReference UIDs.
        workers: highdicom's frame-compression worker processes (only matter when compressing).

    Returns:
        ``output_path``. The SEG shares the source's StudyInstanceUID and FrameOfReferenceUID,
        has new Series/SOP Instance UIDs, and every frame's ImagePositionPatient equals its
        source slice's.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    output_path = Path(output_path)
    if not volume.datasets:
        raise InputError("the volume carries no DICOM headers; a SEG needs its source series")
    labels_ijk = np.asarray(labels_ijk)
    if labels_ijk.shape != volume.shape:
        raise InputError(f"label map shape {labels_ijk.shape} differs from the series shape {volume.shape}")
    if not np.issubdtype(labels_ijk.dtype, np.integer) and labels_ijk.dtype != bool:
        raise InputError(f"label map must be integer, got {labels_ijk.dtype}")
    if len(volume.datasets) != volume.shape[2]:
        raise InputError(f"{len(volume.datasets)} headers for {volume.shape[2]} slices")
    if not segments:
        raise ConfigError("no segments described; a SEG needs at least one")
    specs = sorted(segments, key=lambda s: s.label_value)
    values = [s.label_value for s in specs]
    if len(set(values)) != len(values) or min(values) < 1 or max(values) > 65535:
        raise ConfigError(f"segment label values must be unique and in 1..65535, got {values}")
    present = np.unique(labels_ijk)
    present = present[present != 0]
    unknown = sorted(set(present.tolist()) - set(values))
    if unknown:
        raise InputError(f"label values {unknown} occur in the label map but have no segment description")
    if segmentation_type not in ("BINARY", "LABELMAP"):
        raise ConfigError(f"segmentation_type must be BINARY or LABELMAP, got {segmentation_type!r}")

    _check_volume_matches_headers(volume)
    sources = _source_headers(volume, allow_generated_uids)

    # label value -> segment number 1..N (DICOM numbers segments consecutively from 1)
    lut = np.zeros(max(values) + 1, dtype=np.uint8 if len(specs) < 256 else np.uint16)
    lut[values] = np.arange(1, len(specs) + 1)
    seg_numbers = lut[labels_ijk.view(np.uint8) if labels_ijk.dtype == bool else labels_ijk]
    pixels = np.ascontiguousarray(seg_numbers.transpose(2, 1, 0))  # [k, j, i] = (frames, rows, cols)

    plane_positions = None
    multiframe = len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1
    if multiframe:
        # one enhanced source: give each slice its source frame's position; highdicom then
        # references the matching frame numbers (volume k order need not be frame order)
        plane_positions = []
        for k in range(volume.shape[2]):
            ipp, _ = _frame_ipp_iop(sources[0], volume.frame_numbers[k])
            plane_positions.append(hd.PlanePositionSequence("PATIENT", [float(v) for v in ipp]))
    elif len(sources) != volume.shape[2]:
        raise InputError(f"{len(sources)} distinct source headers for {volume.shape[2]} slices")

    algo = hd.AlgorithmIdentificationSequence(
        name=str(algorithm[0]), family=codes.cid7162.ArtificialIntelligence, version=str(algorithm[1])
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=s.label_name[:64],
            segmented_property_category=_code(s.category_code, f"segment {s.label_name!r} category_code"),
            segmented_property_type=_code(s.type_code, f"segment {s.label_name!r} type_code"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            display_color=hd.color.CIELabColor.from_rgb(*s.color_rgb) if s.color_rgb else None,
        )
        for n, s in enumerate(specs, start=1)
    ]
    try:
        with warnings.catch_warnings():
            # highdicom warns about odd source PatientName strings; not ours to fix, keep logs clean
            warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=pixels,
                segmentation_type=segmentation_type,
                segment_descriptions=descriptions,
                series_instance_uid=generate_uid(),
                series_number=int(series_number),
                sop_instance_uid=generate_uid(),
                instance_number=int(instance_number),
                manufacturer=manufacturer,
                manufacturer_model_name=manufacturer_model_name,
                software_versions=f"segapp {__version__}",
                device_serial_number=device_serial_number,
                content_label=content_label,
                content_description=series_description[:64],
                transfer_syntax_uid=transfer_syntax_uid,
                plane_positions=plane_positions,
                omit_empty_frames=omit_empty_frames,
                workers=workers,
            )
    except (ValueError, TypeError, AttributeError) as exc:
        raise DicomError(f"highdicom refused to build the SEG: {exc}") from exc
    seg.SeriesDescription = series_description[:64]
    with atomic_path(output_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    logger.info("wrote SEG with %d segments, %d frames", len(specs), int(seg.NumberOfFrames))
    return output_path


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _unpack_bits(data: bytes, n_pixels: int) -> np.ndarray:
    """DICOM 1-bit pixels: least significant bit first."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits.size < n_pixels:
        raise ValueError(f"frame holds {bits.size} bits, expected {n_pixels}")
    return bits[:n_pixels]


def _decode_frames(ds: Dataset, path: str) -> np.ndarray:
    """All frames as ``(frames, rows, columns)``.

    pydicom decodes most encodings. Two it cannot (pydicom 3.0) are decoded here, per frame, each
    encapsulated frame being padded to a whole byte: Deflated Image Frame Compression
    (1.2.840.10008.1.2.8.1, raw deflate) and RLE Lossless with 1 bit allocated (one RLE segment of
    packed bits, decoded with pylibjpeg-rle).
    """
    from pydicom.encaps import generate_frames

    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8))
    try:
        if ts == DEFLATED_IMAGE_FRAME or (ts == RLE_LOSSLESS and bits == 1):
            dtype = np.dtype(f"<u{max(bits // 8, 1)}")
            frames = []
            for raw in generate_frames(ds.PixelData, number_of_frames=n):
                if ts == DEFLATED_IMAGE_FRAME:
                    data = zlib.decompress(raw, -15)
                else:
                    from rle.utils import decode_segment

                    header = np.frombuffer(raw[:64], dtype="<u4")
                    if header[0] != 1:
                        raise ValueError(f"1-bit RLE frame with {header[0]} segments (expected 1)")
                    data = decode_segment(raw[int(header[1]) :])
                if bits == 1:
                    frames.append(_unpack_bits(data, rows * cols).reshape(rows, cols))
                else:
                    frames.append(np.frombuffer(data, dtype=dtype)[: rows * cols].reshape(rows, cols))
            return np.stack(frames)
        arr = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the user needs one clear message
        raise DicomError(f"cannot decode the SEG pixel data (transfer syntax {ts}): {exc}", path) from exc
    return arr.reshape(n, rows, cols)


def _group(ds: Dataset, pf: Dataset | None, keyword: str) -> Dataset | None:
    """First item of a functional group macro, per-frame first, then shared."""
    for groups in (pf, ds.get("SharedFunctionalGroupsSequence", [None])[0]):
        if groups is not None and keyword in groups and len(groups[keyword].value):
            return groups[keyword].value[0]
    return None


@dataclass
class _SegFrame:
    segment: int  # referenced segment number (0 for LABELMAP frames)
    ipp: np.ndarray | None
    source_uid: str | None
    source_frame: int | None


def _frames_info(ds: Dataset, path: str) -> tuple[list[_SegFrame], np.ndarray | None, np.ndarray | None]:
    """Per-frame segment number, position and source reference; the shared orientation and
    pixel spacing (row spacing, column spacing)."""
    labelmap = str(ds.get("SegmentationType", "")).upper() == "LABELMAP"
    n = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(per_frame) != n:
        raise DicomError(f"{len(per_frame)} per-frame functional groups for {n} frames", path)
    frames: list[_SegFrame] = []
    iop = spacing = None
    for f in range(n):
        pf = per_frame[f]
        seg_id = _group(ds, pf, "SegmentIdentificationSequence")
        if seg_id is None and not labelmap:
            raise DicomError(f"frame {f + 1} names no segment (SegmentIdentificationSequence)", path)
        pos = _group(ds, pf, "PlanePositionSequence")
        ori = _group(ds, pf, "PlaneOrientationSequence")
        meas = _group(ds, pf, "PixelMeasuresSequence")
        if ori is not None:
            this_iop = np.asarray([float(v) for v in ori.ImageOrientationPatient])
            if iop is not None and not np.allclose(iop, this_iop, atol=1e-4):
                raise DicomError("frames have different orientations; not a stack of parallel slices", path)
            iop = this_iop
        if meas is not None and "PixelSpacing" in meas:
            spacing = np.asarray([float(v) for v in meas.PixelSpacing])
        src_uid = src_frame = None
        deriv = _group(ds, pf, "DerivationImageSequence")
        if deriv is not None and "SourceImageSequence" in deriv and len(deriv.SourceImageSequence):
            item = deriv.SourceImageSequence[0]
            src_uid = str(item.get("ReferencedSOPInstanceUID", "")) or None
            if "ReferencedFrameNumber" in item:
                src_frame = int(item.ReferencedFrameNumber)
        frames.append(
            _SegFrame(
                segment=0 if labelmap else int(seg_id.ReferencedSegmentNumber),
                ipp=None if pos is None else np.asarray([float(v) for v in pos.ImagePositionPatient]),
                source_uid=src_uid,
                source_frame=src_frame,
            )
        )
    return frames, iop, spacing


def _own_grid(frames: list[_SegFrame], iop, spacing, rows: int, cols: int, ds: Dataset, path: str):
    """Grid (affine_lps, shape) spanned by the SEG's own frames, for reading without a reference."""
    if iop is None or spacing is None or any(f.ipp is None for f in frames):
        raise DicomError("SEG frames lack plane position/orientation; a reference series is needed", path)
    normal = np.cross(iop[:3], iop[3:])
    dist = np.array([float(np.dot(normal, f.ipp)) for f in frames])
    levels = np.unique(np.round(dist, 3))
    shared_meas = _group(ds, None, "PixelMeasuresSequence")
    step = float(shared_meas.get("SpacingBetweenSlices", 0) or 0) if shared_meas is not None else 0.0
    if step <= 0:
        step = (
            float(np.min(np.diff(levels)))
            if len(levels) > 1
            else float((shared_meas.get("SliceThickness", 1.0) if shared_meas is not None else 1.0) or 1.0)
        )
    nk = int(round((levels[-1] - levels[0]) / step)) + 1
    origin = frames[int(np.argmin(dist))].ipp
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * spacing[1]
    affine[:3, 1] = iop[3:] * spacing[0]
    affine[:3, 2] = normal * step
    affine[:3, 3] = origin
    return affine, (cols, rows, nk)


def _reference_volume(reference, seg_ds: Dataset) -> SeriesVolume:
    if isinstance(reference, SeriesVolume):
        return reference
    from app.io.dicom_series import read_series

    series_uid = None
    ref_series = seg_ds.get("ReferencedSeriesSequence", [])
    if len(ref_series):
        series_uid = str(ref_series[0].get("SeriesInstanceUID", "")) or None
    try:
        return read_series(reference, series_uid=series_uid)
    except DicomError:
        if series_uid is None:
            raise
        # the folder may hold the series under other UIDs (re-exported); take its default series
        logger.warning("reference folder lacks the SEG's referenced series; using its default series")
        return read_series(reference)


def _place_frame(
    frame_ipp: np.ndarray,
    iop: np.ndarray,
    spacing: np.ndarray,
    rows: int,
    cols: int,
    affine_lps: np.ndarray,
    tol: float,
):
    """Voxel index arrays ``(i, j, k)`` (each ``(rows, cols)``) of a frame's pixels on the grid of
    ``affine_lps`` (voxel -> LPS mm; ``frame_ipp``/``iop`` are LPS too) when the frame shares the grid's
    axes (up to order and sign); None when the frame does not lie on the grid."""
    v0 = world_to_voxel(affine_lps, frame_ipp)
    dcol = world_to_voxel(affine_lps, frame_ipp + iop[:3] * spacing[1]) - v0  # one column step
    drow = world_to_voxel(affine_lps, frame_ipp + iop[3:] * spacing[0]) - v0  # one row step
    for vec in (v0, dcol, drow):
        if np.abs(vec - np.round(vec)).max() > tol:
            return None
    v0, dcol, drow = np.round(v0).astype(int), np.round(dcol).astype(int), np.round(drow).astype(int)
    if np.abs(dcol).sum() != 1 or np.abs(drow).sum() != 1:
        return None  # frame pixels are not single grid steps (different spacing or an oblique cut)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return tuple(v0[a] + c * dcol[a] + r * drow[a] for a in range(3))


def read_seg(
    seg_path: str | Path,
    reference: SeriesVolume | str | Path | None = None,
    *,
    segments: Sequence[SegmentSpec] | None = None,
    overlap: Literal["error", "highest"] = "error",
    tol_voxel: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a DICOM SEG as a label map on the reference series' grid.

    Args:
        seg_path: the SEG file (BINARY, FRACTIONAL or LABELMAP; any transfer syntax pydicom decodes
            plus deflated-frame and 1-bit RLE).
        reference: the source series (a :class:`SeriesVolume` or a folder read with
            ``read_series``, preferring the series the SEG references). ``None``: the grid spanned
            by the SEG's own frames.
        segments: when given, segment ``n`` gets the ``label_value`` of the spec whose
            ``label_name`` equals its SegmentLabel (as :func:`write_seg` wrote it); otherwise a
            segment's label value is its segment number.
        overlap: a voxel in two segments raises (``"error"``) or takes the higher label value
            (``"highest"``).
        tol_voxel: how far (in voxels) a frame may lie off the reference grid.

    Frames are placed by ReferencedSOPInstanceUID (+ frame number) when that names a reference
    slice, else by ImagePositionPatient; when both exist they must agree. In-plane, a frame is
    placed by its geometry, so frames smaller than the reference (e.g. 510x510 on 512x512) work.
    FRACTIONAL frames count as inside above half of MaximumFractionalValue.

    Returns:
        ``(labels_ijk, affine_lps)``: uint8 (uint16 when a label exceeds 255) and the grid's voxel -> LPS (mm) affine.
    """
    path = str(seg_path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise DicomError(f"not a readable DICOM file: {exc}", path) from exc
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in (SEG_STORAGE, LABELMAP_SEG_STORAGE):
        raise DicomError(f"not a DICOM SEG (SOP Class {sop_class or 'missing'})", path)
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames, iop, spacing = _frames_info(ds, path)
    pixels = _decode_frames(ds, path)
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    if seg_type == "FRACTIONAL":
        pixels = pixels > float(ds.get("MaximumFractionalValue", 255)) / 2

    # segment number -> label value
    descr = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in ds.get("SegmentSequence", [])}
    if not descr:
        raise DicomError("SEG describes no segments (SegmentSequence)", path)
    if segments is not None:
        by_name = {s.label_name: s.label_value for s in segments}
        missing = sorted({name for name in descr.values() if name not in by_name})
        if missing:
            raise InputError(f"SEG segments {missing} are not among the given segment descriptions", path)
        label_of = {n: by_name[name] for n, name in descr.items()}
    else:
        label_of = dict((n, n) for n in descr)
    out_dtype = np.uint8 if max(label_of.values()) < 256 else np.uint16

    if reference is None:
        affine_lps, shape = _own_grid(frames, iop, spacing, rows, cols, ds, path)
        ref_uids: dict[tuple[str, int], int] = {}
    else:
        vol = _reference_volume(reference, ds)
        affine_lps, shape = np.asarray(vol.affine_lps, dtype=np.float64), vol.shape
        ref_uids = {}
        for k, rds in enumerate(vol.datasets):
            uid = _meta_uid(rds, "SOPInstanceUID", "MediaStorageSOPInstanceUID")
            fn = vol.frame_numbers[k] if vol.frame_numbers else 1
            ref_uids[(uid, fn)] = k
    if iop is None or spacing is None:
        raise DicomError("SEG has no PlaneOrientation/PixelMeasures functional group", path)

    ref_spacing = voxel_spacing(affine_lps)
    labels = np.zeros(shape, dtype=out_dtype)
    filled = np.zeros(shape, dtype=bool) if overlap == "error" else None
    owner = np.zeros(shape, dtype=np.uint16) if overlap == "error" else None
    unplaced = 0
    for f, info in enumerate(frames):
        mask = pixels[f] != 0
        if not mask.any():
            continue
        k_ref = None
        if info.source_uid is not None:
            k_ref = ref_uids.get((info.source_uid, info.source_frame or 1))
        if info.ipp is not None:
            idx = _place_frame(info.ipp, iop, spacing, rows, cols, affine_lps, tol_voxel)
            if idx is None:
                raise DicomError(
                    f"frame {f + 1} at {info.ipp.round(3).tolist()} mm does not lie on the reference grid "
                    f"(spacing {ref_spacing.round(4).tolist()} mm)",
                    path,
                )
            if k_ref is not None and not (idx[2] == k_ref).all():
                raise DicomError(
                    f"frame {f + 1} references source slice {k_ref} but its position puts it at slice "
                    f"{int(idx[2].flat[0])}",
                    path,
                )
        elif k_ref is not None:
            if (rows, cols) != (shape[1], shape[0]):
                raise DicomError(f"frame {f + 1} has no position and its size differs from the reference", path)
            r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
            idx = (c, r, np.full_like(r, k_ref))
        else:
            raise DicomError(f"frame {f + 1} has neither a position nor a reference to a known slice", path)
        ii, jj, kk = (a[mask] for a in idx)
        inside = (ii >= 0) & (ii < shape[0]) & (jj >= 0) & (jj < shape[1]) & (kk >= 0) & (kk < shape[2])
        unplaced += int((~inside).sum())
        ii, jj, kk = ii[inside], jj[inside], kk[inside]
        seg_values = pixels[f][mask][inside] if seg_type == "LABELMAP" else None
        if seg_type == "LABELMAP":
            values = np.array([label_of.get(int(s), 0) for s in range(int(seg_values.max()) + 1)])[seg_values]
        else:
            values = np.full(ii.shape, label_of[info.segment])
        if filled is not None:
            clash = filled[ii, jj, kk] & (owner[ii, jj, kk] != (seg_values if seg_values is not None else info.segment))
            if clash.any():
                other = int(owner[ii, jj, kk][clash][0])
                raise DicomError(
                    f"segments {other} and {info.segment} overlap in {int(clash.sum())} voxels; "
                    "read with overlap='highest' to keep the higher label",
                    path,
                )
            filled[ii, jj, kk] = True
            owner[ii, jj, kk] = seg_values if seg_values is not None else info.segment
        labels[ii, jj, kk] = np.maximum(labels[ii, jj, kk], values.astype(out_dtype))
    if unplaced:
        raise DicomError(f"{unplaced} segmented pixels lie outside the reference grid {tuple(shape)}", path)
    return labels, affine_lps


def seg_to_nifti(seg_path: str | Path, reference_folder: str | Path | None, output_path: str | Path, **kwargs) -> Path:
    """``segapp seg2nifti``: read a SEG onto its reference series' grid and save a NIfTI label map
    (RAS affine). ``kwargs`` go to :func:`read_seg`."""
    from app.io.geometry import lps_to_ras
    from app.io.nifti import save_labels_nifti

    labels, affine_lps = read_seg(seg_path, reference_folder, **kwargs)
    return save_labels_nifti(labels, lps_to_ras(affine_lps), output_path)
