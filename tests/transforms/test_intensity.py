"""Intensity transforms on small hand-computed arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

from app.errors import ConfigError, InputError
from app.transforms.intensity import (
    CheckFinite,
    CheckFinited,
    ForegroundPercentileNormalize,
    ForegroundPercentileNormalized,
    NormalizeFromPlan,
    NormalizeFromPland,
    check_finite,
    normalization_from_plan,
)

HU = np.array([[[-500, -100, 0, 50, 200, 1000]]], dtype=np.int16)  # (C=1, 1, 6)
# clip to -100..200, then (x - 50) / 25
HU_EXPECTED = np.array([[[-6.0, -6.0, -2.0, 0.0, 6.0, 6.0]]], dtype=np.float32)
CT_ENTRY = {"channel": 0, "scheme": "CT", "lower": -100.0, "upper": 200.0, "mean": 50.0, "std": 25.0}


def _mt(array, name="/data/case_a.nii.gz") -> MetaTensor:
    return MetaTensor(torch.as_tensor(array), affine=torch.eye(4), meta={"filename_or_obj": name})


def test_foreground_percentile_normalize_hand_computed():
    out = ForegroundPercentileNormalize(-100, 200, 50, 25)(HU)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(np.asarray(out), HU_EXPECTED, atol=1e-5)


def test_foreground_percentile_normalize_equals_clip_then_zscore():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 400, size=(1, 7, 6, 5)).astype(np.float32)
    out = ForegroundPercentileNormalize(-300.5, 420.0, 33.3, 123.4)(x)
    np.testing.assert_allclose(np.asarray(out), (np.clip(x, -300.5, 420.0) - 33.3) / 123.4, atol=1e-4)


def test_foreground_percentile_normalized_keeps_metadata():
    d = ForegroundPercentileNormalized("image", -100, 200, 50, 25)({"image": _mt(HU), "label": np.ones(3)})
    assert isinstance(d["image"], MetaTensor)
    assert d["image"].meta["filename_or_obj"] == "/data/case_a.nii.gz"
    np.testing.assert_allclose(d["image"].numpy(), HU_EXPECTED, atol=1e-5)
    np.testing.assert_array_equal(d["label"], np.ones(3))


@pytest.mark.parametrize(
    "args, match",
    [((-100, 200, 50, 0), "std > 0"), ((200, 200, 50, 10), "upper_hu"), ((-100, 200, float("nan"), 10), "finite")],
)
def test_foreground_percentile_normalize_rejects_bad_values(args, match):
    with pytest.raises(ConfigError, match=match):
        ForegroundPercentileNormalize(*args)


def test_check_finite_passes_finite_images_unchanged():
    img = _mt(np.arange(6, dtype=np.float32).reshape(1, 2, 3))
    assert CheckFinite()(img) is img
    ints = np.arange(4, dtype=np.int16)
    assert CheckFinite()(ints) is ints
    d = {"image": img}
    assert CheckFinited("image")(d)["image"] is img


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_the_file(bad):
    arr = np.zeros((1, 2, 2, 2), dtype=np.float32)
    arr[0, 1, 1, 1] = bad
    with pytest.raises(InputError, match=r"/data/case_a\.nii\.gz") as info:
        CheckFinited("image")({"image": _mt(arr)})
    assert info.value.path == "/data/case_a.nii.gz"
    assert ("1 NaN" if np.isnan(bad) else "1 infinite") in str(info.value)


@pytest.mark.parametrize("as_tensor", [True, False])
def test_check_finite_passes_finite_values_whose_sum_overflows(as_tensor):
    """The one-sum check: a sum that overflows sends the check voxel by voxel, which passes."""
    big = np.full((1, 3, 2, 4), 3e38, dtype=np.float32)  # sum = inf, every voxel finite
    half = np.full((1, 300, 2), 60000.0, dtype=np.float16)  # float16: overflows at 65504
    for arr in (big, half, np.float32(2.0)):
        img = _mt(arr) if as_tensor and arr.ndim else torch.as_tensor(arr) if as_tensor else arr
        assert CheckFinite()(img) is img
    big[0, 2, 1, 3] = -np.inf
    with pytest.raises(InputError, match="0 NaN and 1 infinite"):
        CheckFinite(name="x.nii")(_mt(big) if as_tensor else big)
    if as_tensor:  # a dtype numpy does not have
        with pytest.raises(InputError, match="1 NaN and 0 infinite"):
            CheckFinite(name="x.nii")(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16))


def test_check_finite_numpy_with_legacy_meta_dict_and_explicit_name():
    arr = np.array([[1.0, np.nan, np.nan]])
    with pytest.raises(InputError, match="legacy.nii.gz.*2 NaN"):
        CheckFinited("image")({"image": arr, "image_meta_dict": {"filename_or_obj": "legacy.nii.gz"}})
    with pytest.raises(InputError, match="given.nii"):
        CheckFinite(name="given.nii")(arr)
    with pytest.raises(InputError, match="<image without file name>"):
        check_finite(torch.tensor([np.inf]))


def test_normalize_from_plan_ct_and_mr_channels():
    mr = np.array([[[0, 1, 2, 3, 0, 0]]], dtype=np.float32)
    plan = {"normalization": [CT_ENTRY, {"channel": 1, "scheme": "MR", "nonzero": True}]}
    out = NormalizeFromPlan(plan)(_mt(np.concatenate([HU.astype(np.float32), mr])))
    assert isinstance(out, MetaTensor) and out.shape == (2, 1, 6)
    np.testing.assert_allclose(out[0:1].numpy(), HU_EXPECTED, atol=1e-5)
    # nonzero voxels 1, 2, 3: mean 2, population std sqrt(2/3); zeros stay 0
    s = np.sqrt(2 / 3)
    np.testing.assert_allclose(out[1, 0].numpy(), [0, -1 / s, 0, 1 / s, 0, 0], atol=1e-5)


def test_normalize_from_plan_file_in_a_bundle_config(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "plan.json").write_text(json.dumps({"plan_version": 1, "normalization": [CT_ENTRY]}))
    parser = ConfigParser(
        {
            "bundle_root": str(tmp_path),
            "preprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {
                        "_target_": "app.transforms.intensity.NormalizeFromPland",
                        "keys": "image",
                        "plan": "$@bundle_root + '/configs/plan.json'",
                    }
                ],
            },
        }
    )
    pre = parser.get_parsed_content("preprocessing")
    assert isinstance(pre, Compose)
    out = pre({"image": _mt(HU)})["image"]
    np.testing.assert_allclose(out.numpy(), HU_EXPECTED, atol=1e-5)


def test_normalize_from_pland_checks_finite_and_channels():
    t = NormalizeFromPland("image", {"normalization": [CT_ENTRY]})
    bad = HU.astype(np.float32)
    bad[0, 0, 2] = np.nan
    with pytest.raises(InputError, match="case_a.nii.gz"):
        t({"image": _mt(bad)})
    with pytest.raises(InputError, match="2 channel"):
        t({"image": _mt(np.concatenate([HU, HU]))})
    # check_finite=False lets NaN through (MONAI semantics)
    out = NormalizeFromPland("image", {"normalization": [CT_ENTRY]}, check_finite=False)({"image": _mt(bad)})
    assert torch.isnan(out["image"]).sum() == 1


def test_normalization_from_plan_errors_name_the_file(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="plan.json"):
        NormalizeFromPlan(p)
    p.write_text(json.dumps({"normalization": [{"scheme": "PET"}]}))
    with pytest.raises(ConfigError, match="'PET'"):
        NormalizeFromPlan(str(p))
    p.write_text(json.dumps({"normalization": [{"scheme": "CT", "lower": 0}]}))
    with pytest.raises(ConfigError, match="upper"):
        normalization_from_plan(p)
    with pytest.raises(ConfigError, match="'norm2'"):
        normalization_from_plan({"normalization": [CT_ENTRY]}, modality_key="norm2")
    assert normalization_from_plan({"norm2": [CT_ENTRY]}, modality_key="norm2")[0]["mean"] == 50.0
