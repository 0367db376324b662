"""``segapp demo``: trains on fold 0 of the sample data with a local MLflow store, evaluates, segments a
NIfTI image and the sample MR DICOM series (NIfTI, DICOM SEG, RTSTRUCT, PNG overlays) and prints the
validation Dice and every path. One epoch here; the README's headline paragraph."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import SAMPLE_MANIFEST

from app.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _printed_path(printed: str, label: str) -> Path:
    match = re.search(rf"^{re.escape(label)}\s*(\S+)", printed, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{printed}"
    return Path(match.group(1))


@pytest.mark.slow
def test_demo_trains_evaluates_segments_and_prints_every_path(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for step in ("[1/4] training", "[2/4] evaluating", "[3/4] segmenting a NIfTI", "[4/4] segmenting the sample MR"):
        assert step in printed

    # validation Dice per label (fold 0) and the HD95 line
    match = re.search(r"^validation \(fold 0\): (.+)$", printed, re.MULTILINE)
    assert match, printed
    pairs = dict(zip(match.group(1).split()[::2], map(float, match.group(1).split()[1::2])))
    assert {k for k in pairs if "anterior" in k} and {k for k in pairs if "posterior" in k}, pairs
    assert all("dice" in k and 0.0 <= v <= 1.0 for k, v in pairs.items()), pairs
    assert re.search(r"^validation HD95 \(mm\):\s+\S*hd95\S* ", printed, re.MULTILINE), printed

    # the run: model, metrics, the local MLflow store (inside the output folder, with the run in it)
    run = out / "train"
    assert _printed_path(printed, "model:") == run / "models" / "model.pt" and (run / "models" / "model.pt").is_file()
    assert _printed_path(printed, "metrics:") == run / "metrics.json"
    assert json.loads((run / "metrics.json").read_text())["last"]["epoch"] == 1
    uri = re.search(r"^MLflow run:\s+(\S+) in (\S+)$", printed, re.MULTILINE)
    assert uri, printed
    run_name, tracking_uri = uri.groups()
    assert tracking_uri.startswith("sqlite:///") and Path(tracking_uri[len("sqlite:///") :]).is_relative_to(out)
    store = Path(tracking_uri[len("sqlite:///") :])
    assert store.is_file() and store.stat().st_size > 0
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(tracking_uri=tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=tracking_uri).search_experiments()]
    )
    assert run_name in {r.info.run_name for r in runs}

    # the NIfTI input: a label map on the input's grid, and a PNG overlay
    seg = _printed_path(printed, "NIfTI output:")
    assert seg.parent == out / "infer_nifti" and seg.name.endswith("_seg.nii.gz") and seg.is_file()
    first = json.loads(SAMPLE_MANIFEST.read_text())["cases"][0]["image"]
    src = nib.load(SAMPLE_MANIFEST.parent / first)
    labels = nib.load(seg)
    assert labels.shape == src.shape and np.allclose(labels.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(labels.dataobj)).tolist()) <= {0, 1, 2}
    (overlay,) = (out / "infer_nifti").glob("*_overlay.png")
    assert overlay.read_bytes()[:8] == PNG_MAGIC

    # the DICOM series: NIfTI, DICOM SEG, RTSTRUCT and a PNG overlay, each printed
    dicom = {kind: _printed_path(printed, f"DICOM {kind}:") for kind in ("nifti", "seg", "rtstruct", "overlay")}
    assert all(p.parent == out / "infer_dicom" and p.is_file() for p in dicom.values()), dicom
    assert dicom["nifti"].name.endswith(".nii.gz") and nib.load(dicom["nifti"]).ndim == 3
    assert pydicom.dcmread(dicom["seg"]).Modality == "SEG"
    assert pydicom.dcmread(dicom["rtstruct"]).Modality == "RTSTRUCT"
    assert dicom["overlay"].read_bytes()[:8] == PNG_MAGIC
    assert re.search(r"^done in \d+ s$", printed, re.MULTILINE)
