"""U-Net border weight maps (Ronneberger et al. 2015, eq. 2) for a weighted cross-entropy.

``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))``

* ``w_c``: class-balancing weight, inverse class frequency over labelled voxels, normalised so that
  its mean over labelled voxels is 1 (or 1 everywhere with ``class_balance=False``);
* ``d1``, ``d2``: distances to the nearest and second-nearest object, where objects are the
  connected components of each foreground class (so touching objects of different classes stay
  separate). Inside an object ``d1 = 0``;
* ignored voxels (``label == ignore_value``) get weight 0.

The border term is cut to 0 where ``d1 + d2 > truncate * sigma`` (``exp(-truncate^2 / 2)`` of
``w0``: 3.4e-4 for the default 4). That makes it cheap: each object's distance transform is only
computed inside its bounding box grown by ``truncate * sigma``, and at most ``max_objects`` objects
(the largest) are used.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from scipy import ndimage

from app.errors import InputError
from app.io.geometry import voxel_spacing

logger = logging.getLogger(__name__)

__all__ = ["unet_weight_map", "class_balance_weights", "UNetWeightMapd"]


def class_balance_weights(label: np.ndarray, ignore_value: int | None = None) -> np.ndarray:
    """Inverse-frequency weight per voxel, mean 1 over labelled voxels, 0 on ignored ones (float32).

    With ``K`` classes present among ``N`` labelled voxels and ``n_c`` voxels of class ``c``:
    ``w_c = N / (K n_c)``.
    """
    label = np.asarray(label)
    labelled = np.ones(label.shape, bool) if ignore_value is None else label != ignore_value
    out = np.zeros(label.shape, np.float32)
    classes, counts = np.unique(label[labelled], return_counts=True)
    n = counts.sum()
    for c, n_c in zip(classes, counts):
        out[label == c] = n / (len(classes) * n_c)
    out[~labelled] = 0.0
    return out


def _objects(label: np.ndarray, labelled: np.ndarray, max_objects: int):
    """Connected components of each foreground class: list of (bounding box, boolean crop)."""
    objs = []
    for c in np.unique(label[labelled & (label != 0)]):
        comp, n = ndimage.label(labelled & (label == c))
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        for idx, sl in enumerate(ndimage.find_objects(comp), start=1):
            objs.append((int(sizes[idx - 1]), sl, comp, idx))
    if len(objs) > max_objects:
        logger.warning("weight map: %d objects, keeping the %d largest for the border term", len(objs), max_objects)
        objs = sorted(objs, key=lambda o: -o[0])[:max_objects]
    return objs


def unet_weight_map(
    label: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    spacing: Sequence[float] | None = None,
    class_balance: bool = True,
    ignore_value: int | None = None,
    truncate: float = 4.0,
    max_objects: int = 256,
) -> np.ndarray:
    """U-Net weight map of a label array (see the module docstring for the formula).

    Args:
        label: integer label array ``(*spatial)``, 0 = background.
        w0: border weight amplitude (dimensionless).
        sigma: border width: in voxels, or in mm when ``spacing`` is given.
        spacing: voxel size in mm per axis; distances are then in mm.
        class_balance: use the inverse-frequency weight ``w_c`` (else ``w_c = 1``).
        ignore_value: label value of unlabelled voxels (weight 0; not part of any object).
        truncate: the border term is 0 where ``d1 + d2 > truncate * sigma``.
        max_objects: at most this many objects (the largest) enter the border term.

    Returns:
        float32 array of ``label``'s shape.
    """
    label = np.asarray(label)
    if label.dtype.kind not in "iub":
        if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
            raise InputError("weight map: label array holds non-integer values")
        label = label.astype(np.int64)
    if sigma <= 0 or w0 < 0:
        raise ValueError(f"weight map: need sigma > 0 and w0 >= 0, got sigma={sigma}, w0={w0}")
    sampling = np.ones(label.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if sampling.shape != (label.ndim,) or np.any(sampling <= 0):
        raise ValueError(f"weight map: spacing {spacing} does not fit a {label.ndim}-D label")
    labelled = np.ones(label.shape, bool) if ignore_value is None else label != ignore_value

    weight = class_balance_weights(label, ignore_value) if class_balance else labelled.astype(np.float32)
    if w0 == 0:
        return weight

    cutoff = truncate * sigma
    margin = np.ceil(cutoff / sampling).astype(int)  # voxels per axis
    d1 = np.full(label.shape, np.inf, np.float32)
    d2 = np.full(label.shape, np.inf, np.float32)
    for _, sl, comp, idx in _objects(label, labelled, max_objects):
        crop = tuple(slice(max(s.start - m, 0), min(s.stop + m, n)) for s, m, n in zip(sl, margin, label.shape))
        # the whole object lies inside its crop, so distances in the crop are exact
        d = ndimage.distance_transform_edt(comp[crop] != idx, sampling=sampling).astype(np.float32)
        c1, c2 = d1[crop], d2[crop]
        d2[crop] = np.minimum(c2, np.maximum(c1, d))
        d1[crop] = np.minimum(c1, d)
    total = d1 + d2  # inf where fewer than two objects are near
    near = labelled & (total <= cutoff)
    weight[near] += (w0 * np.exp(-(total[near] ** 2) / (2.0 * sigma**2))).astype(np.float32)
    return weight


class UNetWeightMapd(MapTransform):
    """Dictionary wrapper of :func:`unet_weight_map`: adds ``weight_key`` next to each label key.

    Labels are channel-first ``(1, *spatial)`` (MONAI); the weight map has the same shape and type
    (a MetaTensor keeps the label's affine). ``spacing="affine"`` reads the voxel size (mm) from the
    label's MetaTensor affine so that ``sigma`` is in mm; a sequence gives it explicitly; None keeps
    ``sigma`` in voxels.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        weight_key: str | Sequence[str] = "weight",
        w0: float = 10.0,
        sigma: float = 5.0,
        spacing: Sequence[float] | str | None = None,
        class_balance: bool = True,
        ignore_value: int | None = None,
        truncate: float = 4.0,
        max_objects: int = 256,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        wk = [weight_key] if isinstance(weight_key, str) else list(weight_key)
        if len(wk) != len(self.keys):
            raise ValueError(f"{len(self.keys)} label keys but {len(wk)} weight keys")
        self.weight_keys = wk
        if isinstance(spacing, str) and spacing != "affine":
            raise ValueError(f"spacing must be a sequence, None or 'affine', got {spacing!r}")
        self.spacing = spacing
        self.kwargs = dict(
            w0=w0,
            sigma=sigma,
            class_balance=class_balance,
            ignore_value=ignore_value,
            truncate=truncate,
            max_objects=max_objects,
        )

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, wkey in zip(self.keys, self.weight_keys):
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"UNetWeightMapd: key {key!r} missing")
            lab = d[key]
            arr = np.asarray(lab.detach().cpu() if hasattr(lab, "detach") else lab)
            if arr.ndim < 2 or arr.shape[0] != 1:
                raise InputError(f"UNetWeightMapd: {key!r} must be channel-first with one channel, got {arr.shape}")
            spacing = self.spacing
            if spacing == "affine":
                affine = getattr(lab, "affine", None)
                if affine is None:
                    raise InputError(f"UNetWeightMapd: {key!r} has no affine for spacing='affine'")
                spacing = voxel_spacing(np.asarray(affine))[: arr.ndim - 1]
            w = unet_weight_map(arr[0], spacing=spacing, **self.kwargs)[None]
            dtype = torch.float32 if isinstance(lab, torch.Tensor) else np.float32
            d[wkey] = convert_to_dst_type(w, lab, dtype=dtype)[0]
        return d
