"""Compatibility re-exports: the SEG code now lives in :mod:`app.io.segments`, :mod:`app.io.seg_write`
and :mod:`app.io.seg_read`. Kept only for importers outside ``app/io`` not yet updated
(``app/cli.py``, ``app/engine/infer_cli.py``, ``bench/infer_speed.py``); import from the new modules."""

from app.io.seg_read import read_seg, seg_to_nifti
from app.io.seg_write import write_seg
from app.io.segments import SegmentSpec

__all__ = ["SegmentSpec", "read_seg", "seg_to_nifti", "write_seg"]
