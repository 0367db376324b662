"""Write files so that a crash never leaves a half-written output: temp file in the same
folder, fsync, then ``os.replace`` (atomic on POSIX)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import io
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's ``sync_file_range(2)`` from the C library (Python's ``os`` lacks it), None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; wait for none of it


def start_writeback(fh: BinaryIO, start: int) -> int:
    """Ask the kernel to start writing ``fh``'s bytes ``start`` .. its position to disk now, without
    waiting, so that the fsync before an atomic rename finds less to write: a writer calls it after each
    large block. Returns the position (the next call's ``start``). A hint only: it does nothing for an
    in-memory file or where the call is missing (not Linux), and ignores the call's errors.

    The 5 MB PixelData of ``bench/seg_write_speed.py``'s SEG, written in 1 MB blocks: write + fsync
    4.9-5.4 -> 3.1-3.3 ms (2-core CPU machine, ext4 on a virtio disk).
    """
    end = fh.tell()
    if _SYNC_FILE_RANGE is not None and end > start:
        try:
            fd = fh.fileno()
        except (OSError, AttributeError, io.UnsupportedOperation):
            return end
        fh.flush()
        _SYNC_FILE_RANGE(fd, start, end - start, _SYNC_FILE_RANGE_WRITE)
    return end


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# atomic_path's temp files: "." + the final name's stem + "." + mkstemp's 8 random characters + ".tmp" + suffixes
_TEMP_NAME = re.compile(r"\..*\.[a-z0-9_]{8}\.tmp(\..*)?")


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files :func:`atomic_path` left in ``folder`` when its process was killed (a SIGKILL
    runs no cleanup); return them. Only for a caller that alone writes into ``folder``: another writer's
    temp file in flight would go too."""
    root = Path(folder)
    if not root.is_dir():
        return []
    stale = sorted(p for p in root.iterdir() if _TEMP_NAME.fullmatch(p.name) and p.is_file())
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; rename it over ``final_path`` on success.

    ``suffix`` defaults to the final file's suffixes (so writers that sniff the extension, such as
    nibabel for ``.nii.gz``, still pick the right format). On any exception the temp file is removed
    and ``final_path`` is left as it was.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final_path.suffixes) if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{final_path.stem}.", suffix=f".tmp{suffix}", dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should get the usual mode
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write(final_path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``final_path``."""
    with atomic_path(final_path) as tmp:
        writer(tmp)
    return Path(final_path)


def atomic_write_text(final_path: str | os.PathLike, text: str) -> Path:
    return atomic_write(final_path, lambda p: p.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on a file ``.NAME.lock`` beside ``path``, held for the ``with`` block: for a
    read-modify-write of ``path`` that several processes may do at once (without it, one's update is
    lost). The folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
