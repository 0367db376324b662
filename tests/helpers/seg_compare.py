"""Compare a SEG written by the fast engine with highdicom's (used by tests/io/test_seg_fast.py and
bench/seg_write_speed.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

# Differ by design between two writes (new UIDs, clocks) or between the engines (see app/io/seg_fast.py).
_PER_WRITE = {
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "MediaStorageSOPInstanceUID",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "DimensionOrganizationUID",
    "ImplementationClassUID",
    "ImplementationVersionName",
    "FileMetaInformationGroupLength",
    "ContributingEquipmentSequence",
    "PixelData",
}


def seg_differences(a: Dataset, b: Dataset, path: str = "") -> list[str]:
    """Every difference between two datasets (keywords, VRs, values; sequences item by item)."""
    out = []
    keys = {e.keyword or str(e.tag) for e in a} | {e.keyword or str(e.tag) for e in b}
    for kw in sorted(keys - _PER_WRITE):
        if kw not in a or kw not in b:
            out.append(f"{path}{kw}: only in {'fast' if kw in a else 'highdicom'}")
            continue
        ea, eb = a[kw], b[kw]
        if ea.VR != eb.VR:
            out.append(f"{path}{kw}: VR {ea.VR} != {eb.VR}")
        elif ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                out.append(f"{path}{kw}: {len(ea.value)} items != {len(eb.value)}")
            for n, (ia, ib) in enumerate(zip(ea.value, eb.value)):
                out += seg_differences(ia, ib, f"{path}{kw}[{n}].")
        elif str(ea.value) != str(eb.value):  # str: DS/IS compare as written
            out.append(f"{path}{kw}: {ea.value!r} != {eb.value!r}")
    return out


def assert_same_seg(fast_path: str | Path, ref_path: str | Path) -> tuple[Dataset, Dataset]:
    fast, ref = pydicom.dcmread(fast_path), pydicom.dcmread(ref_path)
    problems = seg_differences(fast, ref) + seg_differences(fast.file_meta, ref.file_meta, "file_meta.")
    assert not problems, "fast engine differs from highdicom:\n" + "\n".join(problems[:40])
    n_bits = int(ref.NumberOfFrames) * int(ref.Rows) * int(ref.Columns)
    n_bytes = (n_bits + 7) // 8
    # same bits; highdicom pads an odd length with the character '0', we with NUL
    assert len(fast.PixelData) == len(ref.PixelData) == n_bytes + n_bytes % 2
    assert fast.PixelData[:n_bytes] == ref.PixelData[:n_bytes]
    np.testing.assert_array_equal(fast.pixel_array, ref.pixel_array)
    # the engine's own differences, checked rather than ignored
    assert fast.ContributingEquipmentSequence[0] == ref.ContributingEquipmentSequence[0]  # acquisition
    assert len(fast.ContributingEquipmentSequence) == len(ref.ContributingEquipmentSequence) - 1  # no "highdicom"
    org = fast.DimensionOrganizationSequence[0].DimensionOrganizationUID
    assert {d.DimensionOrganizationUID for d in fast.DimensionIndexSequence} == {org}
    return fast, ref
