"""Write files so that a crash never leaves a half-written output: temp file in the same
folder, fsync, then ``os.replace`` (atomic on POSIX)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
