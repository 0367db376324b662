"""Checks that run before the work starts, so that what the machine cannot do fails in seconds with one
line instead of after an hour of training or inference.

* :func:`check_output_dir`: the folder exists (a file can be written and removed in it) or can be made.
* :func:`check_free_space`: the file system holds the outputs' estimated size (:func:`estimate_output_bytes`).
* :func:`memory_budget_bytes` / :func:`check_memory`: what a job may allocate (``SEGAPP_MEMORY_LIMIT``,
  else the memory the kernel reports available).
* :func:`check_device`: the requested compute device exists.
* :func:`check_tracking_server`: an ``http(s)://`` MLflow tracking URI answers within a few seconds.

All raise :class:`app.errors.EnvError` (or ``ConfigError`` for an option that is malformed).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from app.errors import ConfigError, EnvError, env_error
from app.io.nifti import format_bytes

MEMORY_ENV = "SEGAPP_MEMORY_LIMIT"
TRACKING_TIMEOUT_S = 3.0
# Bytes per voxel written per output format, worst case (uncompressed uint8 NIfTI; BINARY SEG frames
# at one bit per voxel and segment plus ~1 kB of functional groups per frame; contours are text).
_SLACK = 1 << 20


def check_output_dir(path: str | os.PathLike, option: str = "--output") -> Path:
    """Prove that outputs can be written in ``path``; return it resolved. A folder that does not exist
    yet is not made here (a run refused later leaves nothing behind): its nearest existing parent is
    checked for the right to make it.

    Raises:
        EnvError: it is a file, cannot be created, or cannot be written (read-only, permissions).
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise EnvError(f"the output folder ({option}) is a file", p)
    probe_dir = p
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if probe_dir != p and not probe_dir.is_dir():
        raise EnvError(f"cannot create the output folder ({option}): a part of the path is a file, not a folder", p)
    if probe_dir != p:  # can the folder be made there? (a probe folder, removed at once)
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".segapp-write-test-", dir=probe_dir))
        except OSError as exc:
            raise env_error(exc, f"cannot create the output folder ({option})", p) from exc
        return p.resolve()
    try:
        fd, probe = tempfile.mkstemp(prefix=".segapp-write-test-", dir=p)
        try:
            os.write(fd, b"segapp")
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
    except OSError as exc:
        raise env_error(exc, f"cannot write in the output folder ({option})", p) from exc
    return p.resolve()


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to this user on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def estimate_output_bytes(shape: Sequence[int], n_segments: int, formats: Sequence[str]) -> int:
    """A generous upper bound of the bytes one series' outputs take on disk.

    Args:
        shape: the source voxel grid ``(I, J, K)``.
        n_segments: foreground labels of the model.
        formats: among ``nifti``, ``seg``, ``rtstruct`` (the PNG overlay and summary are always written).
    """
    i, j, k = (int(s) for s in shape[:3])
    voxels = i * j * k
    total = _SLACK + 2 * max(i * j, j * k, i * k) * 3  # overlay PNG (three RGB slices) and summary
    if "nifti" in formats:
        total += voxels + 352
    if "seg" in formats:
        total += n_segments * (voxels // 8 + k * 1024) + 64 * 1024
    if "rtstruct" in formats:
        total += n_segments * k * 32 * 1024 + 64 * 1024
    return total


def check_free_space(path: str | os.PathLike, need_bytes: int, what: str = "the outputs") -> None:
    """EnvError when the file system of ``path`` has less than ``need_bytes`` free."""
    free = free_bytes(path)
    if free < need_bytes:
        raise EnvError(
            f"{what} need about {format_bytes(need_bytes)} but only {format_bytes(free)} is free on this disk", path
        )


def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ConfigError(f"expected a size such as 8G, 512M or 1000000, got {text!r}", MEMORY_ENV)
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def _available_memory() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return 1 << 62  # unknown: no limit


def memory_budget_bytes() -> int:
    """Host memory a job may use: ``SEGAPP_MEMORY_LIMIT`` (``8G``, ``512M``, bytes), else what is available now."""
    text = os.environ.get(MEMORY_ENV)
    return _parse_bytes(text) if text else _available_memory()


def check_memory(need_bytes: int, what: str, path: str | os.PathLike | None = None) -> None:
    """EnvError when ``need_bytes`` exceeds :func:`memory_budget_bytes`."""
    budget = memory_budget_bytes()
    if need_bytes > budget:
        source = MEMORY_ENV if os.environ.get(MEMORY_ENV) else "available memory"
        raise EnvError(
            f"{what} needs about {format_bytes(need_bytes)}, more than {format_bytes(budget)} ({source})", path
        )


def check_device(name: str):
    """The torch device for ``--device`` (``ConfigError`` naming the option when it is not there)."""
    from app.runtime.device import resolve_device

    return resolve_device(name)


def check_tracking_server(uri: str | None, timeout_s: float = TRACKING_TIMEOUT_S) -> None:
    """An ``http(s)://`` MLflow tracking URI must answer (any HTTP status) within ``timeout_s``.

    Local stores (``sqlite:``, paths, ``file:``) and other schemes are not checked here (MLflow reports them).

    Raises:
        EnvError: nothing answers (refused, unresolvable host, timeout), naming ``--tracking-uri``.
    """
    if not uri or not re.match(r"^https?://", uri, re.I):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (http/https checked above)
            resp.read(64)
    except urllib.error.HTTPError:
        return  # something answers (a proxy that wants credentials, an older server without /health)
    except OSError as exc:  # URLError, refused, reset, timeout
        reason = getattr(exc, "reason", exc)
        words = "timed out" if isinstance(reason, TimeoutError) else str(reason)
        if isinstance(reason, ConnectionRefusedError):
            words = "connection refused"
        elif isinstance(reason, socket.gaierror):
            words = "unknown host"
        raise EnvError(
            f"no MLflow tracking server answers at {uri} within {timeout_s:g} s ({words}); start it, or pass "
            "--tracking-fallback local to track in the run folder instead",
            "--tracking-uri",
        ) from exc
