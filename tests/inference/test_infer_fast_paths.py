"""Fast inference paths give the same labels as the plain MONAI way; stitching memory stays bounded.

* ``sliding_window_labels`` equals MONAI's ``sliding_window_inference`` + argmax (float32 buffer,
  exactly; float16 buffer, Dice >= 0.999), on the network voxel grid and streamed onto axis-aligned
  and oblique target voxel grids (equal to full ``resample_to_grid`` + argmax).
* ``BundlePredictor`` with ``fast=True`` vs ``fast=False`` on DICOM phantoms (axial, sagittal,
  coronal, oblique; LPS affines from the series) and on a NIfTI-style RAS image: labels equal or
  Dice >= 0.999 per label.
* The 105-class 512x512x400 CT case: the streamed buffer estimate stays under 8 GB where the naive
  float32 one does not, and a real (smaller) 105-class run stays inside its estimate.
* The CPU fallback is chosen when the estimate exceeds the budget or the free device memory.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dicom_phantoms import write_phantom_series
from monai.inferers import sliding_window_inference

from app.bundle.model import load_model
from app.inference.predictor import BundlePredictor
from app.inference.resample import cell_argmax_slab, channel_argmax, resample_to_grid, target_to_source_voxel
from app.inference.stitching import (
    WindowSpec,
    choose_stitch_device,
    estimate_stitch_bytes,
    sliding_window_labels,
    target_span,
)
from app.io.dicom_series import read_series

GB = 1e9


def _net(out_channels: int = 5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, out_channels, 3, padding=1)
    ).eval()


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    denom = x.sum() + y.sum()
    return 1.0 if denom == 0 else 2.0 * float((x & y).sum()) / float(denom)


def _assert_same_labels(a, b, min_dice: float = 0.999) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    for label in sorted(set(np.unique(a)) | set(np.unique(b))):
        if label == 0:
            continue
        assert _dice(a, b, label) >= min_dice, f"label {label}: Dice {_dice(a, b, label):.5f}"


def _oblique_affine(shape_scale=(0.9, 0.8, 1.3)) -> np.ndarray:
    th = 0.4
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(shape_scale)
    aff[:3, 3] = [10, -5, 4]
    return aff


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize(
    "shape,roi,overlap",
    [((37, 29, 21), (16, 16, 16), 0.5), ((10, 20, 12), (16, 16, 16), 0.25), ((33, 40, 26), (16, 24, 12), 0.6)],
)
@pytest.mark.parametrize("cross_rows", [False, True])
@torch.no_grad()
def test_stitching_equals_monai_sliding_window_argmax(mode, shape, roi, overlap, cross_rows):
    net = _net()
    x = torch.randn(1, 1, *shape)
    ref = sliding_window_inference(x, roi, 3, net, overlap, mode)[0]
    stats: dict = {}
    spec = WindowSpec(roi, 3, (overlap,) * 3, mode)
    labels = sliding_window_labels(x, net, spec, cross_rows=cross_rows, stats=stats)
    torch.testing.assert_close(labels, channel_argmax(ref))
    # the buffer holds one window row (+ nothing retained) of the plane, never the whole output
    assert stats["peak_buffer_bytes"] < ref.numel() * 4 or min(shape) <= max(roi)


@torch.no_grad()
def test_float16_buffer_matches_monai_within_dice():
    net = _net()
    x = torch.randn(1, 1, 48, 40, 36)
    ref = channel_argmax(sliding_window_inference(x, (16, 16, 16), 4, net, 0.5, "gaussian")[0])
    stats: dict = {}
    labels = sliding_window_labels(
        x, net, WindowSpec((16, 16, 16), 4, (0.5,) * 3, "gaussian"), acc_dtype=torch.float16, stats=stats
    )
    assert stats["acc_dtype"] == "float16"
    _assert_same_labels(labels.numpy(), ref.numpy())


@pytest.mark.parametrize("target", ["permuted_flipped", "oblique"])
@pytest.mark.parametrize("max_slab_bytes", [2**14, 2**28])
@pytest.mark.parametrize("cross_rows", [False, True])
@torch.no_grad()
def test_streamed_resample_argmax_equals_full_resampling(target, max_slab_bytes, cross_rows):
    net = _net()
    x = torch.randn(1, 1, 37, 29, 21)
    affine_net = np.diag([1.0, 1.0, 1.0, 1.0])
    affine_net[:3, 3] = [5, -3, 2]
    if target == "oblique":
        affine_dst = _oblique_affine()
    else:  # target i <- network j (flipped), target j <- network i, target k <- network k (flipped)
        affine_dst = np.array([[0, -0.7, 0, 30], [0.8, 0, 0, -2], [0, 0, -1.3, 30], [0, 0, 0, 1.0]])
    dst_shape = (40, 45, 22)
    probs = torch.softmax(sliding_window_inference(x, (16, 16, 16), 3, net, 0.5, "gaussian")[0], 0)
    ref = channel_argmax(resample_to_grid(probs, affine_net, affine_dst, dst_shape, method="grid_sample"))
    stats: dict = {}
    labels = sliding_window_labels(
        x,
        net,
        WindowSpec((16, 16, 16), 3, (0.5,) * 3, "gaussian"),
        affine_net=affine_net,
        affine_dst=affine_dst,
        dst_shape=dst_shape,
        max_slab_bytes=max_slab_bytes,
        cross_rows=cross_rows,
        stats=stats,
    )
    assert labels.shape == dst_shape
    _assert_same_labels(labels.numpy(), ref.numpy())
    assert (labels == ref).float().mean() > 0.9999


@pytest.mark.parametrize("flip", [False, True])
def test_boundary_only_argmax_equals_dense_interpolation(flip):
    """cell_argmax_slab: labels from the source argmax where a cell's 8 corners agree, interpolation
    elsewhere; equal to interpolating every class everywhere (zero padding outside, ties to the first)."""
    torch.manual_seed(1)
    logits = torch.nn.functional.avg_pool3d(torch.randn(1, 4, 30, 26, 22) * 6, 5, 1, 2)[0]
    probs = torch.softmax(logits, 0)
    probs[:, :8, :8, :] = 0.25  # a tied region: class 0 must win there
    affine_src = np.diag([1.5, 1.5, 1.5, 1.0])
    affine_dst = (
        np.array([[0, -0.7, 0, 40], [0.8, 0, 0, -6], [0, 0, -1.1, 36], [0, 0, 0, 1.0]])
        if flip
        else np.diag([0.7, 0.6, 1.0, 1.0]) @ np.array([[1, 0, 0, -3], [0, 1, 0, -2], [0, 0, 1, -1], [0, 0, 0, 1.0]])
    )
    dst = (72, 66, 40)  # reaches past the source field: zero padding there
    # separable: the same float64 source coordinates (grid_sample's float32 ones break the exact ties
    # of the tied block differently on its border)
    ref = channel_argmax(resample_to_grid(probs, affine_src, affine_dst, dst, method="separable"))
    m = target_to_source_voxel(affine_src, affine_dst)
    ours = torch.cat([cell_argmax_slab(probs, m, dst, k0, min(k0 + 9, dst[2])) for k0 in range(0, dst[2], 9)], dim=2)
    assert (ours != ref).sum() <= 2, int((ours != ref).sum())  # float rounding at exact near-ties only
    assert cell_argmax_slab(probs, _oblique_affine(), dst, 0, 4) is None  # oblique: the caller interpolates


def test_105_class_ct_estimate_under_8gb_where_naive_fp32_is_not():
    """TotalSegmentator-like: 105 classes, 128^3 windows, overlap 0.5, network grid 1.5 mm.

    A 512x512x400 CT at 0.8 x 0.8 x 1.0 mm is 273 x 273 x 267 voxels at 1.5 mm. The streamed float16
    buffer (one window row of the plane plus retained slices) + the image, labels and temporaries
    stays under 8 GB; MONAI's full float32 output + count map, the softmax copy and the resampled
    probabilities on the 512x512x400 source grid do not (by far).
    """
    src = (512, 512, 400)
    affine_src = np.diag([0.8, 0.8, 1.0, 1.0])  # RAS, voxel centres; the network grid covers the same field
    net = tuple(int(round(n * s / 1.5)) for n, s in zip(src, (0.8, 0.8, 1.0)))
    affine_net = np.diag([1.5, 1.5, 1.5, 1.0])
    axis, span = target_span(affine_net, affine_src, net, src, 105)
    est = estimate_stitch_bytes(
        105, net, (128, 128, 128), 0.5, dst_shape=src, span=span, axis=axis, acc_bytes=2, sw_batch_size=2
    )
    assert est["streamed"] < 8 * GB, est
    assert est["naive_fp32"] > 8 * GB, est
    # the README's figures: "needs about 3.6 GB, the naive float32 way over 60 GB" (3.60 GB and 62.8 GB)
    assert 3.4 * GB < est["streamed"] < 3.8 * GB, est
    assert est["naive_fp32"] > 60 * GB, est
    # float32 accumulation alone (no streaming) would already need C x V x 4 bytes on the device
    assert 105 * np.prod(net) * 4 > 8 * GB
    # with the network grid = the 512x512x400 source grid, the float16 row buffer alone is
    # 105 x 512 x 400 x 128 x 2 bytes = 5.5 GB and the total passes 8 GB: that case takes the CPU fallback
    worst = estimate_stitch_bytes(105, src, (128, 128, 128), 0.5, acc_bytes=2)
    assert worst["streamed"] > 8 * GB
    fallback = choose_stitch_device(worst["streamed"], "cuda", free_bytes=int(79 * GB), budget_bytes=int(8 * GB))
    assert fallback.type == "cpu"


@torch.no_grad()
def test_real_105_class_run_stays_inside_its_estimate():
    net = _net(out_channels=105)
    x = torch.randn(1, 1, 48, 44, 64)
    affine_net = np.diag([1.5, 1.5, 1.5, 1.0])
    affine_dst = np.diag([0.8, 0.8, 1.0, 1.0])
    dst_shape = (88, 80, 94)
    slab_bytes = 2**20  # 105 classes x 88 x 80 target voxels: one target slice per step
    roi, spec = (24, 24, 24), WindowSpec((24, 24, 24), 2, (0.5,) * 3, "gaussian")
    stats: dict = {}
    labels = sliding_window_labels(
        x,
        net,
        spec,
        affine_net=affine_net,
        affine_dst=affine_dst,
        dst_shape=dst_shape,
        max_slab_bytes=slab_bytes,
        stats=stats,
    )
    axis, span = target_span(affine_net, affine_dst, x.shape[2:], dst_shape, 105, slab_bytes)
    assert axis == stats["stream_axis"] == 2
    est = estimate_stitch_bytes(
        105,
        x.shape[2:],
        roi,
        0.5,
        dst_shape=dst_shape,
        span=span,
        axis=axis,
        acc_bytes=4,
        sw_batch_size=2,
        max_slab_bytes=slab_bytes,
        cross_rows=True,  # on the CPU, batches take the next row's first windows
    )
    assert stats["peak_buffer_bytes"] <= est["buffer"] + est["weights"]
    naive_output = 105 * int(np.prod(x.shape[2:])) * 4
    assert stats["peak_buffer_bytes"] < 0.7 * naive_output
    probs = torch.softmax(sliding_window_inference(x, roi, 2, net, 0.5, "gaussian")[0], 0)
    ref = channel_argmax(resample_to_grid(probs, affine_net, affine_dst, dst_shape))
    assert (labels == ref).float().mean() > 0.9999


def test_cpu_fallback_when_budget_or_free_memory_is_small():
    est = estimate_stitch_bytes(105, (273, 273, 267), (128, 128, 128), 0.5, dst_shape=(512, 512, 400))["streamed"]
    assert choose_stitch_device(est, "cuda:0", free_bytes=int(79 * GB)).type == "cuda"
    assert choose_stitch_device(est, "cuda:0", free_bytes=int(79 * GB), budget_bytes=est // 2).type == "cpu"
    assert choose_stitch_device(est, "cuda:0", free_bytes=est).type == "cpu"  # 90 % headroom
    assert choose_stitch_device(est, "cpu", budget_bytes=1).type == "cpu"


@torch.no_grad()
def test_fallback_device_is_used_by_the_stitcher():
    net = _net()
    x = torch.randn(1, 1, 24, 24, 20)
    seen = []

    def pick(n_classes: int) -> torch.device:
        seen.append(n_classes)
        return choose_stitch_device(
            estimate_stitch_bytes(n_classes, x.shape[2:], (16, 16, 16))["streamed"],
            "cuda",
            free_bytes=int(80 * GB),
            budget_bytes=1,
        )

    stats: dict = {}
    labels = sliding_window_labels(x, net, WindowSpec((16, 16, 16), 2, (0.5,) * 3), stitch_device=pick, stats=stats)
    assert seen == [5] and stats["stitch_device"] == "cpu" and labels.device.type == "cpu"


@pytest.fixture(scope="module")
def threshold_predictor(tmp_path_factory):
    from nets_for_tests import ThresholdNet

    ckpt = tmp_path_factory.mktemp("ckpt") / "threshold.pt"
    torch.save(ThresholdNet().state_dict(), ckpt)
    model = load_model(
        "hippocampus_unet3d",
        ckpt,
        device="cpu",
        overrides={"network_def": {"_target_": "nets_for_tests.ThresholdNet"}, "patch_size": [32, 32, 32]},
    )
    return BundlePredictor.from_model(model)


@pytest.mark.parametrize(
    "orientation,reverse", [("axial", False), ("sagittal", True), ("coronal", False), ("oblique", True)]
)
def test_fast_and_plain_predictor_agree_on_dicom_phantoms(threshold_predictor, tmp_path, orientation, reverse):
    write_phantom_series(
        tmp_path / "s", orientation=orientation, shape=(48, 40, 30), spacing=(0.8, 0.9, 1.5), reverse_file_order=reverse
    )
    volume = read_series(tmp_path / "s")
    image = volume.to_metatensor()
    fast = threshold_predictor.predict_metatensor(image, fast=True)
    plain = threshold_predictor.predict_metatensor(image, fast=False)
    assert fast.labels.shape == plain.labels.shape == volume.shape
    assert fast.labels.dtype == np.uint8
    np.testing.assert_allclose(fast.affine_ras, volume.affine_ras)
    assert (plain.labels == 1).sum() > 100, "the threshold network should label the phantom's objects"
    _assert_same_labels(fast.labels, plain.labels)
    assert {"preprocess_s", "network_s", "stitch_s", "postprocess_s"} <= set(fast.timings)


def test_fast_preprocessing_matches_monai_transforms(threshold_predictor, tmp_path):
    write_phantom_series(tmp_path / "s", orientation="sagittal", shape=(40, 36, 24), spacing=(0.7, 0.9, 1.3))
    image = read_series(tmp_path / "s").to_metatensor()
    ref = threshold_predictor.core({"image": image})["image"]
    ours, padding = threshold_predictor._preprocess_on_device(image)
    assert padding == "border"  # Spacingd's default, which the way back uses too
    assert tuple(ours.shape) == tuple(ref.shape)
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(ref.affine), atol=1e-6)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-4)


def test_identity_grid_fast_equals_plain(threshold_predictor):
    """A RAS 1 mm image is already on the network grid: labels straight from the stitcher."""
    from monai.data import MetaTensor

    rng = np.random.default_rng(0)
    arr = rng.normal(size=(1, 40, 34, 28)).astype(np.float32)
    image = MetaTensor(torch.as_tensor(arr), affine=torch.eye(4, dtype=torch.float64), meta={"space": "RAS"})
    fast = threshold_predictor.predict_metatensor(image, fast=True)
    plain = threshold_predictor.predict_metatensor(image, fast=False)
    np.testing.assert_array_equal(fast.labels, plain.labels)
    assert json.dumps(threshold_predictor.last_stats["net_shape"]) == "[40, 34, 28]"


def _predictor(preprocessing, post=None, threshold: float = 0.0) -> BundlePredictor:
    from monai.inferers import SlidingWindowInferer
    from nets_for_tests import ThresholdNet

    inferer = SlidingWindowInferer((32, 32, 16), 2, 0.25)
    return BundlePredictor(ThresholdNet(threshold), preprocessing, inferer, "cpu", postprocessing=post)


def test_spacing_padding_mode_survives_an_orientation_before_it(tmp_path):
    """Orientationd records no padding mode; the fast path must still resample (and later go back)
    with Spacingd's ``zeros``, as MONAI does, not with the default ``border``."""
    from monai.transforms import Compose, Orientationd, Spacingd

    write_phantom_series(tmp_path / "s", orientation="oblique", shape=(40, 36, 12), spacing=(0.7, 0.9, 2.5))
    image = read_series(tmp_path / "s").to_metatensor()
    transforms = [
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=(0.8, 0.8, 0.8), padding_mode="zeros"),
    ]
    predictor = _predictor(transforms)
    ours, padding = predictor._preprocess_on_device(image)
    assert padding == "zeros" and predictor.preprocess_note == ""
    ref = Compose(transforms)({"image": image})["image"]
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(ref.affine), atol=1e-6)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-4)


