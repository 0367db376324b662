"""Resample a channel-first volume from one voxel grid to another, given both affines.

Used to put predictions back on the exact source grid and to move an image onto the network grid:
for every *target* voxel we compute where it lies in the *source* grid (``inv(affine_src) @
affine_dst``) and interpolate there, on whatever device the data is on. Both affines must be in the
same world frame (both RAS or both LPS); the frame cancels out.

Two implementations give the same trilinear (``align_corners=True`` voxel-centre) interpolation:

* ``grid_sample``: any affine (oblique included), one sampling grid per slab of target slices.
* ``separable``: when each target axis maps to exactly one source axis (permutations, flips,
  scalings, shifts: the common case of axial series and RAS network grids), three 1-D linear
  interpolations (gather + lerp); no sampling grid, much faster and lighter on memory.

:func:`resample_slab` gives one slab of target slices, so callers (``app.inference.stitching``) can fuse
resampling of class probabilities with the argmax and never hold ``C x I x J x K`` on the target grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

METHODS = ("auto", "grid_sample", "separable")


def target_to_source_voxel(affine_src: np.ndarray, affine_dst: np.ndarray) -> np.ndarray:
    """4x4 map from target voxel indices to source voxel indices."""
    return np.linalg.inv(np.asarray(affine_src, np.float64)) @ np.asarray(affine_dst, np.float64)


def axis_aligned(m: np.ndarray, atol: float = 1e-6) -> list[int] | None:
    """For a target->source voxel map ``m``: ``perm`` with target axis ``t`` reading source axis
    ``perm[t]`` when every target axis maps to exactly one source axis, else ``None`` (oblique)."""
    a = np.abs(np.asarray(m, np.float64)[:3, :3])
    big = a > atol * max(1.0, a.max())
    if not (big.sum(axis=0) == 1).all() or not (big.sum(axis=1) == 1).all():
        return None
    return [int(np.argmax(big[:, t])) for t in range(3)]


def _grid(
    m: np.ndarray, src_shape: Sequence[int], dst_shape: Sequence[int], k0: int, k1: int, device: torch.device
) -> torch.Tensor:
    """Normalised sampling grid (1, I, J, k1-k0, 3) for target slices k0:k1, in grid_sample's (x=z-last) order."""
    m_t = torch.as_tensor(m, dtype=torch.float64, device=device)
    i = torch.arange(dst_shape[0], dtype=torch.float64, device=device)
    j = torch.arange(dst_shape[1], dtype=torch.float64, device=device)
    k = torch.arange(k0, k1, dtype=torch.float64, device=device)
    ii, jj, kk = torch.meshgrid(i, j, k, indexing="ij")  # (I, J, K)
    pts = torch.stack([ii, jj, kk], dim=-1) @ m_t[:3, :3].T + m_t[:3, 3]  # source voxel coords
    size = torch.as_tensor(list(src_shape), dtype=torch.float64, device=device)
    # align_corners=True: index 0 -> -1, index n-1 -> +1 (n == 1 maps everything to 0)
    norm = torch.where(size > 1, 2.0 * pts / (size - 1).clamp(min=1) - 1.0, torch.zeros_like(pts))
    # grid_sample's input is (N, C, D=I, H=J, W=K); its grid's last dim is ordered (W, H, D) = (k, j, i)
    return norm.flip(-1).unsqueeze(0).float()


