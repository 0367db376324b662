"""The fast BINARY SEG builder: the same object highdicom's ``Segmentation(...)`` builds for a label
map on a series' grid, built in one pass.

Where the time goes in highdicom (per frame: numpy checks, a pydicom Dataset tree of ~12 nested
datasets, per-frame bit packing; then pydicom encoding those trees) is replaced by:

* the frames: the box that holds labels found with one reduction, compared per segment and
  bit-packed with numpy a few planes at a time, the PixelData written after the rest of the dataset,
  a few frames at a time (:mod:`app.io.seg_pixels`);
* the per-frame functional groups, SourceImageSequence and ReferencedSeriesSequence encoded as
  bytes from per-slice templates (:mod:`app.io.dicom_bytes`) and added as raw elements.

highdicom still builds what it is fast at: the codes, segment descriptions (encoded once per set of
segments, :func:`encoded_segment_sequence`), contributing equipment, plane orientation and pixel
measures; the SOP Common/patient/study header is the one its ``SOPClass`` builds, without its module
tables (:mod:`app.io.derived_header`); its ``highdicom.spatial`` functions give the frame order and
slice spacing, so they are highdicom's by construction. Differences from highdicom's output (kept on
purpose): the ContributingEquipmentSequence does not list highdicom as the "software library used to
create this instance" (it did not create it); a pixel data of odd length is padded with NUL
(highdicom pads with the character ``"0"``); the DimensionOrganizationUID has pydicom's UID root.
``tests/io/test_seg_fast.py`` compares everything else with highdicom attribute by attribute.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds, is_valid_ds

from app.errors import InputError
from app.io import dicom_bytes as db
from app.io.derived_header import acquisition_equipment, sop_header
from app.io.dicom_source import SourceSeries
from app.io.seg_pixels import Frames, PackedFrames, binary_frames, write_pixel_data
from app.io.segments import SEG_STORAGE, SegmentSpec, segment_descriptions

# Native transfer syntaxes the fast builder writes (compressed ones go through highdicom).
FAST_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # Explicit / Implicit VR Little Endian

_IPP = BaseTag(0x00200032)  # as BaseTag, pydicom's lookups skip converting the key
_T = {  # tags used in the byte templates
    "RefSOPClass": 0x00081150,
    "RefSOPInstance": 0x00081155,
    "RefFrameNumber": 0x00081160,
    "RefSeries": 0x00081115,
    "RefInstance": 0x0008114A,
    "SourceImage": 0x00082112,
    "DerivationImage": 0x00089124,
    "DerivationCode": 0x00089215,
    "SeriesInstanceUID": 0x0020000E,
    "IPP": 0x00200032,
    "FrameContent": 0x00209111,
    "PlanePosition": 0x00209113,
    "DimIndexValues": 0x00209157,
    "SpatialLocationsPreserved": 0x0028135A,
    "PurposeOfReference": 0x0040A170,
    "SegmentIdentification": 0x0062000A,
    "RefSegmentNumber": 0x0062000B,
}


def ds_value_text(value: object) -> str:
    """``str(DS(value, auto_format=True))`` (how highdicom writes DS values) without building the DS
    (3.5 -> 0.6 us a value): a DS's original string when it is valid (or already auto-formatted),
    else the number formatted by pydicom's ``format_number_as_ds``."""
    text = value.strip() if isinstance(value, str) else getattr(value, "original_string", None)
    if text is None:
        return format_number_as_ds(float(value))  # type: ignore[arg-type]
    if getattr(value, "auto_format", False) or is_valid_ds(text):
        return text
    return format_number_as_ds(float(text))


@functools.lru_cache(maxsize=32)
def encoded_segment_sequence(
    specs: tuple[SegmentSpec, ...], algorithm: tuple[str, str], implicit: bool
) -> bytes | None:
    """The items of the SegmentSequence of ``segment_descriptions(specs, algorithm)``, encoded once
    per set of segments (a DICOM node writes the same ones series after series: 1.1 ms a SEG to build
    and write them with highdicom and pydicom). None when a text is not ASCII: its bytes then depend
    on the source's character set."""
    texts = [*algorithm, *(t for s in specs for t in (s.label_name, *s.category_code, *s.type_code))]
    texts += [t for s in specs if s.type_modifier_code for t in s.type_modifier_code]
    if not all(str(t).isascii() for t in texts):
        return None
    return b"".join(db.item(db.encode_dataset(d, implicit)) for d in segment_descriptions(specs, algorithm))