def test_a_crop_in_the_preprocessing_takes_the_plain_path(tmp_path):
    """CropForegroundd computes its box from the voxels (after the pending resampling), and MONAI's
    Invertd pads the crop back with background, which the fused way back cannot do: plain path."""
    from monai.transforms import Activationsd, AsDiscreted, Compose, CropForegroundd, Invertd, Spacingd

    write_phantom_series(tmp_path / "s", orientation="sagittal", shape=(40, 36, 24), spacing=(0.7, 0.9, 1.3))
    image = read_series(tmp_path / "s").to_metatensor()
    transforms = [
        Spacingd(keys="image", pixdim=(1.0, 1.0, 1.0)),
        CropForegroundd(keys="image", source_key="image", select_fn=lambda x: x > -900, margin=3),
    ]
    pre = Compose(transforms)
    post = Compose(
        [
            Activationsd(keys="pred", softmax=True),
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )
    predictor = _predictor(transforms, post, threshold=-950.0)
    ours, _ = predictor._preprocess_on_device(image)
    ref = pre({"image": image})["image"]
    assert tuple(ours.shape) == tuple(ref.shape)  # the box from the resampled voxels, as MONAI finds it
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(ref.affine), atol=1e-6)
    assert "crops" in predictor.preprocess_note
    pred = predictor.predict_metatensor(image)
    assert pred.path == "plain" and "CropForeground" in pred.note
    # MONAI's own chain: preprocessing, inferer, postprocessing (Invertd pads the crop with background)
    with torch.no_grad():
        logits = predictor.inferer(ref[None], predictor.network)[0]
    theirs = post({"image": ref, "pred": logits})["pred"][0].numpy()
    assert 100 < (theirs == 1).sum() < theirs.size / 2
    np.testing.assert_array_equal(pred.labels, theirs)


