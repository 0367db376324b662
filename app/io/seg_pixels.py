"""The frames of a BINARY SEG for a label map, and its PixelData written frame by frame.

PS3.5 8.1.1: 1-bit pixels fill each byte from its least significant bit (``np.packbits(...,
bitorder="little")``); BINARY frames follow one another without padding, so a frame starts
mid-byte when rows x columns is not a multiple of 8.

Only the box of rows and planes that hold labels is read after the first pass (organs cover a
fraction of a CT slice), a few planes per pass, and each pass packs only the columns where its planes
hold labels. How depends on the map's memory:

* ``[i, j, k]`` with ``k`` fastest (C order, what inference returns): the pass is copied into one
  reused C-contiguous buffer (every ``(i, j)`` row once; its columns are found there, 0.2 ms, where
  reducing the strided box took 2.3), each segment compared there a column slab
  at a time and columns ``8c .. 8c + 7`` packed into byte ``c`` by shifts over whole slabs; only the
  packed pass (an eighth) is transposed to frame order, as it is written. Transposing the uint8 box
  itself, then comparing and packing frame rows, took 14.3-14.9 ms where this takes 6-7 and 0.8 more
  in :meth:`PackedFrames.write_to` (512 x 512 x 300, 3 labels, 150 frames; 2-core CPU machine).
* frame order (``i`` fastest, as ``read_series`` returns): frame rows are contiguous, so each frame's
  rows are compared and packed in place.

Only the packed box of each non-empty frame is kept (:class:`PackedFrames`). The PixelData is
written after the rest of the dataset, a few frames at a time, each the kept box in a zero frame
(:func:`write_pixel_data`): no whole frame stack is ever held (for a 1100-frame 512 x 512 SEG that
was two 36 MB buffers, the stack and its bytes, fresh memory whose page faults cost more than the
copies).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np

from app.errors import InputError
from app.io.atomic import start_writeback

_COLUMN_PASS_BYTES = 16 << 20  # of a C-order box per pass: fewer passes, each copying every (i, j) row once
_PLANES_PER_FRAME_PASS = 8  # a 512 x 512 frame's mask is 256 KiB: 8 of them stay in cache
# frame rows per copy into PackedFrames' write buffer: a part kept in [byte, row, plane] memory is read in
# cache-sized tiles (0.68 -> 0.30 ms for a 44 x 350 x 70 part; 2-core CPU machine)
_ROWS_PER_COPY = 8


class PackedFrames:
    """A byte-aligned BINARY PixelData (frames of ``rows x columns / 8`` bytes) held as the kept boxes:
    ``parts`` are ``(c0, part)``, ``part`` a ``[frame, row - j0, byte - c0]`` array (any memory order), in
    frame order; each frame is zero outside its part's rows ``j0 .. j1`` and bytes ``c0 .. c0 + width``."""

    def __init__(self, parts: Sequence[tuple[int, np.ndarray]], rows_used: tuple[int, int], rows: int, row_bytes: int):
        self.parts = [(c0, p) for c0, p in parts if len(p)]
        self.rows_used, self.frame_shape = rows_used, (rows, row_bytes)
        self.nbytes = sum(len(p) for _, p in self.parts) * rows * row_bytes

    def write_to(self, fh: BinaryIO, frames_per_write: int = 32) -> None:
        """Write the frames, a few at a time from one reused zero buffer (no whole stack in memory), each
        block handed to the disk as it is written (:func:`app.io.atomic.start_writeback`)."""
        j0, j1 = self.rows_used
        buf = np.zeros((frames_per_write, *self.frame_shape), np.uint8)
        flushed = fh.tell()
        written = (0, 0)  # the bytes of buf's rows j0 .. j1 a part may have set
        for c0, part in self.parts:
            c1 = c0 + part.shape[2]
            if (c0, c1) != written:  # outside each part's bytes buf must be zero
                buf[:, j0:j1, written[0] : written[1]] = 0
                written = (c0, c1)
            for f0 in range(0, len(part), frames_per_write):
                chunk = part[f0 : f0 + frames_per_write]
                for r in range(0, j1 - j0, _ROWS_PER_COPY):
                    tile = chunk[:, r : r + _ROWS_PER_COPY]
                    buf[: len(chunk), j0 + r : j0 + r + tile.shape[1], c0:c1] = tile
                fh.write(buf[: len(chunk)].data)
                flushed = start_writeback(fh, flushed)  # the disk writes while the next frames are made


