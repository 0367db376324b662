"""Training, resume, MLflow tracking, evaluation and NIfTI inference through the real CLI paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SAMPLE_MANIFEST, TINY
from mlflow.tracking import MlflowClient

from app.cli import main
from app.training.tracking import MLflowTracker, file_sha256
from app.training.train import train

BUNDLE = "hippocampus_unet3d"


def _weights(path: Path) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return obj.get("network", obj)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    epochs = 4
    full = train(
        BUNDLE,
        str(SAMPLE_MANIFEST),
        epochs=epochs,
        device="cpu",
        output_dir=str(tmp_path / "full"),
        extra_configs=["demo.json"],
        overrides=TINY,
        seed=7,
    )

    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "app.cli",
        "train",
        BUNDLE,
        "--manifest",
        str(SAMPLE_MANIFEST),
        "--epochs",
        str(epochs),
        "--device",
        "cpu",
        "--out",
        str(killed),
        "--seed",
        "7",
        "--config",
        "demo.json",
        "--override",
        json.dumps(TINY),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "SEGAPP_NO_PROGRESS": "1"},
    )
    metrics_file = killed / "metrics.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.is_file() and len(json.loads(metrics_file.read_text())["history"]) >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = json.loads(metrics_file.read_text())["history"]
    assert 1 <= len(done_before) < epochs
    run_before = json.loads((killed / "mlflow_run.json").read_text())["run_id"]
    assert not (killed / "models" / "model.pt").exists()  # no final model from a killed run

    resumed = train(
        BUNDLE,
        str(SAMPLE_MANIFEST),
        epochs=epochs,
        device="cpu",
        output_dir=str(killed),
        extra_configs=["demo.json"],
        overrides=TINY,
        seed=7,
        resume=True,
    )
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, epochs + 1))
    for key, value in full["final"].items():
        assert resumed["final"][key] == pytest.approx(value, abs=1e-6), key
    wf, wr = _weights(tmp_path / "full" / "models" / "model.pt"), _weights(killed / "models" / "model.pt")
    for name in wf:
        assert torch.allclose(wf[name], wr[name], atol=1e-6), name
    assert resumed["mlflow"]["run_id"] == run_before  # the same MLflow run continues
    client = MlflowClient(resumed["mlflow"]["tracking_uri"])
    steps = [m.step for m in client.get_metric_history(run_before, "train_loss")]
    assert sorted(set(steps)) == list(range(1, epochs + 1))


@pytest.mark.slow
def test_mlflow_server_records_params_metrics_artifacts(tmp_path, mlflow_server):
    rc = main(
        [
            "train",
            BUNDLE,
            "--manifest",
            str(SAMPLE_MANIFEST),
            "--epochs",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "run"),
            "--tracking-uri",
            mlflow_server,
            "--config",
            "demo.json",
            "--override",
            json.dumps(TINY),
        ]
    )
    assert rc == 0
    info = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())
    assert info["tracking_uri"] == mlflow_server
    client = MlflowClient(mlflow_server)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("hippocampus_unet3d-fold0-")
    p = run.data.params
    assert p["bundle"] == BUNDLE and p["bundle_version"] == "0.1.0" and p["fold"] == "0"
    assert p["manifest_sha256"] == file_sha256(SAMPLE_MANIFEST)
    assert json.loads(p["network_features"]) == [4, 8] and p["epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    dice = client.get_metric_history(run.info.run_id, "val_mean_dice")
    assert len(dice) == 2 and all(0.0 <= m.value <= 1.0 for m in dice)
    assert "val_dice_anterior" in run.data.metrics and "val_hd95_posterior" in run.data.metrics
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"executed_config.json", "metadata.json", "metrics.json", "models"} <= top
    models = {a.path for a in client.list_artifacts(run.info.run_id, "models")}
    assert "models/model.pt" in models
    executed = json.loads(
        Path(client.download_artifacts(run.info.run_id, "executed_config.json", str(tmp_path))).read_text()
    )
    assert executed["features"] == [4, 8] and executed["network_def"]["features"] == "@features"
    # a second run gets its own MLflow run (never logs into the first one)
    rc = main(
        [
            "train",
            BUNDLE,
            "--manifest",
            str(SAMPLE_MANIFEST),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "run2"),
            "--tracking-uri",
            mlflow_server,
            "--config",
            "demo.json",
            "--override",
            json.dumps(TINY),
        ]
    )
    assert rc == 0
    assert json.loads((tmp_path / "run2" / "mlflow_run.json").read_text())["run_id"] != info["run_id"]


def _lps_permuted_copy(src: Path, dst: Path) -> None:
    """Store the same physical image with flipped i, j and permuted axes (an LPS-like, non-axial layout)."""
    img = nib.load(str(src))
    data = np.asarray(img.dataobj)
    a = img.affine
    n, m, _ = data.shape
    flip = np.array([[-1, 0, 0, n - 1], [0, -1, 0, m - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    perm = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)  # new (a,b,c) -> old (b,c,a)
    new = data[::-1, ::-1, :].transpose(2, 0, 1)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(new), a @ flip @ perm), str(dst))


def _threshold_bundle_args(tmp_path: Path) -> list[str]:
    from nets_for_tests import ThresholdNet

    ckpt = tmp_path / "threshold.pt"
    torch.save(ThresholdNet().state_dict(), ckpt)
    return [
        "--checkpoint",
        str(ckpt),
        "--device",
        "cpu",
        "--override",
        json.dumps({"network_def": {"_target_": "nets_for_tests.ThresholdNet"}, "patch_size": [32, 32, 32]}),
    ]


def test_infer_nifti_lps_keeps_input_grid_and_voxels(tmp_path):
    case = json.loads(SAMPLE_MANIFEST.read_text())["cases"][0]["image"]
    src = SAMPLE_MANIFEST.parent / case
    lps = tmp_path / "in" / "case_lps.nii.gz"
    lps.parent.mkdir()
    _lps_permuted_copy(src, lps)
    assert nib.aff2axcodes(nib.load(str(lps)).affine) != ("R", "A", "S")

    assert (
        main(
            [
                "infer",
                BUNDLE,
                "--input",
                str(lps.parent),
                "--output",
                str(tmp_path / "out"),
                "--format",
                "nifti,overlay",
                *_threshold_bundle_args(tmp_path),
            ]
        )
        == 0
    )
    out = nib.load(str(tmp_path / "out" / "case_lps_seg.nii.gz"))
    inp = nib.load(str(lps))
    assert out.shape == inp.shape
    np.testing.assert_array_equal(out.affine, inp.affine)
    assert (tmp_path / "out" / "case_lps_overlay.png").stat().st_size > 1000
    # ThresholdNet labels voxels above the foreground mean (z-score > 0): exact, no flip, no shift
    x = np.asarray(inp.dataobj, dtype=np.float64)
    fg = x != 0
    expected = (fg & (x > x[fg].mean())).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)


def test_cli_errors_are_one_line_and_leave_no_output(tmp_path, capsys):
    out = tmp_path / "out"
    # a bundle without a checkpoint
    assert main(["infer", BUNDLE, "--input", str(SAMPLE_MANIFEST.parent / "imagesTr"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "models/model.pt" in err and "ships no trained weights" in err
    # a missing input
    assert (
        main(
            ["infer", BUNDLE, "--input", str(tmp_path / "nope"), "--output", str(out)]
            + _threshold_bundle_args(tmp_path)
        )
        == 2
    )
    assert "nope: input not found" in capsys.readouterr().err
    # a device that does not exist here
    assert (
        main(
            [
                "train",
                BUNDLE,
                "--device",
                "cuda:7" if torch.cuda.is_available() else "cuda",
                "--epochs",
                "1",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "--device" in capsys.readouterr().err
    # a corrupt checkpoint
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert (
        main(
            [
                "infer",
                BUNDLE,
                "--input",
                str(SAMPLE_MANIFEST.parent / "imagesTr"),
                "--output",
                str(out),
                "--checkpoint",
                str(bad),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "bad.pt: cannot read checkpoint" in capsys.readouterr().err
    # a manifest that does not match its data
    broken = json.loads(SAMPLE_MANIFEST.read_text())
    broken["data_root"] = str(SAMPLE_MANIFEST.parent)
    broken["cases"][0]["sha256"]["image"] = "0" * 64
    m = tmp_path / "broken.json"
    m.write_text(json.dumps(broken))
    assert main(["train", BUNDLE, "--manifest", str(m), "--epochs", "1", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "checksum" in err.lower()
    assert not out.exists() or not any(out.rglob("*.nii.gz"))


def test_resume_logs_the_epochs_a_killed_run_checkpointed_but_did_not_log(tmp_path):
    from ignite.engine import Engine

    out = tmp_path / "run"
    out.mkdir()
    first = MLflowTracker(str(out), run_name="t")
    engine = Engine(lambda e, b: None)
    first.start(engine)
    first.client.log_metric(first.run_id, "train_loss", 0.9, step=1)
    # the checkpointer wrote epoch 2, then the process was killed before the tracker logged it
    history = [{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.7, "val_mean_dice": 0.5}]
    (out / "metrics.json").write_text(json.dumps({"history": history}))
    resumed = MLflowTracker(str(out), run_name="t", resume=True)
    engine.state.epoch = 2  # restored from checkpoints/last.pt
    resumed.start(engine)
    assert resumed.run_id == first.run_id
    client = resumed.client
    assert {m.step: m.value for m in client.get_metric_history(first.run_id, "train_loss")} == {1: 0.9, 2: 0.7}
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "val_mean_dice")] == [(2, 0.5)]
