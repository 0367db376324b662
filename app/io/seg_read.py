"""Reading a DICOM SEG onto a grid, whoever wrote it.

Frames are decoded by :mod:`app.io.seg_decode` and placed on the reference grid frame by frame
(:mod:`app.io.seg_frames`):

* **By position** (PlanePosition, PlaneOrientation, PixelMeasures, in LPS mm) when the SEG shares
  the reference series' Frame of Reference (or names none): this is what the standard makes
  authoritative, and it works whatever the writer did with the references.
* **By reference** (the source slice the frame's *per-frame* DerivationImage names) for frames
  without a usable position, or for every frame when the Frame of Reference differs (positions
  then mean nothing on this grid).
* When both exist and disagree, the **position wins** and the disagreement is logged (e.g. a writer
  that numbered references off by one). References in the *shared* functional groups listing all
  source images (as Siemens syngo.via writes them) name no frame's slice: frames are then placed by
  position, which is logged too. A frame neither way placeable raises; nothing is placed silently
  off its position.

Segment types: BINARY; FRACTIONAL (a pixel is inside when its value is >= ``fractional_threshold``
(0.5) x MaximumFractionalValue); LABELMAP (pixel values are segment numbers, 0 background).
Overlapping segments (several on one voxel, BINARY/FRACTIONAL): in the label map the **higher
segment number wins** (logged with the voxel count) unless ``overlap="error"``; with
``per_segment=True`` each segment comes back as its own mask, overlaps kept. Frames may cover any
part of the series (missing slices are background). Segment descriptions need only a
SegmentNumber (no SegmentedPropertyCategory/Type needed; SegmentLabel for ``segments=``).

Index order: label maps are ``[i, j, k]`` (column, row, slice); a SEG frame is ``[row, column]``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, overload

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from app.errors import ConfigError, DicomError, InputError
from app.io.dicom_source import meta_uid
from app.io.geometry import voxel_spacing
from app.io.seg_decode import decode_frames
from app.io.seg_frames import Placement, SegFrames, frames_info, own_grid, place_by_position, place_on_slice
from app.io.segments import LABELMAP_SEG_STORAGE, SEG_STORAGE, SegmentSpec
from app.io.volume import SeriesVolume

logger = logging.getLogger(__name__)


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


def _label_values(ds: Dataset, segments: Sequence[SegmentSpec] | None, path: str) -> dict[int, int]:
    """Segment number -> label value: the spec's ``label_value`` matched by SegmentLabel, else the number."""
    descr = {
        int(s.SegmentNumber): str(s.get("SegmentLabel", "") or "")
        for s in ds.get("SegmentSequence", [])
        if s.get("SegmentNumber") is not None
    }
    if not descr:
        raise DicomError("SEG describes no segments (SegmentSequence)", path)
    if segments is None:
        return {n: n for n in descr if n != 0}
    by_name = {s.label_name: s.label_value for s in segments}
    missing = sorted({name for n, name in descr.items() if n != 0 and name not in by_name})
    if missing:
        raise InputError(f"SEG segments {missing} are not among the given segment descriptions", path)
    return {n: by_name[name] for n, name in descr.items() if n != 0}


def _placements(
    info: SegFrames,
    rows: int,
    cols: int,
    affine_lps: np.ndarray,
    shape,
    ref_slices: dict | None,
    use_positions: bool,
    tol: float,
    path: str,
) -> list[Placement]:
    """One placement per frame (see the module docstring for the rule), logging what was used."""
    by_position = by_reference = disagree = 0
    iop, pixel_spacing = info.iop, info.pixel_spacing
    out = []
    for f, fr in enumerate(info.frames, start=1):
        k_ref = None
        if ref_slices is not None and len(fr.refs) == 1:  # a frame's own source slice
            uid, frame_no = fr.refs[0]
            k_ref = ref_slices.get((uid, frame_no or 1))
        if use_positions and fr.ipp is not None and iop is not None and pixel_spacing is not None:
            pl = place_by_position(fr.ipp, iop, pixel_spacing, affine_lps, tol)
            if pl is None:
                raise DicomError(
                    f"frame {f} at {fr.ipp.round(3).tolist()} mm does not lie on the reference grid "
                    f"(spacing {voxel_spacing(affine_lps).round(4).tolist()} mm)",
                    path,
                )
            if k_ref is not None and (pl.slice_axis != 2 or pl.origin[2] != k_ref):
                disagree += 1
            by_position += 1
        elif k_ref is not None:
            if (rows, cols) != (shape[1], shape[0]):
                raise DicomError(f"frame {f} is placed by its reference but its size differs from the series'", path)
            pl = place_on_slice(k_ref)
            by_reference += 1
        elif not use_positions:
            raise DicomError(
                f"frame {f} references no slice of the series, and the SEG's Frame of Reference "
                "differs from the series' (its positions cannot be used)",
                path,
            )
        else:
            raise DicomError(f"frame {f} has neither a position nor a reference to a known slice", path)
        out.append(pl)
    if by_position:
        why = ""
        if info.shared_refs:
            why = f" (its source references are in the shared functional groups, {info.shared_refs} images)"
        elif not any(fr.refs for fr in info.frames):
            why = " (it has no per-frame source references)"
        logger.info("SEG: %d frames placed by plane position in the series' frame of reference%s", by_position, why)
    if by_reference:
        logger.info("SEG: %d frames placed by their per-frame source reference", by_reference)
    if disagree:
        logger.warning(
            "SEG: %d frames reference a different slice than their position says; placed by position", disagree
        )
    return out


