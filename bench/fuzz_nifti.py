"""Fuzz ``segapp infer`` with NIfTI files whose headers are mutated at random (hypothesis), beyond CI's count.

The same property as ``tests/inference/test_nifti_fuzz.py`` (the strategy and the check live in
``tests/helpers/nifti_mutations.py``): every mutated file gives either outputs on the input's grid or a
one-line ``SegappError`` naming it with nothing left behind; anything else is a bug, printed with the
smallest failing file hypothesis finds. Prints the number of examples, the seconds they took, and how
many ended in each outcome.

    python bench/fuzz_nifti.py --examples 2000            # a new random sample each run
    python bench/fuzz_nifti.py --examples 500 --seed 7    # a reproducible one
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "helpers"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    ap.add_argument(
        "--memory-limit", default="16M", help="SEGAPP_MEMORY_LIMIT while fuzzing (bounds the network grids it runs)"
    )
    args = ap.parse_args()
    os.environ["SEGAPP_MEMORY_LIMIT"] = args.memory_limit
    os.environ.setdefault("SEGAPP_HOME", tempfile.mkdtemp(prefix="segapp-fuzz-home-"))

    import logging
    import warnings

    import torch
    from hypothesis import HealthCheck, given, seed, settings
    from nifti_mutations import check_infer_outcome, mutations
    from runs import tiny_run

    from app.bundle.model import load_model
    from app.inference.pipeline import Segmenter

    logging.disable(logging.CRITICAL)  # nibabel logs each header it "fixes"
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="segapp-fuzz-") as tmp:
        segmenter = Segmenter(load_model(run=tiny_run(Path(tmp) / "run"), device="cpu"))
        outcomes: Counter[str] = Counter()

        @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=mutations())
        def fuzz(case) -> None:
            with tempfile.TemporaryDirectory(prefix="case-", dir=tmp) as folder:
                outcomes[check_infer_outcome(segmenter, case, Path(folder))] += 1
            done = sum(outcomes.values())
            if done % 100 == 0:
                print(f"{done} examples, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

        if args.seed is not None:
            fuzz = seed(args.seed)(fuzz)
        t0 = time.perf_counter()
        failed = None
        try:
            fuzz()
        except Exception as exc:  # the property failed: hypothesis printed the smallest example
            failed = exc
        elapsed = time.perf_counter() - t0
    total = sum(outcomes.values())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}")
    print(f"{total} example(s) run (hypothesis counts {args.examples} valid ones) in {elapsed:.1f} s")
    for label, n in outcomes.most_common():
        print(f"  {n:6d}  {label}")
    if failed is not None:
        print(f"PROPERTY FAILED: {type(failed).__name__}: {failed}")
        return 1
    print("every example: outputs on the input's grid, or one line naming the file and nothing left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
