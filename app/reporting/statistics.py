"""Per-segment statistics of a label map on its source image: voxel count, volume, intensities, extent.

Everything is computed on the source grid (``[i, j, k]`` voxels with a voxel -> LPS affine, as
``app.io.volume.SeriesVolume`` holds them):

* ``voxel_count`` and ``volume_ml`` = voxel count x voxel volume, the voxel volume being
  ``|det(affine_lps[:3, :3])|`` mm^3 (right for oblique and sheared grids too), / 1000 for mL;
* intensity ``mean``, ``sd`` (population, ddof 0), ``min``, ``max`` and the 5/25/50/75/95th
  percentiles (linear interpolation) of the image under the segment, in the image's own units
  (the DICOM reader applies RescaleSlope/Intercept: Hounsfield units for CT);
* ``bbox_ijk``: first and last voxel index per axis (inclusive);
* ``bbox_lps_mm``: the axis-aligned box in LPS (mm) that encloses the segment's voxels as boxes
  (their full extent, not only their centres), exact for any orientation.

``SeriesStatistics.to_dict()`` is what ``statistics.json`` holds; :func:`csv_row` flattens it into
one row of a results table, :func:`update_statistics_csv` puts that row into a CSV shared by many
series (replacing the series' earlier row, so a re-run never duplicates it).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from app.errors import InputError
from app.io.atomic import atomic_write_text, locked
from app.io.geometry import voxel_spacing, voxel_to_world

PERCENTILES = (5, 25, 50, 75, 95)


@dataclass
class SegmentStatistics:
    """One segment's figures (intensity fields are ``None`` for an empty segment).

    Attributes:
        label_value, label_name: the label in the map and its name.
        voxel_count: voxels with this label.
        volume_ml: ``voxel_count`` x voxel volume, millilitres.
        mean, sd, min, max: image values under the segment (source units).
        percentiles: ``{"p05": ..., "p25": ..., "p50": ..., "p75": ..., "p95": ...}``.
        bbox_ijk: ``[[i0, i1], [j0, j1], [k0, k1]]`` inclusive voxel indices.
        bbox_lps_mm: ``{"min": [x, y, z], "max": [x, y, z]}`` in LPS millimetres.
    """

    label_value: int
    label_name: str
    voxel_count: int
    volume_ml: float
    mean: float | None = None
    sd: float | None = None
    min: float | None = None
    max: float | None = None
    percentiles: dict[str, float] = field(default_factory=dict)
    bbox_ijk: list[list[int]] | None = None
    bbox_lps_mm: dict[str, list[float]] | None = None


@dataclass
class SeriesStatistics:
    """The statistics of one series.

    Attributes:
        key: the series' output stem (no patient data).
        modality: DICOM Modality ('' for NIfTI).
        units: intensity units ("HU" for CT; see :func:`intensity_units`).
        shape: the voxel grid ``(I, J, K)``.
        spacing_mm: voxel size along ``i, j, k``.
        voxel_volume_mm3: ``|det(affine_lps[:3, :3])|``.
        segments: one entry per described or present label, by label value.
    """

    key: str
    modality: str
    units: str
    shape: list[int]
    spacing_mm: list[float]
    voxel_volume_mm3: float
    segments: list[SegmentStatistics]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def intensity_units(dataset: Any) -> str:
    """The units of a series' voxel values after rescale: "HU" for CT, else RescaleType, PET Units or ''."""
    if dataset is None:
        return ""
    if str(dataset.get("Modality", "") or "").upper() == "CT":
        return "HU"
    for keyword in ("RescaleType", "Units"):
        value = str(dataset.get(keyword, "") or "").strip()
        if value:
            return value
    return ""


def _names(segments: Sequence[Mapping[str, Any]] | Mapping[int, str] | None) -> dict[int, str]:
    if segments is None:
        return {}
    if isinstance(segments, Mapping):
        return {int(v): str(n) for v, n in segments.items() if int(v) != 0}
    return {int(s["label_value"]): str(s.get("label_name", f"label {s['label_value']}")) for s in segments}


def _lps_box(mask: np.ndarray, offset: Sequence[int], affine_lps: np.ndarray) -> dict[str, list[float]]:
    """Exact LPS box of the voxels of ``mask`` (a crop starting at voxel ``offset``).

    Each LPS coordinate is linear in ``(i, j, k)``, so along every ``(j, k)`` line its extremes over
    the segment lie at the line's first or last voxel: evaluating those (``O(J*K)`` points rather
    than every voxel) gives the voxel centres' extremes; half a voxel's projected size is added.
    """
    hit = mask.any(axis=0)
    first = mask.argmax(axis=0)
    last = mask.shape[0] - 1 - mask[::-1].argmax(axis=0)
    jj, kk = np.nonzero(hit)
    ends = np.concatenate([np.stack([first[jj, kk], jj, kk], 1), np.stack([last[jj, kk], jj, kk], 1)])
    centres = voxel_to_world(affine_lps, ends + np.asarray(offset))
    half = 0.5 * np.abs(np.asarray(affine_lps, np.float64)[:3, :3]).sum(axis=1)
    return {"min": (centres.min(0) - half).tolist(), "max": (centres.max(0) + half).tolist()}