def _interp_axis(x: torch.Tensor, dim: int, coords: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """1-D interpolation of ``x`` along ``dim`` at fractional source ``coords`` (float64, 1-D)."""
    n = x.shape[dim]
    if padding_mode == "border":
        coords = coords.clamp(0, n - 1)
    elif padding_mode == "reflection":  # align_corners=True reflection about the end voxel centres
        if n == 1:
            coords = torch.zeros_like(coords)
        else:
            period = 2 * (n - 1)
            coords = coords.abs() % period
            coords = torch.where(coords > n - 1, period - coords, coords)
    elif padding_mode != "zeros":
        raise ValueError(f"unknown padding_mode {padding_mode!r}")
    view = [1] * x.ndim
    view[dim] = -1
    if mode == "nearest":
        idx = torch.round(coords)  # half to even, as grid_sample
        valid = (idx >= 0) & (idx <= n - 1)
        out = _take(x, dim, idx.clamp(0, n - 1).long())
        if not bool(valid.all()):
            out = out * valid.to(x.dtype).view(view)
        return out
    lo = torch.floor(coords)
    w = coords - lo
    lo_valid = (lo >= 0) & (lo <= n - 1)
    hi_valid = (lo + 1 >= 0) & (lo + 1 <= n - 1)
    a = _take(x, dim, lo.clamp(0, n - 1).long())
    b = _take(x, dim, (lo + 1).clamp(0, n - 1).long())
    if bool(lo_valid.all()) and bool((hi_valid | (w == 0)).all()):
        return a.lerp_(b, w.to(x.dtype).view(view))  # one pass; the clamped neighbour has weight 0
    w = w.to(x.dtype)
    a *= ((1 - w) * lo_valid.to(x.dtype)).view(view)
    a += b * (w * hi_valid.to(x.dtype)).view(view)
    return a


def _take(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, idx)`` by advanced indexing: on large CPU volumes ``index_select`` is up
    to 10x slower for every dim but a contiguous leading one (e.g. DICOM's slice-major arrays)."""
    return x[(slice(None),) * dim + (idx,)]


def _separable(
    work: torch.Tensor, m: np.ndarray, perm: list[int], dst_shape: Sequence[int], mode: str, padding_mode: str
) -> torch.Tensor:
    """(C, *src) -> (C, *dst_shape) by three 1-D interpolations; shrinking axes first to keep it small."""
    out = work
    order = sorted(range(3), key=lambda t: dst_shape[t] / max(1, work.shape[1 + perm[t]]))
    for t in order:
        a = perm[t]
        idx = torch.arange(dst_shape[t], dtype=torch.float64, device=work.device)
        coords = idx * float(m[a, t]) + float(m[a, 3])
        out = _interp_axis(out, 1 + a, coords, mode, padding_mode)
    # out has source axis order with target sizes; target axis t is source axis perm[t]
    return out.permute(0, *[1 + perm[t] for t in range(3)])


def _axis_perm(m: np.ndarray, method: str) -> list[int] | None:
    """The separable path's axis permutation for ``method`` (None: use grid_sample)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    perm = axis_aligned(m) if method != "grid_sample" else None
    if method == "separable" and perm is None:
        raise ValueError("separable resampling needs axis-aligned grids")
    return perm


def resample_to_grid(
    data: torch.Tensor,
    affine_src: np.ndarray,
    affine_dst: np.ndarray,
    dst_shape: Sequence[int],
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    slab: int | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """Resample ``data`` (C, I, J, K) on ``affine_src`` onto the grid (``affine_dst``, ``dst_shape``).

    Args:
        data: channel-first volume on the source grid (any float dtype; ints only with ``nearest``).
        affine_src: 4x4 voxel->world of ``data``.
        affine_dst: 4x4 voxel->world of the target grid, same world frame as ``affine_src``.
        dst_shape: target spatial shape ``(I, J, K)``.
        mode: ``bilinear`` (trilinear in 3D) for images/probabilities, ``nearest`` for labels.
        padding_mode: value outside the source field: ``zeros`` | ``border`` | ``reflection``.
        slab: process this many target slices (along K) at a time to bound memory (None: all).
        method: ``auto`` (separable when the grids are axis-aligned, else grid_sample) |
            ``grid_sample`` | ``separable`` (raises for oblique grids).

    Returns:
        (C, *dst_shape) tensor on ``data``'s device and dtype.
    """
    m = target_to_source_voxel(affine_src, affine_dst)
    dst_shape = tuple(int(s) for s in dst_shape)
    perm = _axis_perm(m, method)
    out = torch.empty((data.shape[0], *dst_shape), dtype=data.dtype, device=data.device)
    slab = slab or dst_shape[2]
    for k0 in range(0, dst_shape[2], slab):
        k1 = min(k0 + slab, dst_shape[2])
        out[:, :, :, k0:k1] = _resample_slab(data, m, perm, dst_shape, k0, k1, mode, padding_mode).to(data.dtype)
    return out


def _resample_slab(
    data: torch.Tensor,
    m: np.ndarray,
    perm: list[int] | None,
    dst_shape: Sequence[int],
    k0: int,
    k1: int,
    mode: str,
    padding_mode: str,
) -> torch.Tensor:
    """Target slices ``k0:k1`` as a float tensor (C, I, J, k1-k0) (float32 for half/integer inputs)."""
    src = data if data.dtype in (torch.float32, torch.float64) else None
    if perm is not None:
        # only the source slices that target slices k0:k1 read along the source axis perm[2]
        a = perm[2]
        c0, c1 = sorted((k0 * m[a, 2] + m[a, 3], (k1 - 1) * m[a, 2] + m[a, 3]))
        n = data.shape[1 + a]
        lo = int(min(max(np.floor(c0), 0), n - 1))
        hi = int(min(max(np.floor(c1) + 2, lo + 1), n))  # clamping/zero padding see the same ends as in full
        if padding_mode == "reflection":
            lo, hi = 0, n
        part = data.narrow(1 + a, lo, hi - lo)
        part = part if src is not None else part.float()
        shift = np.eye(4)
        shift[:3, 3] = [0, 0, k0]
        m_part = m @ shift
        m_part[a, 3] -= lo
        return _separable(part, m_part, perm, (dst_shape[0], dst_shape[1], k1 - k0), mode, padding_mode)
    work = (src if src is not None else data.float()).unsqueeze(0)
    grid = _grid(m, data.shape[1:], dst_shape, k0, k1, data.device).to(work.dtype)
    # grid_sample wants (N, C, D, H, W) with the grid indexed (N, D', H', W', 3): use (I, J, K) as (D, H, W)
    return F.grid_sample(work, grid, mode=mode, padding_mode=padding_mode, align_corners=True)[0]


def resample_slab(
    data: torch.Tensor,
    m: np.ndarray,
    dst_shape: Sequence[int],
    k0: int,
    k1: int,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    method: str = "auto",
) -> torch.Tensor:
    """Target slices ``k0:k1`` of ``data`` (C, *src) resampled with the target->source voxel map ``m``.

    Returns float32 (float64 for float64 input) ``(C, dst_shape[0], dst_shape[1], k1 - k0)``; the
    building block of :func:`resample_to_grid` for callers that hold only part of the source grid
    (``m`` then maps target voxels into that part's own voxel indices).
    """
    perm = _axis_perm(m, method)
    return _resample_slab(
        data, np.asarray(m, np.float64), perm, tuple(int(s) for s in dst_shape), k0, k1, mode, padding_mode
    )


def channel_argmax(x: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """``argmax`` over dim 0 (first maximum wins, as ``torch.argmax``) by one elementwise pass per class.

    ``torch.argmax(x, 0)`` reduces over the outermost, strided dimension and is an order of magnitude
    slower on CPU for large volumes.
    """
    best = x[0].clone()
    labels = torch.zeros(x.shape[1:], dtype=dtype, device=x.device)
    for c in range(1, x.shape[0]):
        better = x[c] > best
        labels.masked_fill_(better, c)
        torch.maximum(best, x[c], out=best)
    return labels


_MIXED = 255


def cell_argmax_slab(
    probs: torch.Tensor,
    m: np.ndarray,
    dst_shape: Sequence[int],
    k0: int,
    k1: int,
    chunk: int = 2**22,
    padding_mode: str = "zeros",
) -> torch.Tensor | None:
    """Labels ``argmax_c`` of trilinearly resampled ``probs`` for target slices ``k0:k1``,
    interpolating only where the answer is not already known.

    If the 8 source voxels around a target point all have the same argmax ``c``, the interpolated
    scores (a convex combination) keep ``c`` on top (ties included: the first maximum wins at every
    corner, so strictly against lower classes). So: argmax on the *source* grid, mark source cells
    whose 8 corners agree, look each target voxel's cell up, and interpolate all classes only at
    target voxels in mixed cells (boundaries) or partly outside the source field. Work scales with
    the boundary, not with ``C x`` the target volume.

    Args:
        probs: (C, *src) scores on the source voxel grid (C <= 255).
        m: target voxel -> source voxel map, axis-aligned (see :func:`axis_aligned`).
        dst_shape, k0, k1: target grid and the slices to compute.
        padding_mode: ``zeros`` (outside the source field every score is 0) or ``border`` (a target
            voxel outside reads the nearest source voxel: coordinates are clamped to the field).

    Returns:
        uint8 labels ``(I, J, k1 - k0)``, or None when the grids are not axis-aligned, C > 255 or the
        padding mode is another one.
    """
    perm = axis_aligned(m)
    n_classes = probs.shape[0]
    if perm is None or n_classes > _MIXED or padding_mode not in ("zeros", "border"):
        return None
    dev = probs.device
    src = probs.shape[1:]
    lab = channel_argmax(probs)
    # per source cell (x..x+1, y..y+1, z..z+1): its label when the 8 corners agree, else _MIXED
    if min(src) < 2:
        cells = torch.full([max(1, n - 1) for n in src], _MIXED, dtype=torch.uint8, device=dev)
    else:
        base = lab[:-1, :-1, :-1]
        same = torch.ones_like(base, dtype=torch.bool)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    if dx or dy or dz:
                        same &= lab[dx : src[0] - 1 + dx, dy : src[1] - 1 + dy, dz : src[2] - 1 + dz] == base
        cells = torch.where(same, base, torch.full_like(base, _MIXED))
    # per target axis (1-D tables): the cell a target index falls in and whether that cell is whole;
    # for the exact interpolation, both neighbours' flat offsets and their zero-padded weights
    dst = (int(dst_shape[0]), int(dst_shape[1]), k1 - k0)
    offsets = (0, 0, k0)
    strides = [src[1] * src[2], src[2], 1]
    cell_idx, whole, tables = [], [], []
    for t in range(3):
        a = perm[t]
        c = (torch.arange(dst[t], dtype=torch.float64, device=dev) + offsets[t]) * float(m[a, t]) + float(m[a, 3])
        if padding_mode == "border":
            c = c.clamp(0, src[a] - 1)
        lo = torch.floor(c)
        w = (c - lo).float()
        cell = torch.where((lo == src[a] - 1) & (w == 0) & (src[a] > 1), lo - 1, lo)  # exactly on the last voxel
        whole.append((cell >= 0) & (cell <= src[a] - 2))
        cell_idx.append(cell.clamp(0, max(0, src[a] - 2)).long())
        valid_lo = ((lo >= 0) & (lo <= src[a] - 1)).float()
        valid_hi = ((lo + 1 >= 0) & (lo + 1 <= src[a] - 1)).float()
        tables.append(
            (
                lo.clamp(0, src[a] - 1).long() * strides[a],
                (lo + 1).clamp(0, src[a] - 1).long() * strides[a],
                (1 - w) * valid_lo,
                w * valid_hi,
            )
        )
    # gather the cells in target axis order: target axis t reads source axis perm[t]
    looked = cells
    for t in sorted(range(3), key=lambda t: dst[t] / max(1, cells.shape[perm[t]])):  # shrinking axes first
        looked = (
            looked.index_select(0, cell_idx[t]) if perm[t] == 0 else looked[(slice(None),) * perm[t] + (cell_idx[t],)]
        )
    out = looked.permute(*perm)  # a view: the caller copies the labels into place anyway
    for t in range(3):  # target planes in cells cut by the source border: interpolate them exactly
        bad = torch.nonzero(~whole[t]).squeeze(1)
        if bad.numel():
            out.index_fill_(t, bad, _MIXED)
    ti, tj, tk = torch.nonzero(out == _MIXED, as_tuple=True)
    flat_probs = probs.reshape(n_classes, -1)
    step = max(1, chunk // n_classes)
    for s0 in range(0, ti.numel(), step):
        at = [ti[s0 : s0 + step], tj[s0 : s0 + step], tk[s0 : s0 + step]]
        per_axis = [[tab[q][at[t]] for q in range(4)] for t, tab in enumerate(tables)]  # off_lo, off_hi, w_lo, w_hi
        acc = torch.zeros((n_classes, at[0].numel()), dtype=torch.float32, device=dev)
        for corner in range(8):
            d = ((corner >> 2) & 1, (corner >> 1) & 1, corner & 1)
            lin = per_axis[0][d[0]] + per_axis[1][d[1]] + per_axis[2][d[2]]
            weight = per_axis[0][2 + d[0]] * per_axis[1][2 + d[1]] * per_axis[2][2 + d[2]]
            acc.addcmul_(flat_probs.index_select(1, lin).float(), weight)
        out[at[0], at[1], at[2]] = channel_argmax(acc)
    return out


def is_identity(affine_src: np.ndarray, affine_dst: np.ndarray, src_shape, dst_shape, atol: float = 1e-5) -> bool:
    """True when the two grids coincide, so resampling can be skipped."""
    return tuple(src_shape) == tuple(dst_shape) and np.allclose(
        target_to_source_voxel(affine_src, affine_dst), np.eye(4), atol=atol
    )
