"""What the NIfTI header check costs on an honest file, next to reading the voxels.

``app.io.nifti.inspect_nifti`` checks a header against its file before any voxel is allocated. For an
uncompressed file that is a ``stat``; for a gzip file whose trailer gives the declared length exactly (what
nibabel and most writers produce) it reads 4 bytes; otherwise (several gzip members, trailing bytes) it
decompresses the stream once, keeping nothing. This prints the seconds of each case and of ``load_nifti``
(which includes the check) for a synthetic CT-sized int16 volume.

    python bench/nifti_header_check.py                      # 512 x 512 x 300 int16
    python bench/nifti_header_check.py --shape 256 256 100
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import nibabel as nib
    import numpy as np

    from app.io.nifti import format_bytes, inspect_nifti, load_nifti

    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 200, args.shape) - 500).astype(np.int16)
    arr[:, :, : args.shape[2] // 3] = -1024  # air compresses, like a real CT's surroundings
    with tempfile.TemporaryDirectory() as tmp:
        raw, gz, members = Path(tmp) / "ct.nii", Path(tmp) / "ct.nii.gz", Path(tmp) / "ct_members.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.diag([0.8, 0.8, 1.5, 1.0])), raw)
        data = raw.read_bytes()
        gz.write_bytes(gzip.compress(data, compresslevel=1))
        half = len(data) // 2
        members.write_bytes(gzip.compress(data[:half], compresslevel=1) + gzip.compress(data[half:], compresslevel=1))
        dims = " x ".join(map(str, args.shape))
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s); volume {dims} int16")
        print(f"{'file':42s} {'size':>10s} {'check s':>9s} {'load s':>9s}")
        for label, path in (
            ("uncompressed .nii", raw),
            (".nii.gz, one member (trailer exact)", gz),
            (".nii.gz, two members (stream counted)", members),
        ):
            check = _best(lambda p=path: inspect_nifti(p), args.repeat)
            load = _best(lambda p=path: load_nifti(p), args.repeat)
            print(f"{label:42s} {format_bytes(path.stat().st_size):>10s} {check:9.4f} {load:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
