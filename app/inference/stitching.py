"""Sliding-window inference with a bounded stitching buffer, streamed straight into labels.

MONAI's ``sliding_window_inference`` always materialises the whole blended output, ``C x I x J x K``
in the input's dtype, on ``device`` (its ``buffer_steps`` only bounds the *window-side* buffer on
``sw_device``; the full output still exists on ``device``). For 105 classes on a CT that is tens of
GB, so we stitch ourselves: windows are visited row by row along one *stream axis* ``a`` of the
network voxel grid; a buffer holds only ``roi[a]`` (+ a few retained) network slices; once no later
row can touch a slice it is normalised by the summed importance weights, softmaxed and consumed:

* no target grid: ``argmax`` straight into labels on the network voxel grid;
* a target grid (the source image's voxel grid, same world frame, e.g. both RAS): the target
  slabs whose interpolation footprint is finished are resampled (trilinear, separable when the
  grids are axis-aligned) and reduced to labels at once (``resample_slab`` + ``channel_argmax``).

Window positions, padding, the Gaussian/constant importance map and the blending of *logits*
(softmax after blending) are MONAI's, so in float32 the labels equal MONAI's argmax.
The buffer is float16 on CUDA (the probabilities and blended logits are well inside its range) and
float32 on the CPU (half arithmetic is slow there). :func:`choose_stitch_device` falls back to a CPU
buffer when :func:`estimate_stitch_bytes` says it will not fit the device's free memory or a budget.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices

from app.inference.resample import (
    axis_aligned,
    cell_argmax_slab,
    channel_argmax,
    resample_slab,
    target_to_source_voxel,
)

log = logging.getLogger(__name__)

# Temporaries of one resampling step. 64 MiB: the same speed as 256 MiB on the 2-core CPU machine,
# 50 MiB less peak RSS for a 256 x 256 x 120 CT (bench/infer_speed.py, 312 -> 260 MiB)
DEFAULT_MAX_SLAB_BYTES = 64 * 2**20


class _DeviceTimer:
    """Time spent in code blocks on ``device`` without stalling it: CUDA events on a GPU (read once,
    at the end), wall time on the CPU. A host sync per window batch would stop the host from queueing
    work ahead of the GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.cpu_s = 0.0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.cpu_s += time.perf_counter() - t0

    def seconds(self) -> float:
        if not self.cuda:
            return self.cpu_s
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events) / 1000.0


@dataclass(frozen=True)
class WindowSpec:
    """Sliding-window settings (MONAI ``SlidingWindowInferer`` semantics), sizes in network voxels."""

    roi_size: tuple[int, int, int]
    sw_batch_size: int = 4
    overlap: tuple[float, float, float] = (0.25, 0.25, 0.25)
    mode: str = "constant"
    sigma_scale: float | tuple[float, ...] = 0.125
    padding_mode: str = "constant"
    cval: float = 0.0

    @classmethod
    def from_inferer(cls, inferer) -> WindowSpec | None:
        """The spec of a MONAI ``SlidingWindowInferer`` (None for other inferers or unsupported options)."""
        from monai.inferers import SlidingWindowInferer

        if not isinstance(inferer, SlidingWindowInferer) or inferer.roi_weight_map is not None or inferer.with_coord:
            return None
        roi = tuple(int(r) for r in np.broadcast_to(np.asarray(inferer.roi_size), (3,)))
        if min(roi) <= 0:  # "whole axis" windows: leave those to MONAI
            return None
        ov = tuple(float(o) for o in np.broadcast_to(np.asarray(inferer.overlap, dtype=float), (3,)))
        return cls(
            (roi[0], roi[1], roi[2]),
            int(inferer.sw_batch_size),
            (ov[0], ov[1], ov[2]),
            str(inferer.mode),
            inferer.sigma_scale if isinstance(inferer.sigma_scale, float) else tuple(inferer.sigma_scale),
            str(inferer.padding_mode),
            float(inferer.cval),
        )


def scan_interval(image_size: Sequence[int], roi: Sequence[int], overlap: Sequence[float]) -> list[int]:
    """MONAI's window step per axis (``monai.inferers.utils._get_scan_interval``, private there)."""
    out = []
    for n, r, o in zip(image_size, roi, overlap):
        out.append(int(r) if r == n else max(1, int(r * (1 - o))))
    return out


