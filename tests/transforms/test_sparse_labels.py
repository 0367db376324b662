"""Sparse labels simulated from dense ones (orthogonal planes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE_HIPPOCAMPUS
from monai.data import MetaTensor

from app.transforms.sparse_labels import (
    SparseSlicesd,
    case_seed,
    choose_planes,
    labelled_fraction,
    sparsify_slices,
)

IGN = 255


def _label():
    lab = np.zeros((30, 40, 20), np.uint8)
    lab[10:20, 5:30, 5:15] = 1
    lab[12:15, 10:14, 8:11] = 2
    return lab


@pytest.mark.parametrize("k", [1, 2, 3])
def test_planes_fraction_kept_values_and_foreground(k):
    lab = _label()
    sparse = sparsify_slices(lab, slices_per_axis=k, ignore_value=IGN, rng=k)
    planes = choose_planes(lab, k, rng=k)
    ni, nj, nk = lab.shape
    # inclusion-exclusion over the three families of k planes
    expected = (k * nj * nk + k * ni * nk + k * ni * nj - k * k * (ni + nj + nk) + k**3) / (ni * nj * nk)
    frac = labelled_fraction(sparse, IGN)
    assert frac.voxels == pytest.approx(expected)
    assert frac.slices == pytest.approx((k / ni, k / nj, k / nk))
    kept = sparse != IGN
    assert np.array_equal(sparse[kept], lab[kept])
    assert set(np.unique(sparse)) <= {0, 1, 2, IGN}
    for ax, idx in planes.items():
        assert len(idx) == k
        for i in idx:  # every plane passes through foreground and is fully labelled
            assert np.take(lab, i, axis=ax).any()
            assert np.all(np.take(sparse, i, axis=ax) != IGN)


def test_planes_spread_over_the_object():
    lab = _label()
    planes = choose_planes(lab, 3, axes=(1,), rng=0)[1]  # foreground spans j = 5..29
    # one plane in each third of the extent [5, 30)
    assert 5 <= planes[0] < 5 + 25 / 3 <= planes[1] < 5 + 50 / 3 <= planes[2] < 30


def test_planes_deterministic_and_fallbacks():
    lab = _label()
    a = sparsify_slices(lab, (1, 2, 1), rng=7)
    b = sparsify_slices(lab, (1, 2, 1), rng=np.random.default_rng(7))
    assert np.array_equal(a, b)
    # fewer foreground planes than asked: all of them plus others
    p = choose_planes(lab, 12, axes=(0,), rng=0)[0]  # foreground planes i = 10..19 (10 of them)
    assert len(p) == 12 and set(range(10, 20)) <= set(p)
    # no foreground at all: spread over the axis
    empty = np.zeros((10, 10, 10), np.uint8)
    assert len(choose_planes(empty, 2, rng=0)[2]) == 2
    # existing ignore in the dense label stays ignored
    lab2 = lab.copy()
    lab2[:, :, 0] = IGN
    assert np.all(sparsify_slices(lab2, 3, rng=0)[:, :, 0] == IGN)


def test_output_dtype_can_hold_ignore_value():
    lab = _label().astype(np.int8)
    out = sparsify_slices(lab, 1, rng=0, ignore_value=IGN)
    assert (out == IGN).any() and out.dtype.itemsize >= 1 and np.iinfo(out.dtype).max >= IGN


def test_case_seed_is_stable_and_uses_the_base_name():
    assert case_seed("/data/a/case_001.nii.gz") == case_seed("/other/case_001.nii.gz")
    assert case_seed("case_001.nii.gz") != case_seed("case_002.nii.gz")
    assert case_seed("case_001.nii.gz", 1) != case_seed("case_001.nii.gz", 0)
    assert 0 <= case_seed("case_001.nii.gz") < 2**32


def test_dictionary_transforms_are_per_case_deterministic():
    lab = _label()
    mt1 = MetaTensor(torch.as_tensor(lab[None]).float(), meta={"filename_or_obj": "/d/case_001_label.nii.gz"})
    mt2 = MetaTensor(torch.as_tensor(lab[None]).float(), meta={"filename_or_obj": "/d/case_002_label.nii.gz"})
    t = SparseSlicesd(keys="label", slices_per_axis=1, ignore_value=IGN)
    a, b = t({"label": mt1})["label"], t({"label": mt1})["label"]
    c = t({"label": mt2})["label"]
    assert isinstance(a, MetaTensor) and a.dtype == torch.float32 and a.shape == mt1.shape
    assert torch.equal(a, b)  # the same planes in every epoch
    assert not torch.equal(a, c)  # another case, other planes
    kept = a != IGN
    assert torch.equal(a[kept], mt1[kept])
    # numpy labels without a file name: seeded from the label's content
    d = t({"label": lab[None]})
    assert isinstance(d["label"], np.ndarray) and np.array_equal(d["label"], t({"label": lab[None]})["label"])
    # an explicit case key (base name only)
    t_key = SparseSlicesd(slices_per_axis=1, case_key="id")
    assert not np.array_equal(
        t_key({"label": lab[None], "id": "x1"})["label"], t_key({"label": lab[None], "id": "x2"})["label"]
    )
    assert np.array_equal(
        t_key({"label": lab[None], "id": "x1"})["label"], t_key({"label": lab[None], "id": "/elsewhere/x1"})["label"]
    )
    # seed=None: a fresh draw from the transform's own random state
    r = SparseSlicesd(slices_per_axis=1, seed=None)
    r.set_random_state(0)
    first = r({"label": lab[None]})["label"]
    r.set_random_state(0)
    assert np.array_equal(first, r({"label": lab[None]})["label"])


DATA = SAMPLE_HIPPOCAMPUS / "labelsTr"


def test_real_hippocampus_labels():
    import nibabel as nib

    files = sorted(DATA.glob("hippocampus_*.nii.gz"))[:3]
    assert files, f"no labels under {DATA}"
    for f in files:
        lab = np.asarray(nib.load(f).dataobj).astype(np.uint8)
        sparse = sparsify_slices(lab, 2, ignore_value=IGN, rng=case_seed(f.name))
        kept = sparse != IGN
        assert np.array_equal(sparse[kept], lab[kept])
        ni, nj, nk = lab.shape
        expected = (2 * (nj * nk + ni * nk + ni * nj) - 4 * (ni + nj + nk) + 8) / lab.size
        assert labelled_fraction(sparse, IGN).voxels == pytest.approx(expected)
        for ax, idx in choose_planes(lab, 2, rng=case_seed(f.name)).items():
            assert all(np.take(lab, i, axis=ax).any() for i in idx)
