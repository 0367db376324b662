"""Fuzz the DICOM series reader with many random examples (the properties of tests/io/test_dicom_fuzz.py).

    python bench/fuzz_dicom.py --examples 2000 [--seed 1] [--only series|multiframe|mosaic]

Each property damages a small valid phantom at random and checks that the reader either reads a
consistent volume (equal to the plain pydicom reader's) or raises a SegappError. Prints examples run
and seconds per property; exits 1 on the first falsified property (hypothesis prints the example).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _property(fuzz, kind: str, count: dict):
    def prop(mutations):
        count["n"] += 1
        fuzz.check_damaged(kind, mutations)

    return prop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=1000, help="examples per property (default 1000)")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    ap.add_argument("--only", choices=["series", "multiframe", "mosaic"], action="append")
    a = ap.parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "helpers"), str(REPO / "tests" / "io")]
    logging.disable(logging.WARNING)  # the reader logs every damaged file it skips

    import test_dicom_fuzz as fuzz
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    lengths = {"series": 4, "multiframe": 3, "mosaic": 3}
    failed = 0
    for kind in a.only or list(lengths):
        count = {"n": 0}
        prop = _property(fuzz, kind, count)

        test = settings(
            max_examples=a.examples,
            deadline=None,
            database=None,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
        )(given(mutations=st.lists(fuzz.mutation, min_size=1, max_size=lengths[kind]))(prop))
        if a.seed is not None:
            test = seed(a.seed)(test)
        t0 = time.perf_counter()
        try:
            test()
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - report and go on with the next property
            status = f"FALSIFIED ({type(exc).__name__})"
            failed += 1
            for e in getattr(exc, "exceptions", [exc]):
                print(f"{type(e).__name__}: {e}", *getattr(e, "__notes__", []), sep="\n", file=sys.stderr)
        dt = time.perf_counter() - t0
        print(
            f"{kind:10s} {count['n']:6d} examples (incl. shrinking) {dt:7.1f} s  {dt / max(1, count['n']) * 1000:6.1f} "
            f"ms/example  {status}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