def _pad_amounts(shape: Sequence[int], roi: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) padding per axis so each axis is at least ``roi`` (MONAI: half before)."""
    out = []
    for n, r in zip(shape, roi):
        diff = max(r - n, 0)
        out.append((diff // 2, diff - diff // 2))
    return out


def stream_axis(m: np.ndarray | None, net_shape: Sequence[int], dst_shape: Sequence[int] | None) -> int:
    """Network axis to stream along: the one whose slices a target slab along ``k`` spans least.

    ``m`` maps target voxels to network voxels; without a target grid, the longest network axis.
    """
    if m is None or dst_shape is None:
        return int(np.argmax(net_shape))
    spread = [
        abs(m[a, 0]) * (dst_shape[0] - 1) + abs(m[a, 1]) * (dst_shape[1] - 1) + 1e-9 * net_shape[a] for a in range(3)
    ]
    return int(np.argmin(spread))


def _slab_plan(m: np.ndarray, a: int, n_a: int, dst_shape: Sequence[int], slab: int) -> list[tuple[int, int, int, int]]:
    """Target slabs ``(lo, hi, k0, k1)`` sorted by the network slices ``[lo, hi)`` along ``a`` they read."""
    plan = []
    for k0 in range(0, dst_shape[2], slab):
        k1 = min(k0 + slab, dst_shape[2])
        corners = np.array(
            [[i, j, k, 1.0] for i in (0, dst_shape[0] - 1) for j in (0, dst_shape[1] - 1) for k in (k0, k1 - 1)]
        )
        c = corners @ m[a]
        # one slice of margin each side: linear interpolation reads floor and floor + 1 (+ rounding)
        lo = int(min(max(math.floor(c.min()) - 1, 0), n_a - 1))
        hi = int(max(min(math.floor(c.max()) + 3, n_a), lo + 1))
        if hi - lo < 2 <= n_a:  # a 1-slice view would read as a degenerate (broadcast) axis, not zero padding
            lo, hi = (lo - 1, hi) if hi == n_a else (lo, hi + 1)
        plan.append((lo, hi, k0, k1))
    return sorted(plan)


def default_slab(
    num_classes: int, dst_shape: Sequence[int], max_slab_bytes: int = DEFAULT_MAX_SLAB_BYTES, cells: bool = False
) -> int:
    """Target slices per resampling step so the temporaries stay near ``max_slab_bytes``: float32
    per class for dense interpolation; ~16 bytes per voxel (uint8/bool maps, boundary indices) for
    ``cell_argmax_slab``, whose few large steps also spare many small ops (they stall on busy CPUs)."""
    per_slice = dst_shape[0] * dst_shape[1] * (16 if cells else num_classes * 4 * 3)
    return int(max(1, min(dst_shape[2], max_slab_bytes // max(1, per_slice))))


def target_span(
    affine_net: np.ndarray,
    affine_dst: np.ndarray,
    net_shape: Sequence[int],
    dst_shape: Sequence[int],
    num_classes: int,
    max_slab_bytes: int = DEFAULT_MAX_SLAB_BYTES,
    cells: bool = True,
) -> tuple[int, int]:
    """(stream axis, most network slices one target slab reads) for resampling onto ``dst_shape``."""
    m = target_to_source_voxel(affine_net, affine_dst)
    a = stream_axis(m, net_shape, dst_shape)
    cells = cells and axis_aligned(m) is not None and num_classes <= 255
    slab = default_slab(num_classes, dst_shape, max_slab_bytes, cells)
    plan = _slab_plan(m, a, int(net_shape[a]), dst_shape, slab)
    return a, max(hi - lo for lo, hi, _, _ in plan)


def estimate_stitch_bytes(
    num_classes: int,
    net_shape: Sequence[int],
    roi_size: Sequence[int],
    overlap: float | Sequence[float] = 0.5,
    dst_shape: Sequence[int] | None = None,
    span: int | None = None,
    axis: int | None = None,
    acc_bytes: int = 2,
    out_bytes: int | None = None,
    in_channels: int = 1,
    sw_batch_size: int = 4,
    max_slab_bytes: int = DEFAULT_MAX_SLAB_BYTES,
    cells: bool = True,
    cross_rows: bool = False,
) -> dict[str, int]:
    """Peak device bytes of stitching with the streamed buffer, and of the naive float32 way.

    Network activations are not included (they depend on the network, not on the volume).

    Args:
        num_classes: network output channels.
        net_shape: network voxel grid ``(I, J, K)`` (after the bundle's spacing/orientation).
        roi_size, overlap, sw_batch_size, in_channels: sliding-window settings and input channels.
        dst_shape: source voxel grid the labels go to (None: labels on the network grid).
        span, axis: network slices one target slab reads along the stream axis, and that axis
            (see :func:`target_span`; default 8 slices along axis 2, the axial case).
        acc_bytes: bytes per buffer element (2: float16 on CUDA, 4: float32).
        out_bytes: bytes per window output element (default ``acc_bytes``: AMP on CUDA).
        cells: the boundary-only argmax (axis-aligned grids, <= 255 classes) rather than dense
            interpolation of every class.
        cross_rows: batches that take windows of the next row (``sliding_window_labels``): the buffer
            holds one window interval more.

    Returns:
        ``streamed`` and ``naive_fp32`` totals and the streamed parts: ``buffer`` (``roi + span``
        slices of the plane), ``weights``, ``image_labels`` (network-grid input, uint8 labels),
        ``windows`` (a batch of inputs and outputs), ``temporaries`` (normalisation/softmax chunks
        and one target slab's float32 interpolation). ``naive_fp32``: MONAI's float32 output and
        count map, a softmax copy and (with a target grid) the resampled probabilities, plus the
        same image, labels and windows.
    """
    net_shape = [int(s) for s in net_shape]
    roi = [min(int(r), n) for r, n in zip(roi_size, net_shape)]
    a = axis if axis is not None else (2 if dst_shape is not None else int(np.argmax(net_shape)))
    span = (8 if dst_shape is not None else 0) if span is None else int(span)
    plane = int(np.prod(net_shape)) // net_shape[a]
    v_net = int(np.prod(net_shape))
    v_dst = int(np.prod(dst_shape)) if dst_shape is not None else v_net
    ov = float(np.broadcast_to(np.asarray(overlap, dtype=float), (3,))[a])
    interval = max(int(roi[a] * (1 - ov)), 1) if cross_rows else 0
    slices = min(net_shape[a], roi[a] + span + interval)
    out_bytes = acc_bytes if out_bytes is None else out_bytes
    windows = sw_batch_size * int(np.prod(roi)) * (num_classes * out_bytes + in_channels * 4)
    temporaries = 2 * max_slab_bytes
    if dst_shape is not None and cells:  # uint8/bool maps of a target slab + boundary voxels' float32 scores
        slab = default_slab(num_classes, dst_shape, max_slab_bytes, cells=True)
        temporaries += 16 * dst_shape[0] * dst_shape[1] * slab + 3 * 4 * 2**22
    elif dst_shape is not None:  # dense: float32 copy of the slab's source slices + interpolation passes
        slab = default_slab(num_classes, dst_shape, max_slab_bytes)
        temporaries += 3 * num_classes * dst_shape[0] * dst_shape[1] * slab * 4 + num_classes * plane * span * 4
    parts = {
        "buffer": num_classes * plane * slices * acc_bytes,
        "weights": plane * slices * 4,
        "image_labels": in_channels * v_net * 4 + v_dst,
        "windows": windows,
        "temporaries": temporaries,
    }
    naive = (
        2 * num_classes * v_net * 4
        + v_net * 4
        + parts["image_labels"]
        + sw_batch_size * int(np.prod(roi)) * (num_classes + in_channels) * 4
    )
    if dst_shape is not None:
        naive += num_classes * v_dst * 4
    return {"streamed": int(sum(parts.values())), "naive_fp32": int(naive), **parts}


def choose_stitch_device(
    estimate_bytes: int,
    device: torch.device | str,
    budget_bytes: int | None = None,
    free_bytes: int | None = None,
    headroom: float = 0.9,
) -> torch.device:
    """``device`` when the estimate fits ``headroom`` x its free memory (and ``budget_bytes``), else the CPU.

    ``free_bytes`` defaults to ``torch.cuda.mem_get_info`` on CUDA; CPU devices are returned as is.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return device
    if free_bytes is None and device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(device)[0]
    limit = math.inf if free_bytes is None else headroom * free_bytes
    if budget_bytes is not None:
        limit = min(limit, budget_bytes)
    if estimate_bytes > limit:
        log.info(
            "stitching buffer ~%.2f GB exceeds %.2f GB on %s: stitching on the CPU",
            estimate_bytes / 1e9,
            limit / 1e9,
            device,
        )
        return torch.device("cpu")
    return device


@dataclass
class _Buffers:
    """The stitching buffers: blended outputs ``buf`` (C, *plane, slices) and summed importance ``w``
    of network slices ``[b0, b0 + cap)`` along the stream axis; slices before ``fin`` are finished."""

    buf: torch.Tensor | None = None
    w: torch.Tensor | None = None
    b0: int = 0
    fin: int = 0
    peak: int = 0

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.buf is not None and self.w is not None, "buffers are allocated with the first windows"
        return self.buf, self.w


@torch.no_grad()
def sliding_window_labels(
    x: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    spec: WindowSpec,
    *,
    affine_net: np.ndarray | None = None,
    affine_dst: np.ndarray | None = None,
    dst_shape: Sequence[int] | None = None,
    stitch_device: torch.device | str | Callable[[int], torch.device] | None = None,
    acc_dtype: torch.dtype | None = None,
    amp: bool = False,
    channels_last: bool = False,
    max_slab_bytes: int = DEFAULT_MAX_SLAB_BYTES,
    cells: bool = True,
    padding_mode: str = "zeros",
    softmax: bool = True,
    cross_rows: bool | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Labels of a sliding-window prediction, on the network voxel grid or resampled onto a target grid.

    Args:
        x: ``(1, C_in, I, J, K)`` image on the network voxel grid, on the device ``predictor`` runs on.
        predictor: the network (windows ``(B, C_in, *roi)`` -> logits ``(B, C, *roi)``).
        spec: window settings.
        affine_net, affine_dst, dst_shape: network and target voxel->world affines (same frame, e.g.
            both RAS) and the target shape; all None for labels on the network grid.
        stitch_device: where the buffer lives (default ``x``'s device), or a function of the number of
            classes returning it (called once the first windows are out, e.g. ``choose_stitch_device``).
        acc_dtype: buffer dtype (default float16 on CUDA, else float32).
        amp: autocast the network (CUDA). channels_last: feed windows channels-last (CUDA convs).
        cells: on axis-aligned grids interpolate only around label boundaries
            (``cell_argmax_slab``: same labels, far less work); False: every class everywhere.
        padding_mode: probabilities of target voxels outside the network grid: ``zeros`` (background)
            or ``border`` (the nearest network voxel's, as MONAI's ``Invertd`` of a default ``Spacingd``).
        softmax: resample softmax probabilities onto the target grid (True) or the blended logits
            (False: as ``Invertd`` does for a bundle that applies no softmax before it).
        cross_rows: fill every network call with ``sw_batch_size`` windows, taking the next row's
            first windows when a row runs out (the buffer then holds one window interval more along
            the stream axis); default: when the network runs on the CPU, where small batches are slow.
        stats: filled with ``stream_axis``, ``peak_buffer_bytes``, ``stitch_device``, ``acc_dtype``,
            ``windows``, ``network_s`` (time in ``predictor``) and ``resample_s`` (resampling + argmax).

    Returns:
        uint8 labels (int64 above 256 classes) on ``stitch_device``: target shape, or the network shape.
    """
    if x.ndim != 5 or x.shape[0] != 1:
        raise ValueError(f"x must be (1, C, I, J, K), got {tuple(x.shape)}")
    dev = x.device if stitch_device is None or callable(stitch_device) else torch.device(stitch_device)
    real = [int(s) for s in x.shape[2:]]
    resample = dst_shape is not None
    m: np.ndarray | None = None
    dst: tuple[int, ...] = tuple(int(s) for s in x.shape[2:])  # labels on the network grid
    if dst_shape is not None:
        if affine_net is None or affine_dst is None:
            raise ValueError("a target grid needs both affine_net and affine_dst")
        dst = tuple(int(s) for s in dst_shape)
        m = target_to_source_voxel(affine_net, affine_dst)  # target voxel -> network voxel
    m_t = m if m is not None else np.eye(4)
    roi = [int(r) for r in spec.roi_size]
    pads = _pad_amounts(real, roi)
    if any(p for pair in pads for p in pair):
        flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last axis first
        x = F.pad(x, flat, mode=spec.padding_mode, **({"value": spec.cval} if spec.padding_mode == "constant" else {}))
    size = [int(s) for s in x.shape[2:]]
    a = stream_axis(m, real, dst_shape)
    slices = dense_patch_slices(size, roi, scan_interval(size, roi, spec.overlap))
    rows: dict[int, list] = {}
    for sl in slices:
        rows.setdefault(sl[a].start, []).append(sl)
    starts = sorted(rows)
    imp = compute_importance_map(
        tuple(roi), mode=spec.mode, sigma_scale=spec.sigma_scale, device=x.device, dtype=torch.float32
    )[None, None]
    autocast = torch.autocast(x.device.type, dtype=torch.float16) if amp and x.device.type == "cuda" else None

    st = _Buffers()
    net_timer = _DeviceTimer(x.device)
    res_timer: _DeviceTimer | None = None  # on the stitching device, known after the first window batch
    labels: torch.Tensor | None = None
    plan: list[tuple[int, int, int, int]] = []
    pad_a, n_a = pads[a][0], real[a]

    def ensure(cap_needed: int, n_classes: int) -> None:
        buf, w = st.buf, st.w
        cap = 0 if buf is None else buf.shape[1 + a]
        if cap >= cap_needed:
            return
        shape = list(size)
        shape[a] = cap_needed - cap
        more = torch.zeros((n_classes, *shape), dtype=acc_dtype, device=dev)
        more_w = torch.zeros((1, *shape), dtype=torch.float32, device=dev)
        st.buf = more if buf is None else torch.cat([buf, more], dim=1 + a)
        st.w = more_w if w is None else torch.cat([w, more_w], dim=1 + a)
        st.peak = max(st.peak, st.buf.numel() * st.buf.element_size() + st.w.numel() * 4)

    def shift_to(new_b0: int) -> None:
        d = new_b0 - st.b0
        if d <= 0:
            return
        for t in st.tensors():
            cap = t.shape[1 + a]
            if d >= cap:
                t.zero_()
                continue
            for i in range(0, cap - d, d):  # forward, chunks of <= d slices: sources never overwritten early
                n = min(d, cap - d - i)
                t.narrow(1 + a, i, n).copy_(t.narrow(1 + a, i + d, n))
            t.narrow(1 + a, cap - d, d).zero_()
        st.b0 = new_b0

    def finish(f1: int) -> None:
        """Normalise (and softmax) padded network slices [fin, f1), then consume what is ready."""
        buf, w = st.tensors()
        b0 = st.b0
        assert labels is not None
        f0 = st.fin
        per_slice = buf.numel() // buf.shape[1 + a]  # classes x plane
        chunk = max(1, DEFAULT_MAX_SLAB_BYTES // (4 * per_slice))  # bounded float32 temporaries
        for s in range(f0, f1, chunk):
            n = min(chunk, f1 - s)
            v = buf.narrow(1 + a, s - b0, n).float() / w.narrow(1 + a, s - b0, n)
            if resample and softmax:
                v = torch.softmax(v, dim=0)
            buf.narrow(1 + a, s - b0, n).copy_(v)
        st.fin = f1
        r0, r1 = max(f0, pad_a) - pad_a, min(f1 - pad_a, n_a)  # newly finished real network slices
        if not resample:
            if r1 > r0:
                part = buf.narrow(1 + a, r0 + pad_a - b0, r1 - r0)
                for d in range(3):
                    if d != a:
                        part = part.narrow(1 + d, pads[d][0], real[d])
                labels.narrow(a, r0, r1 - r0).copy_(channel_argmax(part, labels.dtype))
            return
        fin_real = min(f1 - pad_a, n_a)
        assert res_timer is not None
        with res_timer():
            while plan and (plan[0][1] <= fin_real or fin_real >= n_a):
                lo, hi, k0, k1 = plan.pop(0)
                v0 = lo  # only the real slices this target slab reads (its plan has a one-slice margin)
                view = buf.narrow(1 + a, v0 + pad_a - b0, hi - v0)
                for d in range(3):
                    if d != a:
                        view = view.narrow(1 + d, pads[d][0], real[d])
                shift = np.eye(4)
                shift[a, 3] = -v0
                lab = cell_argmax_slab(view, shift @ m_t, dst, k0, k1, padding_mode=padding_mode) if cells else None
                if lab is None:  # oblique grids or > 255 classes: interpolate every class everywhere
                    lab = channel_argmax(resample_slab(view, shift @ m_t, dst, k0, k1, "bilinear", padding_mode))
                labels[:, :, k0:k1] = lab.to(labels.dtype)

    # windows in row order; a batch may take the first windows of the next row (cross_rows), so every
    # network call but the last gets sw_batch_size windows (on CPUs a batch of 2 costs ~1.5x per window)
    if cross_rows is None:
        cross_rows = x.device.type == "cpu"
    order = [(r, sl) for r, s in enumerate(starts) for sl in rows[s]]
    if cross_rows:
        batches = [order[b : b + spec.sw_batch_size] for b in range(0, len(order), spec.sw_batch_size)]
    else:
        batches = [
            [(r, sl) for sl in rows[s][b : b + spec.sw_batch_size]]
            for r, s in enumerate(starts)
            for b in range(0, len(rows[s]), spec.sw_batch_size)
        ]
    for i_batch, chunk in enumerate(batches):
        batch = [sl for _, sl in chunk]
        win = torch.cat([x[(slice(0, 1), slice(None), *sl)] for sl in batch])
        if channels_last:
            win = win.contiguous(memory_format=torch.channels_last_3d)
        with net_timer(), autocast if autocast is not None else nullcontext():
            out = predictor(win)
        if not isinstance(out, torch.Tensor):  # deep-supervision tuples/dicts: MONAI's inferer handles those
            raise TypeError(f"the network returned {type(out).__name__}, not one tensor: use fast=False")
        if st.buf is None:
            n_classes = out.shape[1]
            if callable(stitch_device):
                dev = torch.device(stitch_device(n_classes))
            acc_dtype = acc_dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
            res_timer = _DeviceTimer(dev)
            imp_dev = imp.to(dev)
            dtype = torch.uint8 if n_classes <= 256 else torch.int64
            labels = torch.empty(dst, dtype=dtype, device=dev)
            if resample:
                cells = cells and axis_aligned(m_t) is not None and n_classes <= 255
                slab = default_slab(n_classes, dst, max_slab_bytes, cells)
                plan = _slab_plan(m_t, a, n_a, dst, slab)
            # a pending target slab keeps at most its span of finished slices before the row's window
            span = max((hi - lo for lo, hi, _, _ in plan), default=0)
            ensure(min(size[a], roi[a] + span), n_classes)
        # weight in place in the output's own dtype (fp16 under AMP): no float32 copy of C x roi
        out = out.mul_(imp.to(out.dtype)).to(device=dev, dtype=acc_dtype)
        ensure(max(sl[a].start for sl in batch) + roi[a] - st.b0, out.shape[1])
        buf, w = st.tensors()
        for p, sl in zip(out, batch):
            idx = list(sl)
            idx[a] = slice(sl[a].start - st.b0, sl[a].stop - st.b0)
            buf[(slice(None), *idx)] += p
            w[(slice(None), *idx)] += imp_dev[0]
        # slices before the next pending window's row are final: no later window touches them
        f1 = starts[batches[i_batch + 1][0][0]] if i_batch + 1 < len(batches) else size[a]
        if f1 > st.fin:
            finish(f1)
            keep = f1 if not plan else min(f1, plan[0][0] + pad_a)  # slices a pending target slab still reads
            shift_to(max(keep, st.b0))
    if stats is not None:
        stats.update(
            stream_axis=a,
            peak_buffer_bytes=int(st.peak),
            stitch_device=str(dev),
            acc_dtype=str(acc_dtype).replace("torch.", ""),
            windows=len(slices),
            network_s=net_timer.seconds(),
            resample_s=res_timer.seconds() if res_timer is not None else 0.0,
        )
    assert labels is not None, "no window was run"
    return labels
