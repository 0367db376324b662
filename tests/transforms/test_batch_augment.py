"""Batched device-side augmentation (app.transforms.batch_augment) and its engine hook, on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss
from monai.networks.layers import GaussianFilter
from monai.networks.nets import UNet
from monai.transforms import Affine
from monai.utils.enums import CommonKeys
from scipy import ndimage

from app.errors import ConfigError, InputError
from app.training.prepare_batch import AugmentPrepareBatch
from app.transforms.batch_augment import BatchAugment, monai_elastic_rms

SHAPE = (40, 44, 36)

FULL = dict(
    prob_elastic=1.0,
    sigma_range=(5.0, 8.0),
    magnitude_range=(1.5, 2.5),
    prob_affine=1.0,
    rotate_range=(0.3, 0.2, 0.4),
    scale_range=0.1,
    translate_range=3.0,
    prob_flip=0.5,
    flip_axes=(0, 1, 2),
)


def phantom(batch: int = 4, shape=SHAPE, zoom: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth, asymmetric image (three Gaussian blobs of different sizes) and its threshold as label.

    ``zoom`` scales the blobs and their positions (``shape`` should scale with it).
    """
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    img = torch.zeros(shape)
    for centre, s, amp in (((14, 16, 14), 7.0, 1.0), ((28, 30, 22), 5.0, 0.9), ((26, 12, 26), 4.0, 0.8)):
        r2 = sum((g - c * zoom) ** 2 for g, c in zip(grids, centre))
        img = img + amp * torch.exp(-r2 / (2 * (s * zoom) ** 2))
    image = img.expand(batch, 1, *shape).clone()
    return image, (image > 0.5).to(torch.int64)


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


# ------------------------------------------------------------------ geometry and alignment


@pytest.mark.parametrize("zoom", [1.0, 2.0])
def test_label_follows_image_through_elastic_affine_flip(zoom):
    image, label = phantom(shape=tuple(int(s * zoom) for s in SHAPE), zoom=zoom)
    aug = BatchAugment(**dict(FULL, magnitude_range=(1.5 * zoom, 2.5 * zoom), translate_range=3 * zoom), seed=1)
    out, lab, _ = aug(image, label)
    assert out.shape == image.shape and lab.shape == label.shape and lab.dtype == torch.int64
    for b in range(image.shape[0]):
        # nearest-resampled label vs threshold of the trilinear-resampled image: they may differ only
        # within 1 voxel of the label's boundary (nearest rounds, the threshold is sub-voxel)...
        thr, lb = (out[b, 0] > 0.5).numpy(), lab[b, 0].numpy().astype(bool)
        cube = ndimage.generate_binary_structure(3, 3)  # "within 1 voxel", diagonals included
        edge = ndimage.binary_dilation(lb, cube) & ~ndimage.binary_erosion(lb, cube)
        assert not ((thr != lb) & ~edge).any(), b
        # ...which for these object sizes (radius ~8 / ~16 voxels) leaves Dice ~0.95 / ~0.97
        # (a pure half-voxel shift alone gives 0.947 at zoom 1)
        assert dice(lab[b], out[b] > 0.5) >= (0.93 if zoom == 1.0 else 0.96), b
        # and the sample really moved
        assert dice(lab[b], label[b]) < 0.95, b


def test_flip_only_is_exact():
    image, label = phantom()
    aug = BatchAugment(prob_flip=1.0, flip_axes=(0, 2), seed=3)
    out, lab, _ = aug(image, label)
    assert torch.equal(out, image.flip([2, 4])) and torch.equal(lab, label.flip([2, 4]))
    assert torch.equal(lab, (out > 0.5).long())


