"""DDP training with 2 CPU processes (gloo) through ``segapp train --nproc 2``: sharded data, equal weights
on both ranks, metrics reduced over ranks (odd validation set), one MLflow run, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE_MANIFEST, TINY
from mlflow.tracking import MlflowClient

from app.data.manifest import fold_datalist
from app.evaluation.evaluate import evaluate
from app.runtime.distributed import unwrap, wrap
from app.runtime.launch import RECORD_ENV, strip_nproc, torchrun_command, weights_sha256

BUNDLE = "hippocampus_unet3d"
EPOCHS = 3
# 4 training cases -> 2 per rank, batch 1; 3 validation cases -> 2 + 1 (uneven: must not hang).
DDP_TINY = {
    **TINY,
    "batch_size": 1,
    "validate#dataset#data": "$app.data.manifest.fold_datalist(@manifest, @fold, 'val', max_cases=3)",
}


def _cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "app.cli",
        "train",
        BUNDLE,
        "--manifest",
        str(SAMPLE_MANIFEST),
        "--epochs",
        str(EPOCHS),
        "--device",
        "cpu",
        "--out",
        str(out),
        "--seed",
        "3",
        "--nproc",
        "2",
        "--config",
        "demo.json",
        "--override",
        json.dumps(DDP_TINY),
        *extra,
    ]


def _env(record: Path) -> dict:
    return {**os.environ, "SEGAPP_NO_PROGRESS": "1", RECORD_ENV: str(record), "PYTHONPATH": str(REPO)}


def _records(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


def _run(cmd: list[str], cwd: Path, env: dict) -> None:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


def test_torchrun_command_runs_the_cli_module_with_the_given_argv():
    argv = strip_nproc(["-v", "train", BUNDLE, "--nproc", "4", "--epochs", "1"])
    cmd = torchrun_command(argv, 4)
    assert cmd[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m"]
    assert cmd[7:] == ["app.cli", "-v", "train", BUNDLE, "--epochs", "1"]
    assert strip_nproc(["train", "b", "--nproc", "2", "--nproc=3", "--epochs", "1"]) == ["train", "b", "--epochs", "1"]


def test_wrap_is_identity_in_one_process():
    import torch

    net = torch.nn.Linear(2, 2)
    assert wrap(net, "cpu") is net and unwrap(net) is net
    assert len(weights_sha256(net)) == 64


def _epoch_one_recorded(metrics_file: Path, record: Path) -> bool:
    """Epoch 1 is checkpointed and both ranks' batch records have it (they are written after it)."""
    try:
        if len(json.loads(metrics_file.read_text())["history"]) < 1:
            return False
        return all("1" in r["epochs"] for r in _records(record))
    except (OSError, ValueError, KeyError):
        return False  # not written yet


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree (Linux /proc), whatever session it started."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone already
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and every process it started (torchrun's workers run in
    sessions of their own, so the group alone would miss them)."""
    below = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_ddp_two_ranks_shard_data_agree_track_once_and_resume(tmp_path):
    # Uninterrupted reference run.
    full, full_rec = tmp_path / "full", tmp_path / "full_rec"
    _run(_cmd(full), tmp_path, _env(full_rec))
    r0, r1 = _records(full_rec)
    assert (r0["world_size"], r1["world_size"]) == (2, 2)
    train_ids = {c["id"] for c in fold_datalist(SAMPLE_MANIFEST, 0, "train", max_cases=4)}
    for epoch in map(str, range(1, EPOCHS + 1)):
        a, b = set(r0["epochs"][epoch]), set(r1["epochs"][epoch])
        assert len(a) == len(b) == 2 and not a & b, (epoch, a, b)  # each rank its own half
        assert a | b == train_ids
    assert r0["epochs"]["1"] != r0["epochs"]["2"] or r0["epochs"]["2"] != r0["epochs"]["3"]  # reshuffled per epoch
    assert r0["weights_sha256"] and r0["weights_sha256"] == r1["weights_sha256"]  # all-reduced gradients

    metrics = json.loads((full / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, EPOCHS + 1))
    info = json.loads((full / "mlflow_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [info["run_id"]]  # rank 1 never logs
    assert runs[0].data.params["world_size"] == "2"
    # Validation metrics are gathered over both ranks' cases (2 + 1): same as one process on all 3.
    single = evaluate(
        None,
        str(SAMPLE_MANIFEST),
        run=str(full),
        device="cpu",
        overrides={"dataset#data": DDP_TINY["validate#dataset#data"]},
    )
    for key in ("val_dice_anterior", "val_dice_posterior", "val_mean_dice", "val_mean_hd95"):
        assert metrics["final"][key] == pytest.approx(single[key], abs=1e-5), key

    # Kill the whole torchrun group after epoch 1, then resume to the end.
    killed, killed_rec = tmp_path / "killed", tmp_path / "killed_rec"
    proc = subprocess.Popen(
        _cmd(killed),
        cwd=tmp_path,
        env=_env(killed_rec),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    metrics_file = killed / "metrics.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if _epoch_one_recorded(metrics_file, killed_rec):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-3000:]}"
    _kill_tree(proc)  # segapp, torchrun and its workers
    proc.wait()
    proc.stderr.close()
    done = len(json.loads(metrics_file.read_text())["history"])
    assert 1 <= done < EPOCHS and not (killed / "models" / "model.pt").exists()
    run_before = json.loads((killed / "mlflow_run.json").read_text())["run_id"]

    _run(_cmd(killed, "--resume"), tmp_path, _env(killed_rec))
    resumed = json.loads(metrics_file.read_text())
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, EPOCHS + 1))
    assert json.loads((killed / "mlflow_run.json").read_text())["run_id"] == run_before
    client = MlflowClient(json.loads((killed / "mlflow_run.json").read_text())["tracking_uri"])
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1
    steps = sorted({m.step for m in client.get_metric_history(run_before, "train_loss")})
    assert steps == list(range(1, EPOCHS + 1))
    k0, k1 = _records(killed_rec)
    assert k0["weights_sha256"] == k1["weights_sha256"]  # both ranks loaded last.pt
    for epoch in map(str, range(1, EPOCHS + 1)):  # resumed epochs draw the same shards as the full run
        assert k0["epochs"][epoch] == r0["epochs"][epoch] and k1["epochs"][epoch] == r1["epochs"][epoch]
    assert k0["weights_sha256"] == r0["weights_sha256"]  # exact resume under DDP
    for key, value in metrics["final"].items():
        assert resumed["final"][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_nproc_1_matches_the_single_process_run(tmp_path):
    # The issue asks for this on a GPU; CI has none, so it runs on CPU (gloo) here.
    one, plain = tmp_path / "nproc1", tmp_path / "plain"
    cmd = _cmd(one)
    cmd[cmd.index("--nproc") + 1] = "1"
    _run(cmd, tmp_path, _env(tmp_path / "rec1"))
    plain_cmd = _cmd(plain)
    i = plain_cmd.index("--nproc")
    del plain_cmd[i : i + 2]
    _run(plain_cmd, tmp_path, {**os.environ, "SEGAPP_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)})
    a = json.loads((one / "metrics.json").read_text())
    b = json.loads((plain / "metrics.json").read_text())
    assert [h["epoch"] for h in a["history"]] == [h["epoch"] for h in b["history"]] == list(range(1, EPOCHS + 1))
    for key, value in b["final"].items():
        assert a["final"][key] == pytest.approx(value, abs=1e-5, nan_ok=True), key  # HD95 is NaN with no prediction
