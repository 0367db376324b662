"""The trained model segapp ships (``hippocampus_unet3d_small``): small, a five-fold ensemble with
mirroring, and it segments a real MR DICOM series with no training and no data beside it."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import REPO, TEST_DATA

from app.bundle.config import bundle_parser
from app.cli import main

BUNDLE = REPO / "bundles" / "hippocampus_unet3d_small"
SERIES = sorted((TEST_DATA / "mr_dicom_series").glob("Study*/*"))


def test_the_weights_are_a_few_megabytes_and_fit_the_five_fold_ensemble():
    weights = BUNDLE / "models" / "model.pt"
    assert weights.stat().st_size < 4 * 2**20
    net = bundle_parser(BUNDLE, ["inference"], {"device_name": "cpu"}).get_parsed_content("network_def")
    state = torch.load(weights, weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.float16}  # stored half, loaded into float32
    net.load_state_dict(state)  # strict: every fold's every weight
    assert len(net.members) == 5 and net.mirror_axes == [0]
    summary = json.loads((BUNDLE / "docs" / "cv_summary.json").read_text())
    assert summary["num_cases"] == 208 and summary["folds"] == [0, 1, 2, 3, 4]
    assert summary["pooled"]["dice"]["anterior"]["mean"] > 0.8 and summary["pooled"]["dice"]["posterior"]["mean"] > 0.8


def _printed(value: float, text: str) -> str:
    """``value`` rounded as ``text`` prints it (its decimals, its sign)."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{value:+.{decimals}f}" if text.startswith(("+", "-")) else f"{value:.{decimals}f}"


def _row(card: str, name: str) -> list[str]:
    """The anterior and posterior cells of the card's table row ``name``."""
    (line,) = [ln for ln in card.splitlines() if ln.startswith(f"| {name} |")]
    return [c.strip() for c in line.strip().strip("|").split("|")][1:]


def _one(pattern: str, text: str) -> tuple[str, ...]:
    match = re.search(pattern, text)
    assert match, pattern
    return match.groups()


