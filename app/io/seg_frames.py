"""Where a SEG's frames lie: their functional-group metadata and their placement on a voxel grid.

A frame is placed either by its geometry (PlanePosition + PlaneOrientation + PixelMeasures, LPS
mm, meaningful in the SEG's Frame of Reference) or by the source slice its per-frame
DerivationImage references. :func:`read_seg <app.io.seg_read.read_seg>` decides which; this
module extracts the metadata and does the arithmetic.

Index order: grids are ``[i, j, k]`` (column, row, slice); a frame is ``[row, column]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from app.errors import DicomError
from app.io.geometry import world_to_voxel


def _group(ds: Dataset, pf: Dataset | None, keyword: str) -> Dataset | None:
    """First item of a functional group macro, per-frame first, then shared."""
    for groups in (pf, ds.get("SharedFunctionalGroupsSequence", [None])[0]):
        if groups is not None and keyword in groups and len(groups[keyword].value):
            return groups[keyword].value[0]
    return None


def _source_refs(derivation_items) -> list[tuple[str, int | None]]:
    """(ReferencedSOPInstanceUID, ReferencedFrameNumber or None) of every source image listed."""
    refs = []
    for deriv in derivation_items:
        for item in deriv.get("SourceImageSequence", []):
            uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
            if uid:
                frame = item.get("ReferencedFrameNumber")
                refs.append((uid, int(frame) if frame not in (None, "") else None))
    return refs


@dataclass
class SegFrame:
    """One frame's metadata.

    Attributes:
        segment: its ReferencedSegmentNumber (0 for LABELMAP frames, whose pixels are segment numbers).
        ipp: ImagePositionPatient (LPS mm) of its first pixel, or None.
        refs: the source images its *per-frame* DerivationImageSequence lists (a reference in the
            shared functional groups names no frame's own source and is not here).
    """

    segment: int
    ipp: np.ndarray | None
    refs: list[tuple[str, int | None]] = field(default_factory=list)


@dataclass
class SegFrames:
    """All frames' metadata; ``iop`` (row cosine, column cosine) and ``pixel_spacing`` (row spacing,
    column spacing, mm) are shared by all frames or None; ``shared_refs`` counts the source images
    a shared DerivationImageSequence lists (as some workstations write it)."""

    frames: list[SegFrame]
    iop: np.ndarray | None
    pixel_spacing: np.ndarray | None
    shared_refs: int


def frames_info(ds: Dataset, path: str) -> SegFrames:
    """Per-frame segment number, position and per-frame source references; the common orientation
    and pixel spacing.

    Raises:
        DicomError: frame count and per-frame groups disagree, a BINARY/FRACTIONAL frame names no
        segment, frames of different orientations.
    """
    labelmap = str(ds.get("SegmentationType", "")).upper() == "LABELMAP"
    n = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(per_frame) != n:
        raise DicomError(f"{len(per_frame)} per-frame functional groups for {n} frames", path)
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    shared_refs = len(_source_refs(shared.get("DerivationImageSequence", []))) if shared is not None else 0
    frames: list[SegFrame] = []
    iop = spacing = None
    for f in range(n):
        pf = per_frame[f]
        seg_id = _group(ds, pf, "SegmentIdentificationSequence")
        if seg_id is None and not labelmap:
            raise DicomError(f"frame {f + 1} names no segment (SegmentIdentificationSequence)", path)
        pos = _group(ds, pf, "PlanePositionSequence")
        ori = _group(ds, pf, "PlaneOrientationSequence")
        meas = _group(ds, pf, "PixelMeasuresSequence")
        if ori is not None and "ImageOrientationPatient" in ori:
            this_iop = np.asarray([float(v) for v in ori.ImageOrientationPatient])
            if iop is not None and not np.allclose(iop, this_iop, atol=1e-4):
                raise DicomError("frames have different orientations; not a stack of parallel slices", path)
            iop = this_iop
        if meas is not None and "PixelSpacing" in meas:
            spacing = np.asarray([float(v) for v in meas.PixelSpacing])
        ipp = None
        if pos is not None and pos.get("ImagePositionPatient") is not None:
            ipp = np.asarray([float(v) for v in pos.ImagePositionPatient])
        frames.append(
            SegFrame(
                segment=0 if seg_id is None else int(seg_id.ReferencedSegmentNumber),
                ipp=ipp,
                refs=_source_refs(pf.get("DerivationImageSequence", [])),
            )
        )
    return SegFrames(frames, iop, spacing, shared_refs)


@dataclass(frozen=True)
class Placement:
    """Frame pixel ``(row r, column c)`` is grid voxel ``origin + r * step(row_axis) + c * step(col_axis)``:
    one frame row down moves ``row_step`` (+-1) along grid axis ``row_axis``, one column right
    ``col_step`` along ``col_axis``; the third axis is constant (the frame's slice)."""

    origin: tuple[int, int, int]
    row_axis: int
    row_step: int
    col_axis: int
    col_step: int

    @property
    def slice_axis(self) -> int:
        return 3 - self.row_axis - self.col_axis

    def voxels(self, r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Grid indices ``(i, j, k)`` of frame pixels ``(r, c)`` (arrays of rows and columns)."""
        out = [np.full(r.shape, o, dtype=np.int64) for o in self.origin]
        out[self.row_axis] += self.row_step * r.astype(np.int64)
        out[self.col_axis] += self.col_step * c.astype(np.int64)
        return out[0], out[1], out[2]


def place_by_position(
    ipp: np.ndarray, iop: np.ndarray, pixel_spacing: np.ndarray, affine_lps: np.ndarray, tol: float
) -> Placement | None:
    """Placement of a frame at ``ipp`` (LPS mm) with ``iop`` and ``pixel_spacing`` (row, column
    spacing, mm) on the grid of ``affine_lps`` (voxel -> LPS mm): None unless the frame's pixels
    are grid voxels (within ``tol`` voxels) along two grid axes, one voxel per pixel."""
    v0 = world_to_voxel(affine_lps, ipp)
    dcol = world_to_voxel(affine_lps, ipp + iop[:3] * pixel_spacing[1]) - v0  # one column step
    drow = world_to_voxel(affine_lps, ipp + iop[3:] * pixel_spacing[0]) - v0  # one row step
    for vec in (v0, dcol, drow):
        if np.abs(vec - np.round(vec)).max() > tol:
            return None
    v0, dcol, drow = np.round(v0).astype(int), np.round(dcol).astype(int), np.round(drow).astype(int)
    if np.abs(dcol).sum() != 1 or np.abs(drow).sum() != 1 or np.abs(dcol).argmax() == np.abs(drow).argmax():
        return None  # frame pixels are not single grid steps (different spacing or an oblique cut)
    ra, ca = int(np.abs(drow).argmax()), int(np.abs(dcol).argmax())
    return Placement((int(v0[0]), int(v0[1]), int(v0[2])), ra, int(drow[ra]), ca, int(dcol[ca]))


def place_on_slice(k: int) -> Placement:
    """A frame covering grid slice ``k`` exactly: rows along ``j``, columns along ``i``."""
    return Placement((0, 0, int(k)), 1, 1, 0, 1)


def own_grid(info: SegFrames, rows: int, cols: int, ds: Dataset, path: str) -> tuple[np.ndarray, tuple]:
    """Grid ``(affine_lps, shape)`` spanned by the SEG's own frames (for reading without a reference):
    in-plane the frames' pixels, across them SpacingBetweenSlices (else the smallest gap between
    frame planes, else SliceThickness, else 1 mm) from the lowest plane along the normal."""
    frames, iop, spacing = info.frames, info.iop, info.pixel_spacing
    if iop is None or spacing is None or any(f.ipp is None for f in frames):
        raise DicomError("SEG frames lack plane position/orientation; a reference series is needed", path)
    normal = np.cross(iop[:3], iop[3:])
    ipps = np.array([f.ipp for f in frames], dtype=np.float64)  # all present (checked above)
    dist = ipps @ normal
    levels = np.unique(np.round(dist, 3))
    shared_meas = _group(ds, None, "PixelMeasuresSequence")
    step = float(shared_meas.get("SpacingBetweenSlices", 0) or 0) if shared_meas is not None else 0.0
    if step <= 0:
        step = (
            float(np.min(np.diff(levels)))
            if len(levels) > 1
            else float((shared_meas.get("SliceThickness", 1.0) if shared_meas is not None else 1.0) or 1.0)
        )
    nk = round((levels[-1] - levels[0]) / step) + 1
    origin = ipps[int(np.argmin(dist))]
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * spacing[1]
    affine[:3, 1] = iop[3:] * spacing[0]
    affine[:3, 2] = normal * step
    affine[:3, 3] = origin
    return affine, (cols, rows, nk)