def segment_statistics(
    image_ijk: np.ndarray,
    labels_ijk: np.ndarray,
    affine_lps: np.ndarray,
    segments: Sequence[Mapping[str, Any]] | Mapping[int, str] | None = None,
    *,
    key: str = "",
    modality: str = "",
    units: str = "",
) -> SeriesStatistics:
    """Statistics of every label of ``labels_ijk`` over ``image_ijk`` (both ``[i, j, k]`` on one grid).

    Args:
        image_ijk: voxel values in source units (e.g. ``SeriesVolume.array``: HU for CT).
        labels_ijk: integer label map, 0 = background, same shape.
        affine_lps: 4x4 voxel -> LPS (mm).
        segments: the described labels (``[{"label_value", "label_name"}, ...]`` as a bundle's
            ``LoadedModel.segments``, or ``{value: name}``). Described labels without voxels get a
            zero entry; present labels without a description are named ``label N``.
        key, modality, units: carried into the result.

    Raises:
        InputError: the image and label map differ in shape, or the labels are not integers.
    """
    image = np.asarray(image_ijk)
    labels = np.asarray(labels_ijk)
    if image.shape != labels.shape or labels.ndim != 3:
        raise InputError(f"image {image.shape} and label map {labels.shape} must be 3D arrays of one shape")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise InputError(f"label map must be integer, got {labels.dtype}")
    labels = labels.astype(np.int64, copy=False) if labels.dtype == bool else labels
    affine = np.asarray(affine_lps, np.float64)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    names = _names(segments)
    present = [int(v) for v in np.unique(labels) if v > 0]
    boxes = ndimage.find_objects(labels) if present else []  # one pass for every label's index box
    out = []
    for value in sorted(set(names) | set(present)):
        name = names.get(value, f"label {value}")
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            out.append(SegmentStatistics(value, name, 0, 0.0))
            continue
        mask = labels[box] == value
        values = image[box][mask].astype(np.float64)
        count = int(mask.sum())
        pct = np.percentile(values, PERCENTILES)
        out.append(
            SegmentStatistics(
                label_value=value,
                label_name=name,
                voxel_count=count,
                volume_ml=count * voxel_mm3 / 1000.0,
                mean=float(values.mean()),
                sd=float(values.std()),
                min=float(values.min()),
                max=float(values.max()),
                percentiles={f"p{p:02d}": float(v) for p, v in zip(PERCENTILES, pct)},
                bbox_ijk=[[int(s.start), int(s.stop) - 1] for s in box],
                bbox_lps_mm=_lps_box(mask, [int(s.start) for s in box], affine),
            )
        )
    return SeriesStatistics(
        key=key,
        modality=modality,
        units=units,
        shape=[int(n) for n in labels.shape],
        spacing_mm=[float(s) for s in voxel_spacing(affine)],
        voxel_volume_mm3=voxel_mm3,
        segments=out,
    )


def write_statistics_json(stats: SeriesStatistics, path: str | Path) -> Path:
    """Write ``statistics.json`` (atomically)."""
    return atomic_write_text(path, stats.to_json() + "\n")


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.6g}"


def csv_row(stats: SeriesStatistics | Mapping[str, Any]) -> dict[str, str]:
    """One results-table row: ``key``, ``modality``, ``units``, then per segment ``<name>.voxels``,
    ``.volume_ml``, ``.mean``, ``.sd``, ``.min``, ``.p05`` ... ``.p95``, ``.max``, ``.bbox_lps_min``
    and ``.bbox_lps_max`` (``"x y z"`` mm)."""
    d = stats.to_dict() if isinstance(stats, SeriesStatistics) else dict(stats)
    row = {"key": str(d["key"]), "modality": str(d["modality"]), "units": str(d["units"])}
    for s in d["segments"]:
        p = f"{s['label_name']}."
        row[p + "voxels"] = str(s["voxel_count"])
        row[p + "volume_ml"] = _fmt(s["volume_ml"])
        for name in ("mean", "sd", "min"):
            row[p + name] = _fmt(s[name])
        for q in PERCENTILES:
            row[p + f"p{q:02d}"] = _fmt(s["percentiles"].get(f"p{q:02d}"))
        row[p + "max"] = _fmt(s["max"])
        box = s["bbox_lps_mm"]
        row[p + "bbox_lps_min"] = " ".join(_fmt(v) for v in box["min"]) if box else ""
        row[p + "bbox_lps_max"] = " ".join(_fmt(v) for v in box["max"]) if box else ""
    return row


def update_statistics_csv(path: str | Path, row: Mapping[str, str]) -> Path:
    """Put ``row`` into the CSV at ``path``: replace the row with the same ``key`` or append; columns are
    the union in order of appearance (a row without a column leaves it empty). Written atomically
    under a file lock."""
    path = Path(path)
    with locked(path):
        rows: list[dict[str, str]] = []
        columns: list[str] = []
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                columns = list(reader.fieldnames or [])
                rows = [dict(r) for r in reader]
        rows = [r for r in rows if r.get("key") != row["key"]] + [dict(row)]
        for name in row:
            if name not in columns:
                columns.append(name)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())
    return path