def test_model_card_figures_match_cv_summary():
    """Every figure of the card's plan, CV, post-processing, window and timing text is its recorded
    source (docs/cv_summary.json, docs/plan.json, docs/measurements.json), rounded as printed."""
    raw = (BUNDLE / "docs" / "README.md").read_text()
    card = " ".join(raw.split())  # figures may be wrapped across lines
    summary = json.loads((BUNDLE / "docs" / "cv_summary.json").read_text())
    measured = json.loads((BUNDLE / "docs" / "measurements.json").read_text())
    labels = ("anterior", "posterior")
    pooled = summary["pooled"]
    # the CV table: pooled mean ± sd per label, per-fold Dice
    for row, metric in (
        ("Dice, pooled mean ± sd", "dice"),
        ("HD95 (mm)", "hd95_mm"),
        ("surface Dice at 1 mm", "surface_dice"),
        ("volume error (mL, predicted − reference)", "volume_error_ml"),
    ):
        for label, cell in zip(labels, _row(raw, row), strict=True):
            mean, sd = (t.strip() for t in cell.split("±"))
            got = (_printed(pooled[metric][label]["mean"], mean), _printed(pooled[metric][label]["sd"], sd))
            assert got == (mean, sd), (row, label, got)
    folds = summary["per_fold"]
    for label, cell in zip(labels, _row(raw, "Dice per fold (0–4)"), strict=True):
        printed = [t.strip() for t in cell.split(",")]
        assert [_printed(folds[str(k)]["dice"][label]["mean"], t) for k, t in enumerate(printed)] == printed, label
    sizes = [folds[str(k)]["dice"]["anterior"]["n"] for k in range(5)]
    assert "folds of " + ", ".join(map(str, sizes)) + " cases" in card
    assert f"({summary['num_cases']} cases in all)" in card and sum(sizes) == summary["num_cases"]
    epochs = json.loads((BUNDLE / "configs" / "train.json").read_text())["epochs"]
    assert f"{epochs} epochs of {summary['num_cases'] - max(sizes)}-{summary['num_cases'] - min(sizes)} cases" in card
    # without mirroring; the post-processing step
    plain = _one(r"Without mirroring: (\S+) / (\S+)\.", card)
    assert tuple(_printed(summary["tta"]["dice"]["plain"][k], t) for k, t in zip(labels, plain)) == plain
    per_label = summary["postprocessing"]["per_label"]
    pp = _one(r"anterior (\S+) → (\S+), posterior (\S+) → (\S+)\)", card)
    expected = [per_label[k][w] for k in labels for w in ("dice_before", "dice_after")]
    assert tuple(_printed(v, t) for v, t in zip(expected, pp)) == pp
    (gain,) = _one(r"raised the pooled Dice by (\S+) per label", card)
    assert {_printed(per_label[k]["dice_after"] - per_label[k]["dice_before"], gain) for k in labels} == {gain}
    assert summary["postprocessing"]["largest_component"] == [1, 2] and all(per_label[k]["adopted"] for k in labels)
    # the windows (docs/measurements.json)
    for pattern, key in (
        (r"no post-processing\): (\S+) / (\S+);", "bundle_windows"),
        (r"it would be (\S+) / (\S+) \(", "outer_window_alone"),
    ):
        printed = _one(pattern, card)
        dice = measured["windows"][key]["dice"]
        assert tuple(_printed(dice[k], t) for k, t in zip(labels, printed)) == printed, key
    # training and evaluation time
    total, per_fold = _one(r"(\S+) minutes of training for the five folds \(([\d., ]+) min", card)
    minutes = measured["training_minutes"]["per_fold"]
    assert [_printed(m, t) for m, t in zip(minutes, per_fold.split(", "), strict=True)] == per_fold.split(", ")
    assert _printed(sum(minutes), total) == total
    (evaluation,) = _one(r"plus (\S+) minutes of CV evaluation", card)
    assert _printed(summary["evaluation_seconds"] / 60, evaluation) == evaluation
    seconds = _one(r"one fold's network took (\S+) s per case, (\S+) s with the left-right mirroring", card)
    recorded = summary["tta"]["seconds_per_case"]
    assert (_printed(recorded["plain"], seconds[0]), _printed(recorded["mirrored"], seconds[1])) == seconds
    # the plan (docs/plan.json) and the augmentation's flips
    plan = json.loads((BUNDLE / "docs" / "plan.json").read_text())
    net = plan["plan"]["network"]
    assert "--gpu-memory 0.2 --base-features 4 --float32 --output plan.json" in card
    assert net["budget_gib"] == 0.2 and net["amp"] is False and plan["features"] == [4, 8, 16, 32]
    assert plan["target_spacing"] == [1.0, 1.0, 1.0] and "target spacing 1 mm" in card
    assert "patch " + "×".join(map(str, plan["patch_size"])) in card and f"batch {plan['batch_size']}," in card
    assert "median size " + "×".join(f"{v:g}" for v in net["median_shape"]) in card
    (gib,) = _one(r"estimated training memory is (\S+) GiB", card)
    assert _printed(net["estimated_gib"], gib) == gib
    augment = json.loads((BUNDLE / "configs" / "train.json").read_text())["train"]["batch_augment"]
    assert augment["flip_axes"] == [0] and "its training flipped left-right only" in card  # RAS axis 0


@pytest.mark.slow
@pytest.mark.parametrize("series", SERIES, ids=[s.parent.name for s in SERIES])
def test_infer_segments_a_real_mr_series_out_of_the_box(series, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        ["infer", "hippocampus_unet3d_small", "--input", str(series), "--output", str(out), "--device", "cpu",
         "--format", "nifti,seg"]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "5-fold ensemble, mirroring TTA (2 flips): 10 forward pass(es) per window" in printed
    (nifti,) = sorted(out.glob("*.nii.gz"))
    img = nib.load(nifti)
    labels = np.asarray(img.dataobj)
    first = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
    grid = [int(first.Rows), int(first.Columns), len(list(series.glob("*.dcm")))]
    assert sorted(labels.shape) == sorted(grid)  # the series' own grid
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
    volumes = [float((labels == v).sum()) * voxel_ml for v in (1, 2)]
    # a hippocampus head and body/tail: each about 1-3 mL in MSD Task04; nothing else labelled
    assert all(0.3 < v < 6.0 for v in volumes), volumes
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    assert list(out.glob("*.dcm"))  # and a DICOM SEG beside it
