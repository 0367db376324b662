"""The decoding pool (app.io.decode_pool): results in call order whichever way they come back (a
shared-memory slot, or the pipe for what does not fit or is not an array), an error that leaves no
slot to be overwritten by a call still running, and callers on several threads sharing one pool."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from app.errors import DicomError
from app.io import decode_pool
from app.io.decode_pool import run_calls, shutdown_decode_pool


def frame(file: str, seed: int, shape: tuple[int, ...], dtype: str, delay: float = 0.0) -> np.ndarray:
    """A decoder stand-in: an array determined by ``seed`` (after ``delay`` seconds)."""
    time.sleep(delay)
    return np.random.default_rng(seed).integers(0, 1000, size=shape).astype(dtype)


def fails(file: str) -> None:
    raise DicomError("cannot decode pixel data", path=file)


def text(file: str) -> str:
    return file.upper()


@pytest.fixture(autouse=True)
def fresh_pool():
    shutdown_decode_pool()
    yield
    shutdown_decode_pool()


def test_results_in_call_order_through_slots_and_pipe():
    big = (decode_pool._SLOT_BYTES // 2 + 8,)  # int16: one element more than a slot holds -> the pipe
    # 30 calls, 4 in flight on 2 workers: each slot is used several times
    calls = [(frame, (f"f{n}", n, (3 + n % 4, 5, 7), ("<i2", "<u2", "<f4", "|u1")[n % 4])) for n in range(30)]
    calls[7] = (frame, ("big", 7, big, "<i2"))
    calls[11] = (text, ("not an array",))
    got = run_calls(calls, workers=2)
    want = [fn(*args) for fn, args in calls]
    assert got[11] == "NOT AN ARRAY"
    for g, w in zip(got, want):
        if isinstance(w, np.ndarray):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)


def test_a_worker_copies_its_array_into_its_slot():
    decode_pool._arena = decode_pool._Arena(2)  # as a forked worker sees its pool's arena
    try:
        out = decode_pool._call(frame, ("f", 3, (4, 6), "<u2"), 1)
        assert isinstance(out, decode_pool._InSlot) and out.shape == (4, 6) and out.dtype == "<u2"
        np.testing.assert_array_equal(decode_pool._arena.view(1, out.shape, out.dtype), frame("f", 3, (4, 6), "<u2"))
        assert decode_pool._call(text, ("x",), 0) == "X"  # not an array: returned as it is
        assert isinstance(decode_pool._call(frame, ("f", 3, (4, 6), "<u2"), None), np.ndarray)  # no slot given
    finally:
        decode_pool._arena = None


def test_an_error_raises_and_later_calls_get_their_own_results():
    slow = [(frame, (f"s{n}", 100 + n, (64, 64), "<i2", 0.05)) for n in range(3)]
    with pytest.raises(DicomError, match="bad.dcm: cannot decode"):
        run_calls([(fails, ("bad.dcm",)), *slow], workers=2)  # slow calls still running when it raises
    calls = [(frame, (f"g{n}", n, (64, 64), "<i2")) for n in range(12)]
    for got, (fn, args) in zip(run_calls(calls, workers=2), calls):
        np.testing.assert_array_equal(got, fn(*args))  # no slot written twice
    time.sleep(0.2)
    assert decode_pool._arena is not None and sorted(decode_pool._arena.free) == [0, 1, 2, 3]  # every slot back


def test_threads_share_the_pool():
    out: dict[int, list] = {}

    def caller(t: int) -> None:
        calls = [(frame, (f"t{t}_{n}", 1000 * t + n, (32, 16), "<i2")) for n in range(20)]
        out[t] = [np.array_equal(g, fn(*args)) for g, (fn, args) in zip(run_calls(calls, workers=2), calls)]

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert out == {t: [True] * 20 for t in range(3)}
