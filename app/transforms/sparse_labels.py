"""Simulated sparse annotation from dense labels: orthogonal planes (Cicek et al. 2016).

Every voxel that is not kept is set to ``ignore_value`` (the masked losses of ``app.losses`` skip
it); kept voxels hold the dense label unchanged.

Reproducibility: the same case must get the same annotation in every epoch and every run (a fresh
random draw each epoch would leak the dense labels over training). The dictionary transforms
therefore seed their generator per case, from ``seed`` and a stable hash (CRC-32) of the case's
file name (or of the label's bytes when it has none); see :func:`case_seed`.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_dst_type

from app.errors import InputError

__all__ = [
    "case_seed",
    "choose_planes",
    "sparsify_slices",
    "labelled_fraction",
    "LabelledFraction",
    "SparseSlicesd",
]


def case_seed(case_id: str, seed: int = 0) -> int:
    """Stable 32-bit seed for a case (same in every process, unlike ``hash``); only the base name of a
    path is used so that moving the data folder keeps the annotation."""
    return zlib.crc32(os.path.basename(str(case_id)).encode("utf-8"), int(seed) & 0xFFFFFFFF)


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _out_dtype(label: np.ndarray, ignore_value: int) -> np.dtype:
    """The label's dtype if it can hold ``ignore_value``, else a wider integer type."""
    dt = label.dtype
    if dt.kind in "iu" and np.iinfo(dt).min <= ignore_value <= np.iinfo(dt).max:
        return dt
    if dt.kind == "f":
        return dt
    return np.result_type(np.min_scalar_type(ignore_value), np.int16 if ignore_value < 0 else np.uint8)


def _spread(candidates: np.ndarray, k: int, lo: int, hi: int, rng: np.random.Generator) -> list[int]:
    """``k`` indices from ``candidates`` spread over ``[lo, hi]``: one random pick in each of ``k``
    equal bins (an empty bin takes the nearest unused candidate)."""
    if k >= len(candidates):
        return sorted(int(c) for c in candidates)
    edges = np.linspace(lo, hi + 1, k + 1)
    chosen: list[int] = []
    for b in range(k):
        left = candidates[(candidates >= edges[b]) & (candidates < edges[b + 1])]
        left = np.setdiff1d(left, chosen)
        if len(left) == 0:
            centre = 0.5 * (edges[b] + edges[b + 1])
            rest = np.setdiff1d(candidates, chosen)
            left = rest[[int(np.argmin(np.abs(rest - centre)))]]
        chosen.append(int(rng.choice(left)))
    return sorted(chosen)


def choose_planes(
    label: np.ndarray,
    slices_per_axis: int | Sequence[int] = 1,
    axes: Sequence[int] = (0, 1, 2),
    ignore_value: int | None = 255,
    rng: np.random.Generator | int | None = None,
    through_foreground: bool = True,
) -> dict[int, list[int]]:
    """Plane indices to annotate, per axis: ``{axis: [index, ...]}``.

    With ``through_foreground`` the planes are drawn among those containing foreground (label > 0,
    not ignored), spread over the foreground's extent; when fewer such planes exist than asked, all
    of them are taken plus planes from the rest of the axis. Without foreground (or with
    ``through_foreground=False``) the planes are spread over the whole axis.
    """
    label = np.asarray(label)
    rng = _rng(rng)
    ks = (
        [int(slices_per_axis)] * len(axes)
        if isinstance(slices_per_axis, (int, np.integer))
        else [int(k) for k in slices_per_axis]
    )
    if len(ks) != len(axes):
        raise ValueError(f"slices_per_axis {slices_per_axis} does not match axes {axes}")
    fg = label > 0
    if ignore_value is not None:
        fg &= label != ignore_value
    planes: dict[int, list[int]] = {}
    for ax, k in zip(axes, ks):
        n = label.shape[ax]
        k = int(min(max(k, 0), n))
        others = tuple(a for a in range(label.ndim) if a != ax)
        with_fg = np.flatnonzero(fg.any(axis=others)) if through_foreground else np.array([], int)
        if len(with_fg) == 0:
            planes[ax] = _spread(np.arange(n), k, 0, n - 1, rng)
        elif len(with_fg) >= k:
            planes[ax] = _spread(with_fg, k, int(with_fg[0]), int(with_fg[-1]), rng)
        else:
            rest = np.setdiff1d(np.arange(n), with_fg)
            extra = rng.choice(rest, size=k - len(with_fg), replace=False)
            planes[ax] = sorted(int(i) for i in np.concatenate([with_fg, extra]))
    return planes


def sparsify_slices(
    label: np.ndarray,
    slices_per_axis: int | Sequence[int] = 1,
    axes: Sequence[int] = (0, 1, 2),
    ignore_value: int = 255,
    rng: np.random.Generator | int | None = None,
    through_foreground: bool = True,
) -> np.ndarray:
    """Keep ``slices_per_axis`` annotated orthogonal planes per axis, set the rest to ``ignore_value``.

    Args:
        label: dense integer labels ``(*spatial)`` (voxels already equal to ``ignore_value`` stay so).
        slices_per_axis: planes per axis (one number, or one per entry of ``axes``).
        axes: the axes whose planes are annotated.
        ignore_value: value of unlabelled voxels in the output.
        rng: generator or seed (same seed, same planes).
        through_foreground: draw planes among those that contain foreground (see :func:`choose_planes`).

    Returns:
        a new array: dense labels on the chosen planes, ``ignore_value`` elsewhere.
    """
    label = np.asarray(label)
    planes = choose_planes(label, slices_per_axis, axes, ignore_value, rng, through_foreground)
    keep = np.zeros(label.shape, bool)
    for ax, idx in planes.items():
        sl: list[slice | list[int]] = [slice(None)] * label.ndim
        sl[ax] = idx
        keep[tuple(sl)] = True
    out = np.full(label.shape, ignore_value, dtype=_out_dtype(label, ignore_value))
    out[keep] = label[keep]
    return out


