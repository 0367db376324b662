"""``gc_paused``: the collector is off inside, and back as it was after, errors and nesting included."""

from __future__ import annotations

import gc

import pytest

from app.io.gc_pause import gc_paused


def test_gc_paused_restores_the_collector_as_it_was():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # nested: the inner block found it off and leaves it off
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a reader failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()


def test_scan_leaves_the_collector_enabled(tmp_path):
    from app.errors import DicomError
    from app.io.dicom_scan import scan

    (tmp_path / "note.txt").write_text("not DICOM")
    result = scan(tmp_path)
    assert result.n_files == 1 and not result.series and gc.isenabled()
    with pytest.raises(DicomError):
        scan(tmp_path / "missing")
    assert gc.isenabled()