@pytest.mark.parametrize(
    "spacing,why", [({"mode": "nearest"}, "mode ['nearest']"), ({"padding_mode": "reflection"}, "['reflection']")]
)
def test_resampling_that_invertd_undoes_otherwise_takes_the_plain_path(tmp_path, spacing, why):
    """Invertd inverts a Spacingd with its own mode and padding; the fused way back is trilinear with
    zeros or border padding, so other settings go MONAI's way."""
    from monai.transforms import Spacingd

    write_phantom_series(tmp_path / "s", orientation="coronal", shape=(30, 28, 12), spacing=(0.7, 0.9, 2.0))
    image = read_series(tmp_path / "s").to_metatensor()
    pred = _predictor([Spacingd(keys="image", pixdim=(1.0, 1.0, 1.0), **spacing)]).predict_metatensor(image)
    assert pred.path == "plain" and why in pred.note
    assert pred.labels.shape == image.shape[1:]


@pytest.mark.parametrize("post_steps", ["softmax_invert", "invert_logits", "invert_nearest"])
@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_predictor_equals_monais_own_chain(tmp_path, orientation, post_steps):
    """The bundle's preprocessing, inferer and postprocessing run as MONAI transforms are the reference:
    the fused path (softmax -> Invertd, or Invertd of the logits) and the plain path (Invertd with its
    default nearest_interp) give the same labels on the source grid."""
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        Invertd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    write_phantom_series(tmp_path / "s", orientation=orientation, shape=(40, 36, 12), spacing=(0.7, 0.9, 2.5))
    image = read_series(tmp_path / "s").to_metatensor()
    transforms = [
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=(1.2, 1.2, 1.2)),
        ScaleIntensityRanged(keys="image", a_min=-1000, a_max=300, b_min=0, b_max=1),
    ]
    pre = Compose(transforms)
    invert = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=post_steps == "invert_nearest")
    softmax = [Activationsd(keys="pred", softmax=True)] if post_steps == "softmax_invert" else []
    post = Compose([*softmax, invert, AsDiscreted(keys="pred", argmax=True)])
    predictor = _predictor(transforms, post, threshold=0.05)
    pred = predictor.predict_metatensor(image)
    assert pred.path == ("plain" if post_steps == "invert_nearest" else "fast"), pred.note
    ref = pre({"image": image})["image"]
    with torch.no_grad():
        logits = predictor.inferer(ref[None], predictor.network)[0]
    theirs = post({"image": ref, "pred": logits})["pred"][0].numpy()
    assert (theirs == 1).sum() > 500
    np.testing.assert_array_equal(pred.labels, theirs)


