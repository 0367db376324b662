"""Per-segment statistics on asymmetric phantoms in several orientations: volumes, intensities in source units
(HU after RescaleSlope/Intercept), exact LPS bounding boxes; the JSON file and the shared CSV table."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
from dicom_phantoms import write_phantom_series
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import InputError
from app.io.dicom_series import read_series
from app.reporting.statistics import (
    csv_row,
    intensity_units,
    segment_statistics,
    update_statistics_csv,
    write_statistics_json,
)

SEGMENTS = [
    {"label_value": 1, "label_name": "box"},
    {"label_value": 2, "label_name": "sphere"},
    {"label_value": 3, "label_name": "bar"},
    {"label_value": 7, "label_name": "not found"},
]


def _brute_lps_box(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every corner of every voxel of the mask, in LPS: the box enclosing them."""
    corners = np.array(list(itertools.product((-0.5, 0.5), repeat=3)))
    centres = np.argwhere(mask).astype(np.float64)
    pts = (centres[:, None, :] + corners[None]).reshape(-1, 3)
    lps = pts @ affine[:3, :3].T + affine[:3, 3]
    return lps.min(0), lps.max(0)


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "oblique"])
def test_statistics_of_a_ct_phantom(tmp_path, orientation):
    # per-slice rescale: the statistics must use the values in HU, not the stored integers
    rescale = [(1.0 + 0.25 * (k % 3), -1024.0 + 3 * k) for k in range(16)]
    info = write_phantom_series(tmp_path / "ct", orientation=orientation, rescale=rescale, reverse_file_order=True)
    vol = read_series(tmp_path / "ct")
    stats = segment_statistics(vol.array, info.mask_ijk, vol.affine_lps, SEGMENTS, key="s1", modality="CT", units="HU")
    voxel_mm3 = 0.8 * 0.9 * 1.5  # the phantom's spacing
    assert stats.voxel_volume_mm3 == pytest.approx(voxel_mm3, rel=1e-6)
    by_value = {s.label_value: s for s in stats.segments}
    assert sorted(by_value) == [1, 2, 3, 7]
    for value in (1, 2, 3):
        s = by_value[value]
        mask = info.mask_ijk == value
        hu = info.array_ijk[mask].astype(np.float64)  # ground truth in HU, independent of the reader
        assert s.voxel_count == int(mask.sum()) > 0
        assert s.volume_ml == pytest.approx(mask.sum() * voxel_mm3 / 1000, rel=1e-6)
        assert s.mean == pytest.approx(hu.mean(), rel=1e-6)
        assert s.sd == pytest.approx(hu.std(), rel=1e-6)
        assert (s.min, s.max) == (pytest.approx(hu.min()), pytest.approx(hu.max()))
        assert s.percentiles["p50"] == pytest.approx(np.median(hu))
        assert s.percentiles["p05"] <= s.percentiles["p25"] <= s.percentiles["p75"] <= s.percentiles["p95"]
        idx = np.argwhere(mask)
        assert s.bbox_ijk == [[int(a), int(b)] for a, b in zip(idx.min(0), idx.max(0))]
        lo, hi = _brute_lps_box(mask, info.affine_lps)
        np.testing.assert_allclose(s.bbox_lps_mm["min"], lo, atol=1e-3)
        np.testing.assert_allclose(s.bbox_lps_mm["max"], hi, atol=1e-3)
    empty = by_value[7]
    assert (empty.label_name, empty.voxel_count, empty.volume_ml, empty.mean, empty.bbox_lps_mm) == (
        "not found",
        0,
        0.0,
        None,
        None,
    )
    assert intensity_units(vol.datasets[0]) == "HU"


def test_mr_units_and_undescribed_labels(tmp_path):
    info = write_phantom_series(tmp_path / "mr", modality="MR", orientation="coronal")
    vol = read_series(tmp_path / "mr")
    assert intensity_units(vol.datasets[0]) == ""  # MR values have no physical unit
    stats = segment_statistics(vol.array, info.mask_ijk, vol.affine_lps, {1: "box"})
    assert [(s.label_value, s.label_name) for s in stats.segments] == [(1, "box"), (2, "label 2"), (3, "label 3")]
    with pytest.raises(InputError):
        segment_statistics(vol.array, info.mask_ijk[:-1], vol.affine_lps)
    with pytest.raises(InputError):
        segment_statistics(vol.array, info.mask_ijk.astype(np.float32), vol.affine_lps)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    angles=st.tuples(*[st.floats(-3.1, 3.1)] * 3),
    spacing=st.tuples(*[st.floats(0.3, 4.0)] * 3),
)
def test_lps_box_is_exact_for_any_grid(seed, angles, spacing):
    rng = np.random.default_rng(seed)
    mask = rng.random((7, 6, 5)) > 0.8
    mask[rng.integers(7), rng.integers(6), rng.integers(5)] = True
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    affine[:3, 3] = rng.normal(0, 50, 3)
    (s,) = segment_statistics(np.zeros(mask.shape, np.float32), mask.astype(np.uint8), affine).segments
    lo, hi = _brute_lps_box(mask, affine)
    np.testing.assert_allclose(s.bbox_lps_mm["min"], lo, atol=1e-6)
    np.testing.assert_allclose(s.bbox_lps_mm["max"], hi, atol=1e-6)
    assert s.volume_ml == pytest.approx(mask.sum() * np.prod(spacing) / 1000)


def test_json_and_csv_table(tmp_path):
    info = write_phantom_series(tmp_path / "ct", shape=(12, 10, 8))
    vol = read_series(tmp_path / "ct")
    a = segment_statistics(vol.array, info.mask_ijk, vol.affine_lps, SEGMENTS[:3], key="series_a", modality="CT")
    path = write_statistics_json(a, tmp_path / "out" / "a_statistics.json")
    assert json.loads(path.read_text()) == json.loads(a.to_json())
    table = tmp_path / "out" / "statistics.csv"
    update_statistics_csv(table, csv_row(a))
    b = segment_statistics(vol.array, (info.mask_ijk == 1).astype(np.uint8), vol.affine_lps, {1: "box", 4: "cyst"})
    b.key = "series_b"
    update_statistics_csv(table, csv_row(b))
    update_statistics_csv(table, csv_row(a))  # a re-run replaces its row
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["key"] for r in rows] == ["series_b", "series_a"]
    by_key = {r["key"]: r for r in rows}
    box = a.segments[0]
    assert float(by_key["series_a"]["box.volume_ml"]) == pytest.approx(box.volume_ml, rel=1e-5)
    assert int(by_key["series_a"]["box.voxels"]) == box.voxel_count
    assert [float(v) for v in by_key["series_a"]["box.bbox_lps_min"].split()] == pytest.approx(
        box.bbox_lps_mm["min"], rel=1e-5
    )
    assert by_key["series_a"]["cyst.voxels"] == ""  # a column of another series stays empty here
    assert by_key["series_b"]["cyst.voxels"] == "0" and by_key["series_b"]["sphere.voxels"] == ""
