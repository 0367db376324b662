"""Keep freed memory in the process's heap while a network runs on the CPU.

glibc's ``malloc`` serves every block above its mmap threshold (128 KiB, rising dynamically to at
most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``. A 3D network's activations are such
blocks, so every layer of every call meets pages that the kernel must fault in and zero again
(hundreds of thousands of faults per window; ``bench/cpu_heap.py`` counts them and times a network
with and without this module). PyTorch's CPU tuning guides avoid it by preloading jemalloc or
TCMalloc; :func:`retained_heap` does it with glibc alone, for the span of a block.

Inside the block glibc makes no new mapping (``M_MMAP_MAX`` 0) and gives no memory back
(``M_TRIM_THRESHOLD`` 2 GiB), so freed activations serve the next call; the process's peak memory
can grow by what the heap keeps. On leaving the last block glibc is set as its dynamic threshold
ends up after large blocks were freed (mmap above 32 MiB, trim above 64 MiB: setting either turns
the dynamic rule off) and ``malloc_trim(0)`` returns the free heap to the kernel, so a long-running
process (``segapp serve``) holds no more memory between jobs than before.

segapp runs the network and the fused stitching of CPU inference inside it
(``app.inference.predictor``). CPU training is left out: a step keeps its activations for the
backward pass, so its peak is already the larger one and what the heap keeps comes on top of it
(``bench/cpu_heap.py``'s ``train`` rows: 4.4 GiB without, 7.3 GiB with, for four 96³ crops).

Left alone: other C libraries (musl, macOS), a process whose user tuned glibc's allocator
(``MALLOC_*_`` variables or ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``), and
``SEGAPP_RETAIN_HEAP=0``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_KEEP_ALL = 2**31 - 1  # mallopt takes an int: up to 2 GiB of free heap top stays
# after the block: glibc's dynamic rule at its ceiling (mallopt(3)), and its default mapping count
_AFTER_MMAP_THRESHOLD, _AFTER_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 32 << 20, 64 << 20, 65536

_lock = threading.Lock()
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl and macOS lack it)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def heap_is_managed() -> bool:
    """Whether :func:`retained_heap` changes anything in this process (see the module's docstring)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    user_tuned = "glibc.malloc." in tunables or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)
    return _LIBC is not None and not user_tuned and os.environ.get("SEGAPP_RETAIN_HEAP", "1") != "0"


def retaining() -> bool:
    """Whether a :func:`retained_heap` block is open in this process."""
    return _depth > 0


@contextmanager
def retained_heap(enabled: bool = True) -> Iterator[None]:
    """Within the block, freed memory stays in the heap for the next allocation (glibc only).

    Nested and concurrent blocks share one setting: the defaults come back when the last one ends.
    ``enabled=False`` (e.g. a network on a GPU, whose host allocations are small) does nothing.
    """
    global _depth
    if not enabled or not heap_is_managed():
        yield
        return
    assert _LIBC is not None
    with _lock:
        _depth += 1
        if _depth == 1:
            _LIBC.mallopt(_M_MMAP_MAX, 0)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                _LIBC.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_THRESHOLD)
                _LIBC.malloc_trim(0)
