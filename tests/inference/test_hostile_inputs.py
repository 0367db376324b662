"""Hostile inputs through ``segapp infer`` and ``segapp infer-batch``: each ends in exactly one line naming the
file or option (no traceback) and its exit code, leaves no output behind, and never writes one output over
another. The network is a tiny untrained U-Net (``runs.tiny_run``): these tests are about the plumbing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from dicom_phantoms import write_phantom_series
from nifti_mutations import base_array, base_image, nifti_bytes
from runs import tiny_run
from sandbox import error_lines

from app.cli import main
from app.inference.jobs import output_keys

OUTPUT_SUFFIXES = ("_seg.nii.gz", "_seg.dcm", "_rtstruct.dcm", "_overlay.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("run"))


def _infer(run: Path, src: Path, out: Path, *extra: str) -> int:
    return main(["infer", "--run", str(run), "--device", "cpu", "--input", str(src), "--output", str(out), *extra])


def _line(capsys) -> str:
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    return lines[0]


def _outputs(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(OUTPUT_SUFFIXES))


def _write(path: Path, edits=(), gz=True, img=None, cut=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(nifti_bytes(img if img is not None else base_image(), edits, gz, cut))
    return path


# -- no silent loss: unique names, no overwrite --------------------------------------------------------------
def test_same_file_name_in_two_subfolders_gives_two_outputs(tmp_path, run, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    a = _write(src / "a" / "case.nii.gz")
    flipped = nib.Nifti1Image(np.asarray(base_image().dataobj)[::-1].copy(), base_image().affine)
    b = _write(src / "b" / "case.nii.gz", img=flipped)
    assert _infer(run, src, out, "--format", "nifti,overlay") == 0
    assert _outputs(out) == ["a/case_overlay.png", "a/case_seg.nii.gz", "b/case_overlay.png", "b/case_seg.nii.gz"]
    for inp, key in ((a, "a/case"), (b, "b/case")):
        seg, ref = nib.load(out / f"{key}_seg.nii.gz"), nib.load(inp)
        assert seg.shape == ref.shape
        np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-5)
        summary = json.loads((out / f"{key}_summary.json").read_text())
        assert summary["status"] == "ok" and summary["outputs"]["nifti"] == str(out / f"{key}_seg.nii.gz")


def test_output_names_keep_the_relative_path_sanitised_and_unique(tmp_path):
    src = tmp_path / "in"
    rels = ["x y/scan 1.nii.gz", "x_y/scan_1.nii.gz", "z/CASE.nii", "z/case.nii.gz", ".hidden/é.nii", "top.nii"]
    files = [src / r for r in rels]
    keys = output_keys(files, src)

    def h(rel: str) -> str:
        return hashlib.sha1(rel.encode()).hexdigest()[:8]

    assert keys == {
        files[0]: f"x_y/scan_1_{h(rels[0])}",
        files[1]: f"x_y/scan_1_{h(rels[1])}",
        files[2]: f"z/CASE_{h(rels[2])}",
        files[3]: f"z/case_{h(rels[3])}",
        files[4]: "hidden/_",
        files[5]: "top",
    }


def test_second_infer_into_the_same_folder_refuses_without_overwrite(tmp_path, run, capsys):
    src, out = _write(tmp_path / "case.nii.gz"), tmp_path / "out"
    assert _infer(run, src, out) == 0
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _infer(run, src, out) == 2
    assert _line(capsys) == f"segapp: error: {out / 'case_seg.nii.gz'}: output exists (use --overwrite to replace it)"
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert _infer(run, src, out, "--overwrite") == 0
    assert (out / "case_seg.nii.gz").stat().st_mtime_ns != before[out / "case_seg.nii.gz"]
    assert _outputs(out) == ["case_seg.nii.gz"]  # the PNG overlay only on request


def test_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path, run):
    src = tmp_path / "in"
    _write(src / "case.nii.gz")
    out = src / "results"
    assert _infer(run, src, out) == 0
    assert _infer(run, src, out, "--overwrite") == 0  # the first run's case_seg.nii.gz is not an input now
    assert _outputs(out) == ["case_seg.nii.gz"]


def test_output_folder_that_is_the_input_folder(tmp_path, run):
    src = _write(tmp_path / "in" / "case.nii.gz").parent
    assert _infer(run, src, src) == 0
    assert _infer(run, src, src, "--overwrite") == 0  # case_seg.nii.gz beside it is an output, not an input
    assert _outputs(src) == ["case_seg.nii.gz"]


def test_dicom_series_second_run_refuses_without_overwrite(tmp_path, run, capsys):
    info = write_phantom_series(tmp_path / "mr", modality="MR", rescale=(1.0, 0.0))
    out = tmp_path / "out"
    assert _infer(run, info.folder, out) == 0
    (nifti,) = out.glob("*_seg.nii.gz")
    capsys.readouterr()
    assert _infer(run, info.folder, out) == 2
    assert _line(capsys) == f"segapp: error: {nifti}: output exists (use --overwrite to replace it)"


# -- bad NIfTI files: one line, before the model is even built ------------------------------------------------
SFORM = "the voxel-to-world affine from the sform (srow_x/y/z)"
BAD_NIFTI = {
    "4d_three_volumes": (
        [],  # a real 4D file (three volumes), written below
        None,
        "a 4D image with 3 volumes (shape (11, 9, 7, 3)); the model takes one 3D image (1 channel): split the "
        "volumes and segment each",
    ),
    "2d": ([("dim", 0, 2)], None, "a 2D image (shape (11, 9)); segapp segments 3D volumes"),
    "zero_axis": ([("dim", 1, 0)], None, "the header declares an axis of length zero or less (shape (0, 9, 7))"),
    "singular_affine": (
        [("srow_x", 1, 1.3), ("srow_y", 1, 0.0), ("srow_z", 1, 0.0), ("srow_x", 0, 1.3)]
        + [("srow_y", 0, 0.0), ("srow_z", 0, 0.0)],
        None,
        f"{SFORM} is singular (voxel size 1.3, 1.3, 2.1 mm; its axes do not span 3D)",
    ),
    "nan_affine": ([("srow_z", 2, float("nan"))], None, f"{SFORM} holds NaN or Inf"),
    "truncated_gz": (
        [],
        0.5,
        "truncated or corrupt gzip file (Compressed file ended before the end-of-stream marker was reached)",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_NIFTI))
def test_bad_nifti_is_one_line_before_the_model_is_built(tmp_path, name, capsys):
    edits, cut, message = BAD_NIFTI[name]
    base = base_image()
    img = nib.Nifti1Image(np.stack([np.asarray(base.dataobj)] * 3, -1), base.affine) if name.startswith("4d") else base
    bad = _write(tmp_path / "in" / f"{name}.nii.gz", edits, cut=cut, img=img)
    _write(tmp_path / "in" / "good.nii.gz")  # a good file beside it is not segmented either: checks come first
    out = tmp_path / "out"
    missing = tmp_path / "no_such_weights.pt"  # were the model built first, this would be the error
    rc = main(
        ["infer", "hippocampus_unet3d", "--checkpoint", str(missing), "--device", "cpu"]
        + ["--input", str(tmp_path / "in"), "--output", str(out)]
    )
    assert rc == 2
    assert _line(capsys) == f"segapp: error: {bad}: {message}"
    assert not out.exists() or list(out.iterdir()) == []  # nothing written (the folder is not even made)


def test_30000_cubed_voxels_in_a_400_byte_file(tmp_path, capsys):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    raw = nifti_bytes(img, [("dim", i, 30000) for i in (1, 2, 3)])
    bad = tmp_path / "huge.nii"
    bad.write_bytes((raw + b"\0" * 400)[:400])
    rc = main(["infer", "hippocampus_unet3d", "--input", str(bad), "--output", str(tmp_path / "out")])
    assert rc == 2
    assert _line(capsys) == (
        f"segapp: error: {bad}: the header declares 30000 x 30000 x 30000 voxels of int16 (54.0 TB from byte 352) "
        "but the file has 400 bytes (truncated, or a wrong header)"
    )


def _overflowing(slope: float) -> int:
    with np.errstate(over="ignore"):
        return int(np.isinf(base_array().astype(np.float32) * np.float32(slope)).sum())


@pytest.mark.parametrize(
    ("edits", "counts"),
    [
        ([("datatype", 0, 16), ("bitpix", 0, 32), ("dim", 3, 3), ("vox_offset", 0, 352.0)], None),  # float bytes
        ([("scl_slope", 0, 3e38), ("scl_inter", 0, 0.0)], (0, _overflowing(3e38))),  # beyond float32
    ],
    ids=["nan_voxels", "slope_overflow"],
)
def test_non_finite_voxels_fail_after_loading_with_no_output(tmp_path, run, edits, counts, capsys):
    if counts is None:  # a float32 file with one NaN voxel
        arr = np.asarray(base_image().dataobj, dtype=np.float32)
        arr[3, 4, 5] = np.nan
        img, edits, counts = nib.Nifti1Image(arr, base_image().affine), [], (1, 0)
    else:
        img = base_image()
    src, out = _write(tmp_path / "case.nii.gz", edits, img=img), tmp_path / "out"
    assert _infer(run, src, out) == 2
    n = int(np.prod(img.shape))
    assert _line(capsys) == (
        f"segapp: error: {src}: image has {counts[0]} NaN and {counts[1]} infinite voxel(s) out of {n}; "
        "fix or exclude this file"
    )
    assert _outputs(out) == []
    summary = json.loads((out / "case_summary.json").read_text())
    assert summary["status"] == "failed" and summary["outputs"] == {} and "NaN" in summary["error"]


def test_memory_budget_refuses_before_the_network_runs(tmp_path, run, capsys, monkeypatch):
    src, out = _write(tmp_path / "case.nii.gz"), tmp_path / "out"
    monkeypatch.setenv("SEGAPP_MEMORY_LIMIT", "20k")
    assert _infer(run, src, out) == 4
    line = _line(capsys)
    assert re.fullmatch(
        rf"segapp: error: {re.escape(str(src))}: segmenting it \(network grid \d+ x \d+ x \d+ voxels\) needs about "
        r"\d+\.\d kB, more than 20\.5 kB \(SEGAPP_MEMORY_LIMIT\)",
        line,
    ), line
    assert _outputs(out) == []
    monkeypatch.setenv("SEGAPP_MEMORY_LIMIT", "lots")
    assert _infer(run, src, tmp_path / "out2") == 2
    assert _line(capsys) == (
        "segapp: error: SEGAPP_MEMORY_LIMIT: expected a size such as 8G, 512M or 1000000, got 'lots'"
    )


def test_voxel_size_that_would_blow_up_the_network_grid(tmp_path, run, capsys):
    # 9000 mm voxels are within the plausible range, but the 1 mm network grid would be ~10^11 voxels
    src = _write(tmp_path / "case.nii.gz", [("srow_x", 0, 9000.0), ("srow_y", 1, 9000.0), ("srow_z", 2, 9000.0)])
    assert _infer(run, src, tmp_path / "out") == 4
    assert re.fullmatch(
        rf"segapp: error: {re.escape(str(src))}: segmenting it \(network grid \d+ x \d+ x \d+ voxels\) needs about "
        r"[\d.]+ [TP]B, more than [\d.]+ [kMG]B \(available memory\)",
        _line(capsys),
    )


def test_broken_link_named_like_a_nifti_is_not_skipped(tmp_path, capsys):
    src = tmp_path / "in"
    _write(src / "good.nii.gz")
    (src / "gone.nii.gz").symlink_to(tmp_path / "deleted.nii.gz")
    assert main(["infer", "hippocampus_unet3d", "--input", str(src), "--output", str(tmp_path / "out")]) == 2
    assert (
        _line(capsys)
        == f"segapp: error: {src / 'gone.nii.gz'}: a NIfTI name that is not a readable file (broken link?)"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_is_named_before_anything_else(tmp_path, capsys):
    src = _write(tmp_path / "case.nii.gz")
    rc = main(["infer", "hippocampus_unet3d", "--device", "cuda", "--input", str(src), "--output", str(tmp_path / "o")])
    assert rc == 2
    assert _line(capsys) == (
        "segapp: error: --device: CUDA was requested but no CUDA device is available (use --device cpu or auto)"
    )
    assert not (tmp_path / "o").exists()


# -- half the outputs: a DICOM series whose SEG step fails leaves no NIfTI ------------------------------------
def test_negative_pixel_spacing_leaves_no_output_at_all(tmp_path, run, capsys):
    info = write_phantom_series(tmp_path / "mr", modality="MR", rescale=(1.0, 0.0))
    for f in info.files:
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = [-0.9, 0.8]
        ds.save_as(f)
    out = tmp_path / "out"
    rc = _infer(run, info.folder, out, "--format", "nifti,seg,rtstruct")
    assert rc == 2
    line = _line(capsys)
    assert line.startswith("segapp: error: ")
    assert _outputs(out) == []  # before all-or-nothing: a mirrored NIfTI was left here
    for summary in out.glob("*_summary.json"):  # written when the reader accepted the series
        record = json.loads(summary.read_text())
        assert record["status"] == "failed" and record["outputs"] == {} and record["error"] in line


# -- infer-batch: earlier failures stay failed --------------------------------------------------------------
def test_infer_batch_rerun_reports_an_earlier_failure_as_failed(tmp_path, run, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    _write(src / "good.nii.gz")
    bad = _write(src / "bad.nii.gz", cut=0.5)
    args = ["infer-batch", "--run", str(run), "--device", "cpu", "--input", str(src), "--output", str(out)]
    assert main(args) == 1
    first = capsys.readouterr()
    error = f"{bad}: truncated or corrupt gzip file (Compressed file ended before the end-of-stream marker was reached)"
    key = "nifti_" + hashlib.sha1(b"bad.nii.gz").hexdigest()[:12]
    assert f"failed  {key}  {bad}: {error}" in first.err
    assert "1 ok, 1 failed, 0 skipped" in first.out
    marker = out / key / "done.json"
    written = marker.stat().st_mtime_ns

    assert main(args) == 1  # not run again, but still failed (it used to say "skipped", exit 0)
    again = capsys.readouterr()
    assert f"failed  {key}  {bad}: failed before (use --retry-failed to run it again): {error}" in again.err
    assert "0 ok, 1 failed, 1 skipped" in again.out and marker.stat().st_mtime_ns == written

    assert main([*args, "--retry-failed"]) == 1
    assert "0 ok, 1 failed, 1 skipped" in capsys.readouterr().out and marker.stat().st_mtime_ns != written
    assert not list(out.rglob(".segapp-partial-*")) and not list(out.rglob("*.tmp*"))


def test_infer_batch_output_that_is_a_file(tmp_path, capsys):
    src = _write(tmp_path / "in" / "case.nii.gz").parent
    (tmp_path / "out").write_text("a file")
    rc = main(["infer-batch", "hippocampus_unet3d", "--input", str(src), "--output", str(tmp_path / "out")])
    assert rc == 4
    assert _line(capsys) == f"segapp: error: {tmp_path / 'out'}: the output folder (--output) is a file"


def test_infer_output_that_is_a_file(tmp_path, capsys):
    src = _write(tmp_path / "case.nii.gz")
    (tmp_path / "out").write_text("a file")
    assert main(["infer", "hippocampus_unet3d", "--input", str(src), "--output", str(tmp_path / "out")]) == 4
    assert _line(capsys) == f"segapp: error: {tmp_path / 'out'}: the output folder (--output) is a file"
    below = tmp_path / "out" / "sub"
    assert main(["infer", "hippocampus_unet3d", "--input", str(src), "--output", str(below)]) == 4
    assert _line(capsys) == (
        f"segapp: error: {below}: cannot create the output folder (--output): a part of the path is a file, "
        "not a folder"
    )
    assert os.path.isfile(tmp_path / "out")


@pytest.mark.parametrize("content", ["empty", "not_dicom"])
def test_folder_without_dicom_is_one_line_before_the_model_is_built(tmp_path, content, capsys):
    src = tmp_path / "in"
    src.mkdir()
    if content == "not_dicom":
        (src / "notes.txt").write_text("not an image")
    missing = tmp_path / "no_such_weights.pt"  # were the model built first, this would be the error
    rc = main(["infer", "hippocampus_unet3d", "--checkpoint", str(missing), "--device", "cpu"]
              + ["--input", str(src), "--output", str(tmp_path / "out")])  # fmt: skip
    assert rc == 2
    expected = "folder contains no files" if content == "empty" else "no DICOM files found among 1 file(s): notes.txt"
    captured = capsys.readouterr()
    (line,) = error_lines(captured.err)
    assert line.startswith(f"segapp: error: {src}: {expected}"), line
    assert "model:" not in captured.out


def test_a_scan_made_before_the_model_counts_in_read_s(tmp_path, run):
    """``segapp infer`` scans the folder before it builds the model and hands the scan on: its seconds
    still count in the series' read_s and total_s."""
    from app.bundle.model import load_model
    from app.inference.pipeline import Segmenter
    from app.io.dicom_series import scan_for_images

    write_phantom_series(tmp_path / "ct", modality="MR", shape=(20, 18, 10))
    segmenter = Segmenter(load_model(run=run, device="cpu"))
    res = segmenter.dicom(
        tmp_path / "ct", tmp_path / "out", ["nifti"], scan=scan_for_images(tmp_path / "ct"), scan_s=30.0
    )
    assert 30.0 <= res.timings["read_s"] < 60.0 and res.timings["total_s"] >= res.timings["read_s"]
    summary = json.loads(next((tmp_path / "out").glob("*_summary.json")).read_text())
    assert summary["timings"]["read_s"] == pytest.approx(res.timings["read_s"])