@torch.no_grad()
def test_cpu_batches_take_the_next_rows_windows():
    """On the CPU every network call but the last gets sw_batch_size windows (3 rows of 20 windows here)."""
    net, sizes = _net(), []

    def counting(win: torch.Tensor) -> torch.Tensor:
        sizes.append(win.shape[0])
        return net(win)

    x = torch.randn(1, 1, 33, 40, 26)
    spec = WindowSpec((16, 24, 12), 3, (0.6,) * 3, "gaussian")
    ref = sliding_window_labels(x, net, spec, cross_rows=False)
    labels = sliding_window_labels(x, counting, spec)  # default on a CPU tensor: cross_rows
    assert sizes[:-1] == [3] * (len(sizes) - 1) and sum(sizes) == 60
    torch.testing.assert_close(labels, ref)


@pytest.mark.parametrize("fast", [True, False])
def test_on_network_called_once_after_preprocessing_before_the_network(threshold_predictor, fast):
    """The pipeline starts highdicom's import there (it then overlaps the network)."""
    from monai.data import MetaTensor

    image = MetaTensor(torch.zeros(1, 20, 18, 16), affine=torch.diag(torch.tensor([0.8, 0.9, 1.5, 1.0])))
    forwards: list[int] = []
    hook = threshold_predictor.network.register_forward_pre_hook(lambda *_: forwards.append(1))
    seen: list[int] = []
    try:
        threshold_predictor.predict_metatensor(image, fast=fast, on_network=lambda: seen.append(len(forwards)))
    finally:
        hook.remove()
    assert seen == [0] and len(forwards) > 0  # once, before the first window
