"""``frame_stack``: an ``[i, j, k]`` array as DICOM's ``[frame, row, column]`` stack, whatever its layout."""

from __future__ import annotations

import numpy as np
import pytest

from app.io.volume import frame_stack


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 2), (37, 21, 17), (64, 8, 33)])
@pytest.mark.parametrize("layout", ["c", "f", "view"])
def test_frame_stack_is_the_transposed_array(shape, layout):
    rng = np.random.default_rng(sum(shape))
    a = rng.integers(0, 200, size=shape, dtype=np.uint16)
    if layout == "f":
        a = np.asfortranarray(a)
    elif layout == "view":  # a strided window of a bigger map, as the SEG writer crops it
        big = rng.integers(0, 200, size=(shape[0] + 3, shape[1] + 2, shape[2] + 4), dtype=np.uint16)
        a = big[1 : 1 + shape[0], 2 : 2 + shape[1], 3 : 3 + shape[2]]
    out = frame_stack(a)
    assert out.flags.c_contiguous and out.dtype == a.dtype
    np.testing.assert_array_equal(out, a.transpose(2, 1, 0))


def test_frame_stack_of_frame_ordered_memory_is_a_view():
    kji = np.arange(4 * 3 * 2, dtype=np.uint8).reshape(4, 3, 2)
    assert np.shares_memory(frame_stack(kji.transpose(2, 1, 0)), kji)
