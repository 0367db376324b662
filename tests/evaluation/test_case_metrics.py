"""Per-case metrics: surface Dice on a hand-computed case, volumes in mL, empty labels, the summary."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.evaluation.metrics import case_metrics, summarize_rows

LABELS = {0: "background", 1: "a", 2: "b"}


def _cubes():
    """A 4x4x4 cube and the same cube shifted one voxel along i, voxels of 2 x 1 x 1 mm."""
    ref = np.zeros((10, 10, 10), np.int16)
    ref[2:6, 2:6, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[3:7, 2:6, 2:6] = 1
    return pred, ref


@pytest.mark.parametrize(
    "tolerance, expected",
    [
        # Boundary voxels (6-neighbour outside the cube): 64 - 8 = 56 per cube. Within 0.5 mm only
        # coinciding boundary voxels count: i in 3..5 with (j, k) on the 12-voxel ring, 36 per cube.
        (0.5, (36 + 36) / (56 + 56)),
        # 1.5 mm adds the 4 face voxels inside the ring on each cube's inner i face (1 mm from the ring);
        # the 16 voxels of each outer i face stay 2 mm from the other boundary.
        (1.5, (40 + 40) / (56 + 56)),
        # 2.5 mm: every boundary voxel has the other cube's boundary voxel 2 mm along i
        (2.5, 1.0),
    ],
)
def test_surface_dice_of_a_shifted_cube_by_hand(tolerance, expected):
    pred, ref = _cubes()
    (row,) = [r for r in case_metrics(pred, ref, (2.0, 1.0, 1.0), {0: "bg", 1: "a"}, tolerance)]
    assert row["surface_dice"] == pytest.approx(expected, abs=1e-6)
    assert row["dice"] == pytest.approx(2 * 48 / 128)  # 3 of 4 slabs overlap
    assert row["hd95_mm"] == pytest.approx(2.0)  # one voxel along the 2 mm axis


def test_volumes_in_ml_and_labels_absent_from_one_or_both_maps():
    pred, ref = _cubes()
    pred[8, 8, 8] = 2  # label b only in the prediction
    rows = {r["label"]: r for r in case_metrics(pred, ref, (2.0, 1.0, 1.0), LABELS, 1.0)}
    a, b = rows["a"], rows["b"]
    assert a["volume_ref_ml"] == pytest.approx(64 * 2 / 1000) and a["volume_error_ml"] == pytest.approx(0.0)
    assert b["dice"] == 0.0 and b["surface_dice"] == 0.0 and math.isnan(b["hd95_mm"])
    assert b["volume_error_ml"] == pytest.approx(0.002)
    rows = {r["label"]: r for r in case_metrics(ref, ref, (1, 1, 1), LABELS, 1.0)}
    assert math.isnan(rows["b"]["dice"]) and rows["a"]["dice"] == 1.0 and rows["a"]["surface_dice"] == 1.0
    with pytest.raises(ValueError, match="same 3D grid"):
        case_metrics(ref[:5], ref, (1, 1, 1), LABELS)


def test_summary_mean_sd_n_leave_out_undefined_cases():
    rows = [
        {"label": "a", "dice": 0.8, "hd95_mm": 1.0},
        {"label": "a", "dice": 0.6, "hd95_mm": math.nan},
        {"label": "b", "dice": math.nan, "hd95_mm": 3.0},
    ]
    s = summarize_rows(rows, ("dice", "hd95_mm"))
    assert s["dice"]["a"] == {"mean": pytest.approx(0.7), "sd": pytest.approx(math.sqrt(0.02)), "n": 2}
    assert s["dice"]["b"]["n"] == 0 and s["dice"]["mean"] == pytest.approx(0.7)
    assert s["hd95_mm"]["a"] == {"mean": 1.0, "sd": 0.0, "n": 1} and s["hd95_mm"]["mean"] == pytest.approx(2.0)
