"""Random spatial + intensity augmentation of a whole batch, on the batch's device.

MONAI's ``Rand3DElasticd``/``RandAffined`` work one sample at a time and smooth a full-resolution
noise field with a Gaussian; in 3D that, not the network, limits training speed. ``BatchAugment``
instead builds one sampling grid per sample (flip ∘ affine ∘ elastic), with the elastic field drawn
as noise on a coarse grid, smoothed there and upsampled trilinearly, then resamples the whole batch
with a single ``grid_sample`` for the image (trilinear) and a single one for the label and any extra
integer maps (nearest). Intensity changes follow, image only.

Parameters mean what they mean in MONAI (``Rand3DElasticd``, ``RandAffined``, ``RandFlipd``,
``RandAdjustContrastd``, ``RandGaussianNoised``, ``RandScaleIntensityd``, ``RandShiftIntensityd``),
except ``magnitude_range``, which here is the RMS displacement per axis in voxels (MONAI's number
depends on ``sigma``; :func:`monai_elastic_rms` converts). All coordinates are voxels of the batch's
own grid (rotations in voxel space, as MONAI does without ``spacing``).

Random parameters (which samples get which change, angles, factors) are drawn on the host from a
seeded CPU generator, so deciding what to do never waits for the device; the bulk noise (elastic
fields, Gaussian noise) is drawn on the device from a device generator seeded from the same seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from app.errors import ConfigError
from app.transforms.batch_intensity import apply_gamma, apply_gaussian_noise, apply_scale_shift

__all__ = ["BatchAugment", "monai_elastic_rms"]

logger = logging.getLogger(__name__)

_TRUNCATE = 3.0  # Gaussian kernels cut at 3 sigma, like MONAI's GaussianFilter(truncated=3.0)


def monai_elastic_rms(sigma: float, magnitude: float) -> float:
    """RMS displacement per axis (voxels) of MONAI's ``Rand3DElastic(sigma, magnitude)`` field.

    MONAI smooths uniform(-1, 1) noise with ``GaussianFilter(3, sigma, truncated=3.0)`` and multiplies
    by ``magnitude``; the result's standard deviation is ``magnitude * sqrt(1/3) * sqrt(sum k^2)``
    where ``k`` is the 3D kernel. Use it to translate a MONAI config: ``magnitude_range`` here =
    ``monai_elastic_rms(sigma, m)`` for MONAI's ``m``.
    """
    from monai.networks.layers import GaussianFilter

    radius = int(_TRUNCATE * sigma) + 1
    delta = torch.zeros(1, 1, 2 * radius + 1, dtype=torch.float64)
    delta[0, 0, radius] = 1.0
    k1 = GaussianFilter(1, sigma, _TRUNCATE)(delta.float()).double()
    sum_sq_3d = float(k1.square().sum()) ** 3  # separable kernel
    return float(magnitude) * math.sqrt(sum_sq_3d / 3.0)


def _pair(value: Any, name: str, symmetric_ok: bool = True) -> tuple[float, float]:
    """``x`` -> ``(-x, x)``; ``(lo, hi)`` -> ``(lo, hi)``."""
    if isinstance(value, (int, float)) and symmetric_ok:
        lo, hi = -abs(float(value)), abs(float(value))
    elif isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        lo, hi = float(value[0]), float(value[1])
    else:
        form = "a number or a (min, max) pair" if symmetric_ok else "a (min, max) pair"
        raise ConfigError(f"BatchAugment: {name} must be {form}, got {value!r}")
    if lo > hi:
        raise ConfigError(f"BatchAugment: {name} has min > max: {value!r}")
    return lo, hi


def _per_axis(value: Any, name: str) -> tuple[tuple[float, float], ...]:
    """MONAI-style per-axis range: a number (all axes), or 3 entries each a number or a (min, max)."""
    if isinstance(value, (int, float)):
        return (_pair(value, name),) * 3
    if isinstance(value, Sequence) and len(value) == 3:
        return tuple(_pair(v, f"{name}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"BatchAugment: {name} must be a number or 3 per-axis entries, got {value!r}")


def _prob(value: Any, name: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"BatchAugment: {name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Drop MONAI metadata: after resampling, a MetaTensor's affine would be wrong."""
    as_tensor = getattr(t, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else t


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """``(B, 3)`` angles (radians) about axes 0, 1, 2 -> ``(B, 3, 3)`` float64 ``R0 @ R1 @ R2``."""
    b = angles.shape[0]
    c, s = torch.cos(angles), torch.sin(angles)
    eye = torch.eye(3, dtype=torch.float64).expand(b, 3, 3)
    mats = []
    for ax in range(3):
        m = eye.clone()
        p, q = (ax + 1) % 3, (ax + 2) % 3  # right-handed, as MONAI's create_rotate
        m[:, p, p], m[:, p, q], m[:, q, p], m[:, q, q] = c[:, ax], -s[:, ax], s[:, ax], c[:, ax]
        mats.append(m)
    return mats[0] @ mats[1] @ mats[2]


class BatchAugment:
    """Random flip/affine/elastic resampling plus intensity changes for a batch on its device.

    Args:
        prob_elastic: probability per sample of an elastic deformation.
        sigma_range: ``(min, max)`` smoothness of the displacement field: std of the Gaussian that
            smooths the noise, in voxels (as MONAI's ``Rand3DElastic``).
        magnitude_range: ``(min, max)`` RMS displacement per axis, in voxels.
        prob_affine: probability per sample of a random affine.
        rotate_range: radians; a number ``r`` (``U(-r, r)`` about every axis) or 3 per-axis entries,
            each a number or ``(min, max)`` (as MONAI's ``RandAffine``).
        scale_range: like MONAI: ``0.1`` gives a factor in ``[0.9, 1.1]`` per axis (factor > 1 samples
            a larger region, so the content shrinks); same forms as ``rotate_range``.
        translate_range: voxels; same forms as ``rotate_range``.
        prob_flip: probability per sample and per axis in ``flip_axes`` of a flip.
        flip_axes: spatial axes (0, 1, 2 = i, j, k) that may be flipped.
        prob_gamma, gamma_range: ``RandAdjustContrast``: exponent drawn from ``gamma_range``.
        prob_noise, noise_std: ``RandGaussianNoise``: zero-mean noise, its std drawn from
            ``U(0, noise_std)`` (intensity units).
        prob_contrast, contrast_range: ``RandScaleIntensity``: ``x * (1 + f)``, ``f`` from
            ``contrast_range`` (number ``s`` means ``(-s, s)``).
        prob_brightness, brightness_range: ``RandShiftIntensity``: ``x + o``, ``o`` from
            ``brightness_range`` (intensity units).
        padding_mode: image value outside the field of view: ``"zeros"``, ``"border"`` or ``"reflection"``.
        label_pad_value: label value for voxels sampled from outside the field of view (0, or the
            loss's ignore value so that they do not count).
        extra_pad_value: the same for the ``extra`` tensors.
        seed: seed of both generators (None: drawn from torch's global RNG).

    Call: ``image, label, extra = aug(image, label, extra)`` with ``image`` ``(B, C, X, Y, Z)`` float
    (any float dtype; resampled in float32, returned in its own dtype), ``label`` ``(B, L, X, Y, Z)``
    of any dtype or None, ``extra`` a dict of ``(B, *, X, Y, Z)`` maps (ignore masks, ...) resampled
    like the label, or None. Label and extras keep their dtype and never get a value they did not
    have (except ``label_pad_value``/``extra_pad_value`` outside the field). ``last_params`` holds
    the parameters of the last call (CPU tensors, see :meth:`sample_params`).
    """

    def __init__(
        self,
        prob_elastic: float = 0.0,
        sigma_range: Sequence[float] = (5.0, 8.0),
        magnitude_range: Sequence[float] = (1.0, 3.0),
        prob_affine: float = 0.0,
        rotate_range: Any = 0.0,
        scale_range: Any = 0.0,
        translate_range: Any = 0.0,
        prob_flip: float = 0.0,
        flip_axes: Sequence[int] = (),
        prob_gamma: float = 0.0,
        gamma_range: Sequence[float] = (0.7, 1.5),
        prob_noise: float = 0.0,
        noise_std: float = 0.1,
        prob_contrast: float = 0.0,
        contrast_range: Any = 0.1,
        prob_brightness: float = 0.0,
        brightness_range: Any = 0.1,
        padding_mode: str = "zeros",
        label_pad_value: float = 0,
        extra_pad_value: float = 0,
        seed: int | None = None,
    ):
        self.prob_elastic = _prob(prob_elastic, "prob_elastic")
        self.sigma_range = _pair(sigma_range, "sigma_range", symmetric_ok=False)
        self.magnitude_range = _pair(magnitude_range, "magnitude_range", symmetric_ok=False)
        if self.sigma_range[0] <= 0 or self.magnitude_range[0] < 0:
            raise ConfigError(
                f"BatchAugment: sigma_range must be > 0 and magnitude_range >= 0, "
                f"got {sigma_range!r}, {magnitude_range!r}"
            )
        self.prob_affine = _prob(prob_affine, "prob_affine")
        self.rotate_range = _per_axis(rotate_range, "rotate_range")
        self.scale_range = _per_axis(scale_range, "scale_range")
        if any(lo <= -1.0 for lo, _ in self.scale_range):
            raise ConfigError(f"BatchAugment: scale_range must keep 1 + s > 0, got {scale_range!r}")
        self.translate_range = _per_axis(translate_range, "translate_range")
        self.prob_flip = _prob(prob_flip, "prob_flip")
        self.flip_axes = tuple(int(a) for a in flip_axes)
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ConfigError(f"BatchAugment: flip_axes must be spatial axes among 0, 1, 2, got {flip_axes!r}")
        self.prob_gamma = _prob(prob_gamma, "prob_gamma")
        self.gamma_range = _pair(gamma_range, "gamma_range", symmetric_ok=False)
        if self.gamma_range[0] <= 0:
            raise ConfigError(f"BatchAugment: gamma_range must be > 0, got {gamma_range!r}")
        self.prob_noise = _prob(prob_noise, "prob_noise")
        if not isinstance(noise_std, (int, float)) or noise_std < 0:
            raise ConfigError(f"BatchAugment: noise_std must be a number >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)
        self.prob_contrast = _prob(prob_contrast, "prob_contrast")
        self.contrast_range = _pair(contrast_range, "contrast_range")
        self.prob_brightness = _prob(prob_brightness, "prob_brightness")
        self.brightness_range = _pair(brightness_range, "brightness_range")
        if padding_mode not in ("zeros", "border", "reflection"):
            raise ConfigError(f"BatchAugment: padding_mode must be zeros, border or reflection, got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.label_pad_value = label_pad_value
        self.extra_pad_value = extra_pad_value
        # Coarse control-point spacing (voxels) of the elastic noise: the smallest sigma still spans
        # 2 coarse cells, so the field is well resolved before the trilinear upsampling.
        self._coarse_spacing = max(1.0, self.sigma_range[0] / 2.0)
        self._base_grids: dict[tuple, torch.Tensor] = {}
        self.last_params: dict[str, torch.Tensor] | None = None
        self.set_random_state(seed)

    # ------------------------------------------------------------------ randomness
    def set_random_state(self, seed: int | None = None) -> BatchAugment:
        """Reseed (like MONAI's ``Randomizable.set_random_state``); returns self."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._seed = int(seed)
        self._cpu_gen = torch.Generator(device="cpu").manual_seed(self._seed)
        self._dev_gens: dict[str, torch.Generator] = {}
        return self

    def _device_generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._dev_gens:
            # distinct stream from the parameter generator even on CPU
            self._dev_gens[key] = torch.Generator(device=device).manual_seed(self._seed ^ 0x5EED5EED)
        return self._dev_gens[key]

    def _uniform(self, shape: tuple, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=self._cpu_gen, dtype=torch.float64)

    def _coin(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(n, generator=self._cpu_gen, dtype=torch.float64) < p

    def _ranges(self, n: int, ranges: tuple[tuple[float, float], ...]) -> torch.Tensor:
        return torch.stack([self._uniform((n,), lo, hi) for lo, hi in ranges], dim=1)

    def sample_params(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Draw per-sample parameters (CPU tensors, first dimension ``batch_size``).

        Keys: ``elastic`` (bool), ``sigma``, ``magnitude`` (voxels); ``affine`` (bool), ``rotate``
        ``(B, 3)`` radians, ``scale`` ``(B, 3)`` factors, ``translate`` ``(B, 3)`` voxels; ``flip``
        ``(B, 3)`` bool; ``gamma_on``, ``gamma``; ``noise_on``, ``noise_std``; ``contrast_on``,
        ``contrast`` (the ``f`` in ``x * (1 + f)``); ``brightness_on``, ``brightness``. Values of
        switched-off changes are drawn anyway (so one sample's draw does not shift the others').
        """
        n = int(batch_size)
        p: dict[str, torch.Tensor] = {}
        p["elastic"] = self._coin(n, self.prob_elastic)
        p["sigma"] = self._uniform((n,), *self.sigma_range)
        p["magnitude"] = self._uniform((n,), *self.magnitude_range)
        p["affine"] = self._coin(n, self.prob_affine)
        p["rotate"] = self._ranges(n, self.rotate_range)
        p["scale"] = 1.0 + self._ranges(n, self.scale_range)
        p["translate"] = self._ranges(n, self.translate_range)
        flip = torch.rand((n, 3), generator=self._cpu_gen, dtype=torch.float64) < self.prob_flip
        allowed = torch.zeros(3, dtype=torch.bool)
        allowed[list(self.flip_axes)] = True
        p["flip"] = flip & allowed
        p["gamma_on"] = self._coin(n, self.prob_gamma)
        p["gamma"] = self._uniform((n,), *self.gamma_range)
        p["noise_on"] = self._coin(n, self.prob_noise)
        p["noise_std"] = self._uniform((n,), 0.0, self.noise_std)
        p["contrast_on"] = self._coin(n, self.prob_contrast)
        p["contrast"] = self._uniform((n,), *self.contrast_range)
        p["brightness_on"] = self._coin(n, self.prob_brightness)
        p["brightness"] = self._uniform((n,), *self.brightness_range)
        return p

    # ------------------------------------------------------------------ geometry
    def _base_grid(self, spatial: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """``(X, Y, Z, 3)`` voxel coordinates relative to the volume centre, float32, cached."""
        key = (spatial, str(device))
        if key not in self._base_grids:
            axes = [torch.arange(s, device=device, dtype=torch.float32) - (s - 1) / 2.0 for s in spatial]
            self._base_grids[key] = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        return self._base_grids[key]

    def _elastic_field(self, sigma: torch.Tensor, magnitude: torch.Tensor, spatial, device) -> torch.Tensor:
        """``(b, X, Y, Z, 3)`` displacement (voxels): coarse noise, Gaussian-smoothed, upsampled.

        Each sample's field is rescaled so that its RMS per axis equals its ``magnitude``.
        """
        b = sigma.shape[0]
        n_ctrl = [max(2, math.ceil((s - 1) / self._coarse_spacing) + 1) for s in spatial]
        spacing = [max(s - 1, 1) / (n - 1) for s, n in zip(spatial, n_ctrl)]  # actual, <= nominal
        # one kernel per sample and axis, zero-padded to the widest (grouped conv batches them)
        sig_c = [sigma / sp for sp in spacing]  # (b,) sigma in coarse cells, per axis
        radius = max(1, max(math.ceil(_TRUNCATE * float(s.max())) for s in sig_c))
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        gen = self._device_generator(device)
        noise = torch.randn(
            (1, b * 3, *[n + 2 * radius for n in n_ctrl]), generator=gen, device=device, dtype=torch.float32
        )
        for axis in range(3):
            k = torch.exp(-0.5 * (x[None, :] / sig_c[axis][:, None]) ** 2)
            k = torch.where(x[None, :].abs() <= _TRUNCATE * sig_c[axis][:, None] + 0.5, k, torch.zeros_like(k))
            k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0)  # (b*3, K)
            shape = [b * 3, 1, 1, 1, 1]
            shape[2 + axis] = 2 * radius + 1
            weight = k.to(device=device, dtype=torch.float32, non_blocking=True).view(shape)
            noise = F.conv3d(noise, weight, groups=b * 3)  # "valid": the margin absorbs the edges
        field = F.interpolate(noise.view(b, 3, *n_ctrl), size=spatial, mode="trilinear", align_corners=True)
        rms = field.square().mean(dim=(1, 2, 3, 4), keepdim=True).sqrt().clamp_min(1e-12)
        mag = magnitude.to(device=device, dtype=torch.float32, non_blocking=True).view(b, 1, 1, 1, 1)
        return (field * (mag / rms)).permute(0, 2, 3, 4, 1)

    def _grids(self, p: dict[str, torch.Tensor], idx: torch.Tensor, spatial, device) -> torch.Tensor:
        """``(b, X, Y, Z, 3)`` grid_sample grids (normalised, last axis ordered k, j, i) for ``idx``."""
        b = idx.numel()
        lin = torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
        trans = torch.zeros(b, 3, dtype=torch.float64)
        aff = p["affine"][idx]
        if bool(aff.any()):
            # MONAI's AffineGrid order: R @ T @ S, i.e. src = R (S p + t)
            rot = _rotation(p["rotate"][idx])
            lin = torch.where(aff[:, None, None], rot @ torch.diag_embed(p["scale"][idx]), lin)
            trans = torch.where(aff[:, None], (rot @ p["translate"][idx][:, :, None])[:, :, 0], trans)
        flip = torch.where(p["flip"][idx], -1.0, 1.0).to(torch.float64)  # flip(p) = -p about the centre
        lin = flip[:, :, None] * lin
        trans = flip * trans
        # voxel offsets -> grid_sample's normalised coordinates (align_corners=True), axes reversed
        half = torch.tensor([max((s - 1) / 2.0, 0.5) for s in spatial], dtype=torch.float64)
        lin = (lin / half[None, :, None]).flip(1)
        trans = (trans / half[None, :]).flip(1)

        pts = self._base_grid(spatial, device).expand(b, *spatial, 3)
        el = p["elastic"][idx]
        if bool(el.any()):
            el_idx = torch.nonzero(el).flatten()
            disp = self._elastic_field(p["sigma"][idx][el_idx], p["magnitude"][idx][el_idx], spatial, device)
            if el_idx.numel() == b:
                pts = pts + disp
            else:
                pts = pts.clone().index_add_(0, el_idx.to(device, non_blocking=True), disp)
        lin_t = lin.transpose(1, 2).to(device=device, dtype=torch.float32, non_blocking=True)
        trans_t = trans[:, None, :].to(device=device, dtype=torch.float32, non_blocking=True)
        grid = torch.baddbmm(trans_t, pts.reshape(b, -1, 3), lin_t)
        return grid.view(b, *spatial, 3)

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        image: torch.Tensor,
        label: torch.Tensor | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        image = _plain(image)
        if image.ndim != 5:
            raise ValueError(f"BatchAugment expects image (B, C, X, Y, Z), got shape {tuple(image.shape)}")
        bsz, spatial, device = image.shape[0], tuple(image.shape[2:]), image.device
        maps: dict[str, torch.Tensor] = {}
        if label is not None:
            maps["\0label"] = _plain(label)
        for key, t in (extra or {}).items():
            maps[key] = _plain(t)
        for key, t in maps.items():
            if t.ndim != 5 or t.shape[0] != bsz or tuple(t.shape[2:]) != spatial:
                name = "label" if key == "\0label" else f"extra[{key!r}]"
                raise ValueError(
                    f"BatchAugment: {name} shape {tuple(t.shape)} does not match image {tuple(image.shape)}"
                )

        p = self.sample_params(bsz)
        self.last_params = p
        with torch.autocast(device_type=device.type, enabled=False):  # grids and sampling in float32
            image, maps = self._spatial(image, maps, p, spatial, device)
            image = self._intensity(image, p, device)
        label_out = maps.pop("\0label", None)
        return image, label_out, maps

    def _spatial(self, image, maps, p, spatial, device):
        moving = p["elastic"] | p["affine"]
        flip_only = ~moving & p["flip"].any(dim=1)
        if not bool(moving.any()) and not bool(flip_only.any()):
            return image, maps
        if bool(moving.all()):  # common case: resample the batch as it is, no gather/scatter
            grid = self._grids(p, torch.arange(image.shape[0]), spatial, device)
            out_img = self._resample_image(image, grid)
            out_maps = self._resample_maps(maps, grid)
        else:
            out_img = image.clone()
            out_maps = {k: v.clone() for k, v in maps.items()}
            # flips alone: exact index reversal, no interpolation
            for b in torch.nonzero(flip_only).flatten().tolist():
                dims = [1 + a for a in range(3) if bool(p["flip"][b, a])]  # spatial axis a of a (C, X, Y, Z) sample
                out_img[b] = image[b].flip(dims)
                for k, v in maps.items():
                    out_maps[k][b] = v[b].flip(dims)
            if bool(moving.any()):
                idx = torch.nonzero(moving).flatten()
                idx_dev = idx.to(device, non_blocking=True)
                grid = self._grids(p, idx, spatial, device)
                out_img.index_copy_(0, idx_dev, self._resample_image(image.index_select(0, idx_dev), grid))
                sub_maps = {k: v.index_select(0, idx_dev) for k, v in maps.items()}
                for k, v in self._resample_maps(sub_maps, grid).items():
                    out_maps[k].index_copy_(0, idx_dev, v)
        if image.is_contiguous(memory_format=torch.channels_last_3d) and not image.is_contiguous():
            out_img = out_img.contiguous(memory_format=torch.channels_last_3d)
        return out_img, out_maps

    def _resample_image(self, image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        res = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=True)
        return res.to(image.dtype)

    def _resample_maps(self, maps: dict[str, torch.Tensor], grid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Nearest-neighbour resampling of label and extras in one pass; out-of-field -> pad values."""
        if not maps:
            return {}
        parts, sizes, offsets = [], [], []
        for v in maps.values():
            sub = v.float()
            # shift so that every in-field value is >= 1: "zeros" padding then marks out-of-field voxels
            # (exact: integers below 2**24 are exact in float32)
            off = sub.amin() - 1.0
            parts.append(sub - off)
            offsets.append(off)
            sizes.append(v.shape[1])
        res = F.grid_sample(torch.cat(parts, dim=1), grid, mode="nearest", padding_mode="zeros", align_corners=True)
        out = {}
        for (k, v), chunk, off in zip(maps.items(), torch.split(res, sizes, dim=1), offsets):
            pad = float(self.label_pad_value if k == "\0label" else self.extra_pad_value)
            vals = torch.where(chunk == 0, pad, chunk + off)
            if not v.dtype.is_floating_point:
                vals = vals.round()
            out[k] = vals.to(v.dtype)
        return out

    def _intensity(self, image: torch.Tensor, p, device) -> torch.Tensor:
        any_on = p["gamma_on"] | p["noise_on"] | p["contrast_on"] | p["brightness_on"]
        if not bool(any_on.any()):
            return image
        dtype = image.dtype
        x = image.float()
        x = apply_scale_shift(x, p["contrast"], p["contrast_on"], p["brightness"], p["brightness_on"])
        x = apply_gamma(x, p["gamma"], p["gamma_on"])
        x = apply_gaussian_noise(x, p["noise_std"], p["noise_on"], self._device_generator(device))
        return x.to(dtype)

    def __repr__(self) -> str:
        return (
            f"BatchAugment(prob_elastic={self.prob_elastic}, prob_affine={self.prob_affine}, "
            f"prob_flip={self.prob_flip}, flip_axes={self.flip_axes}, prob_gamma={self.prob_gamma}, "
            f"prob_noise={self.prob_noise}, prob_contrast={self.prob_contrast}, prob_brightness={self.prob_brightness})"
        )
