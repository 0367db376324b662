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


def _bench(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.parametrize("script", BENCHES)
def test_bench_script_help(script):
    proc = _bench(script, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()


@pytest.mark.parametrize(
    "script, args, says",
    [
        ("read_speed.py", ["--runs", "0"], "need at least 1"),
        ("read_speed.py", ["--workers", "-3"], "need at least 1"),
        ("read_speed.py", ["--synthetic-dir", "/proc/no/such/dir"], "cannot create it"),
        ("read_speed.py", ["--idle", "-1"], "--idle 0 to 60 s"),
        ("cpu_heap.py", ["--roi", "30"], "--roi must be a positive multiple of 4"),
        ("cpu_heap.py", ["--features", "-1", "4"], "--features takes at least two positive channel counts"),
        ("cpu_heap.py", ["--features", "8"], "--features takes at least two positive channel counts"),
        ("cpu_heap.py", ["--workloads", "infer,test"], "--workloads takes infer and/or train"),
    ],
)
def test_a_bench_refuses_a_bad_value_in_one_line(script, args, says):
    proc = _bench(script, *args)
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
    proc = _bench("cpu_heap.py", *"--roi 8 --features 4 8 --batch 1 --calls 1 --rounds 1".split(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if "s/call" in line]
    assert [r.split()[:2] for r in rows] == [
        ["infer", "default"],
        ["infer", "retained"],
        ["train", "default"],
        ["train", "retained"],
    ]
    assert all("faults/call" in r and "peak RSS" in r and "MiB" in r for r in rows)  # time, faults and memory
    assert proc.stdout.count("speed-up retained/default") == 2
