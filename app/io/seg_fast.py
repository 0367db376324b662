"""The fast BINARY SEG builder: the same object highdicom's ``Segmentation(...)`` builds for a label
map on a series' grid, built in one pass.

Where the time goes in highdicom (per frame: numpy checks, a pydicom Dataset tree of ~12 nested
datasets, per-frame bit packing; then pydicom encoding those trees) is replaced by:

* the non-empty planes found with one reduction, gathered and transposed to frame order once,
  one comparison per segment, and bit packing of the whole frame stack with
  ``np.packbits(bitorder="little")`` (PS3.5 8.1.1: 1-bit pixels fill each byte from its least
  significant bit; BINARY frames follow one another without padding, so a frame may start
  mid-byte when rows x columns is not a multiple of 8);
* the per-frame functional groups, SourceImageSequence and ReferencedSeriesSequence encoded as
  bytes from per-slice templates (:mod:`app.io.dicom_bytes`) and added as raw elements.

highdicom still builds what it is fast at: the SOP Common/patient/study/equipment header
(``SOPClass`` + its public copy methods), the codes, segment descriptions, plane orientation and
pixel measures; its ``highdicom.spatial`` functions give the frame order and slice spacing, so
they are highdicom's by construction. Differences from highdicom's output (kept on purpose): the
ContributingEquipmentSequence does not list highdicom as the "software library used to create
this instance" (it did not create it); a pixel data of odd length is padded with NUL
(highdicom pads with the character ``"0"``); the DimensionOrganizationUID has pydicom's UID root.
``tests/io/test_seg_fast.py`` compares everything else with highdicom attribute by attribute.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import DS, format_number_as_ds

from app.errors import InputError
from app.io import dicom_bytes as db
from app.io.derived_header import acquisition_equipment, sop_header
from app.io.dicom_source import SourceSeries
from app.io.segments import SEG_STORAGE
from app.io.volume import frame_stack

logger = logging.getLogger(__name__)

_PLANES_PER_PASS = 8  # planes compared per pass: a 512 x 512 frame's mask is 256 KiB, 8 of them fit in cache

# Native transfer syntaxes the fast builder writes (compressed ones go through highdicom).
FAST_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # Explicit / Implicit VR Little Endian

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


def binary_frames(
    labels_ijk: np.ndarray, values: Sequence[int], plane_order: np.ndarray, omit_empty_frames: bool
) -> tuple[list[tuple[int, int, int]], np.ndarray, bytes]:
    """Frames of a BINARY SEG for a label map, in highdicom's order (segment, then ``plane_order``).

    Args:
        labels_ijk: ``[i, j, k]`` label map (any integer or bool dtype).
        values: the label value of segment ``n`` at ``values[n - 1]``.
        plane_order: slice indices ``k`` in frame order (highdicom's sort along its slice normal).
        omit_empty_frames: leave out frames without a voxel of their segment (as highdicom, all
            frames are kept when the whole map is empty).

    Returns:
        ``(frames, planes, pixel_data)``: per frame ``(segment number, k, plane rank)`` (the rank,
        1-based, is the frame's dimension index value along the planes kept); the ``k`` of the
        planes kept, in rank order; the frames' bits packed contiguously (not yet padded to even
        length).

    Raises:
        InputError: the map holds values other than 0 and ``values``.

    Only the box of rows, columns and planes that hold labels is gathered, transposed to frame
    order and compared (organs cover a fraction of a CT slice); the frames are zero outside it.
    """
    ni, nj, _ = labels_ijk.shape
    # one pass over the map: which (row j, plane k) hold a label (max over i is cheaper than any)
    unsigned = labels_ijk.dtype == bool or np.issubdtype(labels_ijk.dtype, np.unsignedinteger)
    jk = np.max(labels_ijk, axis=0) > 0 if unsigned else np.any(labels_ijk, axis=0)
    nonempty, rows_used = jk.any(axis=0), np.flatnonzero(jk.any(axis=1))
    keep_all = not omit_empty_frames or not nonempty.any()
    planes = np.asarray(plane_order if keep_all else [k for k in plane_order if nonempty[k]], dtype=np.intp)
    j0, j1 = (int(rows_used[0]), int(rows_used[-1]) + 1) if len(rows_used) else (0, 0)
    step = int(planes[1] - planes[0]) if len(planes) > 1 else 1
    if len(planes) and abs(step) == 1 and np.array_equal(np.diff(planes), np.full(len(planes) - 1, step)):
        lo = int(planes.min())  # consecutive planes (the usual case): a view, no gather
        box = labels_ijk[:, j0:j1, lo : lo + len(planes)]  # [i, j - j0, k - lo]
    else:
        box, step = labels_ijk[:, j0:j1][:, :, planes], 1  # [i, j - j0, plane rank]
    cols_used = np.flatnonzero(box.max(axis=(1, 2)) > 0 if unsigned and box.size else box.any(axis=(1, 2)))
    i0, i1 = (int(cols_used[0]), int(cols_used[-1]) + 1) if len(cols_used) else (0, 0)
    byte_aligned = ni % 8 == 0  # then every frame row starts on a byte: pack the box's bytes only
    if byte_aligned:
        i0, i1 = i0 // 8 * 8, -(-i1 // 8) * 8
    sub = frame_stack(box[i0:i1])  # [plane, row j - j0, column i - i0]
    if step < 0:
        sub = sub[::-1]  # plane rank order (a view)
    frames: list[tuple[int, int, int]] = []
    kept: list[np.ndarray] = []
    counted = 0
    # each segment compared a few planes at a time in one reused buffer and packed (8x smaller) before
    # its empty frames are dropped: whole-stack masks would each be fresh memory (in a one-shot run their
    # page faults cost more than the comparisons)
    buf = np.empty((min(_PLANES_PER_PASS, max(1, len(sub))), *sub.shape[1:]), dtype=bool)
    for n, value in enumerate(values, start=1):
        bits = (
            np.empty((len(sub), sub.shape[1], sub.shape[2] // 8), np.uint8)
            if byte_aligned
            else np.empty_like(sub, bool)
        )
        for p0 in range(0, len(sub), _PLANES_PER_PASS):
            part = sub[p0 : p0 + _PLANES_PER_PASS]
            mask = np.equal(part, value, out=buf[: len(part)])
            counted += int(np.count_nonzero(mask))
            bits[p0 : p0 + len(mask)] = np.packbits(mask, axis=2, bitorder="little") if byte_aligned else mask
        rank = np.arange(len(planes)) if keep_all else np.flatnonzero(bits.any(axis=(1, 2)))
        frames.extend((n, int(planes[r]), int(r) + 1) for r in rank)
        kept.append(bits if keep_all else bits[rank])
    if counted != int(np.count_nonzero(sub)):  # every labelled voxel is in the box
        unknown = np.setdiff1d(np.unique(sub), np.asarray([0, *values]))
        raise InputError(f"label values {unknown.tolist()} occur in the label map but have no segment description")
    # the frames, zero outside the box, in one buffer (packed bytes, or masks where frames share bytes)
    c0, c1 = (i0 // 8, i1 // 8) if byte_aligned else (i0, i1)
    stack = np.zeros((len(frames), nj, ni // 8 if byte_aligned else ni), np.uint8 if byte_aligned else bool)
    f0 = 0
    for part in kept:
        stack[f0 : f0 + len(part), j0:j1, c0:c1] = part
        f0 += len(part)
    # rows x columns not a multiple of 8: the frames follow one another bit by bit, packed as one stream
    pixel_data = stack.tobytes() if byte_aligned else np.packbits(stack.reshape(-1), bitorder="little").tobytes()
    return frames, planes, pixel_data


def _ds_text(values) -> str:
    """DS values as highdicom writes them (``DS(v, auto_format=True)``), joined for one element."""
    return "\\".join(str(DS(v, auto_format=True)) for v in values)


def build_binary_seg(
    src: SourceSeries,
    positions_lps: np.ndarray,
    labels_ijk: np.ndarray,
    values: Sequence[int],
    descriptions: Sequence[Dataset],
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
) -> Dataset:
    """A BINARY SEG dataset (ready for ``save_as``) of ``labels_ijk`` on ``src``'s grid, equal to
    highdicom's ``Segmentation(source_images, pixels, "BINARY", descriptions, ...)`` but for the
    differences listed in the module docstring. ``positions_lps`` ``(K, 3)``: each slice's
    ImagePositionPatient (mm, as :func:`app.io.dicom_source.check_volume_matches_headers` returns
    them); ``values[n - 1]`` is segment ``n``'s label value;
    ``descriptions`` are the SegmentSequence items (:func:`app.io.segments.segment_descriptions`).
    """
    import highdicom as hd
    from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector, get_volume_positions
    from pydicom.sr.codedict import codes

    if transfer_syntax_uid not in FAST_TRANSFER_SYNTAXES:
        raise ValueError(f"the fast SEG builder writes only native transfer syntaxes, not {transfer_syntax_uid}")
    implicit = transfer_syntax_uid == "1.2.840.10008.1.2"
    first = src.first
    nk = labels_ijk.shape[2]

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
        return _ds_text(src.instances[src.instance_of_slice[k]].ImagePositionPatient)

    iop = [float(v) for v in orientation[0].ImageOrientationPatient]
    normal = get_normal_vector(iop, index_convention=VOLUME_INDEX_CONVENTION)
    positions = np.asarray(positions_lps, dtype=np.float64)
    distances, plane_order = np.unique(positions @ normal, return_index=True)
    if len(distances) != nk:
        raise InputError("two source slices share one position; not a volume a SEG can describe")
    if "SpacingBetweenSlices" not in measures:
        spacing, _ = get_volume_positions(image_positions=positions, image_orientation=iop)  # type: ignore[arg-type]
        if spacing is not None:
            measures.SpacingBetweenSlices = format_number_as_ds(spacing)

    frames, planes, pixel_data = binary_frames(labels_ijk, values, plane_order, omit_empty_frames)

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
    purpose = hd.sr.CodedConcept.from_code(codes.cid7202.SourceImageForImageProcessingOperation)
    derivation = hd.sr.CodedConcept.from_code(codes.cid7203.SegmentationImageDerivation)
    purpose_seq = db.sequence(_T["PurposeOfReference"], [db.encode_dataset(purpose, implicit)], implicit)
    derivation_seq = db.sequence(_T["DerivationCode"], [db.encode_dataset(derivation, implicit)], implicit)
    preserved = db.text(_T["SpatialLocationsPreserved"], "CS", "YES", implicit)

    def ref_uids(n: int) -> bytes:
        return db.text(_T["RefSOPClass"], "UI", src.sop_class_uids[n], implicit) + db.text(
            _T["RefSOPInstance"], "UI", src.sop_instance_uids[n], implicit
        )

    slice_blocks: dict[int, bytes] = {}
    for k in {f[1] for f in frames}:
        source_item = ref_uids(src.instance_of_slice[k])
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
    refs = [ref_uids(n) for n in range(len(src.instances))]
    ds[_T["SourceImage"]] = db.raw_element(_T["SourceImage"], "SQ", b"".join(db.item(r) for r in refs), implicit)
    series_item = db.sequence(_T["RefInstance"], refs, implicit) + db.text(
        _T["SeriesInstanceUID"], "UI", src.series_instance_uid, implicit
    )
    ds[_T["RefSeries"]] = db.raw_element(_T["RefSeries"], "SQ", db.item(series_item), implicit)

    ds.NumberOfFrames = len(frames)
    if len(pixel_data) % 2:
        pixel_data += b"\0"
    ds[0x7FE00010] = DataElement(0x7FE00010, "OB", pixel_data)
    # raw elements are written as they are only when the dataset claims the target encoding
    ds.set_original_encoding(implicit, True, ds._character_set)
    return ds