def _start_point(
    region: np.ndarray, members: np.ndarray, clearance: int, rng: np.random.Generator, tries: int = 50
) -> np.ndarray:
    """A random voxel of ``region`` whose ``clearance``-cube lies inside the region (so a thick stroke
    fits), checked locally on up to ``tries`` draws; else any voxel of the region."""
    for _ in range(tries):
        p = np.array(np.unravel_index(members[rng.integers(len(members))], region.shape))
        box = tuple(slice(c - clearance, c + clearance + 1) for c in p)
        if all(c - clearance >= 0 and c + clearance < n for c, n in zip(p, region.shape)) and region[box].all():
            return p
    return p


def _in_plane(struct: np.ndarray, axis: int) -> np.ndarray:
    """The structuring element restricted to its central plane normal to ``axis``."""
    s = np.zeros_like(struct)
    sl = [slice(None)] * struct.ndim
    sl[axis] = struct.shape[axis] // 2
    s[tuple(sl)] = struct[tuple(sl)]
    return s


class LabelledFraction(NamedTuple):
    """``voxels``: fraction of labelled voxels; ``slices``: per axis, fraction of planes fully labelled;
    ``slices_touched``: per axis, fraction of planes with at least one labelled voxel."""

    voxels: float
    slices: tuple[float, ...]
    slices_touched: tuple[float, ...]


def labelled_fraction(label: np.ndarray, ignore_value: int = 255) -> LabelledFraction:
    """How much of a (sparse) label array stays labelled (``label != ignore_value``)."""
    lab = np.asarray(label) != ignore_value
    full, touched = [], []
    for ax in range(lab.ndim):
        others = tuple(a for a in range(lab.ndim) if a != ax)
        full.append(float(lab.all(axis=others).mean()))
        touched.append(float(lab.any(axis=others).mean()))
    return LabelledFraction(float(lab.mean()) if lab.size else 0.0, tuple(full), tuple(touched))


class _SparseBase(Randomizable, MapTransform):
    """Per-key application on channel-first ``(1, *spatial)`` labels with per-case seeding."""

    def __init__(self, keys: KeysCollection, seed: int | None, case_key: str | None, allow_missing_keys: bool):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.seed = seed
        self.case_key = case_key

    def randomize(self, data=None) -> None:  # draws happen per key inside __call__
        pass

    def _generator(self, d: Mapping, lab, arr: np.ndarray) -> np.random.Generator:
        """Per-case generator when ``seed`` is set (see the module docstring), else ``self.R``."""
        if self.seed is None:
            return np.random.default_rng(self.R.randint(2**31))
        case = None
        if self.case_key is not None and self.case_key in d:
            case = str(d[self.case_key])
        elif getattr(lab, "meta", None) is not None and lab.meta.get("filename_or_obj"):
            case = str(lab.meta["filename_or_obj"])
        if case is None:
            return np.random.default_rng([int(self.seed), zlib.crc32(np.ascontiguousarray(arr).tobytes())])
        return np.random.default_rng(case_seed(case, self.seed))

    def _apply(self, arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            arr = np.asarray(lab.detach().cpu() if isinstance(lab, torch.Tensor) else lab)
            if arr.ndim < 2 or arr.shape[0] != 1:
                raise InputError(
                    f"{type(self).__name__}: {key!r} must be channel-first with one channel, got {arr.shape}"
                )
            out = self._apply(arr[0], self._generator(d, lab, arr))[None]
            dtype: torch.dtype | np.dtype
            if isinstance(lab, torch.Tensor):  # keep the tensor's dtype when it can hold the output
                dtype = lab.dtype if out.dtype == arr.dtype else torch.int32
            else:
                dtype = out.dtype
            d[key] = convert_to_dst_type(out, lab, dtype=dtype)[0]  # type: ignore[type-var]
        return d


class SparseSlicesd(_SparseBase):
    """Dictionary wrapper of :func:`sparsify_slices` on channel-first labels (axes are spatial axes).

    ``seed`` (default 0): per-case seeding, the same planes for a case in every epoch and run; set
    ``seed=None`` for a fresh draw per call from the transform's own random state (``set_random_state``).
    ``case_key``: data key holding the case id; default: the label's ``filename_or_obj``.
    Place it before any random spatial transform, so that the planes are planes of the original grid.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        slices_per_axis: int | Sequence[int] = 1,
        axes: Sequence[int] = (0, 1, 2),
        ignore_value: int = 255,
        through_foreground: bool = True,
        seed: int | None = 0,
        case_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, seed, case_key, allow_missing_keys)
        self.slices_per_axis = slices_per_axis
        self.axes = tuple(axes)
        self.ignore_value = ignore_value
        self.through_foreground = through_foreground

    def _apply(self, arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return sparsify_slices(arr, self.slices_per_axis, self.axes, self.ignore_value, rng, self.through_foreground)