@overload
def read_seg(
    seg_path: str | Path,
    reference: SeriesVolume | str | Path | None = ...,
    *,
    segments: Sequence[SegmentSpec] | None = ...,
    overlap: Literal["highest", "error"] = ...,
    per_segment: Literal[False] = ...,
    fractional_threshold: float = ...,
    tol_voxel: float = ...,
) -> tuple[np.ndarray, np.ndarray]: ...


@overload
def read_seg(
    seg_path: str | Path,
    reference: SeriesVolume | str | Path | None = ...,
    *,
    segments: Sequence[SegmentSpec] | None = ...,
    overlap: Literal["highest", "error"] = ...,
    per_segment: Literal[True],
    fractional_threshold: float = ...,
    tol_voxel: float = ...,
) -> tuple[dict[int, np.ndarray], np.ndarray]: ...


def read_seg(
    seg_path: str | Path,
    reference: SeriesVolume | str | Path | None = None,
    *,
    segments: Sequence[SegmentSpec] | None = None,
    overlap: Literal["highest", "error"] = "highest",
    per_segment: bool = False,
    fractional_threshold: float = 0.5,
    tol_voxel: float = 0.1,
):
    """Read a DICOM SEG as a label map (or one mask per segment) on the reference series' grid.

    Args:
        seg_path: the SEG file (BINARY, FRACTIONAL or LABELMAP; any transfer syntax pydicom decodes
            plus deflated-frame and 1-bit RLE).
        reference: the source series (a :class:`SeriesVolume` or a folder read with
            ``read_series``, preferring the series the SEG references). ``None``: the grid spanned
            by the SEG's own frames.
        segments: when given, segment ``n`` gets the ``label_value`` of the spec whose
            ``label_name`` equals its SegmentLabel (as :func:`write_seg` wrote it); otherwise a
            segment's label value is its segment number.
        overlap: where segments overlap, the higher segment number wins (``"highest"``, logged)
            or the read fails (``"error"``). Ignored with ``per_segment``.
        per_segment: return ``{label value: bool mask [i, j, k]}`` for every described segment
            (empty masks for segments without frames) instead of one label map.
        fractional_threshold: FRACTIONAL pixels count as inside from this fraction of
            MaximumFractionalValue on.
        tol_voxel: how far (in voxels) a frame may lie off the reference grid.

    Frames are placed as the module docstring says (position in the shared Frame of Reference
    first, per-frame source reference otherwise; disagreements logged, position wins).

    Returns:
        ``(labels_ijk, affine_lps)`` (uint8, uint16 when a label exceeds 255) or, with
        ``per_segment``, ``(masks, affine_lps)``; ``affine_lps`` is the grid's voxel -> LPS (mm) affine.

    Raises:
        DicomError: not a readable SEG, undecodable pixels, frames that cannot be placed or lie
        outside the grid, overlaps with ``overlap="error"``. InputError: segments not in ``segments``.
    """
    path = str(seg_path)
    if overlap not in ("highest", "error"):
        raise ConfigError(f"overlap must be 'highest' or 'error', got {overlap!r}")
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise DicomError(f"not a readable DICOM file: {exc}", path) from exc
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in (SEG_STORAGE, LABELMAP_SEG_STORAGE):
        raise DicomError(f"not a DICOM SEG (SOP Class {sop_class or 'missing'})", path)
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    if seg_type not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise DicomError(f"unknown SegmentationType {seg_type!r}", path)
    rows, cols = int(ds.Rows), int(ds.Columns)
    info = frames_info(ds, path)
    pixels = decode_frames(ds, path)
    if seg_type == "FRACTIONAL":
        pixels = pixels >= fractional_threshold * float(ds.get("MaximumFractionalValue", 255) or 255)
    label_of = _label_values(ds, segments, path)

    if reference is None:
        affine_lps, shape = own_grid(info, rows, cols, ds, path)
        ref_slices, use_positions = None, True
    else:
        vol = _reference_volume(reference, ds)
        affine_lps, shape = np.asarray(vol.affine_lps, dtype=np.float64), tuple(vol.shape)
        ref_slices = {}
        for k, rds in enumerate(vol.datasets):
            uid = meta_uid(rds, "SOPInstanceUID", "MediaStorageSOPInstanceUID")
            ref_slices[(uid, vol.frame_numbers[k] if vol.frame_numbers else 1)] = k
        seg_for = str(ds.get("FrameOfReferenceUID", "") or "")
        vol_for = str(vol.datasets[0].get("FrameOfReferenceUID", "") or "") if vol.datasets else ""
        use_positions = not (seg_for and vol_for and seg_for != vol_for)
        if not use_positions:
            logger.warning("SEG: its frame of reference differs from the series'; frames are placed by reference only")
        elif not seg_for:
            logger.warning("SEG: names no frame of reference; its positions are taken in the series' frame")
    placements = _placements(info, rows, cols, affine_lps, shape, ref_slices, use_positions, tol_voxel, path)

    n_max = max([*label_of, *(fr.segment for fr in info.frames), 1])
    if seg_type == "LABELMAP" and pixels.size:
        n_max = max(n_max, int(pixels.max()))  # LABELMAP pixels are segment numbers, described or not
    owner = np.zeros(shape, dtype=np.uint8 if n_max < 256 else np.uint16)  # winning segment number per voxel
    masks = {n: np.zeros(shape, dtype=bool) for n in label_of} if per_segment else {}
    overlaps: Counter = Counter()
    outside = 0
    order = sorted(range(len(info.frames)), key=lambda f: info.frames[f].segment)  # ascending: higher wins
    flat_owner = owner.reshape(-1)
    for f in order:
        seg, frame = info.frames[f].segment, pixels[f]
        r, c = np.nonzero(frame)  # work on the segmented pixels only
        if not len(r):
            continue
        vi, vj, vk = placements[f].voxels(r, c)
        ok = (vi >= 0) & (vi < shape[0]) & (vj >= 0) & (vj < shape[1]) & (vk >= 0) & (vk < shape[2])
        outside += int(len(ok) - np.count_nonzero(ok))
        flat = np.asarray(np.ravel_multi_index((vi[ok], vj[ok], vk[ok]), shape), dtype=np.intp)
        values = (
            frame[r[ok], c[ok]].astype(owner.dtype)
            if seg_type == "LABELMAP"
            else np.full(len(flat), seg, dtype=owner.dtype)
        )
        current = flat_owner[flat]
        clash = (current != 0) & (current != values)
        if clash.any():
            pairs = np.stack([current[clash], values[clash]], axis=1)
            for (a, b), count in zip(*np.unique(np.sort(pairs, axis=1), axis=0, return_counts=True)):
                overlaps[(int(a), int(b))] += int(count)
            if overlap == "error" and not per_segment:
                (a, b), count = min(overlaps.items())
                raise DicomError(
                    f"segments {a} and {b} overlap in {count} voxels; read with overlap='highest' to let "
                    "the higher segment number win, or per_segment=True",
                    path,
                )
        flat_owner[flat] = values
        if per_segment:
            if seg_type == "LABELMAP":
                for number in np.unique(values).tolist():
                    if number in masks:
                        masks[number].reshape(-1)[flat[values == number]] = True
            elif seg in masks:
                masks[seg].reshape(-1)[flat] = True
    if outside:
        raise DicomError(f"{outside} segmented pixels lie outside the reference grid {tuple(shape)}", path)
    if overlaps and not per_segment:
        logger.warning(
            "SEG: overlapping segments (voxels): %s; the higher segment number wins",
            ", ".join(f"{a}&{b}: {n}" for (a, b), n in sorted(overlaps.items())),
        )
    if seg_type == "LABELMAP":
        used = set(np.unique(pixels).tolist())
    else:
        used = {fr.segment for fr, px in zip(info.frames, pixels) if px.any()}
    undescribed = sorted(used - set(label_of) - {0})
    if undescribed:
        logger.warning("SEG: pixels of undescribed segments %s are read as background", undescribed)

    if per_segment:
        return {label_of[n]: m for n, m in masks.items()}, affine_lps
    out_dtype = np.uint8 if max(label_of.values(), default=0) < 256 else np.uint16
    if not undescribed and owner.dtype == out_dtype and all(n == v for n, v in label_of.items()):
        return owner, affine_lps  # label = segment number: no lookup pass over the volume
    lut = np.zeros(n_max + 1, dtype=out_dtype)
    for n, value in label_of.items():
        lut[n] = value
    return lut[owner], affine_lps


def seg_to_nifti(seg_path: str | Path, reference_folder: str | Path | None, output_path: str | Path, **kwargs) -> Path:
    """``segapp seg2nifti``: read a SEG onto its reference series' grid and save a NIfTI label map
    (RAS affine). ``kwargs`` go to :func:`read_seg`."""
    from app.io.geometry import lps_to_ras
    from app.io.nifti import save_labels_nifti

    labels, affine_lps = read_seg(seg_path, reference_folder, **kwargs)
    return save_labels_nifti(labels, lps_to_ras(affine_lps), output_path)
