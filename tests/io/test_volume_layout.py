"""``frame_stack``: an ``[i, j, k]`` array as DICOM's ``[frame, row, column]`` stack, whatever its
layout; voxel->LPS and voxel->RAS affines of one grid."""

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


def test_ras_and_lps_affines_name_the_same_points():
    """An oblique voxel->LPS affine and its RAS twin put every voxel at the same physical point, x and y
    negated; ``ras_to_lps`` undoes ``lps_to_ras``."""
    from app.io.geometry import lps_to_ras, ras_to_lps, voxel_to_world

    affine_lps = np.array([[0.0, 0.8, 0.3, -120.0], [0.9, 0.0, 0.1, 40.0], [0.1, -0.2, 2.5, 7.5], [0, 0, 0, 1.0]])
    ijk = np.array([[0, 0, 0], [3, 7, 2], [10, 1, 5]], dtype=float)
    lps, ras = voxel_to_world(affine_lps, ijk), voxel_to_world(lps_to_ras(affine_lps), ijk)
    np.testing.assert_allclose(ras, lps * [-1, -1, 1])
    np.testing.assert_allclose(ras_to_lps(lps_to_ras(affine_lps)), affine_lps)
