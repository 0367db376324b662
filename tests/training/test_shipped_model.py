"""The trained model segapp ships (``hippocampus_unet3d_small``): small, a five-fold ensemble with
mirroring, and it segments a real MR DICOM series with no training and no data beside it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import REPO, TEST_DATA

from app.bundle.config import bundle_parser
from app.cli import main

BUNDLE = REPO / "bundles" / "hippocampus_unet3d_small"
SERIES = sorted((TEST_DATA / "mr_dicom_series").glob("Study*/*"))


def test_the_weights_are_a_few_megabytes_and_fit_the_five_fold_ensemble():
    weights = BUNDLE / "models" / "model.pt"
    assert weights.stat().st_size < 4 * 2**20
    net = bundle_parser(BUNDLE, ["inference"], {"device_name": "cpu"}).get_parsed_content("network_def")
    state = torch.load(weights, weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.float16}  # stored half, loaded into float32
    net.load_state_dict(state)  # strict: every fold's every weight
    assert len(net.members) == 5 and net.mirror_axes == [0]
    summary = json.loads((BUNDLE / "docs" / "cv_summary.json").read_text())
    assert summary["num_cases"] == 208 and summary["folds"] == [0, 1, 2, 3, 4]
    assert summary["pooled"]["dice"]["anterior"]["mean"] > 0.8 and summary["pooled"]["dice"]["posterior"]["mean"] > 0.8


@pytest.mark.slow
@pytest.mark.parametrize("series", SERIES, ids=[s.parent.name for s in SERIES])
def test_infer_segments_a_real_mr_series_out_of_the_box(series, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        ["infer", "hippocampus_unet3d_small", "--input", str(series), "--output", str(out), "--device", "cpu",
         "--format", "nifti,seg"]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "5-fold ensemble, mirroring TTA (2 flips): 10 forward pass(es) per window" in printed
    (nifti,) = sorted(out.glob("*.nii.gz"))
    img = nib.load(nifti)
    labels = np.asarray(img.dataobj)
    first = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
    grid = [int(first.Rows), int(first.Columns), len(list(series.glob("*.dcm")))]
    assert sorted(labels.shape) == sorted(grid)  # the series' own grid
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
    volumes = [float((labels == v).sum()) * voxel_ml for v in (1, 2)]
    # a hippocampus head and body/tail: each about 1-3 mL in MSD Task04; nothing else labelled
    assert all(0.3 < v < 6.0 for v in volumes), volumes
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    assert list(out.glob("*.dcm"))  # and a DICOM SEG beside it
