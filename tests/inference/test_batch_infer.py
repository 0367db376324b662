"""``segapp infer-batch`` over a folder of phantom MR series (one corrupt, one CT the bundle refuses) and a
NIfTI file, in one and in two worker processes; reruns skip what is done; manifests as input."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import SAMPLE_MANIFEST
from dicom_phantoms import PATIENT_ID, PATIENT_NAME, write_phantom_series
from runs import tiny_run

from app.cli import main
from app.data.manifest import create_manifest
from app.errors import InputError
from app.inference.batch import find_work, infer_batch

BUNDLE = "hippocampus_unet3d"
SAMPLE_IMAGES = SAMPLE_MANIFEST.parent / "imagesTr"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """An untrained tiny network saved as a training-run folder."""
    return tiny_run(tmp_path_factory.mktemp("run"))


def _write_inputs(root: Path) -> dict:
    good = [
        write_phantom_series(root / f"study{n}" / "mr", modality="MR", rescale=(1.0, 0.0), series_number=n + 1)
        for n in range(3)
    ]
    bad = write_phantom_series(root / "study_bad" / "mr", modality="MR", rescale=(1.0, 0.0))
    f = bad.files[5]  # a truncated slice: the series has a hole
    f.write_bytes(f.read_bytes()[:300])
    ct = write_phantom_series(root / "study_ct" / "ct", modality="CT")
    nifti = SAMPLE_IMAGES / sorted(os.listdir(SAMPLE_IMAGES))[0]
    shutil.copy(nifti, root / "extra.nii.gz")
    return {"good": good, "bad": bad, "ct": ct}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("studies")
    return root, _write_inputs(root)


def _rows(out: Path) -> dict[str, dict]:
    res = json.loads((out / "results.json").read_text())
    with open(out / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["key"] for r in table] == [r["key"] for r in res["series"]]
    assert [r["status"] for r in table] == [r["status"] for r in res["series"]]
    return {r["input"]: r for r in res["series"]}


def _check_first_run(out: Path, root: Path, info: dict) -> dict[str, dict]:
    rows = _rows(out)
    assert len(rows) == 6
    for phantom in info["good"]:
        r = rows[str(phantom.folder)]
        assert r["status"] == "ok" and r["error"] == "", r
        assert r["key"].startswith("series_") and r["seconds"] > 0
        seg_nii = next(out / p for p in r["outputs"] if p.endswith("_seg.nii.gz"))
        img = nib.load(seg_nii)
        assert img.shape == phantom.array_ijk.shape
        seg = pydicom.dcmread(next(out / p for p in r["outputs"] if p.endswith("_seg.dcm")))
        assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == phantom.series_uid
        assert (out / r["key"] / "done.json").is_file()
    bad = rows[str(info["bad"].folder)]
    assert bad["status"] == "failed" and "missing slice" in bad["error"] and bad["outputs"] == []
    ct = rows[str(info["ct"].folder)]
    assert ct["status"] == "skipped" and "CT series" in ct["error"] and "series rules" in ct["error"]
    nii = rows[str(root / "extra.nii.gz")]
    assert nii["status"] == "ok" and nii["key"].startswith("nifti_")
    seg_nii = next(out / p for p in nii["outputs"] if p.endswith("_seg.nii.gz"))
    assert nib.load(seg_nii).shape == nib.load(root / "extra.nii.gz").shape
    # No patient data in the tables or in any output name.
    text = (out / "results.csv").read_text() + (out / "results.json").read_text()
    names = " ".join(str(p.relative_to(out)) for p in out.rglob("*"))
    for secret in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID):
        assert secret not in text and secret not in names
    return rows


def test_batch_one_process_failures_isolated_rerun_skips(tmp_path, inputs, run):
    root, info = inputs
    out = tmp_path / "out"
    rc = main(["infer-batch", BUNDLE, "--input", str(root), "--output", str(out), "--run", str(run), "--device", "cpu"])
    assert rc == 1  # one series failed
    first = _check_first_run(out, root, info)
    counts = json.loads((out / "results.json").read_text())["counts"]
    assert counts == {"ok": 4, "failed": 1, "skipped": 1}
    assert {r["worker"] for r in first.values() if "worker" in r} == {os.getpid()}  # nproc 1 runs in-process

    markers = {p: p.stat().st_mtime_ns for p in out.rglob("done.json")}
    res = infer_batch(None, str(root), str(out), run=str(run), device="cpu")
    # the corrupt series is not run again but still counts as failed, with its old error
    assert res["counts"] == {"ok": 0, "failed": 1, "skipped": 5}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("done.json")} == markers  # nothing redone
    again = _rows(out)
    assert again[str(info["good"][0].folder)]["error"] == "already done"
    assert again[str(info["good"][0].folder)]["outputs"] == first[str(info["good"][0].folder)]["outputs"]
    bad = again[str(info["bad"].folder)]
    assert bad["status"] == "failed"
    assert (
        bad["error"] == "failed before (use --retry-failed to run it again): " + first[str(info["bad"].folder)]["error"]
    )

    # --retry-failed runs the corrupt series again (and it fails again, with its error).
    res = infer_batch(None, str(root), str(out), run=str(run), device="cpu", retry_failed=True)
    assert res["counts"] == {"ok": 0, "failed": 1, "skipped": 5}


def test_batch_repaired_series_is_redone(tmp_path, run):
    root = tmp_path / "in"
    info = _write_inputs(root)
    out = tmp_path / "out"
    infer_batch(None, str(root), str(out), run=str(run), device="cpu")
    shutil.rmtree(info["bad"].folder)  # the site re-exports the series, complete this time
    fixed = write_phantom_series(
        info["bad"].folder,
        modality="MR",
        rescale=(1.0, 0.0),
        series_uid=info["bad"].series_uid,
        study_uid=info["bad"].study_uid,
    )
    res = infer_batch(None, str(root), str(out), run=str(run), device="cpu")
    rows = {r["input"]: r for r in res["series"]}
    assert res["counts"] == {"ok": 1, "failed": 0, "skipped": 5}
    assert rows[str(fixed.folder)]["status"] == "ok"


@pytest.mark.slow
def test_batch_two_processes_same_results(tmp_path, inputs, run):
    root, info = inputs
    one, two = tmp_path / "one", tmp_path / "two"
    infer_batch(None, str(root), str(one), run=str(run), device="cpu")
    res = infer_batch(None, str(root), str(two), nproc=2, run=str(run), device="cpu")
    assert res["nproc"] == 2 and res["counts"] == {"ok": 4, "failed": 1, "skipped": 1}
    rows1, rows2 = _check_first_run(one, root, info), _check_first_run(two, root, info)
    assert {r["worker"] for r in rows2.values() if "worker" in r} - {os.getpid()}  # ran in worker processes
    for key, r in rows1.items():
        assert rows2[key]["status"] == r["status"] and rows2[key]["outputs"] == r["outputs"]
        for rel in r["outputs"]:
            if rel.endswith(".nii.gz"):
                np.testing.assert_array_equal(nib.load(one / rel).get_fdata(), nib.load(two / rel).get_fdata())


def test_batch_bad_checkpoint_in_workers_is_one_clear_error(tmp_path, inputs, capsys):
    root, _ = inputs
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = main(
        [
            "infer-batch",
            BUNDLE,
            "--input",
            str(root),
            "--output",
            str(tmp_path / "out"),
            "--checkpoint",
            str(bad),
            "--device",
            "cpu",
            "--nproc",
            "2",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and str(bad) in err
    rc = main(
        [
            "infer-batch",
            BUNDLE,
            "--input",
            str(tmp_path / "nowhere"),
            "--output",
            str(tmp_path / "o2"),
            "--checkpoint",
            str(bad),
        ]
    )
    assert rc == 2 and "input not found" in capsys.readouterr().err


def test_manifest_input_lists_its_images(tmp_path, run):
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    for name in sorted(os.listdir(SAMPLE_IMAGES))[:2]:
        shutil.copy(SAMPLE_IMAGES / name, data / "imagesTr" / name)
        shutil.copy(SAMPLE_MANIFEST.parent / "labelsTr" / name, data / "labelsTr" / name)
    manifest = tmp_path / "manifest.json"
    create_manifest(data, labels={0: "background", 1: "anterior", 2: "posterior"}, num_folds=2, output=manifest)
    items = find_work(manifest)
    assert [i.kind for i in items] == ["nifti", "nifti"]
    assert sorted(i.input for i in items) == sorted(
        str((data / "imagesTr" / n).resolve()) for n in os.listdir(data / "imagesTr")
    )
    res = infer_batch(None, str(manifest), str(tmp_path / "out"), run=str(run), device="cpu")
    assert res["counts"] == {"ok": 2, "failed": 0, "skipped": 0}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="nothing to segment"):
        find_work(tmp_path / "empty")
