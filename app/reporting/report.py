"""The per-series report files: ``<stem>_statistics.json``, a row of ``statistics.csv``, and a DICOM SR.

:func:`write_series_reports` is what ``Segmenter.dicom`` calls for the output formats ``stats`` and
``sr``. The SR (``<stem>_sr.dcm``, TID 1500, see ``app.io.dicom_sr``) holds each SEG segment's
volume and references that segment, so it needs the SEG written in the same run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from app.errors import ConfigError, DicomError
from app.io.volume import SeriesVolume
from app.reporting.statistics import (
    SeriesStatistics,
    csv_row,
    intensity_units,
    segment_statistics,
    update_statistics_csv,
    write_statistics_json,
)

REPORT_FORMATS = ("stats", "sr")
CSV_NAME = "statistics.csv"


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


def write_series_reports(
    volume: SeriesVolume,
    labels_ijk: np.ndarray,
    segments: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    stem: str,
    formats: Sequence[str],
    *,
    seg_path: str | Path | None = None,
    algorithm: tuple[str, str] = ("segapp", "0"),
) -> dict[str, str]:
    """Write the reports asked for in ``formats`` and return ``{"stats": json, "csv": table, "sr": file}``.

    ``stats``: ``OUTPUT/<stem>_statistics.json`` and the series' row in ``OUTPUT/statistics.csv``.
    ``sr``: ``OUTPUT/<stem>_sr.dcm``; needs ``seg_path`` (the SEG of these labels).
    """
    from app.io.dicom_sr import write_volume_sr

    out = Path(output_dir)
    stats = series_statistics(volume, labels_ijk, segments, stem)
    written: dict[str, str] = {}
    if "stats" in formats:
        written["stats"] = str(write_statistics_json(stats, out / f"{stem}_statistics.json"))
        written["csv"] = str(update_statistics_csv(out / CSV_NAME, csv_row(stats)))
    if "sr" in formats:
        if seg_path is None:
            raise ConfigError("the SR references the SEG's segments: ask for seg too (--format seg,sr)", "--format")
        numbers = seg_segment_numbers(seg_path, stats)
        volumes = {numbers[s.label_value]: s.volume_ml for s in stats.segments if s.label_value in numbers}
        sources = list({id(d): d for d in volume.datasets}.values())  # one per instance (multi-frame: once)
        written["sr"] = str(write_volume_sr(seg_path, sources, volumes, algorithm, out / f"{stem}_sr.dcm"))
    return written
