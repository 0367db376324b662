"""``binary_frames`` against the plain definition (each segment's mask, frame by frame, packed with
``np.packbits``), for label maps in both memory layouts, with passes small enough that a box is read
in several passes and the last one is short."""

from __future__ import annotations

import io

import numpy as np
import pytest

from app.errors import InputError
from app.io import seg_pixels
from app.io.seg_pixels import PackedFrames, binary_frames


def plain_frames(labels_ijk, values, plane_order, omit_empty_frames):
    """The definition: frames (segment, k, rank) and the PixelData bytes, one frame at a time."""
    keep_all = not omit_empty_frames or not labels_ijk.any()
    planes = [k for k in plane_order if keep_all or labels_ijk[:, :, k].any()]
    frames, bits = [], []
    for s, value in enumerate(values):
        for rank, k in enumerate(planes, start=1):
            mask = labels_ijk[:, :, k].T == value  # [row j, column i]
            if keep_all or mask.any():
                frames.append((s + 1, int(k), rank))
                bits.append(mask.reshape(-1))
    stream = np.concatenate(bits) if bits else np.zeros(0, bool)
    return frames, np.asarray(planes), np.packbits(stream, bitorder="little").tobytes()


def pixel_bytes(pixels) -> bytes:
    if isinstance(pixels, PackedFrames):
        out = io.BytesIO()
        pixels.write_to(out, frames_per_write=3)
        return out.getvalue()
    return pixels


def label_map(rng, shape, layout):
    labels = np.zeros(shape, np.uint8)
    ni, nj, nk = shape
    box = (slice(ni // 4, ni - 3), slice(nj // 3, nj - 2), slice(2, nk - 2))  # a box inside the map
    labels[box] = rng.integers(0, 4, labels[box].shape)
    labels[:, :, nk // 2] = 0  # an empty plane inside the box
    return labels if layout == "columns" else np.asarray(labels, order="F")  # "frames": read_series' layout


@pytest.mark.parametrize("layout", ["columns", "frames"])
@pytest.mark.parametrize("ni", [40, 37])  # 37 columns: frame rows do not start on a byte
@pytest.mark.parametrize("order", ["forward", "reversed", "gather"])
@pytest.mark.parametrize("omit_empty_frames", [True, False])
def test_binary_frames_is_the_plain_definition(monkeypatch, layout, ni, order, omit_empty_frames):
    monkeypatch.setattr(seg_pixels, "_COLUMN_PASS_BYTES", ni * 30 * 3)  # 3 planes per pass: 5 passes, the last short
    monkeypatch.setattr(seg_pixels, "_PLANES_PER_FRAME_PASS", 3)
    rng = np.random.default_rng(ni)
    labels = label_map(rng, (ni, 30, 17), layout)
    plane_order = {
        "forward": np.arange(17),
        "reversed": np.arange(17)[::-1],
        "gather": np.asarray([3, 0, 1, 2, 16, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 14]),  # not a run: a gather
    }[order]
    values = [2, 3, 1, 9]  # 9: described, absent
    frames, planes, pixels = binary_frames(labels, values, plane_order, omit_empty_frames)
    want_frames, want_planes, want_bytes = plain_frames(labels, values, plane_order, omit_empty_frames)
    assert frames == want_frames
    np.testing.assert_array_equal(planes, want_planes)
    assert pixel_bytes(pixels) == want_bytes


@pytest.mark.parametrize("layout", ["columns", "frames"])
def test_binary_frames_empty_map_keeps_every_frame(layout):
    labels = label_map(np.random.default_rng(0), (16, 12, 5), layout) * 0
    frames, planes, pixels = binary_frames(labels, [1, 2], np.arange(5), True)
    assert frames == plain_frames(labels, [1, 2], np.arange(5), True)[0]
    assert len(frames) == 10 and pixel_bytes(pixels) == bytes(10 * 16 * 12 // 8)


@pytest.mark.parametrize("layout", ["columns", "frames"])
def test_binary_frames_refuses_an_undescribed_label(layout):
    labels = label_map(np.random.default_rng(1), (16, 12, 7), layout)
    with pytest.raises(InputError, match=r"label values \[3\]"):
        binary_frames(labels, [1, 2], np.arange(7), True)


@pytest.mark.parametrize("layout", ["columns", "frames"])
def test_binary_frames_passes_of_odd_sizes(monkeypatch, layout):
    """Every voxel labelled, passes of 3, 3 and 1 planes whose packed sizes (54, 54, 18 bytes) are not
    whole 8-byte words: nothing of one pass may leak into the next."""
    monkeypatch.setattr(seg_pixels, "_COLUMN_PASS_BYTES", 16 * 9 * 3)
    monkeypatch.setattr(seg_pixels, "_PLANES_PER_FRAME_PASS", 3)
    labels = np.random.default_rng(5).integers(1, 4, (16, 9, 7)).astype(np.uint8)
    labels = labels if layout == "columns" else np.asarray(labels, order="F")
    frames, _, pixels = binary_frames(labels, [1, 2, 3], np.arange(7), True)
    want_frames, _, want_bytes = plain_frames(labels, [1, 2, 3], np.arange(7), True)
    assert frames == want_frames and pixel_bytes(pixels) == want_bytes


@pytest.mark.parametrize("layout", ["columns", "frames"])
@pytest.mark.parametrize("ni", [40, 37])
def test_binary_frames_passes_of_different_columns(monkeypatch, layout, ni):
    """Each pass packs only its own columns: passes whose labels lie in columns 1-6, then 17-36 (a wider
    part), then 9-14 (a narrower one beside it) and then none; no part's bytes may stay in another's frames."""
    monkeypatch.setattr(seg_pixels, "_COLUMN_PASS_BYTES", ni * 10 * 3)  # 3 planes per pass
    monkeypatch.setattr(seg_pixels, "_PLANES_PER_FRAME_PASS", 3)
    rng = np.random.default_rng(ni + 7)
    labels = np.zeros((ni, 10, 12), np.uint8)
    for planes, columns in ((slice(0, 3), slice(1, 7)), (slice(3, 6), slice(17, 37)), (slice(6, 9), slice(9, 15))):
        labels[columns, 2:9, planes] = rng.integers(0, 3, labels[columns, 2:9, planes].shape)
    labels = labels if layout == "columns" else np.asarray(labels, order="F")
    for omit_empty_frames in (True, False):
        frames, _, pixels = binary_frames(labels, [1, 2], np.arange(12), omit_empty_frames)
        want_frames, _, want_bytes = plain_frames(labels, [1, 2], np.arange(12), omit_empty_frames)
        assert frames == want_frames and pixel_bytes(pixels) == want_bytes


@pytest.mark.parametrize("shape", [(0, 5), (1, 70), (117, 70), (15400, 70), (20001, 3), (9, 8192), (5, 9000)])
def test_columns_with_bits_is_any_over_rows(shape):
    """The folded OR-reduction that finds a pass's non-empty planes, remainders of the fold included."""
    rng = np.random.default_rng(shape[0])
    a = np.zeros(shape, np.uint8)
    if a.size:
        a[rng.integers(0, shape[0], 7), rng.integers(0, shape[1], 7)] = rng.integers(1, 256, 7)
        a[-1, -1] = 4  # a bit in the last row: in the fold's remainder where there is one
    np.testing.assert_array_equal(seg_pixels._columns_with_bits(a), a.any(axis=0))
