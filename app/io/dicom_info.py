"""What a folder scan knows about a DICOM series (headers only), and the header helpers it uses.

``SeriesInfo`` is one stack of images that can form one 3D volume; ``ScanResult`` is what
``app.io.dicom_scan.scan`` returns. ``PixelLocation`` is where a file's pixel data lies, found while
its header was read, so that decoding reads the pixel bytes without parsing the header again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.valuerep import AMBIGUOUS_VR, VR

# Direction cosines closer than this (absolute, per component; ~0.06 degrees) are the same plane.
# Scanners write IOP with different rounding on different slices (e.g. -0.059771 vs -0.0597709).
IOP_TOLERANCE = 1e-3
# A plane within this angle of a patient axis gets that axis' name, otherwise "oblique".
_ORIENTATION_LABEL_DEG = 1.0
_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class PixelLocation:
    """Where a file's pixel data element lies.

    Attributes:
        offset: file offset (bytes) of the element's value.
        length: the value length in bytes, or ``UNDEFINED_LENGTH`` (encapsulated, compressed frames).
        keyword: "PixelData", "FloatPixelData" or "DoubleFloatPixelData".
    """

    offset: int
    length: int
    keyword: str = "PixelData"

    @property
    def encapsulated(self) -> bool:
        return self.length == UNDEFINED_LENGTH


def locate_pixel_data(fp: BinaryIO, ds: Dataset) -> PixelLocation | None:
    """The pixel data element that starts at ``fp``'s position, where ``pydicom.dcmread(fp,
    stop_before_pixels=True)`` left it; ``None`` at the end of the file or for a deflated file (whose
    dataset pydicom read from an inflated copy, so file offsets mean nothing).

    Raises:
        ValueError: an explicit VR element with a VR that pixel data cannot have (damage).
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or str(meta.get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.1.99":
        return None
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return None
    start = fp.tell()
    head = fp.read(8)
    if len(head) < 8:
        return None
    end = "<" if little else ">"
    group, elem = struct.unpack(end + "HH", head[:4])
    keyword = _PIXEL_TAGS.get(group << 16 | elem)
    if keyword is None:
        return None
    if implicit:
        length = struct.unpack(end + "I", head[4:8])[0]
        return PixelLocation(start + 8, length, keyword)
    vr = head[4:6]
    if vr not in (b"OB", b"OW", b"OF", b"OD", b"UN"):
        # pydicom would read such an element as implicit VR, taking the VR and length bytes for pixels.
        raise ValueError(f"the {keyword} element has an invalid VR {vr!r}")
    more = fp.read(4)  # OB, OW, OF, OD, UN: 2 reserved bytes, then a 4-byte length
    if len(more) < 4:
        return None
    return PixelLocation(start + 12, struct.unpack(end + "I", more)[0], keyword)


@dataclass
class SeriesInfo:
    """One stack of images that can form a 3D volume (headers only).

    Attributes:
        key: unique name to select it with (see ``app.io.dicom_scan``).
        uid: SeriesInstanceUID ('' when blank).
        modality, description: Modality and SeriesDescription.
        series_number: SeriesNumber (``None`` when absent).
        n_slices: number of 2D images (frames of a multi-frame object, tiles of a Siemens mosaic).
        files: file paths (one per single-frame image; one for a multi-frame object or a mosaic).
        headers: the datasets read with ``stop_before_pixels=True``, in ``files`` order.
        orientation: "axial", "sagittal", "coronal", "oblique" or "unknown" (no IOP).
        image_orientation: the six direction cosines of the plane (``None`` when absent).
        rows, columns: size of one 2D image in pixels (of one tile for a mosaic).
        is_image: False for SEG, RTSTRUCT, SR, PR and other objects without an image to segment.
        multiframe: True for a multi-frame object (one file, ``n_slices`` frames).
        mosaic: True for Siemens mosaic files (ImageType MOSAIC: all slices tiled in one image).
        study_uid, frame_of_reference_uid: StudyInstanceUID and FrameOfReferenceUID.
        split_note: when the UID was split into several stacks, a line describing all of them.
        group_key: for one volume or echo of a 4D / multi-echo series, the key of the whole set
            (what ``--series-uid`` refuses as ambiguous); '' otherwise.
        echo: EchoNumbers of this stack when a multi-echo series was split by echo, else ``None``.
        volume: 1-based volume index when a 4D series was split into volumes, else ``None``.
        volume_attribute: the header attribute that told the volumes apart (e.g.
            "TemporalPositionIdentifier"), '' when not split.
        patient_token: an opaque digest of PatientID and PatientName, to count patients without
            showing them ('' when both are blank).
        pixel_locations: file -> where its pixel data lies (found by the scan; absent = unknown).
    """

    key: str
    uid: str
    modality: str
    description: str
    series_number: int | None
    n_slices: int
    files: list[str]
    headers: list[Dataset] = field(repr=False, default_factory=list)
    orientation: str = "unknown"
    image_orientation: tuple[float, ...] | None = None
    rows: int = 0
    columns: int = 0
    is_image: bool = True
    multiframe: bool = False
    mosaic: bool = False
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    split_note: str = ""
    group_key: str = ""
    echo: int | None = None
    volume: int | None = None
    volume_attribute: str = ""
    patient_token: str = field(default="", repr=False)
    pixel_locations: dict[str, PixelLocation] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        """One line for listings: key, modality, description, slice count, size, orientation."""
        kind = "" if self.is_image else " (not an image series)"
        unit = "frame(s)" if self.multiframe else "slice(s)"
        mosaic = " (mosaic)" if self.mosaic else ""
        return (
            f"{self.key or '(no UID)'} | {self.modality or '?'} | '{self.description}' | "
            f"{self.n_slices} {unit}{mosaic} | {self.columns}x{self.rows} | {self.orientation}{kind}"
        )


@dataclass
class ScanResult:
    """What ``scan`` found: the series, the files it skipped with the reason for each, and which
    series the damaged ones belong to (when that could still be read)."""

    root: str
    series: list[SeriesInfo]
    skipped: list[tuple[str, str]]
    n_files: int
    # SeriesInstanceUID -> the skipped files of that series whose header was readable up to the
    # damage (reading that series is refused: it would lack them).
    damaged: dict[str, list[str]] = field(default_factory=dict)


# What the reader uses from a header. pydicom converts values lazily, on first access, and damaged
# values raise then (ValueError, OSError, struct.error...); ``damaged_element`` converts them all once,
# when the header is read, so that a damaged file is named there and nothing later trips over it.
HEADER_KEYWORDS = (
    "Modality",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "FrameOfReferenceUID",
    "PatientID",
    "PatientName",
    "ImageType",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "EchoNumbers",
    "TemporalPositionIdentifier",
    "AcquisitionNumber",
    "TriggerTime",
    "DiffusionBValue",
    "DiffusionGradientOrientation",
    "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
    "DirectoryRecordSequence",
)


_HEADER_TAGS = {int(tag_for_keyword(name) or 0): name for name in HEADER_KEYWORDS}
# VRs whose conversion pydicom follows with more work (US or SS by PixelRepresentation, nested datasets):
# those elements go through ``Dataset.__getitem__``.
_GETITEM_VRS = {*AMBIGUOUS_VR, VR.SQ}


def convert_element(ds: Dataset, tag: int) -> DataElement:
    """``ds[tag]`` (convert a raw element read from the file, once), for the plain VRs without the
    bookkeeping ``Dataset.__getitem__`` does around pydicom's own conversion (nested lookups; 5-8 % of a
    header scan). Raises what the conversion raises on a damaged value."""
    raw = ds.get_item(tag)  # as read: a RawDataElement until converted
    if isinstance(raw, RawDataElement) and raw.value is not None:  # None: a deferred read
        vr = raw.VR
        if vr in (None, VR.UN):  # implicit VR files carry none; UN resolves to the dictionary's VR (SQ too)
            vr = dictionary_VR(tag) if dictionary_has_tag(tag) else None
        if vr is not None and vr not in _GETITEM_VRS:
            elem = convert_raw_data_element(raw, encoding=ds.original_character_set, ds=ds)
            ds[tag] = elem
            return elem
    return ds[tag]


def damaged_element(ds: Dataset) -> str:
    """'' when every element the reader uses converts; else which one is damaged and how."""
    # plain ints: BaseTag compares in Python, and sets and sorting of BaseTags call that hundreds of times a file
    for tag in sorted(t for t in map(int, ds.keys()) if t in _HEADER_TAGS):
        name = _HEADER_TAGS[tag]
        try:
            elem = convert_element(ds, tag)
            value = elem.value
            if name.endswith("Sequence"):
                if elem.VR != "SQ":
                    return f"damaged {name} (VR {elem.VR}, not a sequence)"
                for item in value or ():
                    for _ in item.iterall():
                        pass
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged values
            return f"damaged {name} ({type(exc).__name__}: {exc})".replace("\n", " ")[:300]
    return ""


def functional_group_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """The item of functional group ``sequence`` (e.g. "PlanePositionSequence") that applies to
    frame ``frame_index`` (0-based) of an enhanced multi-frame object: per-frame wins over shared."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if isinstance(seq, PydicomSequence) and len(seq) > idx:
            inner = seq[idx].get(sequence)
            if isinstance(inner, PydicomSequence) and len(inner) > 0:
                return inner[0]
    return None


def is_enhanced_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def is_mosaic(ds: Dataset) -> bool:
    """Siemens mosaic: ImageType contains MOSAIC (the slices are tiles of one image)."""
    value = ds.get("ImageType")
    if value is None:
        return False
    try:
        values = [value] if isinstance(value, str) else list(value)
    except TypeError:
        return False
    return any(str(v).strip().upper() == "MOSAIC" for v in values)


def header_orientation(ds: Dataset) -> np.ndarray | None:
    """ImageOrientationPatient (6 floats) of a single-frame image or of frame 1 of a multi-frame one."""
    try:
        value = ds.get("ImageOrientationPatient")
        if value is None and is_enhanced_multiframe(ds):
            item = functional_group_item(ds, 0, "PlaneOrientationSequence")
            value = item.get("ImageOrientationPatient") if item is not None else None
        if value is None or isinstance(value, (str, bytes)) or len(value) != 6:
            return None
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except Exception:  # noqa: BLE001 - a damaged value is "no orientation" here; reading names it
        return None
    return arr if np.all(np.isfinite(arr)) else None


def header_position(ds: Dataset) -> np.ndarray | None:
    """ImagePositionPatient (3 floats, mm) of a single-frame image, ``None`` when absent or damaged."""
    try:
        value = ds.get("ImagePositionPatient")
        if value is None or isinstance(value, (str, bytes)) or len(value) != 3:
            return None
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except Exception:  # noqa: BLE001
        return None
    return arr if np.all(np.isfinite(arr)) else None


def orientation_label(iop: np.ndarray | None) -> str:
    """'axial', 'sagittal', 'coronal' (slice normal within 1 degree of a patient axis) or 'oblique'."""
    if iop is None:
        return "unknown"
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        return "unknown"
    normal = np.abs(normal / norm)
    axis = int(np.argmax(normal))
    if np.degrees(np.arccos(min(1.0, normal[axis]))) > _ORIENTATION_LABEL_DEG:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def header_int(ds: Dataset, name: str, default: int | None = None) -> int | None:
    """An integer attribute, ``default`` when absent, blank or not an integer."""
    try:
        value = ds.get(name)
        if value in (None, ""):
            return default
        return int(value)
    except Exception:  # noqa: BLE001 - damaged values read as absent here
        return default


def n_frames(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent or damaged)."""
    n = header_int(ds, "NumberOfFrames", 1)
    return max(1, n or 1)