@pytest.mark.parametrize(
    "kwargs, monai_kwargs",
    [
        (dict(rotate_range=((0.3, 0.3), (0.2, 0.2), (-0.4, -0.4))), dict(rotate_params=(0.3, 0.2, -0.4))),
        (dict(scale_range=((0.2, 0.2), (0.1, 0.1), (-0.1, -0.1))), dict(scale_params=(1.2, 1.1, 0.9))),
        (
            dict(
                rotate_range=((0.3, 0.3), 0, (-0.4, -0.4)),
                scale_range=((0.2, 0.2), 0, 0),
                translate_range=((2, 2), (-3, -3), 0),
            ),
            dict(rotate_params=(0.3, 0.0, -0.4), scale_params=(1.2, 1.0, 1.0), translate_params=(2, -3, 0)),
        ),
    ],
)
def test_affine_matches_monai_affine(kwargs, monai_kwargs):
    """Same numbers, same resampling as MONAI's Affine (rotation axes/signs, scale meaning, order)."""
    img = torch.rand(1, 2, 20, 24, 18, generator=torch.Generator().manual_seed(0))
    out, _, _ = BatchAugment(prob_affine=1.0, **kwargs, seed=0)(img)
    ref = Affine(**monai_kwargs, padding_mode="zeros", mode="bilinear", image_only=True)(img[0])
    assert torch.allclose(out[0], torch.as_tensor(ref), atol=1e-4)


def test_integer_translation_and_label_pad_value():
    image, label = phantom(batch=2)
    label[:, :, 10:14, 10:14, 10:14] = 255  # ignore region
    aug = BatchAugment(prob_affine=1.0, translate_range=((5, 5), 0, 0), label_pad_value=255, seed=0)
    out, lab, _ = aug(image, label)
    # output voxel i samples input i + 5 along axis 0; the last 5 slices come from outside
    assert torch.equal(lab[:, :, :-5], label[:, :, 5:])
    assert bool((lab[:, :, -5:] == 255).all())
    assert torch.allclose(out[:, :, :-5], image[:, :, 5:], atol=1e-5)
    assert float(out[:, :, -5:].abs().max()) < 1e-5  # zeros padding (float32 rounding at the edge)


def test_label_values_never_created_and_ignore_kept():
    g = torch.Generator().manual_seed(0)
    # blocky multi-class label with an ignore value: interpolation would create 1.5, 128, ...
    coarse = torch.tensor([0, 1, 2, 3, 255], dtype=torch.uint8)[torch.randint(0, 5, (3, 1, 8, 9, 7), generator=g)]
    label = coarse.repeat_interleave(5, 2).repeat_interleave(5, 3).repeat_interleave(5, 4)
    image = label.float() / 255
    aug = BatchAugment(**FULL, seed=2)
    _, lab, _ = aug(image, label)
    assert lab.dtype == torch.uint8
    assert set(lab.unique().tolist()) <= {0, 1, 2, 3, 255}
    assert not torch.equal(lab, label)
    # 255 voxels of the output were 255 voxels of the input: the same fraction survives (not smeared)
    frac_in, frac_out = float((label == 255).float().mean()), float((lab == 255).float().mean())
    assert abs(frac_out - frac_in) < 0.05


def test_extra_maps_share_the_label_grid_and_pad():
    image, label = phantom(batch=3)
    annotated = torch.ones_like(label, dtype=torch.uint8)  # an "annotated voxel" mask
    weights = (label * 2 + 1).float()  # float extra: nearest too
    aug = BatchAugment(**FULL, seed=5)
    _, lab, extra = aug(image, label, {"annotated": annotated, "weights": weights})
    assert extra["annotated"].dtype == torch.uint8 and extra["weights"].dtype == torch.float32
    # out-of-field voxels become 0 (not annotated); inside, the weights follow the label exactly
    inside = extra["annotated"] == 1
    assert 0 < float((~inside).float().mean()) < 0.5
    assert torch.equal(extra["weights"][inside], (lab * 2 + 1).float()[inside])
    assert set(extra["weights"].unique().tolist()) <= {0.0, 1.0, 3.0}


