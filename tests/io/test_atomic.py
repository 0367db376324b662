"""Atomic writes: the output appears whole or not at all; ``start_writeback`` is a hint that changes no byte."""

from __future__ import annotations

import io
import sys

import pytest

from app.io import atomic
from app.io.atomic import atomic_path, start_writeback


def test_atomic_path_renames_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    out = tmp_path / "sub" / "result.nii.gz"
    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.endswith(".nii.gz") and tmp != out
        tmp.write_bytes(b"first")
    assert out.read_bytes() == b"first"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert out.read_bytes() == b"first"  # left as it was
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.nii.gz"]  # no temp file left


def test_start_writeback_returns_the_position_and_changes_no_byte(tmp_path):
    blocks = [bytes([n]) * 70_000 for n in range(1, 5)]
    path = tmp_path / "f.bin"
    with open(path, "wb") as fh:
        start = 0
        for block in blocks:
            fh.write(block)
            start = start_writeback(fh, start)
            assert start == fh.tell()
    assert path.read_bytes() == b"".join(blocks)
    mem = io.BytesIO()
    mem.write(b"abc")
    assert start_writeback(mem, 0) == 3 and mem.getvalue() == b"abc"  # in memory: nothing to write back


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_finds_sync_file_range_on_linux():
    assert atomic._SYNC_FILE_RANGE is not None


def test_remove_stale_temps_removes_only_atomic_path_temp_files(tmp_path):
    """What processes killed inside ``atomic_path`` leave (mkstemp ran, the rename did not) goes, for any
    output; the outputs themselves, other dot-files and look-alike names stay."""
    out = tmp_path / "done.json"
    out.write_text("{}")
    writers = [atomic_path(tmp_path / n) for n in ("done.json", "case_seg.nii.gz", ".started")]
    left = [w.__enter__() for w in writers]  # writers killed here: they never leave the block (kept referenced)
    kept = [tmp_path / n for n in (".started", ".done..tmp.json", ".staging-x", "notes.tmp")]  # no 8 random chars
    for k in kept:
        k.write_text("x")
    assert atomic.remove_stale_temps(tmp_path) == sorted(left)
    assert not any(p.exists() for p in left) and out.read_text() == "{}" and all(k.exists() for k in kept)
    assert atomic.remove_stale_temps(tmp_path / "missing") == []
