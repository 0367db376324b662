"""The machine and its servers failing: a read-only or full output disk, a file-size limit hit while the SEG
is written, a PACS that does not answer, an MLflow server that is not there or never answers, and a genuine
bug. Real faults (a tmpfs in a private mount namespace, the kernel's RLIMIT_FSIZE, closed ports, a socket
that never replies), each ending in one line and its exit code; the bug alone gets a traceback.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from conftest import SAMPLE_MANIFEST, TINY, free_port
from dicom_phantoms import write_phantom_series
from nifti_mutations import BASE_SHAPE, base_image, nifti_bytes
from runs import tiny_run
from sandbox import error_lines, needs_tmpfs, run_on_tmpfs, run_with_file_size_limit

from app.cli import main
from app.cli.main import BUG_EXIT, REPORT
from app.io.nifti import format_bytes
from app.runtime.preflight import check_tracking_server, estimate_output_bytes

BUNDLE = "hippocampus_unet3d"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("run"))


def _nifti(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(nifti_bytes(base_image(), gz=True))
    return path


def _line(capsys) -> str:
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    return lines[0]


# -- output disk -----------------------------------------------------------------------------------------
@needs_tmpfs
@pytest.mark.slow  # a segapp subprocess: 10-25 s on 2 cores
def test_read_only_output_folder_fails_before_the_model_is_built(tmp_path, run):
    src, out = _nifti(tmp_path / "case.nii.gz"), tmp_path / "ro"
    t0 = time.perf_counter()
    res = run_on_tmpfs(out, ["infer", "--run", str(run), "--input", str(src), "--output", str(out)], read_only=True)
    assert res.returncode == 4, res.stderr[-2000:]
    assert error_lines(res.stderr) == [
        f"segapp: error: {out}: cannot write in the output folder (--output): read-only file system"
    ]
    assert "network" not in res.stderr  # no inference was run
    assert time.perf_counter() - t0 < 120


@needs_tmpfs
@pytest.mark.slow  # a segapp subprocess: 10-25 s on 2 cores
def test_full_disk_is_found_before_inference(tmp_path, run):
    src, out = _nifti(tmp_path / "case.nii.gz"), tmp_path / "small"
    res = run_on_tmpfs(out, ["infer", "--run", str(run), "--input", str(src), "--output", str(out)], size="64k")
    assert res.returncode == 4, res.stderr[-2000:]
    need = format_bytes(estimate_output_bytes(BASE_SHAPE, 0, ["nifti"]))
    assert error_lines(res.stderr) == [
        f"segapp: error: {out}: the outputs of 1 image(s) need about {need} but only 65.5 kB is free on this disk"
    ]


@pytest.mark.slow  # a segapp subprocess: 10-25 s on 2 cores
def test_file_size_limit_while_writing_the_seg_leaves_no_nifti(tmp_path, run):
    """The NIfTI (1.5 kB) is written, then the SEG (about 20 kB) hits a 16 kB limit: neither is left."""
    info = write_phantom_series(tmp_path / "mr", modality="MR", rescale=(1.0, 0.0))
    out = tmp_path / "out"
    args = ["infer", "--run", str(run), "--device", "cpu", "--input", str(info.folder), "--output", str(out)]
    res = run_with_file_size_limit(args, 16_000)
    assert res.returncode == 4, res.stderr[-2000:]
    (summary,) = out.glob("*_summary.json")
    seg = out / summary.name.replace("_summary.json", "_seg.dcm")
    message = (
        f"{seg}: cannot write this output: file too large for this file system or the process's file-size limit "
        "(ulimit -f)"
    )
    assert error_lines(res.stderr) == [f"segapp: error: {message}"]
    assert sorted(p.name for p in out.iterdir()) == [summary.name]  # no NIfTI, no SEG, no staging folder
    record = json.loads(summary.read_text())
    assert record["status"] == "failed" and record["error"] == message and record["outputs"] == {}
    assert "nifti_write_s" in record["timings"]  # the NIfTI had been written, then taken back


def test_unwrapped_machine_fault_is_one_line_not_a_traceback(tmp_path, capsys):
    data = tmp_path / "data"
    for sub in ("imagesTr", "labelsTr"):
        _nifti(data / sub / "case_001.nii.gz")
        _nifti(data / sub / "case_002.nii.gz")
    target = Path("/sys/segapp_manifest.json")  # sysfs: no new files, whoever asks
    rc = main(["manifest", "create", str(data), "-o", str(target), "--labels", "0=bg", "1=a", "--folds", "2"])
    assert rc == 4
    line = _line(capsys)
    assert line.startswith("segapp: error: /sys/") and line.endswith(
        (": cannot read or write: permission denied", ": cannot read or write: read-only file system")
    )


# -- PACS ------------------------------------------------------------------------------------------------
def test_failed_send_keeps_the_outputs_and_records_it(tmp_path, run, capsys):
    info = write_phantom_series(tmp_path / "mr", modality="MR", rescale=(1.0, 0.0))
    out, dest = tmp_path / "out", f"dimse://NOBODY@127.0.0.1:{free_port()}"
    rc = main(
        ["infer", "--run", str(run), "--device", "cpu", "--input", str(info.folder), "--output", str(out)]
        + ["--format", "seg", "--send", dest]
    )
    assert rc == 3
    line = _line(capsys)
    (summary,) = out.glob("*_summary.json")
    seg = out / summary.name.replace("_summary.json", "_seg.dcm")
    assert line.startswith(f"segapp: error: could not send 1 of 1 file(s) to {dest} after 4 attempt(s) (")
    assert line.endswith(f"the files are kept on disk at: {seg}")
    assert seg.is_file() and not (out / summary.name.replace("_summary.json", "_overlay.png")).exists()  # not asked
    record = json.loads(summary.read_text())
    assert record["status"] == "send_failed" and record["outputs"]["seg"] == str(seg)
    assert record["sent"] == [{"destination": dest, "files": 1, "error": line.removeprefix("segapp: error: ")}]


# -- MLflow ----------------------------------------------------------------------------------------------
def test_dead_tracking_server_fails_train_within_seconds(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    rc = main(
        ["train", BUNDLE, "--tracking-uri", uri, "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "r")]
    )
    elapsed = time.perf_counter() - t0
    assert rc == 4
    assert _line(capsys) == (
        f"segapp: error: --tracking-uri: no MLflow tracking server answers at {uri} within 3 s (connection refused); "
        "start it, or pass --tracking-fallback local to track in the run folder instead"
    )
    assert elapsed < 60  # MLflow's own retries took about 5 minutes before a traceback
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_dead_tracking_server_fails_cross_validation_before_any_fold(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "cv"
    rc = main(["train", BUNDLE, "--fold", "all", "--tracking-uri", uri, "--device", "cpu", "--out", str(out)])
    assert rc == 4
    assert _line(capsys).startswith(f"segapp: error: --tracking-uri: no MLflow tracking server answers at {uri}")
    assert not list(out.glob("fold_*"))


def test_tracking_server_that_never_answers_times_out():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(Exception) as info:
            check_tracking_server(uri, timeout_s=1.0)
        assert time.perf_counter() - t0 < 10
    assert str(info.value) == (
        f"--tracking-uri: no MLflow tracking server answers at {uri} within 1 s (timed out); start it, or pass "
        "--tracking-fallback local to track in the run folder instead"
    )
    assert info.value.exit_code == 4


def test_tracking_server_that_answers_is_accepted(mlflow_server):
    check_tracking_server(mlflow_server)
    check_tracking_server(mlflow_server + "/")


@pytest.mark.slow
def test_tracking_fallback_local_trains_and_says_so(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "r"
    rc = main(
        ["train", BUNDLE, "--manifest", str(SAMPLE_MANIFEST), "--tracking-uri", uri, "--tracking-fallback", "local"]
        + ["--epochs", "1", "--device", "cpu", "--out", str(out), "--override", json.dumps(TINY)]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert (
        f"mlflow:     the tracking server {uri} does not answer; tracking in the local store {out / 'mlflow.db'} "
        "instead" in err
    )
    run_info = json.loads((out / "mlflow_run.json").read_text())
    assert run_info["tracking_uri"] == f"sqlite:///{out / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run_info["tracking_uri"])
    assert client.get_run(run_info["run_id"]).info.status == "FINISHED"
    assert json.loads((out / "executed_config.json").read_text())["tracking_uri"] == ""


# -- a genuine bug ---------------------------------------------------------------------------------------
def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from app.cli import commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "bundle_list", interrupted)
    assert main(["bundle", "list"]) == 130
    assert capsys.readouterr().err.strip() == "segapp: interrupted"


def test_a_bug_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    from app.cli import commands

    def broken(args):
        return 1 // 0

    monkeypatch.setattr(commands, "bundle_list", broken)
    assert main(["bundle", "list"]) == BUG_EXIT
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert (
        err.rstrip().splitlines()[-1]
        == f"segapp: internal error: ZeroDivisionError: integer division or modulo by zero; {REPORT}"
    )


def test_memory_limit_accepts_sizes_with_units(monkeypatch):
    from app.runtime.preflight import memory_budget_bytes

    for text, value in (("8G", 8 << 30), ("512M", 512 << 20), ("20k", 20 << 10), ("1000000", 1_000_000)):
        monkeypatch.setenv("SEGAPP_MEMORY_LIMIT", text)
        assert memory_budget_bytes() == value
    monkeypatch.delenv("SEGAPP_MEMORY_LIMIT")
    assert 0 < memory_budget_bytes() < 1 << 50  # what the kernel reports available
