"""Data-set fingerprint (geometry and foreground intensities) and the training plan made from it.

Follows nnU-Net's experiment planning (Isensee et al., Nature Methods 2021) in spirit:

* The **fingerprint** records, per case, the voxel spacing and size (from the NIfTI affine, in mm
  and voxels along the R, A, S axes, whatever the file's voxel order) and, per image channel,
  statistics of the intensities of the foreground voxels (label > 0): exact mean, std, min and max
  over all of them, and the 0.5 / 99.5 percentiles of a seeded random sample of at most
  ``max_voxels_per_case`` voxels per case.
* The **plan** picks the target spacing (median spacing; for anisotropic data the low-resolution
  axis gets the 10th percentile instead), the normalisation of each channel (CT: clip to the
  foreground percentiles, then z-score with the data-set foreground mean/std; MR: per-case z-score
  over nonzero voxels) and, with :mod:`app.planning.planner`, the patch size, batch size and the
  3D U-Net's depth and width that fit a memory budget (``--gpu-memory``).

The plan file is a **config overlay**: its top-level keys (``target_spacing``, ``patch_size``,
``batch_size``, ``features``, ``preprocessing`` with ``NormalizeFromPland``) are bundle config keys, so
``segapp train BUNDLE --plan plan.json`` and MONAI's runner
(``--config_file "['configs/train.json','plan.json']"``) train with them; everything else the planner
worked out is under ``plan``.

Cases are read one at a time with nibabel, so memory stays at about one volume.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from app.errors import ConfigError, InputError
from app.io.atomic import atomic_write_text
from app.io.geometry import same_grid, voxel_spacing
from app.planning.planner import GIB, plan_network

logger = logging.getLogger(__name__)

__all__ = ["compute_fingerprint", "load_plan", "make_plan", "plan_from_manifest", "plan_overlay", "write_plan"]

PLAN_VERSION = 2
DEFAULT_GPU_MEMORY_GB = 8.0  # nnU-Net's default target
# the overlay's keys that are bundle config keys (the rest of the plan goes under "plan")
OVERLAY_KEYS = ("target_spacing", "patch_size", "batch_size", "features", "normalization")
MODALITIES = ("CT", "MR")
# A CT holds air (about -1000 HU) somewhere; MR intensities are (almost always) >= 0.
_CT_AUTO_MIN_HU = -500.0


def _load(path: str | os.PathLike, what: str) -> nib.spatialimages.SpatialImage:
    try:
        img = nib.load(str(path))
    except FileNotFoundError as exc:
        raise InputError(f"{what} file not found", path=path) from exc
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise InputError(f"cannot read {what} as NIfTI: {exc}", path=path) from exc
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise InputError(f"{what} is not a spatial image", path=path)
    return img


def _read_array(img: nib.spatialimages.SpatialImage, path: str | os.PathLike, what: str) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip, short file, ...
        raise InputError(f"cannot decode {what} voxels: {exc}", path=path) from exc


def _image_channels(data: np.ndarray, path: str) -> np.ndarray:
    """``(I, J, K)`` or NIfTI's channels-last ``(I, J, K, C)`` to ``(C, I, J, K)``."""
    if data.ndim == 3:
        return data[None]
    if data.ndim == 4:
        return np.moveaxis(data, -1, 0)
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI-1 vector images: (I, J, K, 1, C)
        return np.moveaxis(data[:, :, :, 0], -1, 0)
    raise InputError(f"expected a 3D image (optionally with channels), got shape {data.shape}", path=path)


def ras_axis_order(affine_ras: np.ndarray, spacing_ijk, shape_ijk) -> tuple[list[float], list[int]]:
    """Per-voxel-axis spacing (mm) and size (voxels) re-ordered along the R, A, S world axes (the
    voxel axes of the closest RAS orientation, which ``Orientationd("RAS")`` produces)."""
    ras_axis = nib.orientations.io_orientation(np.asarray(affine_ras))[:, 0].astype(int)
    spacing, shape = [0.0] * 3, [0] * 3
    for ijk, ras in enumerate(ras_axis):
        spacing[ras], shape[ras] = float(spacing_ijk[ijk]), int(shape_ijk[ijk])
    return spacing, shape