# binary_frames' result: per frame (segment number, k, plane rank); the planes kept; the PixelData
Frames = tuple[list[tuple[int, int, int]], np.ndarray, PackedFrames | bytes]


def write_pixel_data(fh: BinaryIO, pixels: PackedFrames | bytes, implicit_vr: bool) -> None:
    """Append PixelData (7FE0,0010), OB, padded with NUL to an even length (PS3.5 7.1.1), to a file that
    holds the rest of the dataset (every other element has a lower tag), Little Endian."""
    n = pixels.nbytes if isinstance(pixels, PackedFrames) else len(pixels)
    length = n + n % 2
    fh.write(
        struct.pack("<HHI", 0x7FE0, 0x0010, length)
        if implicit_vr
        else struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length)
    )
    if isinstance(pixels, PackedFrames):
        pixels.write_to(fh)
    else:
        fh.write(pixels)
    if n % 2:
        fh.write(b"\0")


def binary_frames(
    labels_ijk: np.ndarray,
    values: Sequence[int],
    plane_order: np.ndarray,
    omit_empty_frames: bool,
) -> Frames:
    """Frames of a BINARY SEG for a label map, in highdicom's order (segment, then ``plane_order``).

    Args:
        labels_ijk: ``[i, j, k]`` label map (any integer or bool dtype).
        values: the label value of segment ``n`` at ``values[n - 1]``.
        plane_order: slice indices ``k`` in frame order (highdicom's sort along its slice normal).
        omit_empty_frames: leave out frames without a voxel of their segment (as highdicom, all
            frames are kept when the whole map is empty).

    Returns:
        ``(frames, planes, pixel_data)``: per frame ``(segment number, k, plane rank)`` (the rank,
        1-based, is the frame's dimension index value along the planes kept); the ``k`` of the
        planes kept, in rank order; the PixelData value (for :func:`write_pixel_data`): a
        :class:`PackedFrames` when every frame row starts on a byte (columns a multiple of 8), else the
        bytes of the one bit stream the frames then share.

    Raises:
        InputError: the map holds values other than 0 and ``values``.
    """
    ni, nj, _ = labels_ijk.shape
    unsigned = labels_ijk.dtype == bool or np.issubdtype(labels_ijk.dtype, np.unsignedinteger)
    jk = _labelled(labels_ijk, 0, unsigned)  # [j, k]: the one pass over the whole map
    nonempty, rows_used = np.asarray(jk.any(axis=0)), np.flatnonzero(jk.any(axis=1))
    keep_all = not omit_empty_frames or not nonempty.any()
    planes = np.asarray(plane_order if keep_all else [k for k in plane_order if nonempty[k]], dtype=np.intp)
    j0, j1 = (int(rows_used[0]), int(rows_used[-1]) + 1) if len(rows_used) else (0, 0)
    step = int(planes[1] - planes[0]) if len(planes) > 1 else 1
    if len(planes) and abs(step) == 1 and np.array_equal(np.diff(planes), np.full(len(planes) - 1, step)):
        lo = int(planes.min())  # consecutive planes (the usual case): a view, no gather
        box = labels_ijk[:, j0:j1, lo : lo + len(planes)]  # [i, j - j0, k - lo]: rank order, or reversed
        reverse = step < 0  # read forwards all the same (numpy's loops are slow on negative strides)
    else:
        box, reverse = labels_ijk[:, j0:j1][:, :, planes], False  # [i, j - j0, plane rank]
    byte_aligned = ni % 8 == 0  # then every frame row starts on a byte: pack whole bytes only
    frame_ordered = box.strides[0] < box.strides[2]  # [i, j, k] over [k, j, i] memory (read_series' layout)
    plane_bytes = box.shape[0] * box.shape[1] * box.itemsize
    n_pass = _PLANES_PER_FRAME_PASS if frame_ordered else _COLUMN_PASS_BYTES // max(1, plane_bytes)
    n_pass = max(1, min(n_pass, box.shape[2]))
    buffers = _Buffers(box, n_pass, byte_aligned, frame_ordered)
    ranks: list[list[np.ndarray]] = [[] for _ in values]
    kept: list[list[tuple[int, np.ndarray]]] = [[] for _ in values]
    labelled = counted = 0
    for t0 in range(0, box.shape[2], n_pass):
        chunk = box[:, :, t0 : t0 + n_pass]
        # each pass packs only its own columns i0 .. i1; a C-order pass finds them in its contiguous copy
        # (reducing the strided box instead cost more than the copy itself)
        if frame_ordered:
            data = chunk.transpose(2, 1, 0)  # [plane, j, i]
            i0, i1 = _column_range(_labelled(data, (0, 1), unsigned), byte_aligned)
            data = data[:, :, i0:i1]
            per_segment = _from_frames(data, values, byte_aligned, buffers)
        else:
            data = buffers.columns(chunk)  # [i, j, plane], C-contiguous; reduced in 2-D: 0.6 -> 0.2 ms
            i0, i1 = _column_range(_labelled(data.reshape(len(data), -1), 1, unsigned), byte_aligned)
            data = data[i0:i1]  # still contiguous: i is the copy's slowest axis
            per_segment = _from_columns(data, values, byte_aligned, buffers)
        labelled += int(np.count_nonzero(data))
        for s, (found, planes_box, nonempty) in enumerate(per_segment):
            counted += found
            if not found and not keep_all:
                continue
            r = np.arange(len(planes_box)) if keep_all else np.flatnonzero(nonempty)
            ranks[s].append(t0 + r)
            # a copy (the buffers are reused): [plane, j - j0, byte (or i) - i0]; a run of planes, the usual
            # case, copied in the buffer's memory order (PackedFrames.write_to transposes it into its frames)
            run = len(r) and r[-1] - r[0] == len(r) - 1
            part = planes_box[r[0] : r[-1] + 1].copy(order="K") if run else planes_box[r]
            kept[s].append((i0 // 8 if byte_aligned else i0, part))
    if counted != labelled:  # every labelled voxel is in the box
        unknown = np.setdiff1d(np.unique(box), np.asarray([0, *values]))
        raise InputError(f"label values {unknown.tolist()} occur in the label map but have no segment description")
    if reverse:  # box plane q is rank n - 1 - q
        n = box.shape[2]
        ranks = [[(n - 1 - r)[::-1] for r in reversed(seg)] for seg in ranks]
        kept = [[(c0, p[::-1]) for c0, p in reversed(seg)] for seg in kept]
    frames = [(s + 1, int(planes[r]), int(r) + 1) for s in range(len(values)) for part in ranks[s] for r in part]
    parts = [p for seg in kept for p in seg]
    if byte_aligned:
        return frames, planes, PackedFrames(parts, (j0, j1), nj, ni // 8)
    # rows x columns not a multiple of 8: the frames follow one another bit by bit, packed as one stream
    whole = np.zeros((len(frames), nj, ni), bool)
    f0 = 0
    for i0, part in parts:
        whole[f0 : f0 + len(part), j0:j1, i0 : i0 + part.shape[2]] = part
        f0 += len(part)
    return frames, planes, np.packbits(whole.reshape(-1), bitorder="little").tobytes()


def _columns_with_bits(a: np.ndarray) -> np.ndarray:
    """``a.any(axis=0)`` of a C-contiguous 2-D uint8 array with short rows (a pass's planes), OR-reduced
    over rows of a few KiB instead: numpy's reduction over the first axis pays per row (44 x 350 rows of
    70: 0.24 -> 0.03 ms)."""
    rows, n = a.shape
    fold = max(1, min(rows, 8192 // max(1, n)))  # rows of a folded into one row of fold * n bytes
    head = rows // fold * fold
    acc = np.bitwise_or.reduce(a[:head].reshape(rows // fold, fold * n), axis=0)
    acc = np.bitwise_or.reduce(acc.reshape(fold, n), axis=0)
    if head < rows:
        acc |= np.bitwise_or.reduce(a[head:], axis=0)
    return acc != 0


def _column_range(used: np.ndarray, byte_aligned: bool) -> tuple[int, int]:
    """The columns ``i0 .. i1`` that hold the ``used`` ones, widened to whole bytes when frame rows start on one."""
    hit = np.flatnonzero(used)
    i0, i1 = (int(hit[0]), int(hit[-1]) + 1) if len(hit) else (0, 0)
    return (i0 // 8 * 8, -(-i1 // 8) * 8) if byte_aligned else (i0, i1)


def _labelled(a: np.ndarray, axis: int | tuple[int, int], unsigned: bool) -> np.ndarray:
    """Which indices along the axis not in ``axis`` hold a label (``max > 0``: cheaper than ``any``)."""
    return np.asarray(a.max(axis=axis) > 0 if unsigned and a.size else a.any(axis=axis))


class _Buffers:
    """The reused buffers of one :func:`binary_frames` call, flat so that a shorter last pass still
    gets C-contiguous arrays."""

    def __init__(self, box: np.ndarray, n_pass: int, byte_aligned: bool, frame_ordered: bool):
        ni, nj, _ = box.shape
        n = ni * nj * n_pass
        columns = 0 if frame_ordered else n  # the column path's buffers; the frame path needs only its mask
        self.frame_mask = np.empty(n - columns, bool)
        self.copy = np.empty(columns, box.dtype)
        self.column_mask = np.zeros(-(-columns // 64) * 8 if byte_aligned else columns, bool)
        self.packed = np.zeros(len(self.column_mask) if byte_aligned else 0, np.uint8)

    def columns(self, chunk: np.ndarray) -> np.ndarray:
        """``chunk`` ([i, j, plane]) copied C-contiguous: every later pass reads long rows."""
        out = self.copy[: chunk.size].reshape(chunk.shape)
        np.copyto(out, chunk)
        return out


def _from_frames(frames: np.ndarray, values: Sequence[int], byte_aligned: bool, buffers: _Buffers):
    """Per segment ``(voxels, frames [plane, j, byte or i], plane has a voxel)`` of a ``[plane, j, i]``
    view whose rows are contiguous: each frame row packed along its own memory."""
    for value in values:
        mask = np.equal(frames, value, out=buffers.frame_mask[: frames.size].reshape(frames.shape))
        bits = np.packbits(mask, axis=2, bitorder="little") if byte_aligned else mask
        yield int(np.count_nonzero(mask)), bits, bits.reshape(len(bits), -1).any(axis=1)


def _from_columns(columns: np.ndarray, values: Sequence[int], byte_aligned: bool, buffers: _Buffers):
    """Per segment ``(voxels, frames [plane, j, byte or i], plane has a voxel)`` of a C-contiguous
    ``[i, j, plane]`` array: columns ``8c + b`` (b = 0 .. 7) compared as whole ``[c, j, plane]`` slabs
    and packed into byte ``c`` (``byte |= mask << b``), so that only the packed array (an eighth) is
    transposed to frame order."""
    ni, nj, n = columns.shape
    if not byte_aligned:
        for value in values:
            mask = np.equal(columns, value, out=buffers.column_mask[: columns.size].reshape(columns.shape))
            yield int(np.count_nonzero(mask)), mask.transpose(2, 1, 0), mask.reshape(-1, n).any(axis=0)
        return
    width = nj * n
    slabs = columns.reshape(ni // 8, 8, width)
    size = ni // 8 * width
    words = -(-size // 8)  # shift, or and count 8 bytes at a time
    packed, mask = buffers.packed[: 8 * words], buffers.column_mask[: 8 * words]
    packed[size:], mask[size:] = 0, False  # a word's tail may hold a longer pass's bytes; it must count none
    packed_w, mask_w = packed.view(np.uint64), mask.view(np.uint64)
    for value in values:
        np.equal(slabs[:, 0], value, out=packed[:size].view(bool).reshape(ni // 8, width))  # bit 0
        for b in range(1, 8):  # mask bytes are 0 or 1: a shift by b < 8 stays inside its byte
            np.equal(slabs[:, b], value, out=mask[:size].reshape(ni // 8, width))
            np.bitwise_or(packed_w, np.left_shift(mask_w, b, out=mask_w), out=packed_w)
        found = int(np.bitwise_count(packed_w).sum())
        packed_cjp = packed[:size].reshape(ni // 8, nj, n)
        yield found, packed_cjp.transpose(2, 1, 0), _columns_with_bits(packed_cjp.reshape(-1, n))
