"""The per-series report files: ``<stem>_statistics.json``, a row of ``statistics.csv``, and a DICOM SR.

``Segmenter.dicom`` (``app.inference.pipeline``) writes them for the output formats ``stats`` and
``sr``, inside the series' all-or-nothing output set. The SR (``<stem>_sr.dcm``, TID 1500, see
``app.io.dicom_sr``) holds each SEG segment's volume and references that segment, so it needs the
SEG written in the same run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from app.errors import DicomError
from app.io.volume import SeriesVolume
from app.reporting.statistics import (
    SeriesStatistics,
    csv_row,
    intensity_units,
    segment_statistics,
    update_statistics_csv,
    write_statistics_json,
)

CSV_NAME = "statistics.csv"
__all__ = [
    "CSV_NAME",
    "csv_row",
    "series_statistics",
    "update_statistics_csv",
    "write_statistics_json",
    "write_volume_report",
    "intensity_units",
]


def series_statistics(
    volume: SeriesVolume, labels_ijk: np.ndarray, segments: Sequence[Mapping[str, Any]], key: str
) -> SeriesStatistics:
    """:func:`segment_statistics` of a DICOM series, with its modality and units."""
    first = volume.datasets[0] if volume.datasets else None
    return segment_statistics(
        volume.array,
        labels_ijk,
        volume.affine_lps,
        segments,
        key=key,
        modality=str(first.get("Modality", "") or "") if first is not None else "",
        units=intensity_units(first),
    )


def seg_segment_numbers(seg_path: str | Path, stats: SeriesStatistics) -> dict[int, int]:
    """``{label value: SEG segment number}``, matching the SEG's SegmentLabel to the label names."""
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    by_name = {s.label_name[:64]: s.label_value for s in stats.segments}
    out = {}
    for item in seg.SegmentSequence:
        label = str(item.get("SegmentLabel", ""))
        if label not in by_name:
            raise DicomError(f"SEG segment {int(item.SegmentNumber)} {label!r} matches no label", str(seg_path))
        out[by_name[label]] = int(item.SegmentNumber)
    return out


def write_volume_report(
    volume: SeriesVolume,
    stats: SeriesStatistics,
    seg_path: str | Path,
    algorithm: tuple[str, str],
    output_path: str | Path,
) -> Path:
    """The SR of each SEG segment's volume (mL), referencing the SEG's segments and the source images."""
    from app.io.dicom_sr import write_volume_sr

    numbers = seg_segment_numbers(seg_path, stats)
    volumes = {numbers[s.label_value]: s.volume_ml for s in stats.segments if s.label_value in numbers}
    sources = list({id(d): d for d in volume.datasets}.values())  # one per instance (multi-frame: once)
    return write_volume_sr(seg_path, sources, volumes, algorithm, output_path)