class _Moments:
    """Count, mean and sum of squared deviations, merged case by case (Chan et al.) for stability."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        n_b = values.size
        if n_b == 0:
            return
        mean_b = float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else float("nan")


def _modalities(modality: str | Sequence[str], channels: int) -> list[str]:
    mods = [modality] * channels if isinstance(modality, str) else list(modality)
    if len(mods) != channels:
        raise ConfigError(f"modality lists {len(mods)} channel(s) but the images have {channels}")
    out = []
    for m in mods:
        m_up = str(m).upper()
        m_up = "MR" if m_up == "MRI" else m_up
        if m_up not in MODALITIES + ("AUTO",):
            raise ConfigError(f"modality must be 'CT', 'MR' or 'auto', got {m!r}")
        out.append(m_up)
    return out


def compute_fingerprint(
    datalist: Sequence[Mapping[str, Any]],
    *,
    modality: str | Sequence[str] = "auto",
    max_voxels_per_case: int = 10000,
    seed: int = 0,
    ignore_label: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> dict:
    """Geometry and foreground intensity statistics of a labelled NIfTI data set.

    Args:
        datalist: ``[{"image": path, "label": path}, ...]`` (MONAI style; other keys ignored).
            Images are 3D, or 4D with channels last; labels 3D on the image's voxel grid. Entries
            without a label, or whose ``label_format`` is not ``"nifti"``, add geometry only.
        modality: ``"CT"``, ``"MR"``, ``"auto"`` or one per channel. ``"auto"`` says CT when any
            case's channel holds values below -500 (air in HU), else MR.
        max_voxels_per_case: foreground voxels sampled per case (without replacement, seeded) for
            the percentiles; mean/std/min/max use every foreground voxel.
        seed: seed of the sampling.
        ignore_label: label value meaning "not annotated" (sparse labels); not foreground.
        image_key, label_key: keys of the datalist entries.

    Returns:
        A JSON-serialisable dict: ``num_cases``, ``num_channels``, ``modality`` (per channel),
        ``cases`` (per case: ``index``, ``spacing`` (mm) and ``shape`` (voxels) along R, A, S,
        ``foreground_voxels``, ``foreground_mean``/``foreground_std`` per channel),
        ``median_spacing`` (mm), ``median_shape`` (voxels), ``intensity`` (per channel:
        ``percentile_00_5``, ``percentile_99_5``, ``mean``, ``std``, ``min``, ``max`` in image units
        (HU for CT), ``foreground_voxels``, ``sampled_voxels``) and ``settings``.

    Raises:
        InputError: unreadable files, label/image grid mismatch, NaN/Inf foreground voxels, no
            foreground anywhere, inconsistent channel counts.
        ConfigError: bad arguments.
    """
    if not datalist:
        raise InputError("the data list is empty: nothing to fingerprint")
    if max_voxels_per_case < 1:
        raise ConfigError(f"max_voxels_per_case must be >= 1, got {max_voxels_per_case}")
    rng = np.random.default_rng(seed)
    cases: list[dict] = []
    moments: list[_Moments] = []
    samples: list[list[np.ndarray]] = []
    channel_min: list[float] = []
    num_channels = None
    for index, entry in enumerate(datalist):
        if image_key not in entry:
            raise InputError(f"data list entry {index} has no {image_key!r}")
        image_path = str(entry[image_key])
        img = _load(image_path, "image")
        data = _image_channels(_read_array(img, image_path, "image"), image_path)
        if num_channels is None:
            num_channels = data.shape[0]
            moments = [_Moments() for _ in range(num_channels)]
            samples = [[] for _ in range(num_channels)]
            channel_min = [math.inf] * num_channels
        elif data.shape[0] != num_channels:
            raise InputError(f"image has {data.shape[0]} channel(s), earlier images {num_channels}", path=image_path)
        # along R, A, S: the bundles reorient to RAS before resampling, so plans are in that order
        spacing_ras, shape_ras = ras_axis_order(img.affine, voxel_spacing(img.affine), data.shape[1:])
        case = {
            "index": index,
            "spacing": [float(s) for s in spacing_ras],
            "shape": [int(s) for s in shape_ras],
            "foreground_voxels": 0,
            "foreground_mean": None,
            "foreground_std": None,
        }
        for c in range(num_channels):
            channel_min[c] = min(channel_min[c], float(np.nanmin(data[c])))
        label_path = entry.get(label_key)
        if label_path and entry.get("label_format", "nifti") == "nifti":
            lab_img = _load(label_path, "label")
            lab = _read_array(lab_img, label_path, "label")
            while lab.ndim > 3 and lab.shape[-1] == 1:
                lab = lab[..., 0]
            if not same_grid(img.affine, data.shape[1:], lab_img.affine, lab.shape, atol=1e-3):
                raise InputError(
                    f"label grid (shape {lab.shape}) differs from its image's "
                    f"(shape {data.shape[1:]}, {Path(image_path).name}) in shape or affine",
                    path=label_path,
                )
            fg = lab > 0
            if ignore_label is not None:
                fg &= lab != ignore_label
            n_fg = int(fg.sum())
            case["foreground_voxels"] = n_fg
            if n_fg:
                pick = rng.choice(n_fg, size=min(n_fg, max_voxels_per_case), replace=False)
                case_means, case_stds = [], []
                for c in range(num_channels):
                    values = data[c][fg].astype(np.float64)
                    if not np.isfinite(values).all():
                        raise InputError("foreground voxels include NaN or Inf", path=image_path)
                    moments[c].add(values)
                    samples[c].append(values[pick])
                    case_means.append(float(values.mean()))
                    case_stds.append(float(values.std()))
                case["foreground_mean"], case["foreground_std"] = case_means, case_stds
            else:
                logger.warning("case %d: the label has no foreground voxels", index)
        elif label_path:
            logger.warning("case %d: label format %r is not read here; geometry only", index, entry["label_format"])
        cases.append(case)
        del data
    if num_channels is None or not any(m.n for m in moments):
        raise InputError(
            f"none of the {len(datalist)} case(s) has labelled foreground voxels: cannot compute intensity statistics"
        )

    mods = _modalities(modality, num_channels)
    auto = [m == "AUTO" for m in mods]
    mods = [
        ("CT" if channel_min[c] < _CT_AUTO_MIN_HU else "MR") if a else m for c, (m, a) in enumerate(zip(mods, auto))
    ]
    if any(auto):
        logger.info("modality auto-detected per channel: %s (minimum intensities %s)", mods, channel_min)
    intensity = []
    for c in range(num_channels):
        pooled = np.concatenate(samples[c])
        p_lo, p_hi = np.percentile(pooled, [0.5, 99.5])
        intensity.append(
            {
                "channel": c,
                "percentile_00_5": float(p_lo),
                "percentile_99_5": float(p_hi),
                "mean": moments[c].mean,
                "std": moments[c].std,
                "min": moments[c].min,
                "max": moments[c].max,
                "foreground_voxels": moments[c].n,
                "sampled_voxels": int(pooled.size),
            }
        )
    spacings = np.array([c["spacing"] for c in cases])
    shapes = np.array([c["shape"] for c in cases])
    return {
        "num_cases": len(cases),
        "num_channels": num_channels,
        "modality": mods,
        "modality_auto": auto,
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "median_shape": [float(v) for v in np.median(shapes, axis=0)],
        "intensity": intensity,
        "cases": cases,
        "settings": {"max_voxels_per_case": max_voxels_per_case, "seed": seed, "ignore_label": ignore_label},
    }


def make_plan(
    fingerprint: Mapping[str, Any],
    *,
    anisotropy_threshold: float = 3.0,
    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
    num_classes: int = 2,
    base_features: int = 32,
    min_batch: int = 2,
    max_patch_size: int = 256,
    amp: bool = True,
) -> dict:
    """Training plan (target spacing, normalisation, patch, batch, network) from a fingerprint.

    Target spacing: the per-axis median spacing. When its largest over its smallest entry exceeds
    ``anisotropy_threshold``, the largest (low-resolution) axis takes the 10th percentile of the
    cases' spacings on that axis instead, as nnU-Net does, but never finer than the coarsest other
    axis. (nnU-Net also requires the median size on that axis to be small; the spacing ratio alone
    decides here.)

    Patch, batch and network (:func:`app.planning.planner.plan_network`): the median size (voxels)
    at the target spacing (capped at ``max_patch_size``), poolings down to a 4-voxel feature map,
    shrunk until the estimated training memory of a batch of ``min_batch`` fits ``gpu_memory_gb``
    (AMP activations when ``amp``), then the batch grown within the budget and nnU-Net's 5 % cap.

    Returns:
        ``{"plan_version", "modality", "target_spacing" (mm, along i/j/k of RAS-oriented arrays),
        "anisotropic", "low_resolution_axis", "median_spacing", "median_shape",
        "median_shape_at_target", "patch_size" (voxels), "batch_size", "features" (``UNet3D``),
        "network" (the planner's record, with the memory estimate), "normalization" (one dict per
        channel: {"channel", "scheme": "CT", "lower", "upper", "mean", "std"} (HU) or
        {"channel", "scheme": "MR", "nonzero": true}), "num_cases", "fingerprint"}``.
    """
    try:
        spacings = np.array([c["spacing"] for c in fingerprint["cases"]], dtype=np.float64)
        shapes = np.array([c["shape"] for c in fingerprint["cases"]], dtype=np.float64)
        intensity = fingerprint["intensity"]
        modality = list(fingerprint["modality"])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"not a fingerprint made by compute_fingerprint (missing {exc})") from exc
    if spacings.ndim != 2 or not len(spacings) or not (spacings > 0).all():
        raise ConfigError("fingerprint holds no cases with positive spacings")
    median = np.median(spacings, axis=0)
    target = median.copy()
    anisotropic = bool(target.max() / target.min() > anisotropy_threshold)
    low_axis = None
    if anisotropic:
        low_axis = int(np.argmax(target))
        others = np.delete(target, low_axis)
        target[low_axis] = max(float(np.percentile(spacings[:, low_axis], 10)), float(others.max()))
    resampled = np.round(shapes * spacings / target)
    median_at_target = np.median(resampled, axis=0)
    net = plan_network(
        [float(v) for v in median_at_target],
        int(len(spacings)),
        int(float(gpu_memory_gb) * GIB),
        in_channels=len(modality),
        num_classes=int(num_classes),
        base_features=int(base_features),
        min_batch=int(min_batch),
        max_patch=int(max_patch_size),
        spacing=[float(v) for v in target],
        activation_bytes=2 if amp else 4,
    )
    normalization = []
    for c, mod in enumerate(modality):
        if mod == "CT":
            st = intensity[c]
            normalization.append(
                {
                    "channel": c,
                    "scheme": "CT",
                    "lower": st["percentile_00_5"],
                    "upper": st["percentile_99_5"],
                    "mean": st["mean"],
                    "std": st["std"],
                }
            )
        else:
            normalization.append({"channel": c, "scheme": "MR", "nonzero": True})
    return {
        "plan_version": PLAN_VERSION,
        "modality": modality,
        "target_spacing": [float(v) for v in target],
        "anisotropic": anisotropic,
        "low_resolution_axis": low_axis,
        "median_spacing": [float(v) for v in median],
        "median_shape": [float(v) for v in np.median(shapes, axis=0)],
        "median_shape_at_target": [float(v) for v in median_at_target],
        "patch_size": net.patch_size,
        "batch_size": net.batch_size,
        "features": net.features,
        "network": {**net.as_dict(), "num_classes": int(num_classes), "amp": bool(amp)},
        "normalization": normalization,
        "num_cases": int(len(spacings)),
        "fingerprint": dict(fingerprint),
    }


def plan_preprocessing(normalization: Sequence[Mapping[str, Any]]) -> list[dict]:
    """segapp's bundle preprocessing (load, finite check, RAS, ``@target_spacing``) with the plan's
    normalisation (``NormalizeFromPland`` with the plan's entries inline, so the list stands alone)."""
    both = ["image", "label"]
    return [
        {"_target_": "app.transforms.load.LoadCased", "keys": both},
        {"_target_": "app.transforms.intensity.CheckFinited", "keys": "image"},
        {"_target_": "Orientationd", "keys": both, "axcodes": "RAS", "allow_missing_keys": True},
        {
            "_target_": "Spacingd",
            "keys": both,
            "pixdim": "@target_spacing",
            "mode": ["bilinear", "nearest"],
            "allow_missing_keys": True,
        },
        {
            "_target_": "app.transforms.intensity.NormalizeFromPland",
            "keys": "image",
            "plan": {"normalization": [dict(n) for n in normalization]},
            "check_finite": False,
        },
    ]


def plan_overlay(plan: Mapping[str, Any]) -> dict:
    """The plan as a bundle config overlay: config keys on top, the whole plan under ``"plan"``."""
    overlay: dict[str, Any] = {"plan_version": PLAN_VERSION}
    overlay.update({k: plan[k] for k in OVERLAY_KEYS if k in plan})
    overlay["preprocessing"] = plan_preprocessing(plan["normalization"])
    overlay["plan"] = {k: v for k, v in plan.items() if k not in OVERLAY_KEYS}
    return overlay


def write_plan(plan: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``plan`` as its config overlay (:func:`plan_overlay`), indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(plan_overlay(plan), indent=2) + "\n")


def load_plan(path: str | os.PathLike) -> dict:
    """Read a plan file written by :func:`write_plan` (the plan, as :func:`make_plan` returned it);
    :class:`ConfigError` when it is not one."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the plan: {exc}", path=str(path)) from exc
    missing = [
        k
        for k in ("plan_version", "target_spacing", "patch_size", "normalization", "plan")
        if not isinstance(doc, dict) or k not in doc
    ]
    if missing:
        raise ConfigError(f"not a segapp plan (missing {missing})", path=str(path))
    if doc["plan_version"] != PLAN_VERSION:
        raise ConfigError(
            f"plan version {doc['plan_version']} is not supported (expected {PLAN_VERSION}): run `segapp plan` again",
            path=str(path),
        )
    plan = dict(doc["plan"])
    plan.update({k: doc[k] for k in OVERLAY_KEYS if k in doc})
    return plan


def plan_from_manifest(
    manifest_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    modality: str | Sequence[str] = "auto",
    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
    base_features: int = 32,
    amp: bool = True,
    **fingerprint_kwargs: Any,
) -> dict:
    """Fingerprint every case of a data manifest and write the plan (``segapp plan``).

    Args:
        manifest_path: a ``segapp-manifest/1`` file (see :mod:`app.data.manifest`).
        output_path: plan JSON to write; default ``plan.json`` next to the manifest.
        modality: ``"CT"``, ``"MR"``, ``"auto"`` or one per channel.
        gpu_memory_gb: training memory budget (GiB) for :func:`make_plan`; base_features: the
            U-Net's first width; amp: plan float16 activations (GPU) rather than float32 (CPU).
        **fingerprint_kwargs: passed to :func:`compute_fingerprint` (``max_voxels_per_case``,
            ``seed``). The manifest's ``ignore_value`` is excluded from the foreground.

    Returns:
        The plan (also written to ``output_path``).
    """
    from app.data.manifest import fold_datalist, load_manifest

    manifest = load_manifest(manifest_path)
    datalist = fold_datalist(manifest, 0, "all")
    fingerprint_kwargs.setdefault("ignore_label", manifest.ignore_value)
    fingerprint = compute_fingerprint(datalist, modality=modality, **fingerprint_kwargs)
    plan = make_plan(
        fingerprint,
        gpu_memory_gb=gpu_memory_gb,
        num_classes=len(manifest.labels),
        base_features=base_features,
        amp=amp,
    )
    plan["manifest"] = {"name": manifest.name, "content_hash": manifest.content_hash}
    output_path = Path(output_path) if output_path is not None else manifest.path.parent / "plan.json"
    write_plan(plan, output_path)
    logger.info(
        "plan for %d case(s) written to %s: spacing %s mm, patch %s, batch %d, features %s, "
        "normalisation %s, estimated %.2f of %.2f GiB",
        plan["num_cases"],
        output_path,
        plan["target_spacing"],
        plan["patch_size"],
        plan["batch_size"],
        plan["features"],
        [n["scheme"] for n in plan["normalization"]],
        plan["network"]["estimated_gib"],
        plan["network"]["budget_gib"],
    )
    return plan
