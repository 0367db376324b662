"""The benchmarks stay runnable: each script's --help, and bench/device_all.sh (the one device call that
gives every GPU figure) end to end on the CPU at tiny sizes, so it cannot be broken when a device comes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

BENCHES = sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name != "budget.py")


@pytest.mark.parametrize("script", BENCHES)
def test_bench_script_help(script):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()


@pytest.mark.parametrize(
    "args, says",
    [
        (["--runs", "0"], "need at least 1"),
        (["--workers", "-3"], "need at least 1"),
        (["--synthetic-dir", "/proc/no/such/dir"], "cannot create it"),
        (["--idle", "-1"], "--idle 0 to 60 s"),
    ],
)
def test_read_speed_refuses_a_bad_value_in_one_line(args, says):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "read_speed.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_device_all_runs_on_cpu_and_writes_every_figure(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "device_all.sh"), "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "device_all.json").read_text())
    assert doc["requested"] == "cpu" and doc["device"].startswith("CPU")
    for key, cold in (("infer_speed", False), ("infer_speed_cold", True)):  # after a warm-up; a process's first run
        infer = doc[key]
        assert infer["cold"] is cold and infer["segapp"]["total_s"] > 0 and infer["monai"]["network_s"] > 0
        assert all(d == pytest.approx(1.0) for d in infer["dice"].values())  # both paths give the same labels
    assert {r["pipeline"] for r in doc["train_throughput"]["results"]} >= {"c", "d"}
    hippo = doc["hippo_accuracy"]
    assert all(0.0 <= hippo[p]["cv_dice"]["mean"] <= 1.0 for p in ("segapp", "monai_tutorial"))


def test_device_all_refuses_a_bad_option(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "device_all.sh"), "--device", "tpu"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "--device must be cuda or cpu" in proc.stderr


@pytest.mark.slow
def test_cpu_heap_prints_both_modes_of_both_workloads():
    args = "--roi 8 --features 4 8 --batch 1 --calls 1 --rounds 1".split()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cpu_heap.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split()[:2] for line in proc.stdout.splitlines() if "s/call" in line]
    assert rows == [["infer", "default"], ["infer", "retained"], ["train", "default"], ["train", "retained"]]
    assert proc.stdout.count("speed-up retained/default") == 2


def test_cpu_heap_refuses_a_roi_the_network_cannot_pool():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cpu_heap.py"), "--roi", "30"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2 and "--roi must be a positive multiple of 4" in proc.stderr
    assert "Traceback" not in proc.stderr