def test_elastic_rms_magnitude_in_voxels():
    """A linear image is resampled exactly by trilinear interpolation: output - input = displacement."""
    shape = (48, 48, 48)
    coords = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    image = coords[None].repeat(4, 1, 1, 1, 1)
    aug = BatchAugment(
        prob_elastic=1.0, sigma_range=(4.0, 6.0), magnitude_range=(1.0, 3.0), padding_mode="border", seed=0
    )
    out, _, _ = aug(image)
    disp = (out - image)[:, :, 8:-8, 8:-8, 8:-8]  # away from the border clamp
    rms = disp.square().mean(dim=(1, 2, 3, 4)).sqrt()
    expected = aug.last_params["magnitude"].float()
    assert torch.allclose(rms, expected, rtol=0.15), (rms, expected)
    # smooth: neighbouring displacements differ far less than the displacement itself
    step = (disp[:, :, 1:] - disp[:, :, :-1]).square().mean(dim=(1, 2, 3, 4)).sqrt()
    assert bool((step < 0.25 * rms).all())


@pytest.mark.parametrize("sigma", [3.0, 6.0])
def test_monai_elastic_rms_matches_monai_field(sigma):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 64, 64, 64, generator=g) * 2 - 1  # MONAI: uniform(-1, 1)
    field = GaussianFilter(3, sigma, 3.0)(noise) * 100.0
    r = int(3 * sigma) + 1
    measured = float(field[..., r:-r, r:-r, r:-r].std())
    assert math.isclose(monai_elastic_rms(sigma, 100.0), measured, rel_tol=0.1)


# ------------------------------------------------------------------ parameters and randomness


def test_parameters_stay_in_range_and_probabilities_hold():
    aug = BatchAugment(
        **FULL,
        prob_gamma=0.3,
        gamma_range=(0.7, 1.5),
        prob_noise=0.2,
        noise_std=0.05,
        prob_contrast=0.4,
        contrast_range=0.25,
        prob_brightness=0.6,
        brightness_range=(-0.1, 0.3),
        seed=0,
    )
    n = 20000
    p = aug.sample_params(n)

    def within(t, lo, hi):
        return (
            float(t.min()) >= lo
            and float(t.max()) <= hi
            and float(t.min()) < lo + 0.02 * (hi - lo) + 1e-9
            and float(t.max()) > hi - 0.02 * (hi - lo)
        )

    assert within(p["sigma"], 5.0, 8.0) and within(p["magnitude"], 1.5, 2.5)
    for ax, r in enumerate((0.3, 0.2, 0.4)):
        assert within(p["rotate"][:, ax], -r, r)
        assert within(p["scale"][:, ax], 0.9, 1.1)
        assert within(p["translate"][:, ax], -3.0, 3.0)
    assert within(p["gamma"], 0.7, 1.5) and within(p["noise_std"], 0.0, 0.05)
    assert within(p["contrast"], -0.25, 0.25) and within(p["brightness"], -0.1, 0.3)
    for key, prob in [
        ("elastic", 1.0),
        ("affine", 1.0),
        ("gamma_on", 0.3),
        ("noise_on", 0.2),
        ("contrast_on", 0.4),
        ("brightness_on", 0.6),
    ]:
        assert abs(float(p[key].double().mean()) - prob) < 0.02, key
    assert abs(float(p["flip"].double().mean()) - 0.5) < 0.02


def test_flip_axes_restrict_flips():
    p = BatchAugment(prob_flip=1.0, flip_axes=(1,), seed=0).sample_params(100)
    assert bool(p["flip"][:, 1].all()) and not bool(p["flip"][:, [0, 2]].any())


