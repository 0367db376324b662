"""Per-label Dice and HD95: HD95 in mm from the reference's affine, in voxels without one."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from app.evaluation.metrics import SegmentationMetrics, voxel_size_mm

LABELS = {"0": "background", "1": "a", "2": "b"}


def _onehot_pair() -> tuple[torch.Tensor, torch.Tensor]:
    ref = torch.zeros(3, 20, 20, 20)
    ref[0] = 1
    for c, sl in ((1, slice(5, 10)), (2, slice(12, 15))):
        ref[0, sl, sl, sl], ref[c, sl, sl, sl] = 0, 1
    pred = ref.clone()
    pred[0, 10, 5:10, 5:10], pred[1, 10, 5:10, 5:10] = 0, 1  # label a: one extra plane along axis 0
    return pred, ref


def test_hd95_is_in_mm_along_the_axis_of_the_error():
    pred, ref = _onehot_pair()
    for voxel_mm, expected in (((2.0, 1.0, 3.0), 2.0), ((0.5, 1.0, 3.0), 0.5)):
        affine = torch.diag(torch.tensor([*voxel_mm, 1.0]))
        m = SegmentationMetrics(LABELS)
        m.update(([MetaTensor(pred, affine=affine)], [MetaTensor(ref, affine=affine)]))
        res = m.compute()
        assert res["val_hd95_a"] == pytest.approx(expected)
        assert res["val_hd95_b"] == 0.0
        assert res["val_dice_a"] == pytest.approx(2 * 125 / (150 + 125))


def test_hd95_in_voxels_without_an_affine_and_spacing_of_batches():
    pred, ref = _onehot_pair()
    m = SegmentationMetrics(LABELS)
    m.update((pred[None], ref[None]))
    assert m.compute()["val_hd95_a"] == pytest.approx(1.0)
    # an oblique (rotated) 2 x 1 x 3 mm grid still has 2, 1, 3 mm voxels
    c, s = 0.6, 0.8
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = rot @ torch.diag(torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64))
    batch = MetaTensor(torch.stack([ref, ref]), affine=affine)
    assert voxel_size_mm(batch) == [pytest.approx([2.0, 1.0, 3.0])] * 2
