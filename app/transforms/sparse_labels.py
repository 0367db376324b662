"""Simulated sparse annotation from dense labels: orthogonal planes (Cicek et al. 2016) or scribbles.

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
from scipy import ndimage

from app.errors import InputError

__all__ = [
    "case_seed",
    "choose_planes",
    "sparsify_slices",
    "scribbles",
    "labelled_fraction",
    "LabelledFraction",
    "SparseSlicesd",
    "Scribblesd",
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
    ks = [slices_per_axis] * len(axes) if np.isscalar(slices_per_axis) else list(slices_per_axis)
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
        sl = [slice(None)] * label.ndim
        sl[ax] = idx
        keep[tuple(sl)] = True
    out = np.full(label.shape, ignore_value, dtype=_out_dtype(label, ignore_value))
    out[keep] = label[keep]
    return out


def _walk(
    region: np.ndarray,
    start: np.ndarray,
    length: int,
    rng: np.random.Generator,
    plane_axis: int | None,
    turn: float = 0.3,
) -> list[tuple[int, ...]]:
    """A smooth random walk of unit steps inside ``region`` (direction with momentum ``1 - turn``);
    a step that would leave the region picks a new direction (5 tries), else the walk stops."""
    pos = start.astype(float)
    path = [tuple(start)]

    def new_dir(d=None):
        v = rng.normal(size=region.ndim) if d is None else d + turn * rng.normal(size=region.ndim)
        if plane_axis is not None:
            v[plane_axis] = 0.0
        nrm = np.linalg.norm(v)
        return v / nrm if nrm > 0 else new_dir()

    d = new_dir()
    for _ in range(length):
        for _try in range(5):
            cand = pos + d
            idx = tuple(int(round(c)) for c in cand)
            if all(0 <= i < n for i, n in zip(idx, region.shape)) and region[idx]:
                break
            d = new_dir()
        else:
            break
        pos = cand
        if idx != path[-1]:
            path.append(idx)
        d = new_dir(d)
    return path


def scribbles(
    label: np.ndarray,
    n_per_class: int | Mapping[int, int] = 1,
    radius: int = 1,
    length: int = 40,
    ignore_value: int = 255,
    rng: np.random.Generator | int | None = None,
    classes: Sequence[int] | None = None,
    plane_axis: int | None = None,
) -> np.ndarray:
    """Keep random scribble strokes inside each class (background included), the rest ``ignore_value``.

    Each stroke is a smooth random walk of ``length`` unit steps (voxels) that stays inside one
    class region, started at a voxel at least ``radius + 1`` voxels from the class border when there
    is one, then thickened by a ball of ``radius`` voxels (clipped to the class region, so every
    kept voxel carries its true label).

    Args:
        label: dense integer labels ``(*spatial)``.
        n_per_class: strokes per class, or ``{class: count}``.
        radius: stroke half-thickness in voxels (0 = one voxel thin).
        length: stroke length in steps (voxels).
        ignore_value: value of unlabelled voxels in the output.
        rng: generator or seed.
        classes: the classes to scribble (default: every class present, background included).
        plane_axis: when given, strokes are drawn within one plane normal to this axis (as an
            annotator drawing on 2-D slices).
    """
    label = np.asarray(label)
    rng = _rng(rng)
    present = [int(c) for c in np.unique(label) if c != ignore_value]
    classes = present if classes is None else [int(c) for c in classes if int(c) in present]
    keep = np.zeros(label.shape, bool)
    ball = ndimage.generate_binary_structure(label.ndim, 1)
    for c in classes:
        region = label == c
        n = n_per_class.get(c, 0) if isinstance(n_per_class, Mapping) else int(n_per_class)
        if n <= 0:
            continue
        members = np.flatnonzero(region)
        points: list[tuple[int, ...]] = []
        for _ in range(n):
            start = _start_point(region, members, radius + 1, rng)
            points.extend(_walk(region, start, length, rng, plane_axis))
        # thicken within the strokes' bounding box only (cheap on large volumes)
        pts = np.array(points)
        box = tuple(
            slice(max(lo - radius, 0), min(hi + radius + 1, sz))
            for lo, hi, sz in zip(pts.min(0), pts.max(0), label.shape)
        )
        stroke = np.zeros([b.stop - b.start for b in box], bool)
        stroke[tuple((pts - [b.start for b in box]).T)] = True
        if radius > 0:
            struct = ball if plane_axis is None else _in_plane(ball, plane_axis)
            stroke = ndimage.binary_dilation(stroke, structure=struct, iterations=radius, mask=region[box])
        keep[box] |= stroke & region[box]
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
            if isinstance(lab, torch.Tensor):  # keep the tensor's dtype when it can hold the output
                dtype = lab.dtype if out.dtype == arr.dtype else torch.int32
            else:
                dtype = out.dtype
            d[key] = convert_to_dst_type(out, lab, dtype=dtype)[0]
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
        self.kwargs = dict(
            slices_per_axis=slices_per_axis,
            axes=tuple(axes),
            ignore_value=ignore_value,
            through_foreground=through_foreground,
        )

    def _apply(self, arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return sparsify_slices(arr, rng=rng, **self.kwargs)


class Scribblesd(_SparseBase):
    """Dictionary wrapper of :func:`scribbles` on channel-first labels; seeding as :class:`SparseSlicesd`."""

    def __init__(
        self,
        keys: KeysCollection = "label",
        n_per_class: int | Mapping[int, int] = 1,
        radius: int = 1,
        length: int = 40,
        ignore_value: int = 255,
        classes: Sequence[int] | None = None,
        plane_axis: int | None = None,
        seed: int | None = 0,
        case_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, seed, case_key, allow_missing_keys)
        self.kwargs = dict(
            n_per_class=n_per_class,
            radius=radius,
            length=length,
            ignore_value=ignore_value,
            classes=classes,
            plane_axis=plane_axis,
        )

    def _apply(self, arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return scribbles(arr, rng=rng, **self.kwargs)
