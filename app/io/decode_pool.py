"""Worker processes that decode compressed DICOM frames (the JPEG 2000 decoders hold the GIL, so
threads would run them one at a time).

One pool per process, started on first use and kept: starting workers costs about 0.1 s (more than
decoding a small series), and batch inference or a DICOM listener decodes series after series. The
workers are forked (where the platform can fork; spawned elsewhere): ``forkserver`` and ``spawn``
workers import the caller's main script again (which re-runs unguarded scripts, and imports torch
through the ``segapp`` entry point: seconds per worker). A forked worker inherits a copy of the
caller but only runs pydicom's decoders and numpy (no torch, no CUDA, no OpenMP), which is what makes
forking a process with other threads safe here. ``shutdown_decode_pool`` releases the workers; they
also end with the process. Inside a daemonic process (which may not have children) everything runs
in the calling process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from app.errors import DicomError

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_size = 0


def _call(fn: Callable, args: tuple) -> Any:
    return fn(*args)


def _get_pool(workers: int) -> ProcessPoolExecutor | None:
    global _pool, _size
    with _lock:
        if _pool is not None and _size != workers:
            _pool.shutdown(wait=False, cancel_futures=True)
            _pool = None
        if _pool is None:
            if mp.current_process().daemon:
                return None
            context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            try:
                _pool, _size = ProcessPoolExecutor(max_workers=workers, mp_context=context), workers
            except (OSError, ValueError) as exc:
                logger.debug("no decoding processes (%s): decoding in this process", exc)
                return None
        return _pool


def _drop_pool() -> None:
    global _pool
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def shutdown_decode_pool() -> None:
    """End the decoding processes (a later decode starts new ones)."""
    _drop_pool()


def run_calls(calls: list[tuple[Callable, tuple]], workers: int) -> list[Any]:
    """``fn(*args)`` for every ``(fn, args)``, in ``workers`` processes, results in call order.

    ``fn`` must be importable without torch (a module of ``app.io`` that ``app.io.dicom_decode``
    imports) and ``args[0]`` the file it decodes. The first error in call order is raised (workers'
    ``DicomError`` come back as they were raised).

    Raises:
        DicomError: a worker process died (a decoder crashed), naming the first unfinished file.
    """
    if workers <= 1 or len(calls) <= 1:
        return [fn(*args) for fn, args in calls]
    pool = _get_pool(workers)
    if pool is None:
        return [fn(*args) for fn, args in calls]
    try:
        futures = [pool.submit(_call, fn, args) for fn, args in calls]
    except (RuntimeError, AssertionError, OSError, BrokenProcessPool) as exc:  # workers cannot start here
        logger.debug("decoding in this process (%s)", exc)
        _drop_pool()
        return [fn(*args) for fn, args in calls]
    results = []
    try:
        for (_, args), future in zip(calls, futures):
            try:
                results.append(future.result())
            except BrokenProcessPool as exc:
                _drop_pool()
                raise DicomError(
                    "a pixel data decoder process died while decoding this file (or one decoded at "
                    "the same time): its compressed data may be corrupt",
                    path=args[0],
                ) from exc
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return results


__all__ = ["run_calls", "shutdown_decode_pool"]
