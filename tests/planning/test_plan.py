"""Fingerprint and plan: hand-checked statistics on synthetic data, nnU-Net's anisotropy rule, and
the real CT (TotalSegmentator example) and MR (MSD hippocampus) data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SAMPLE_HIPPOCAMPUS, TEST_DATA

from app.data.manifest import create_manifest
from app.errors import ConfigError, InputError
from app.planning import compute_fingerprint, load_plan, make_plan, plan_from_manifest, write_plan
from app.transforms.intensity import NormalizeFromPlan

DATA = TEST_DATA
TOTALSEG = DATA / "totalseg_example"
HIPPO = SAMPLE_HIPPOCAMPUS


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _case(tmp: Path, name: str, image: np.ndarray, label: np.ndarray, affine=None) -> dict:
    return {
        "image": _save(tmp / "imagesTr" / f"{name}.nii.gz", image, affine),
        "label": _save(tmp / "labelsTr" / f"{name}.nii.gz", label, affine),
    }


@pytest.fixture
def tiny(tmp_path) -> list[dict]:
    """Two cases; foreground values 1, 2, 3 (case 0) and 10 (case 1)."""
    img0 = np.full((4, 4, 4), 7.0, np.float32)
    lab0 = np.zeros((4, 4, 4), np.uint8)
    img0[0, 0, :3] = [1, 2, 3]
    lab0[0, 0, :3] = [1, 2, 1]
    img1 = np.full((6, 4, 2), -3.0, np.float32)
    lab1 = np.zeros((6, 4, 2), np.uint8)
    img1[5, 3, 1] = 10
    lab1[5, 3, 1] = 1
    affine1 = np.diag([-0.5, 0.5, 2.0, 1.0])  # a flip: spacing is still positive
    return [_case(tmp_path, "a", img0, lab0), _case(tmp_path, "b", img1, lab1, affine1)]


def test_fingerprint_hand_checked(tiny):
    fp = compute_fingerprint(tiny, modality="MR")
    assert fp["num_cases"] == 2 and fp["num_channels"] == 1 and fp["modality"] == ["MR"]
    assert fp["cases"][0]["spacing"] == [1.0, 1.0, 1.0] and fp["cases"][0]["shape"] == [4, 4, 4]
    assert fp["cases"][1]["spacing"] == [0.5, 0.5, 2.0] and fp["cases"][1]["shape"] == [6, 4, 2]
    assert fp["cases"][0]["foreground_voxels"] == 3 and fp["cases"][1]["foreground_voxels"] == 1
    assert fp["median_spacing"] == [0.75, 0.75, 1.5] and fp["median_shape"] == [5.0, 4.0, 3.0]
    st = fp["intensity"][0]
    assert st["mean"] == pytest.approx(4.0)
    assert st["std"] == pytest.approx(math.sqrt((9 + 4 + 1 + 36) / 4))  # population std of 1, 2, 3, 10
    assert (st["min"], st["max"], st["foreground_voxels"], st["sampled_voxels"]) == (1.0, 10.0, 4, 4)
    assert st["percentile_00_5"] == pytest.approx(np.percentile([1, 2, 3, 10], 0.5))
    assert st["percentile_99_5"] == pytest.approx(np.percentile([1, 2, 3, 10], 99.5))
    assert fp["cases"][0]["foreground_mean"] == [2.0]
    json.dumps(fp)  # serialisable as it is


def test_fingerprint_sampling_is_seeded_and_capped(tmp_path):
    rng = np.random.default_rng(1)
    cases = [
        _case(
            tmp_path,
            f"c{i}",
            rng.normal(100, 20, (10, 10, 10)).astype(np.float32),
            (rng.random((10, 10, 10)) > 0.5).astype(np.uint8),
        )
        for i in range(3)
    ]
    a = compute_fingerprint(cases, modality="MR", max_voxels_per_case=50, seed=3)
    b = compute_fingerprint(cases, modality="MR", max_voxels_per_case=50, seed=3)
    c = compute_fingerprint(cases, modality="MR", max_voxels_per_case=50, seed=4)
    assert a["intensity"] == b["intensity"]
    assert a["intensity"][0]["sampled_voxels"] == 150
    assert a["intensity"][0]["percentile_99_5"] != c["intensity"][0]["percentile_99_5"]
    # mean/std use every foreground voxel, so they do not depend on the sample
    assert a["intensity"][0]["mean"] == c["intensity"][0]["mean"]
    assert a["intensity"][0]["foreground_voxels"] == sum(x["foreground_voxels"] for x in a["cases"])


def test_ignore_label_and_auto_modality(tmp_path):
    img = np.full((4, 4, 4), -1000.0, np.float32)  # air: looks like CT
    lab = np.zeros((4, 4, 4), np.uint8)
    img[1, 1, 1], lab[1, 1, 1] = 40, 1
    img[2, 2, 2], lab[2, 2, 2] = 5000, 255  # not annotated: must not count
    fp = compute_fingerprint([_case(tmp_path, "ct", img, lab)], ignore_label=255)
    assert fp["modality"] == ["CT"] and fp["modality_auto"] == [True]
    assert fp["intensity"][0]["max"] == 40 and fp["intensity"][0]["foreground_voxels"] == 1
    mr = compute_fingerprint([_case(tmp_path, "mr", np.abs(img) + 1, lab)], modality="auto")
    assert mr["modality"] == ["MR"]


def test_multichannel_images(tmp_path):
    img = np.zeros((4, 4, 4, 2), np.float32)  # NIfTI: channels last
    img[..., 0], img[..., 1] = 1.0, -2000.0
    img[0, 0, 0] = [3.0, 500.0]
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[0, 0, :2] = 1
    fp = compute_fingerprint([_case(tmp_path, "mc", img, lab)])
    assert fp["num_channels"] == 2 and fp["modality"] == ["MR", "CT"]
    assert [s["mean"] for s in fp["intensity"]] == [2.0, -750.0]
    plan = make_plan(fp)
    assert [n["scheme"] for n in plan["normalization"]] == ["MR", "CT"]
    with pytest.raises(ConfigError, match="images have 2"):
        compute_fingerprint([_case(tmp_path, "mc", img, lab)], modality=["CT"])


def test_input_errors_name_the_file(tmp_path, tiny):
    bad_shape = _case(tmp_path, "bad", np.zeros((4, 4, 4), np.float32), np.ones((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match=r"labelsTr/bad\.nii\.gz.*differs"):
        compute_fingerprint([bad_shape])
    shifted = dict(
        tiny[0], label=_save(tmp_path / "shifted.nii.gz", np.ones((4, 4, 4), np.uint8), np.diag([1.0, 1.0, 1.1, 1.0]))
    )
    with pytest.raises(InputError, match="shifted.nii.gz"):
        compute_fingerprint([shifted])
    with pytest.raises(InputError, match="missing.nii.gz.*not found"):
        compute_fingerprint([{"image": str(tmp_path / "missing.nii.gz")}])
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="corrupt.nii.gz"):
        compute_fingerprint([{"image": str(tmp_path / "corrupt.nii.gz")}])
    empty = _case(tmp_path, "empty", np.ones((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(InputError, match="no.*foreground|none of"):
        compute_fingerprint([empty])
    nan_img = np.ones((4, 4, 4), np.float32)
    nan_img[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="nan.nii.gz.*NaN"):
        compute_fingerprint([_case(tmp_path, "nan", nan_img, np.ones((4, 4, 4), np.uint8))])
    with pytest.raises(InputError, match="empty"):
        compute_fingerprint([])
    with pytest.raises(ConfigError, match="modality"):
        compute_fingerprint(tiny, modality="PET")


def _fp(spacings, shapes, modality="MR") -> dict:
    """A minimal fingerprint for make_plan."""
    return {
        "cases": [{"spacing": s, "shape": sh} for s, sh in zip(spacings, shapes)],
        "modality": [modality],
        "intensity": [{"percentile_00_5": -900.0, "percentile_99_5": 300.0, "mean": 20.0, "std": 150.0}],
    }


def test_plan_anisotropic_uses_tenth_percentile_on_low_resolution_axis():
    z = [5.0, 5.0, 3.0, 5.0, 2.5]
    plan = make_plan(_fp([[0.8, 0.8, s] for s in z], [[512, 512, 40]] * 5))
    assert plan["anisotropic"] and plan["low_resolution_axis"] == 2
    assert plan["median_spacing"] == [0.8, 0.8, 5.0]
    assert plan["target_spacing"] == pytest.approx([0.8, 0.8, np.percentile(z, 10)])  # 2.7 mm
    # sizes at the target spacing: 512 in-plane, 40 * z / 2.7 -> median 74 slices
    assert plan["median_shape_at_target"] == [512.0, 512.0, float(np.median(np.round(40 * np.array(z) / 2.7)))]
    # 512 x 512 x 74 does not fit 8 GiB: the planner shortens the axes in turn, keeping the patch's
    # proportions to the median size about equal, each axis a multiple of 2^pools, within the budget
    patch, net = plan["patch_size"], plan["network"]
    ratios = [p / m for p, m in zip(patch, plan["median_shape_at_target"])]
    assert max(ratios) < 1 and max(ratios) - min(ratios) < 0.15, ratios
    assert all(p % 2 ** net["pools"] == 0 for p in patch) and len(plan["features"]) == net["pools"] + 1
    assert net["estimated_bytes"] <= net["budget_bytes"] == 8 * 1024**3 and plan["batch_size"] == 2


def test_plan_anisotropic_never_finer_than_other_axes_and_threshold():
    # low-res axis first; its 10th percentile (0.5) would be finer than the other axes (1.0)
    plan = make_plan(_fp([[4.0, 1.0, 1.0]] * 6 + [[0.5, 1.0, 1.0]] * 4, [[20, 100, 100]] * 10))
    assert plan["low_resolution_axis"] == 0 and plan["target_spacing"] == [1.0, 1.0, 1.0]
    # ratio 2.5 <= 3: the median is kept
    iso = make_plan(_fp([[1.0, 1.0, 2.5], [1.0, 1.0, 1.5]], [[30, 30, 10]] * 2))
    assert not iso["anisotropic"] and iso["target_spacing"] == [1.0, 1.0, 2.0]


def test_plan_patch_size_rounding_and_cap():
    plan = make_plan(_fp([[2.0, 2.0, 2.0]], [[8, 65, 300]]))
    # 8 voxels allow one pooling (to 4): even sizes, the long axis capped at 256
    assert plan["patch_size"] == [8, 66, 256] and plan["network"]["pools"] == 1
    with pytest.raises(ConfigError, match="fingerprint"):
        make_plan({"cases": []})


def test_plan_ct_normalisation_and_round_trip(tmp_path):
    plan = make_plan(_fp([[1.0, 1.0, 1.0]], [[32, 32, 32]], modality="CT"))
    assert plan["normalization"] == [
        {"channel": 0, "scheme": "CT", "lower": -900.0, "upper": 300.0, "mean": 20.0, "std": 150.0}
    ]
    path = write_plan(plan, tmp_path / "out" / "plan.json")
    assert load_plan(path) == json.loads(json.dumps(plan))
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp file left behind
    out = NormalizeFromPlan(path)(np.array([[[-2000.0, 20.0, 170.0, 9999.0]]], np.float32))
    np.testing.assert_allclose(np.asarray(out)[0, 0], [-6.133333, 0.0, 1.0, 1.866667], atol=1e-5)
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ConfigError, match="other.json.*not a segapp plan"):
        load_plan(tmp_path / "other.json")


def test_totalsegmentator_ct():
    image, label = TOTALSEG / "example_ct_sm.nii.gz", TOTALSEG / "example_seg.nii.gz"
    fp = compute_fingerprint([{"image": str(image), "label": str(label)}])
    plan = make_plan(fp)
    hu = np.asarray(nib.load(image).dataobj)
    fg = hu[np.asarray(nib.load(label).dataobj) > 0].astype(np.float64)
    st = fp["intensity"][0]
    assert fp["modality"] == ["CT"]  # auto-detected from the air
    assert fg.min() <= st["percentile_00_5"] < st["percentile_99_5"] <= fg.max()
    assert -1024 <= st["percentile_00_5"] and st["percentile_99_5"] <= 3071
    # sampled 10000 of ~110k voxels: percentiles near the exact ones
    assert np.percentile(fg, 0.1) <= st["percentile_00_5"] <= np.percentile(fg, 1.5)
    assert np.percentile(fg, 98.5) <= st["percentile_99_5"] <= np.percentile(fg, 99.9)
    assert st["mean"] == pytest.approx(fg.mean()) and st["std"] == pytest.approx(fg.std())
    assert (st["min"], st["max"]) == (fg.min(), fg.max())
    assert plan["target_spacing"] == pytest.approx([3.0, 3.0, 3.0], abs=1e-3)
    median = plan["median_shape_at_target"]
    step = 2 ** plan["network"]["pools"]
    assert all(p % step == 0 and m <= p < m + step for p, m in zip(plan["patch_size"], median))  # fits whole
    assert plan["normalization"][0]["scheme"] == "CT"
    assert plan["normalization"][0]["lower"] == st["percentile_00_5"]


def test_hippocampus_mr_twenty_cases():
    images = sorted((HIPPO / "imagesTr").glob("hippocampus_*.nii.gz"))[:20]
    assert len(images) == 20
    datalist = [{"image": str(p), "label": str(HIPPO / "labelsTr" / p.name)} for p in images]
    fp = compute_fingerprint(datalist)
    plan = make_plan(fp)
    assert fp["modality"] == ["MR"] and plan["normalization"] == [{"channel": 0, "scheme": "MR", "nonzero": True}]
    assert plan["target_spacing"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-3)
    assert not plan["anisotropic"]
    assert np.allclose(plan["median_shape"], [35, 50, 36], atol=3)
    # nnU-Net's plan for Task04: three poolings (35 / 8 >= 4), the median size rounded up to 8
    assert plan["patch_size"] == [40, 56, 40] and plan["features"] == [32, 64, 128, 160]
    fg = np.concatenate(
        [np.asarray(nib.load(d["image"]).dataobj)[np.asarray(nib.load(d["label"]).dataobj) > 0] for d in datalist]
    ).astype(np.float64)
    assert fp["intensity"][0]["mean"] == pytest.approx(fg.mean())
    assert fp["intensity"][0]["std"] == pytest.approx(fg.std())


def test_plan_from_manifest(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(3):
        lab = np.zeros((8, 8, 8), np.uint8)
        lab[2:5, 2:5, 2:5] = 1
        lab[0, 0, 0] = 255  # not annotated
        img = rng.random((8, 8, 8)).astype(np.float32) + 1
        img[0, 0, 0] = 99.0
        _case(root, f"case{i}", img, lab, np.diag([0.9, 0.9, 1.2, 1.0]))
    create_manifest(
        root, labels={0: "background", 1: "organ"}, output=tmp_path / "m.json", ignore_value=255, num_folds=3
    )
    plan = plan_from_manifest(tmp_path / "m.json", modality="MR")
    written = load_plan(tmp_path / "plan.json")
    assert written["num_cases"] == plan["num_cases"] == 3
    assert written["target_spacing"] == pytest.approx([0.9, 0.9, 1.2])
    assert written["fingerprint"]["intensity"][0]["foreground_voxels"] == 3 * 27  # 255 excluded
    assert written["fingerprint"]["intensity"][0]["max"] < 2.0
    assert len(written["manifest"]["content_hash"]) == 64
    other = plan_from_manifest(tmp_path / "m.json", tmp_path / "elsewhere" / "p.json", modality="CT")
    assert other["normalization"][0]["scheme"] == "CT" and (tmp_path / "elsewhere" / "p.json").is_file()


def test_spacing_and_shape_are_along_ras_whatever_the_voxel_order(tmp_path):
    # the same anisotropic volume stored RAS (i=R, j=A, k=S) and with its axes permuted to (S, R, A), L/P flipped
    img = np.zeros((6, 4, 2), np.float32)
    lab = np.zeros((6, 4, 2), np.uint8)
    img[1:3, 1:3, 1], lab[1:3, 1:3, 1] = 5, 1
    ras = np.diag([0.5, 0.8, 3.0, 1.0])
    perm = np.zeros((4, 4))
    perm[0, 1], perm[1, 2], perm[2, 0], perm[3, 3] = -0.5, -0.8, 3.0, 1  # voxel (k, i, j) -> world
    cases = [
        _case(tmp_path / "ras", "a", img, lab, ras),
        _case(tmp_path / "perm", "a", np.transpose(img, (2, 0, 1)), np.transpose(lab, (2, 0, 1)), perm),
    ]
    fps = [compute_fingerprint([c], modality="MR")["cases"][0] for c in cases]
    assert fps[0]["spacing"] == pytest.approx([0.5, 0.8, 3.0]) and fps[1]["spacing"] == pytest.approx([0.5, 0.8, 3.0])
    assert fps[0]["shape"] == fps[1]["shape"] == [6, 4, 2]
