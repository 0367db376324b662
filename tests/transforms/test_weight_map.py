"""U-Net border weight maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SAMPLE_HIPPOCAMPUS
from monai.data import MetaTensor
from scipy import ndimage

from app.transforms.weight_map import UNetWeightMapd, class_balance_weights, unet_weight_map


def _two_boxes():
    """Two 7x6x4 boxes along i, one empty voxel plane (i = 9) between them."""
    lab = np.zeros((20, 12, 6), np.uint8)
    lab[2:9, 3:9, 1:5] = 1
    lab[10:17, 3:9, 1:5] = 1
    return lab


def test_class_balance_weights_mean_one_and_inverse_frequency():
    lab = _two_boxes()
    w = class_balance_weights(lab)
    # N = 1440 voxels, 336 foreground, 1104 background, K = 2: w_c = N / (K n_c)
    assert w[0, 0, 0] == pytest.approx(1440 / (2 * 1104))
    assert w[5, 5, 2] == pytest.approx(1440 / (2 * 336))
    assert w.mean() == pytest.approx(1.0, abs=1e-6)


def test_gap_between_touching_objects_gets_the_border_weight():
    lab = _two_boxes()
    w = unet_weight_map(lab, w0=10.0, sigma=2.0)
    wc_bg, wc_fg = 1440 / (2 * 1104), 1440 / (2 * 336)
    # gap voxel (9, 5, 2): d1 = d2 = 1 -> wc_bg + 10 exp(-4 / 8) = 0.652 + 6.065
    assert w[9, 5, 2] == pytest.approx(wc_bg + 10 * math.exp(-0.5), rel=1e-5)
    # inside object 1 at (5, 5, 2): d1 = 0, d2 = 5 (to i = 10) -> wc_fg + 10 exp(-25 / 8)
    assert w[5, 5, 2] == pytest.approx(wc_fg + 10 * math.exp(-25 / 8), rel=1e-5)
    # (9, 0, 2): d1 = d2 = sqrt(1 + 9) -> (2 sqrt 10)^2 = 40 -> exp(-40 / 8)
    assert w[9, 0, 2] == pytest.approx(wc_bg + 10 * math.exp(-5.0), rel=1e-5)
    # far away: d1 + d2 > 4 sigma -> no border term
    assert w[0, 0, 5] == pytest.approx(wc_bg, rel=1e-6)
    # the gap holds the largest background weight; object voxels facing it: d1 = 0, d2 = 2
    assert w[lab == 0].max() == pytest.approx(w[9, 5, 2])
    assert w[8, 5, 2] == pytest.approx(wc_fg + 10 * math.exp(-4 / 8), rel=1e-5)
    # close to w_c + w0 as sigma grows
    w_wide = unet_weight_map(lab, w0=10.0, sigma=20.0, class_balance=False)
    assert w_wide[9, 5, 2] == pytest.approx(1 + 10 * math.exp(-4 / 800), rel=1e-5)  # ~ w_c + w0


def test_matches_brute_force_distances():
    rng = np.random.default_rng(0)
    lab = np.zeros((24, 20, 10), np.int16)
    for c in range(6):
        p = rng.integers(2, 18, 3)
        p[2] = min(p[2], 7)
        lab[p[0] : p[0] + 3, p[1] : p[1] + 4, p[2] : p[2] + 2] = 1 + c % 2
    spacing = (0.8, 1.0, 2.5)
    sigma = 3.0  # mm
    w = unet_weight_map(lab, w0=5.0, sigma=sigma, spacing=spacing, class_balance=False, truncate=1e6)
    # brute force: every object's full-volume distance map, sorted per voxel
    dists = []
    for c in (1, 2):
        comp, n = ndimage.label(lab == c)
        for i in range(1, n + 1):
            dists.append(ndimage.distance_transform_edt(comp != i, sampling=spacing))
    d = np.sort(np.stack(dists), axis=0)
    expected = 1.0 + 5.0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
    assert np.allclose(w, expected, rtol=1e-5, atol=1e-5)


def test_touching_objects_of_different_classes_stay_separate():
    lab = np.zeros((12, 6, 6), np.uint8)
    lab[2:6, 1:5, 1:5] = 1
    lab[6:10, 1:5, 1:5] = 2  # touches class 1 at i = 5 | 6
    w = unet_weight_map(lab, w0=10.0, sigma=2.0, class_balance=False)
    # voxel (5, 2, 2) is in object 1 (d1 = 0), one voxel from object 2 (d2 = 1)
    assert w[5, 2, 2] == pytest.approx(1 + 10 * math.exp(-1 / 8), rel=1e-5)


def test_ignored_voxels_get_zero_and_do_not_count():
    lab = _two_boxes().astype(np.int32)
    lab[:, :, 5] = 255
    w = unet_weight_map(lab, ignore_value=255)
    assert np.all(w[:, :, 5] == 0)
    labelled = lab != 255
    assert class_balance_weights(lab, 255)[labelled].mean() == pytest.approx(1.0, abs=1e-6)
    assert np.all(w[labelled] > 0)


def test_single_object_has_no_border_term_and_cap_on_objects(caplog):
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[3:6, 3:6, 3:6] = 1
    w = unet_weight_map(lab, class_balance=False)
    assert np.all(w == 1.0)
    many = np.zeros((30, 30, 4), np.uint8)
    many[::3, ::3, 1] = 1  # 100 one-voxel objects
    with caplog.at_level("WARNING"):
        capped = unet_weight_map(many, max_objects=10, class_balance=False, sigma=2.0)
    assert "keeping the 10 largest" in caplog.text
    assert capped.max() > 1.0


def test_dictionary_transform_keeps_metatensor_and_reads_spacing():
    lab = _two_boxes()
    mt = MetaTensor(torch.as_tensor(lab[None]), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    out = UNetWeightMapd(keys="label", weight_key="weight", sigma=4.0, spacing="affine")({"label": mt})
    w = out["weight"]
    assert isinstance(w, MetaTensor) and w.dtype == torch.float32 and w.shape == (1, 20, 12, 6)
    assert torch.equal(w.affine, mt.affine)
    expected = unet_weight_map(lab, sigma=4.0, spacing=(2.0, 2.0, 3.0))
    assert np.allclose(w[0].numpy(), expected)
    assert out["label"] is mt
    # numpy in, numpy out
    out_np = UNetWeightMapd(sigma=4.0)({"label": lab[None]})
    assert isinstance(out_np["weight"], np.ndarray) and out_np["weight"].dtype == np.float32


def test_real_hippocampus_label():
    import nibabel as nib

    from app.io.geometry import voxel_spacing

    path = sorted((SAMPLE_HIPPOCAMPUS / "labelsTr").glob("hippocampus_*.nii.gz"))[0]
    img = nib.load(path)
    lab = np.asarray(img.dataobj).astype(np.uint8)
    w = unet_weight_map(lab, w0=10.0, sigma=2.0, spacing=voxel_spacing(img.affine))
    wc = class_balance_weights(lab)
    assert w.dtype == np.float32 and w.shape == lab.shape
    assert np.all(w >= wc - 1e-6) and np.all(w <= wc + 10.0 + 1e-5)
    # anterior (1) and posterior (2) hippocampus touch: their interface carries the border term
    touching = (lab == 1) & ndimage.binary_dilation(lab == 2)
    assert touching.any()
    assert np.all(w[touching] - wc[touching] > 10.0 * np.exp(-(2.0**2) / (2 * 2.0**2)) - 1e-4)
