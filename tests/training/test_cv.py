"""Cross-validation (``segapp train --fold all``): five folds, the summary files, MLflow parent and
children, post-processing learned on the CV labels, and the CV folder as an ensemble bundle."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_HIPPOCAMPUS, TINY
from mlflow.tracking import MlflowClient

from app.bundle.model import load_model
from app.cli import main
from app.data.manifest import create_manifest
from app.inference.predictor import BundlePredictor
from app.networks.ensemble import FoldEnsemble
from app.training.cv import learn_postprocessing, write_ensemble_bundle

LABELS = {0: "background", 1: "anterior", 2: "posterior"}


def _blob(shape, center, r) -> np.ndarray:
    idx = np.indices(shape)
    return sum((i - c) ** 2 for i, c in zip(idx, center)) <= r * r


def test_largest_component_is_adopted_only_where_the_cv_labels_say_it_helps():
    shape = (24, 24, 24)
    big, small = _blob(shape, (8, 8, 8), 5), _blob(shape, (19, 19, 19), 2)
    pred = np.zeros(shape, np.int16)
    pred[big], pred[small] = 1, 1
    pred[_blob(shape, (8, 18, 8), 3)] = 2  # one posterior component in both: nothing to gain or lose
    one = np.where(small, 0, pred)  # the reference has only the big component: the small one is spurious
    both = pred.copy()  # the reference has both: keeping the largest loses the small one
    helps = learn_postprocessing([pred, pred], [one, one], LABELS)
    hurts = learn_postprocessing([pred, pred], [both, both], LABELS)
    assert helps["largest_component"] == [1] and helps["per_label"]["anterior"]["adopted"]
    a = helps["per_label"]["anterior"]
    assert a["dice_after"] == pytest.approx(1.0) and a["dice_before"] < 1.0
    assert hurts["largest_component"] == [] and not hurts["per_label"]["anterior"]["adopted"]
    assert hurts["per_label"]["anterior"]["dice_after"] < hurts["per_label"]["anterior"]["dice_before"] == 1.0
    for res in (helps, hurts):  # equal is not better
        assert not res["per_label"]["posterior"]["adopted"]
    assert "anterior" in helps["description"] and "none" in hurts["description"]


def _small_manifest(tmp_path: Path, n: int = 10) -> Path:
    root = tmp_path / "data"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for img in sorted((SAMPLE_HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))[:n]:
        shutil.copy2(img, root / "imagesTr" / img.name)
        shutil.copy2(SAMPLE_HIPPOCAMPUS / "labelsTr" / img.name, root / "labelsTr" / img.name)
    out = tmp_path / "m.json"
    create_manifest(root, labels=LABELS, output=out, num_folds=5)
    return out


@pytest.mark.slow
def test_five_folds_summary_files_mlflow_parent_and_children_and_the_ensemble_bundle(tmp_path, capsys):
    manifest = _small_manifest(tmp_path)
    cv = tmp_path / "cv"
    overrides = {k: v for k, v in TINY.items() if not k.startswith(("train#", "validate#"))}
    rc = main(
        ["train", "hippocampus_unet3d", "--manifest", str(manifest), "--fold", "all", "--epochs", "1",
         "--device", "cpu", "--config", "demo.json", "--out", str(cv), "--override", json.dumps(overrides),
         "--nproc", "2"]  # two folds at a time, each in its own process
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "CV dice anterior" in printed and "postprocessing:" in printed
    summary = json.loads((cv / "cv_summary.json").read_text())
    assert summary["folds"] == [0, 1, 2, 3, 4] and summary["num_cases"] == 10
    assert sorted(summary["per_fold"]) == ["0", "1", "2", "3", "4"]
    for block in [summary["pooled"], *summary["per_fold"].values()]:
        for metric in ("dice", "hd95_mm", "surface_dice", "volume_error_ml"):
            assert set(block[metric]) == {"anterior", "posterior", "mean"}
            assert set(block[metric]["anterior"]) == {"mean", "sd", "n"}
    assert summary["pooled"]["volume_error_ml"]["anterior"]["n"] == 10  # every case has a volume error
    assert sum(f["volume_error_ml"]["anterior"]["n"] for f in summary["per_fold"].values()) == 10
    with open(cv / "cv_cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10 * 2 and {r["label"] for r in rows} == {"anterior", "posterior"}
    assert set(rows[0]) == {"fold", "case", "label", "dice", "hd95_mm", "surface_dice", "volume_ref_ml",
                            "volume_pred_ml", "volume_error_ml"}  # fmt: skip
    assert len({r["case"] for r in rows}) == 10
    for r in rows:
        assert float(r["volume_error_ml"]) == pytest.approx(
            float(r["volume_pred_ml"]) - float(r["volume_ref_ml"]), abs=1e-3
        )
    # MLflow: one parent run, five children
    parent = json.loads((cv / "mlflow_parent_run.json").read_text())
    client = MlflowClient(parent["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("segapp").experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent["run_id"]]
    assert len(runs) == 6 and len(children) == 5
    assert sorted(r.data.params["fold"] for r in children) == ["0", "1", "2", "3", "4"]
    top = client.get_run(parent["run_id"])
    assert top.info.status == "FINISHED" and "cv_dice_anterior" in top.data.metrics
    assert {"cv_summary.json", "cv_cases.csv"} <= {a.path for a in client.list_artifacts(parent["run_id"])}
    # the CV folder is a bundle: the five folds' weights in one ensemble network
    model = load_model(run=cv, device="cpu")
    assert isinstance(model.network, FoldEnsemble) and len(model.network.members) == 5
    fold2 = torch.load(cv / "fold_2" / "models" / "model.pt", weights_only=True)
    for key, value in fold2.items():
        assert torch.equal(model.network.members[2].state_dict()[key], value)
    out = tmp_path / "seg"
    sample = sorted((manifest.parent / "data" / "imagesTr").glob("*.nii.gz"))[0]
    assert main(["infer", "--run", str(cv), "--input", str(sample), "--output", str(out), "--device", "cpu"]) == 0
    assert "5-fold ensemble, no mirroring: 5 forward pass(es)" in capsys.readouterr().out
    assert (out / sample.name.replace(".nii.gz", "_seg.nii.gz")).is_file()
    args = ["infer", "--run", str(cv), "--input", str(sample), "--output", str(tmp_path / "tta"), "--device", "cpu"]
    assert main([*args, "--tta", "mirror"]) == 0
    assert "5-fold ensemble, mirroring TTA (8 flips): 40 forward pass(es)" in capsys.readouterr().out
    # the learned post-processing reaches segapp's predictor as a label step on the source grid
    write_ensemble_bundle(cv, [cv / f"fold_{k}" for k in range(5)], mirror_axes=[0], largest_component=[1, 2])
    model = load_model(run=cv, device="cpu")
    steps = BundlePredictor.from_model(model).post.label_steps
    assert [type(s).__name__ for s in steps] == ["KeepLargestConnectedComponentd"]
    assert model.network.passes == 10  # 5 folds x 2 mirrorings


def test_register_is_refused_for_a_cross_validation_run(tmp_path, capsys):
    rc = main(["train", "hippocampus_unet3d", "--fold", "all", "--register", "m", "--out", str(tmp_path / "cv")])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "segapp: error: --register: registers one model; a cross-validation run has one per fold"
    )
    assert not (tmp_path / "cv").exists()
