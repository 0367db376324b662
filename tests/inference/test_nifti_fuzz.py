"""Property-based fuzzing of ``segapp infer`` on NIfTI files with mutated headers (hypothesis): random dims,
pixdim, datatype, bitpix, sform/qform codes and values, vox_offset, scl_slope/inter, magic, gzip and
truncation of a valid oblique image. Every outcome is either a correct result (outputs on the input's
grid) or a one-line ``SegappError`` naming the file, with no output left behind; never another exception.

CI runs ``SEGAPP_FUZZ_EXAMPLES`` examples (default 100, derandomized so every run tries the same ones);
``python bench/fuzz_nifti.py --examples N`` runs more and prints the outcomes.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from nifti_mutations import Case, check_infer_outcome, mutations
from runs import tiny_run

from app.bundle.model import load_model
from app.inference.pipeline import Segmenter

EXAMPLES = int(os.environ.get("SEGAPP_FUZZ_EXAMPLES", "100"))
OUTCOMES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    saved = os.environ.get("SEGAPP_MEMORY_LIMIT")
    os.environ["SEGAPP_MEMORY_LIMIT"] = "16M"  # mutated voxel sizes must not start a multi-GB network grid
    try:
        yield Segmenter(load_model(run=tiny_run(tmp_path_factory.mktemp("run")), device="cpu"))
    finally:
        if saved is None:
            os.environ.pop("SEGAPP_MEMORY_LIMIT", None)
        else:
            os.environ["SEGAPP_MEMORY_LIMIT"] = saved


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=mutations())
def test_mutated_headers_give_a_correct_result_or_one_line(segmenter, case: Case):
    with tempfile.TemporaryDirectory(prefix="segapp-fuzz-") as folder:
        OUTCOMES[check_infer_outcome(segmenter, case, Path(folder))] += 1


def test_the_fuzzer_reaches_both_outcomes(segmenter):
    """The examples above are not all refused (nor all accepted): the property was really exercised."""
    if not OUTCOMES:  # selected alone (-k): run the property here first
        test_mutated_headers_give_a_correct_result_or_one_line(segmenter)
    assert OUTCOMES["ok"] > 0 and sum(OUTCOMES.values()) > OUTCOMES["ok"], OUTCOMES