@functools.lru_cache(maxsize=2)
def _source_image_codes(implicit: bool) -> tuple[bytes, bytes, bytes]:
    """The encoded PurposeOfReferenceCodeSequence, DerivationCodeSequence and SpatialLocationsPreserved
    of every frame's derivation item: the same in every SEG (0.3 ms a SEG to build and encode)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    purpose = hd.sr.CodedConcept.from_code(codes.cid7202.SourceImageForImageProcessingOperation)
    derivation = hd.sr.CodedConcept.from_code(codes.cid7203.SegmentationImageDerivation)
    return (
        db.sequence(_T["PurposeOfReference"], [db.encode_dataset(purpose, implicit)], implicit),
        db.sequence(_T["DerivationCode"], [db.encode_dataset(derivation, implicit)], implicit),
        db.text(_T["SpatialLocationsPreserved"], "CS", "YES", implicit),
    )


def plane_order(positions_lps: np.ndarray, iop: Sequence[float]) -> np.ndarray | None:
    """The slices ``k`` in highdicom's frame order: sorted by the distance (mm) of their position
    ``positions_lps[k]`` (LPS) along the normal of ``iop`` (``highdicom.spatial.get_normal_vector``);
    None when two slices lie at one distance."""
    from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector

    normal = get_normal_vector(iop, index_convention=VOLUME_INDEX_CONVENTION)
    distances, order = np.unique(np.asarray(positions_lps, dtype=np.float64) @ normal, return_index=True)
    return order if len(distances) == len(positions_lps) else None


def expected_plane_order(affine_lps: np.ndarray, nk: int) -> np.ndarray | None:
    """:func:`plane_order` of the ``nk`` slice positions and the orientation that ``affine_lps``
    (voxel -> LPS mm) gives: the headers' order whenever they match the affine (as
    :func:`app.io.dicom_source.check_volume_matches_headers` checks, to a quarter slice), known before
    they are read."""
    affine = np.asarray(affine_lps, dtype=np.float64)
    norms = np.linalg.norm(affine[:3, :2], axis=0)
    if not np.all(norms > 0):  # no orientation to foretell from (check_volume_matches_headers refuses it)
        return None
    axes = affine[:3, :2] / norms
    positions = affine[:3, 3] + np.arange(nk)[:, None] * affine[:3, 2]
    return plane_order(positions, [*axes[:, 0], *axes[:, 1]])


def _ds_text(values) -> str:
    """DS values as highdicom writes them, joined for one element."""
    return "\\".join(ds_value_text(v) for v in values)


def build_binary_seg(
    src: SourceSeries,
    positions_lps: np.ndarray,
    labels_ijk: np.ndarray,
    values: Sequence[int],
    descriptions: Sequence[Dataset] | bytes,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    manufacturer: str,
    manufacturer_model_name: str,
    software_versions: str,
    device_serial_number: str,
    content_label: str,
    content_description: str,
    series_description: str,
    transfer_syntax_uid: str,
    omit_empty_frames: bool,
    ahead: tuple[np.ndarray, Future[Frames]] | None = None,
) -> tuple[Dataset, PackedFrames | bytes]:
    """A BINARY SEG of ``labels_ijk`` on ``src``'s grid, equal to highdicom's ``Segmentation(source_images,
    pixels, "BINARY", descriptions, ...)`` but for the differences listed in the module docstring: the
    dataset without its PixelData, and that PixelData (:func:`save_binary_seg` writes both).

    ``positions_lps`` ``(K, 3)``: each slice's ImagePositionPatient (mm, as
    :func:`app.io.dicom_source.check_volume_matches_headers` returns them); ``values[n - 1]`` is
    segment ``n``'s label value; ``descriptions`` are the SegmentSequence items
    (:func:`app.io.segments.segment_descriptions`) or their encoding (:func:`encoded_segment_sequence`);
    ``ahead``: ``(plane order, binary_frames(labels_ijk, values, that order, omit_empty_frames))`` started
    before the headers were read (:func:`expected_plane_order`); used when the headers give that order.
    """
    import highdicom as hd
    from highdicom.spatial import get_volume_positions

    if transfer_syntax_uid not in FAST_TRANSFER_SYNTAXES:
        raise ValueError(f"the fast SEG builder writes only native transfer syntaxes, not {transfer_syntax_uid}")
    implicit = transfer_syntax_uid == "1.2.840.10008.1.2"
    first = src.first

    # --- header: what highdicom's SOPClass and Segmentation.__init__ set, without its module tables
    ds = sop_header(
        first,
        sop_class_uid=SEG_STORAGE,
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        modality="SEG",
        transfer_syntax_uid=transfer_syntax_uid,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        device_serial_number=device_serial_number,
        series_description=series_description,
    )
    equipment = acquisition_equipment(first)
    if equipment is not None:
        ds.ContributingEquipmentSequence = [equipment]
    ds.SegmentationType = "BINARY"
    ds.ContentLabel = content_label
    ds.ContentDescription = content_description
    ds.FrameOfReferenceUID = src.frame_of_reference_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", None)
    ds.BitsAllocated = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = first.get("LossyImageCompression", "00")
    if ds.LossyImageCompression == "01":
        for kw in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if kw in first:
                ds[kw] = first[kw]
    ds.Rows, ds.Columns = labels_ijk.shape[1], labels_ijk.shape[0]
    if isinstance(descriptions, bytes):
        ds[0x00620002] = db.raw_element(0x00620002, "SQ", descriptions, implicit)  # SegmentSequence
    else:
        ds.SegmentSequence = list(descriptions)
    ds.SegmentsOverlap = "NO"  # one label per voxel

    dim_org = generate_uid()
    dims = []
    for pointer, group, label in (
        (0x0062000B, 0x0062000A, "Referenced Segment Number"),
        (0x00200032, 0x00209113, "Image Position Patient"),
    ):
        d = Dataset()
        d.DimensionOrganizationUID = dim_org
        d.DimensionIndexPointer = pointer
        d.FunctionalGroupPointer = group
        d.DimensionDescriptionLabel = label
        dims.append(d)
    ds.DimensionIndexSequence = dims
    org = Dataset()
    org.DimensionOrganizationUID = dim_org
    ds.DimensionOrganizationSequence = [org]

    # --- geometry: plane positions and orientation as highdicom takes them from the source
    if src.multiframe:
        sfg = first.SharedFunctionalGroupsSequence[0]
        orientation = hd.PlaneOrientationSequence.from_sequence(sfg.PlaneOrientationSequence)
        measures = Dataset()
        measures.update(sfg.PixelMeasuresSequence[0])  # a copy: SpacingBetweenSlices may be added below
    else:
        orientation = hd.PlaneOrientationSequence(
            coordinate_system="PATIENT", image_orientation=first.ImageOrientationPatient
        )
        measures = hd.PixelMeasuresSequence(
            pixel_spacing=first.PixelSpacing,
            slice_thickness=first.SliceThickness,
            spacing_between_slices=first.get("SpacingBetweenSlices", None),
        )[0]

    def ipp_text(k: int) -> str:  # as highdicom writes the frame positions (DS, auto-formatted)
        if src.multiframe:  # write_seg's highdicom path passes the source frames' positions as floats
            return _ds_text([float(v) for v in positions_lps[k]])
        return _ds_text(src.instances[src.instance_of_slice[k]][_IPP].value)  # by tag: 70 lookups a SEG

    iop = [float(v) for v in orientation[0].ImageOrientationPatient]
    positions = np.asarray(positions_lps, dtype=np.float64)
    order = plane_order(positions, iop)
    if order is None:
        raise InputError("two source slices share one position; not a volume a SEG can describe")
    if "SpacingBetweenSlices" not in measures:
        spacing, _ = get_volume_positions(image_positions=positions, image_orientation=iop)  # type: ignore[arg-type]
        if spacing is not None:
            measures.SpacingBetweenSlices = format_number_as_ds(spacing)

    # --- the references to every source instance: they need no frame, so they are made while the frames are
    refs = [  # each source instance's SOP class and instance UIDs, encoded once
        db.text(_T["RefSOPClass"], "UI", cls, implicit) + db.text(_T["RefSOPInstance"], "UI", uid, implicit)
        for cls, uid in zip(src.sop_class_uids, src.sop_instance_uids)
    ]
    ds[_T["SourceImage"]] = db.raw_element(_T["SourceImage"], "SQ", b"".join(db.item(r) for r in refs), implicit)
    series_item = db.sequence(_T["RefInstance"], refs, implicit) + db.text(
        _T["SeriesInstanceUID"], "UI", src.series_instance_uid, implicit
    )
    ds[_T["RefSeries"]] = db.raw_element(_T["RefSeries"], "SQ", db.item(series_item), implicit)

    if ahead is not None and np.array_equal(ahead[0], order):
        frames, planes, pixel_data = ahead[1].result()
    else:  # the headers order the planes otherwise than the affine foretold (or nothing was started)
        frames, planes, pixel_data = binary_frames(labels_ijk, values, order, omit_empty_frames)

    shared = Dataset()
    shared.PlaneOrientationSequence = orientation
    shared.PixelMeasuresSequence = [measures]
    single_segment = len(values) == 1
    if single_segment:  # highdicom puts a lone segment's identification in the shared groups
        ident = Dataset()
        ident.add(DataElement(0x0062000B, "US", 1))
        shared.SegmentIdentificationSequence = [ident]
        if len(planes) > 1:
            kept = np.sort(planes)  # highdicom checks the kept planes in input order
            spacing, _ = get_volume_positions(
                image_positions=positions[kept],
                image_orientation=iop,
                sort=False,
            )
            if spacing is not None and spacing > 0.0:
                ds.DimensionOrganizationType = "3D"
    ds.SharedFunctionalGroupsSequence = [shared]

    # --- per-frame functional groups and references, encoded from per-slice templates
    purpose_seq, derivation_seq, preserved = _source_image_codes(implicit)

    slice_blocks: dict[int, bytes] = {}
    for k in {f[1] for f in frames}:
        source_item = refs[src.instance_of_slice[k]]
        if src.multiframe:
            source_item += db.text(_T["RefFrameNumber"], "IS", str(src.frame_numbers[k]), implicit)
        source_item += preserved + purpose_seq
        deriv = db.sequence(
            _T["DerivationImage"], [db.sequence(_T["SourceImage"], [source_item], implicit) + derivation_seq], implicit
        )
        slice_blocks[k] = deriv
    plane_blocks = {
        k: db.sequence(_T["PlanePosition"], [db.text(_T["IPP"], "DS", ipp_text(k), implicit)], implicit)
        for k in slice_blocks
    }
    seg_blocks = {
        n: b""
        if single_segment
        else db.sequence(
            _T["SegmentIdentification"],
            [db.element(_T["RefSegmentNumber"], "US", struct.pack("<H", n), implicit)],
            implicit,
        )
        for n in range(1, len(values) + 1)
    }
    per_frame = b"".join(
        db.item(
            slice_blocks[k]
            + db.sequence(
                _T["FrameContent"],
                [db.element(_T["DimIndexValues"], "UL", struct.pack("<II", n, rank), implicit)],
                implicit,
            )
            + plane_blocks[k]
            + seg_blocks[n]
        )
        for n, k, rank in frames
    )
    ds[0x52009230] = db.raw_element(0x52009230, "SQ", per_frame, implicit)  # PerFrameFunctionalGroupsSequence

    ds.NumberOfFrames = len(frames)
    # raw elements are written as they are only when the dataset claims the target encoding
    ds.set_original_encoding(implicit, True, ds._character_set)
    return ds, pixel_data


def save_binary_seg(ds: Dataset, pixel_data: PackedFrames | bytes, path: str | Path) -> None:
    """Write ``ds`` (as ``save_as`` does) and then its PixelData, the dataset's last element."""
    if any(tag >= 0x7FE00010 for tag in ds.keys()):
        raise ValueError("the dataset holds PixelData or a later element; the PixelData must come last")
    implicit = ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    with open(path, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
        write_pixel_data(fh, pixel_data, implicit)