def test_fixed_seed_reproduces_batch():
    image, label = phantom(batch=3)
    kw = dict(FULL, prob_gamma=0.5, prob_noise=0.5, prob_contrast=0.5, prob_brightness=0.5)
    a = BatchAugment(**kw, seed=42)
    first = a(image, label)
    second = a(image, label)
    assert not torch.equal(first[0], second[0])  # the stream moves on
    b = BatchAugment(**kw, seed=42)
    again = b(image, label)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    a.set_random_state(42)
    assert torch.equal(a(image, label)[0], first[0])


def test_zero_probabilities_are_identity():
    image, label = phantom(batch=2)
    mask = torch.ones_like(label, dtype=torch.uint8)
    for aug in (BatchAugment(), BatchAugment(**dict(FULL, prob_elastic=0.0, prob_affine=0.0, prob_flip=0.0))):
        out, lab, extra = aug(image, label, {"m": mask})
        assert torch.equal(out, image) and torch.equal(lab, label) and torch.equal(extra["m"], mask)


def test_samples_get_different_parameters():
    image, label = phantom(batch=4)
    aug = BatchAugment(**dict(FULL, prob_flip=0.0), prob_contrast=1.0, seed=7)
    out, lab, _ = aug(image, label)
    p = aug.last_params
    assert len(set(p["rotate"][:, 0].tolist())) == 4 and len(set(p["contrast"].tolist())) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(out[i], out[j]) and not torch.equal(lab[i], lab[j])


def test_mixed_batch_resamples_only_chosen_samples():
    image, label = phantom(batch=8)
    aug = BatchAugment(prob_elastic=0.4, prob_affine=0.4, rotate_range=0.3, prob_flip=0.3, flip_axes=(0,), seed=11)
    out, lab, _ = aug(image, label)
    p = aug.last_params
    moving = p["elastic"] | p["affine"]
    assert 0 < int(moving.sum()) < 8
    for b in range(8):
        if moving[b]:
            assert not torch.equal(lab[b], label[b])
        elif p["flip"][b, 0]:
            assert torch.equal(out[b], image[b].flip(1)) and torch.equal(lab[b], label[b].flip(1))
        else:
            assert torch.equal(out[b], image[b]) and torch.equal(lab[b], label[b])


# ------------------------------------------------------------------ intensity


def test_intensity_formulas():
    image = torch.rand(4, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    aug = BatchAugment(prob_contrast=1.0, contrast_range=0.2, prob_brightness=1.0, brightness_range=0.3, seed=0)
    out, _, _ = aug(image)
    p = aug.last_params
    expected = image * (1 + p["contrast"].float()).view(4, 1, 1, 1, 1) + p["brightness"].float().view(4, 1, 1, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6)

    aug = BatchAugment(prob_gamma=1.0, gamma_range=(2.0, 3.0), seed=0)
    out, _, _ = aug(image)
    g = aug.last_params["gamma"].float()
    for b in range(4):
        lo, hi = image[b].min(), image[b].max()
        ref = ((image[b] - lo) / (hi - lo + 1e-7)) ** g[b] * (hi - lo) + lo
        assert torch.allclose(out[b], ref, atol=1e-5)
    assert torch.allclose(out.amin(dim=(1, 2, 3, 4)), image.amin(dim=(1, 2, 3, 4)))

    aug = BatchAugment(prob_noise=1.0, noise_std=0.2, seed=0)
    big = torch.zeros(4, 1, 24, 24, 24)
    out, _, _ = aug(big)
    assert torch.allclose(out.std(dim=(1, 2, 3, 4)), aug.last_params["noise_std"].float(), rtol=0.1)


def test_intensity_does_not_touch_label():
    image, label = phantom(batch=2)
    aug = BatchAugment(prob_gamma=1.0, prob_noise=1.0, prob_contrast=1.0, prob_brightness=1.0, seed=0)
    out, lab, _ = aug(image, label)
    assert not torch.equal(out, image) and torch.equal(lab, label)


# ------------------------------------------------------------------ dtypes and layouts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_under_autocast(dtype):
    image, label = phantom(batch=2)
    ref, ref_lab, _ = BatchAugment(**FULL, prob_gamma=1.0, seed=4)(image, label)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lab, _ = BatchAugment(**FULL, prob_gamma=1.0, seed=4)(image.to(dtype), label)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert torch.allclose(out.float(), ref, atol=0.02)
    assert dice(lab, ref_lab) > 0.99


def test_channels_last_and_metatensor_inputs():
    image, label = phantom(batch=2)
    ref, ref_lab, _ = BatchAugment(**FULL, seed=9)(image, label)
    cl = image.contiguous(memory_format=torch.channels_last_3d)
    out, lab, _ = BatchAugment(**FULL, seed=9)(MetaTensor(cl), MetaTensor(label))
    assert type(out) is torch.Tensor and out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(out, ref, atol=1e-6) and torch.equal(lab, ref_lab)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prob_elastic=1.5),
        dict(rotate_range=(0.1, 0.2)),
        dict(sigma_range=(0.0, 2.0)),
        dict(flip_axes=(3,)),
        dict(scale_range=-1.0),
        dict(padding_mode="wrap"),
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ConfigError):
        BatchAugment(**kwargs)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="label"):
        BatchAugment()(torch.zeros(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 7))


