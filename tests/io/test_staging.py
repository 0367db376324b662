"""All-or-nothing output sets: a failing writer leaves none of the set's files; existing outputs are refused
unless overwritten; staging folders of dead processes are removed, those of live ones kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.errors import ConfigError, EnvError
from app.io.staging import STAGING_PREFIX, OutputSet, _host, remove_stale_staging


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_failing_second_writer_leaves_no_first_output(tmp_path):
    outs = OutputSet(tmp_path / "out")
    with pytest.raises(RuntimeError, match="the SEG writer broke"):
        with outs:
            with outs.writing("nifti", "case_seg.nii.gz") as p:
                p.write_bytes(b"labels")
            with outs.writing("seg", "case_seg.dcm"):
                raise RuntimeError("the SEG writer broke")
    assert _files(tmp_path / "out") == []  # neither the NIfTI nor the staging folder
    assert outs.final == {}


def test_a_complete_set_lands_together_in_subfolders(tmp_path):
    outs = OutputSet(tmp_path / "out")
    with outs:
        for kind, name in (("nifti", "a/case_seg.nii.gz"), ("overlay", "a/case_overlay.png")):
            with outs.writing(kind, name) as p:
                p.write_text(kind)
                assert not (tmp_path / "out" / name).exists()  # nothing in place before the end
    assert _files(tmp_path / "out") == ["a/case_overlay.png", "a/case_seg.nii.gz"]
    assert outs.final["nifti"] == tmp_path / "out" / "a" / "case_seg.nii.gz"


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "case_seg.nii.gz").write_text("old")
    outs = OutputSet(out)
    with pytest.raises(ConfigError) as info:
        with outs:
            outs.path("nifti", "case_seg.nii.gz")
    assert str(info.value) == f"{out / 'case_seg.nii.gz'}: output exists (use --overwrite to replace it)"
    assert (out / "case_seg.nii.gz").read_text() == "old"
    with OutputSet(out, overwrite=True) as outs:
        with outs.writing("nifti", "case_seg.nii.gz") as p:
            p.write_text("new")
    assert (out / "case_seg.nii.gz").read_text() == "new" and _files(out) == ["case_seg.nii.gz"]


def test_an_output_that_appears_while_writing_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    outs = OutputSet(out)
    with pytest.raises(ConfigError, match="output exists"):
        with outs:
            with outs.writing("nifti", "x_seg.nii.gz") as p:
                p.write_text("mine")
            with outs.writing("overlay", "x_overlay.png") as p:
                p.write_text("mine")
            (out / "x_overlay.png").write_text("another process's")  # e.g. a second segapp on the same folder
    assert _files(out) == ["x_overlay.png"] and (out / "x_overlay.png").read_text() == "another process's"


def test_os_errors_of_a_writer_name_the_final_file(tmp_path):
    outs = OutputSet(tmp_path / "out")
    with pytest.raises(EnvError) as info:
        with outs:
            with outs.writing("seg", "case_seg.dcm") as p:
                raise OSError(28, "No space left on device", str(p))
    assert (
        str(info.value) == f"{tmp_path / 'out' / 'case_seg.dcm'}: cannot write this output: no space left on the device"
    )


def test_stale_staging_of_dead_processes_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"{STAGING_PREFIX}{_host()}-{dead_pid}-abcd1234"
    live = tmp_path / f"{STAGING_PREFIX}{_host()}-{os.getpid()}-abcd1234"
    other_host = tmp_path / f"{STAGING_PREFIX}otherhost-{dead_pid}-abcd1234"
    for d in (stale, live, other_host):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "x_seg.nii.gz").write_text("half")
    assert remove_stale_staging(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other_host.exists()
    # an output set in that folder cleans up too
    (stale / "sub").mkdir(parents=True)
    with OutputSet(tmp_path) as outs:
        with outs.writing("nifti", "y_seg.nii.gz") as p:
            p.write_text("ok")
    assert not stale.exists() and (tmp_path / "y_seg.nii.gz").is_file()
