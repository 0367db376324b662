"""The 2D images of one DICOM stack, their validated geometry, order and LPS affine.

A ``Slice`` is one 2D image: a single-frame file, one frame of an enhanced multi-frame object, or
one tile of a Siemens mosaic. ``stack_slices`` builds them from the headers the scan read (checking
every number that goes into the affine: finite, positive spacings, frame counts that agree);
``check_and_sort`` validates the stack and sorts it along the slice normal; ``affine_lps`` builds the
voxel -> LPS (mm) affine (see ``app.io.dicom_series``) and refuses a non-finite or singular one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from app.errors import DicomError
from app.io.dicom_decode import count_encapsulated_frames, frame_bytes, pixel_description
from app.io.dicom_info import (
    IOP_TOLERANCE,
    PixelLocation,
    functional_group_item,
    is_enhanced_multiframe,
    is_mosaic,
)
from app.io.mosaic import MosaicLayout, mosaic_layout, mosaic_spacing, tile_positions

logger = logging.getLogger(__name__)

# Positions closer than this (mm) along the normal are the same slice position.
DUPLICATE_MM = 0.01
# Largest sideways drift of the slice positions from the normal line, as a fraction of the in-plane
# pixel size (with a floor for IPP rounding), before the series counts as tilted.
_TILT_DRIFT_PIXELS = 0.05
_TILT_DRIFT_FLOOR_MM = 0.01
# |det| of the affine's 3x3 part (mm^3) below which it is singular (no real voxel is that small).
_SINGULAR_MM3 = 1e-9
# Patient coordinates further than this from the origin (mm, 1 km) are damage, not geometry (and would
# overflow the slice steps).
_MAX_POSITION_MM = 1e6


@dataclass
class Slice:
    """One 2D image of the stack.

    Attributes:
        file: its file; frame: 1-based frame in that file; tile: 0-based mosaic tile (``None`` if not a mosaic).
        header: the file's header (no pixel data).
        ipp, iop: position of its first voxel (LPS mm) and the six direction cosines.
        pixel_spacing: (row spacing, column spacing) in mm; rows, columns: its size in pixels.
        slope, intercept: the rescale of its stored values; thickness: the raw slice spacing value and
            the attribute it came from (used for a one-slice stack only).
        position: its position along the stack's normal (mm), set by ``check_and_sort``.
    """

    file: str
    frame: int
    header: Dataset
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: np.ndarray
    rows: int
    columns: int
    slope: float
    intercept: float
    thickness: tuple[object, str] | None = None
    tile: int | None = None
    layout: MosaicLayout | None = None
    position: float = 0.0

    @property
    def where(self) -> str:
        """The file (and frame or tile) for messages."""
        if self.tile is not None:
            return f"{self.file} (tile {self.tile + 1})"
        if self.frame == 1 and not is_enhanced_multiframe(self.header):
            return self.file
        return f"{self.file} (frame {self.frame})"


def _floats(value, n: int, name: str, where: str) -> np.ndarray:
    try:
        if isinstance(value, (str, bytes)):
            value = [value]
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DicomError(f"{name} is not numeric ({value!r})", path=where) from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise DicomError(f"{name} must hold {n} finite numbers, found {value!r}", path=where)
    return arr


def _position(value, where: str) -> np.ndarray:
    arr = _floats(value, 3, "ImagePositionPatient", where)
    if np.max(np.abs(arr)) > _MAX_POSITION_MM:
        raise DicomError(
            f"ImagePositionPatient {arr.tolist()} lies more than {_MAX_POSITION_MM:.0e} mm from the patient origin",
            path=where,
        )
    return arr


def _pixel_spacing(value, where: str) -> np.ndarray:
    arr = _floats(value, 2, "PixelSpacing", where)
    if np.any(arr <= 0):
        raise DicomError(f"PixelSpacing must be two positive spacings in mm, found {arr.tolist()}", path=where)
    return arr


def _rescale(value, name: str, default: float, where: str) -> float:
    if value in (None, ""):
        return default
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise DicomError(f"{name} is not numeric ({value!r})", path=where) from exc
    if not math.isfinite(out):
        raise DicomError(f"{name} must be a finite number, found {value!r}", path=where)
    return out


def _raw_thickness(src: Dataset) -> tuple[object, str] | None:
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        value = src.get(name)
        if value not in (None, ""):
            return value, name
    return None


def slice_thickness(s: Slice) -> float:
    """The one-slice stack's slice spacing (mm): SpacingBetweenSlices, else SliceThickness, else 1.

    Raises:
        DicomError: the value is not a finite positive number.
    """
    if s.thickness is None:
        return 1.0
    value, name = s.thickness
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise DicomError(f"{name} is not numeric ({value!r})", path=s.where) from exc
    if not math.isfinite(out) or out <= 0:
        raise DicomError(f"{name} must be a finite positive slice spacing in mm, found {value!r}", path=s.where)
    return out


_MISSING = {
    "ImagePositionPatient": "missing ImagePositionPatient (0020,0032): cannot place the slice in space",
    "ImageOrientationPatient": "missing ImageOrientationPatient (0020,0037): the image plane is unknown",
    "PixelSpacing": "missing PixelSpacing (0028,0030): the pixel size is unknown",
}


def _size(ds: Dataset, where: str) -> tuple[int, int]:
    out = []
    for name in ("Rows", "Columns"):
        value = ds.get(name)
        if value in (None, ""):
            raise DicomError(f"missing {name}: not an image", path=where)
        try:
            n = int(value)
        except (TypeError, ValueError) as exc:
            raise DicomError(f"{name} is not an integer ({value!r})", path=where) from exc
        if n <= 0:
            raise DicomError(f"{name} must be positive, found {n}", path=where)
        out.append(n)
    return out[0], out[1]


def _single_frame_slices(file: str, ds: Dataset) -> list[Slice]:
    for name, message in _MISSING.items():
        if ds.get(name) in (None, ""):
            raise DicomError(message, path=file)
    rows, columns = _size(ds, file)
    s = Slice(
        file=file,
        frame=1,
        header=ds,
        ipp=_position(ds.ImagePositionPatient, file),
        iop=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", file),
        pixel_spacing=_pixel_spacing(ds.PixelSpacing, file),
        rows=rows,
        columns=columns,
        slope=_rescale(ds.get("RescaleSlope"), "RescaleSlope", 1.0, file),
        intercept=_rescale(ds.get("RescaleIntercept"), "RescaleIntercept", 0.0, file),
        thickness=_raw_thickness(ds),
    )
    if not is_mosaic(ds):
        return [s]
    return _mosaic_slices(s)


def _mosaic_slices(s: Slice) -> list[Slice]:
    """The tiles of a Siemens mosaic as slices (see ``app.io.mosaic``)."""
    row, col = s.iop[:3], s.iop[3:]
    _check_cosines(s.iop, s.file)
    layout = mosaic_layout(s.header, row, col, s.file)
    spacing, spacing_name = mosaic_spacing(s.header, s.file)
    positions = tile_positions(s.ipp, row, col, s.pixel_spacing, s.rows, s.columns, layout, spacing)
    return [
        Slice(
            file=s.file,
            frame=1,
            header=s.header,
            ipp=positions[t],
            iop=s.iop,
            pixel_spacing=s.pixel_spacing,
            rows=layout.tile_rows,
            columns=layout.tile_columns,
            slope=s.slope,
            intercept=s.intercept,
            thickness=(spacing, spacing_name),
            tile=t,
            layout=layout,
        )
        for t in range(layout.n_images)
    ]


def check_frame_count(file: str, ds: Dataset, loc: PixelLocation | None) -> int:
    """NumberOfFrames of a multi-frame object, checked against its per-frame functional groups and
    its pixel data (when their frame count is certain).

    Raises:
        DicomError: the three numbers disagree (all three named: which one is right is a guess).
    """
    raw = ds.get("NumberOfFrames", 1)
    try:
        n = int(raw) if raw not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise DicomError(f"NumberOfFrames is not an integer ({raw!r})", path=file) from exc
    if n < 1:
        raise DicomError(f"NumberOfFrames must be at least 1, found {n}", path=file)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    n_groups = len(per_frame) if per_frame is not None else None
    n_pixels: int | None = None
    if loc is not None and loc.keyword == "PixelData":
        if loc.encapsulated:
            n_pixels = count_encapsulated_frames(file, loc, n)
        else:
            size = frame_bytes(pixel_description(ds))
            if size:
                whole, rest = divmod(loc.length, size)
                # A partial last frame (or padding) is truncation, reported by decoding.
                n_pixels = whole if (whole > n or (whole < n and rest == 0)) else None
    if (n_groups is not None and n_groups != n) or (n_pixels is not None and n_pixels != n):
        groups = f"{n_groups}" if n_groups is not None else "no"
        pixels = f"{n_pixels}" if n_pixels is not None else f"{n}"
        raise DicomError(
            f"NumberOfFrames is {n} but the per-frame functional groups describe {groups} frame(s) and "
            f"the pixel data holds {pixels} frame(s): refusing to guess which is right",
            path=file,
        )
    return n


def _multiframe_slices(file: str, ds: Dataset, loc: PixelLocation | None) -> list[Slice]:
    """One ``Slice`` per frame of an enhanced multi-frame object (functional groups)."""
    n = check_frame_count(file, ds, loc)
    if not is_enhanced_multiframe(ds):
        if n > 1:
            raise DicomError(
                f"multi-frame object ({n} frames) without per-frame positions "
                "(no functional groups): cannot build a volume",
                path=file,
            )
        return _single_frame_slices(file, ds)
    rows, columns = _size(ds, file)
    out = []
    for f in range(n):
        where = f"{file} frame {f + 1}"
        pos = functional_group_item(ds, f, "PlanePositionSequence")
        ori = functional_group_item(ds, f, "PlaneOrientationSequence")
        meas = functional_group_item(ds, f, "PixelMeasuresSequence")
        if pos is None or "ImagePositionPatient" not in pos:
            raise DicomError(_MISSING["ImagePositionPatient"] + " (PlanePositionSequence)", path=where)
        if ori is None or "ImageOrientationPatient" not in ori:
            raise DicomError(_MISSING["ImageOrientationPatient"] + " (PlaneOrientationSequence)", path=where)
        if meas is None or "PixelSpacing" not in meas:
            raise DicomError(_MISSING["PixelSpacing"] + " (PixelMeasuresSequence)", path=where)
        pvt = functional_group_item(ds, f, "PixelValueTransformationSequence")
        src = pvt if pvt is not None else ds
        out.append(
            Slice(
                file=file,
                frame=f + 1,
                header=ds,
                ipp=_position(pos.ImagePositionPatient, where),
                iop=_floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient", where),
                pixel_spacing=_pixel_spacing(meas.PixelSpacing, where),
                rows=rows,
                columns=columns,
                slope=_rescale(src.get("RescaleSlope"), "RescaleSlope", 1.0, where),
                intercept=_rescale(src.get("RescaleIntercept"), "RescaleIntercept", 0.0, where),
                thickness=_raw_thickness(meas),
            )
        )
    return out


def stack_slices(
    files: list[str],
    headers: list[Dataset],
    locations: dict[str, PixelLocation] | None = None,
) -> list[Slice]:
    """The 2D images of the files (in file order; frames and mosaic tiles in stored order)."""
    out: list[Slice] = []
    locations = locations or {}
    for file, ds in zip(files, headers):
        if "NumberOfFrames" in ds or is_enhanced_multiframe(ds):
            out.extend(_multiframe_slices(file, ds, locations.get(file)))
        else:
            out.extend(_single_frame_slices(file, ds))
    return out


def _check_cosines(iop: np.ndarray, where: str) -> None:
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(np.dot(row, col)) > 1e-2:
        raise DicomError(f"ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors", path=where)


def check_and_sort(slices: list[Slice], slice_tolerance: float, split_note: str) -> list[Slice]:
    """Validate one stack's geometry and return it sorted along the normal ``row_cos x col_cos``."""
    ref = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (ref.rows, ref.columns):
            raise DicomError(
                f"inconsistent Rows/Columns in one series: {s.columns}x{s.rows} here, "
                f"{ref.columns}x{ref.rows} in {ref.where}",
                path=s.where,
            )
        if np.max(np.abs(s.iop - ref.iop)) > IOP_TOLERANCE:
            angle = np.degrees(
                np.arccos(
                    np.clip(abs(np.dot(np.cross(s.iop[:3], s.iop[3:]), np.cross(ref.iop[:3], ref.iop[3:]))), 0, 1)
                )
            )
            raise DicomError(
                f"mixed image orientations in one series: this plane is {angle:.2f} deg from that of {ref.where}",
                path=s.where,
            )
        if not np.allclose(s.pixel_spacing, ref.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise DicomError(
                f"inconsistent PixelSpacing in one series: {s.pixel_spacing.tolist()} mm here, "
                f"{ref.pixel_spacing.tolist()} mm in {ref.where}",
                path=s.where,
            )
    _check_cosines(ref.iop, ref.where)
    normal = np.cross(ref.iop[:3], ref.iop[3:])
    normal /= np.linalg.norm(normal)
    for s in slices:
        s.position = float(np.dot(s.ipp, normal))
    slices = sorted(slices, key=lambda s: s.position)
    if len(slices) == 1:
        return slices

    pos = np.array([s.position for s in slices])
    steps = np.diff(pos)
    dup = np.flatnonzero(steps < DUPLICATE_MM)
    if dup.size:
        a, b = slices[dup[0]], slices[dup[0] + 1]
        raise DicomError(
            f"duplicate slice positions ({dup.size} pair(s)): e.g. "
            f"{a.where} and {b.where} both at {a.position:.3f} mm along the normal "
            "(duplicate files, or a multi-echo/temporal series that no header attribute tells apart)",
            path=b.where,
        )
    base = float(np.min(steps))
    ratio = steps / base
    bad = np.flatnonzero(np.abs(ratio - 1) > slice_tolerance)
    if bad.size:
        n_missing = np.rint(ratio[bad]).astype(int) - 1
        gap_like = (n_missing >= 1) & (
            np.abs(ratio[bad] - np.rint(ratio[bad])) <= slice_tolerance * np.rint(ratio[bad])
        )
        b0 = bad[0]
        a, b = slices[b0], slices[b0 + 1]
        if np.all(gap_like):
            hint = f" ({split_note})" if split_note else ""
            raise DicomError(
                f"missing slice(s): {int(n_missing.sum())} slice(s) missing in {bad.size} gap(s); "
                f"e.g. {int(n_missing[0])} missing between {a.where} at {a.position:.3f} mm and "
                f"{b.where} at {b.position:.3f} mm (spacing {base:.3f} mm){hint}",
                path=b.where,
            )
        raise DicomError(
            f"uneven slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm "
            f"(tolerance {slice_tolerance:.0%}), e.g. {steps[b0]:.3f} mm between {a.where} and "
            f"{b.where}; resample the series to even spacing first",
            path=b.where,
        )

    # Gantry tilt: slice positions drift sideways from the normal line through the first slice.
    offsets = np.array([s.ipp - slices[0].ipp for s in slices])
    lateral = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(lateral, axis=1)
    limit = max(_TILT_DRIFT_FLOOR_MM, _TILT_DRIFT_PIXELS * float(np.min(ref.pixel_spacing)))
    if drift.max() > limit:
        angle = np.degrees(np.arctan2(drift[-1], pos[-1] - pos[0]))
        raise DicomError(
            f"gantry/detector tilt: slice positions are not along the slice normal (tilted by "
            f"{angle:.2f} deg; {drift.max():.2f} mm sideways over the stack, from {slices[0].where} "
            f"to {slices[int(np.argmax(drift))].where}); tilted series are not supported, "
            "resample them first",
            path=slices[-1].where,
        )
    return slices


def affine_lps(slices: list[Slice]) -> np.ndarray:
    """Voxel (i = column, j = row, k = sorted slice) -> LPS (mm) affine of the sorted slices.

    Raises:
        DicomError: the affine is not finite or is singular (names the first file and the matrix).
    """
    ref = slices[0]
    row, col = ref.iop[:3], ref.iop[3:]
    affine = np.eye(4)
    affine[:3, 0] = row * ref.pixel_spacing[1]
    affine[:3, 1] = col * ref.pixel_spacing[0]
    if len(slices) > 1:
        affine[:3, 2] = (slices[-1].ipp - slices[0].ipp) / (len(slices) - 1)
    else:
        normal = np.cross(row, col)
        affine[:3, 2] = normal / np.linalg.norm(normal) * slice_thickness(ref)
    affine[:3, 3] = slices[0].ipp
    with np.errstate(all="ignore"):
        finite = bool(np.all(np.isfinite(affine)))
        det = float(np.linalg.det(affine[:3, :3])) if finite else math.nan
    if not finite or not math.isfinite(det) or abs(det) < _SINGULAR_MM3:
        what = (
            "not finite"
            if not finite
            else f"degenerate (determinant {det} mm^3)"
            if not math.isfinite(det)
            else f"singular (determinant {det:.3g} mm^3)"
        )
        raise DicomError(f"the voxel-to-patient affine is {what}: {np.round(affine[:3], 6).tolist()}", path=ref.where)
    return affine