# ------------------------------------------------------------------ engine hook


def test_prepare_batch_moves_and_augments_and_writes_back_extras():
    image, label = phantom(batch=2)
    batch = {"image": image, "label": label, "mask": torch.ones_like(label, dtype=torch.uint8)}
    prep = AugmentPrepareBatch(BatchAugment(**FULL, seed=0), extra_keys=("mask",))
    img, lab = prep(batch, torch.device("cpu"), non_blocking=True)
    assert img.shape == image.shape and not torch.equal(lab, label)
    assert batch["mask"].dtype == torch.uint8 and bool((batch["mask"] == 0).any())
    plain_img, plain_lab = AugmentPrepareBatch(None)({"image": image}, "cpu")
    assert torch.equal(plain_img, image) and plain_lab is None
    with pytest.raises(InputError, match="mask"):
        prep({"image": image}, "cpu")


def test_prepare_batch_inside_supervised_trainer():
    torch.manual_seed(0)
    image, label = phantom(batch=2, shape=(32, 32, 32))
    data = [{"image": image, "label": label}, {"image": image, "label": label}]
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)
    seen = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        prepare_batch=AugmentPrepareBatch(BatchAugment(**FULL, prob_noise=1.0, seed=0)),
        amp=False,
        decollate=False,
    )

    @trainer.on(IterationEvents.FORWARD_COMPLETED)
    def grab(engine):
        seen.append((engine.state.output[CommonKeys.IMAGE].clone(), engine.state.output[CommonKeys.LABEL].clone()))

    before = [p.detach().clone() for p in net.parameters()]
    trainer.run()
    assert trainer.state.iteration == 2 and len(seen) == 2
    assert np.isfinite(trainer.state.output[CommonKeys.LOSS].item())
    for img, lab in seen:
        assert img.shape == image.shape and not torch.equal(img, image) and not torch.equal(lab, label)
    assert not torch.equal(seen[0][0], seen[1][0])  # fresh draw each iteration
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_builds_from_a_bundle_config():
    from monai.bundle import ConfigParser

    cfg = {
        "prepare_batch": {
            "_target_": "app.training.prepare_batch.AugmentPrepareBatch",
            "augment": {
                "_target_": "app.transforms.batch_augment.BatchAugment",
                "prob_elastic": 0.2,
                "rotate_range": [0.2, 0.2, 0.2],
                "seed": 0,
            },
        }
    }
    prep = ConfigParser(cfg).get_parsed_content("prepare_batch")
    assert isinstance(prep, AugmentPrepareBatch) and prep.augment.prob_elastic == 0.2
    assert prep.augment.rotate_range == ((-0.2, 0.2),) * 3
