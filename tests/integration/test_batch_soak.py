"""Soak: ``segapp infer-batch`` over 200 small series (180 NIfTI images, 20 DICOM series) in 2 worker processes,
one worker killed with SIGKILL midway, then a re-run: every series done exactly once (outputs present and on
their input's grid, each done marker written once, no duplicates, nothing missing, no partial files left).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_phantoms import write_phantom_series
from nifti_mutations import base_array, oblique_affine
from runs import tiny_run

from app.inference.batch import DIED

N_NIFTI, N_DICOM = 180, 20
KILL_AFTER = 40  # done markers before the kill


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent's pid
                kids.append(int(entry.name))
    return kids


def _is_pool_worker(pid: int) -> bool:
    try:
        cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return "spawn_main" in cmd and "resource_tracker" not in cmd


def _inputs(root: Path) -> dict[str, tuple[int, ...]]:
    """``{input path: source grid shape}`` for 180 NIfTI files in 6 folders and 20 DICOM series."""
    shapes: dict[str, tuple[int, ...]] = {}
    rng = np.random.default_rng(0)
    for n in range(N_NIFTI):
        shape = (10 + n % 3, 9, 6 + n % 2)
        arr = base_array(shape) + rng.integers(0, 20, shape).astype(np.int16)
        path = root / f"site{n % 6}" / f"case{n:03d}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, oblique_affine()), path)
        shapes[str(path)] = shape
    for n in range(N_DICOM):
        info = write_phantom_series(
            root / "dicom" / f"study{n:02d}", shape=(12, 10, 8), modality="MR", rescale=(1.0, 0.0), series_number=n
        )
        shapes[str(info.folder)] = (12, 10, 8)
    return shapes


def _batch(run: Path, src: Path, out: Path) -> subprocess.Popen:
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "SEGAPP_NO_PROGRESS": "1",
        "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, "-m", "app.cli", "infer-batch", "--run", str(run), "--device", "cpu", "--nproc", "2"]
    cmd += ["--input", str(src), "--output", str(out)]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own session: the batch and its workers
        stdout, stderr = proc.communicate()
        pytest.fail(f"infer-batch did not finish in {timeout} s: {stderr[-3000:]}")
    return proc.returncode, stdout, stderr


def _markers(out: Path) -> dict[str, tuple[int, int, str]]:
    return {
        p.parent.name: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_text()) for p in sorted(out.glob("*/done.json"))
    }


@pytest.mark.slow
def test_two_workers_one_killed_then_rerun_does_every_series_exactly_once(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    shapes = _inputs(src)
    run = tiny_run(tmp_path / "run")

    proc = _batch(run, src, out)
    killed = None
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("*/done.json"))) >= KILL_AFTER:
            workers = [p for p in _children(proc.pid) if _is_pool_worker(p)]
            if workers:
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    rc, stdout, stderr = _finish(proc)
    assert killed is not None, f"no worker to kill (finished early?): {stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    first = json.loads((out / "results.json").read_text())
    rows = {r["input"]: r for r in first["series"]}
    assert sorted(rows) == sorted(shapes)  # every series listed once
    died = [r for r in first["series"] if r["status"] == "failed"]
    assert 1 <= len(died) <= 2, died  # the killed worker's series (and the other's, if terminated with the pool)
    assert all(r["error"] == DIED for r in died)
    assert first["counts"] == {"ok": len(shapes) - len(died), "failed": len(died), "skipped": 0}
    assert rc == 1 and f"{len(shapes) - len(died)} ok, {len(died)} failed, 0 skipped" in stdout
    after_first = _markers(out)
    assert len(after_first) == len(shapes) - len(died)
    assert not {r["key"] for r in died} & set(after_first)  # a died series has no marker: the re-run does it
    for r in died:  # what a kill inside atomic_write_text leaves (the kill above may or may not have hit one)
        (out / r["key"]).mkdir(parents=True, exist_ok=True)
        (out / r["key"] / ".done.k1ll3d00.tmp.json").write_text("{")
        (out / r["key"] / f".{r['key']}_summary.k1ll3d01.tmp.json").write_text("{")

    rc, stdout, stderr = _finish(_batch(run, src, out))
    assert rc == 0, stderr[-3000:]
    second = json.loads((out / "results.json").read_text())
    assert second["counts"] == {"ok": len(died), "failed": 0, "skipped": len(shapes) - len(died)}
    after_second = _markers(out)
    assert len(after_second) == len(shapes)
    for key, marker in after_first.items():  # not written again
        assert after_second[key] == marker
    runs = {json.loads(m[2])["run"] for m in after_second.values()}
    assert runs == {first["run"], second["run"]}

    log = [json.loads(line) for line in (out / "done.log").read_text().splitlines()]
    assert Counter(rec["key"] for rec in log) == Counter(list(after_second))  # each marker written exactly once
    assert {rec["status"] for rec in log} == {"ok"}

    for row in second["series"]:
        folder = out / row["key"]
        names = sorted(p.name for p in folder.iterdir())
        kind = "dicom" if "dicom" in row["input"] else "nifti"
        assert len(names) == (4 if kind == "dicom" else 3), names  # outputs + summary + done.json, nothing else
        assert not [n for n in names if n.startswith(".")], names  # no staging folder, temp file or .started
        (seg,) = folder.glob("*_seg.nii.gz")
        assert nib.load(seg).shape == shapes[row["input"]]
        if kind == "nifti":
            np.testing.assert_allclose(nib.load(seg).affine, oblique_affine(), atol=1e-5)
