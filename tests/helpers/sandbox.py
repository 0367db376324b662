"""Real machine faults for tests, without root on the host: a command run in its own mount namespace
(``unshare --user --map-root-user --mount``) with a small or read-only tmpfs mounted over a folder,
or with a file-size limit (``RLIMIT_FSIZE``, the kernel's ``ulimit -f``) so that writes past it fail
with ``EFBIG``.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import pytest

SEGAPP = [sys.executable, "-m", "app.cli"]


@lru_cache(maxsize=1)
def can_mount_tmpfs() -> bool:
    """Whether this machine lets an unprivileged mount namespace mount a tmpfs."""
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def needs_tmpfs(test):
    """Skip ``test`` where mount namespaces are not allowed (the check runs a tiny ``unshare`` once)."""
    return pytest.mark.skipif(not can_mount_tmpfs(), reason="no unprivileged mount namespaces here")(test)


def _env() -> dict[str, str]:
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "SEGAPP_NO_PROGRESS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([repo, str(Path(repo) / "tests" / "helpers"), env.get("PYTHONPATH", "")])
    return env


def run_on_tmpfs(
    folder: Path, args: Sequence[str], size: str = "64k", read_only: bool = False, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``segapp ARGS`` with a fresh tmpfs of ``size`` (``ro`` if ``read_only``) mounted on ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    script = f"mount -t tmpfs -o {opts} none {shlex.quote(str(folder))} && exec {shlex.join([*SEGAPP, *args])}"
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
    )


def run_with_file_size_limit(
    args: Sequence[str], limit_bytes: int, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``segapp ARGS`` where no file may grow past ``limit_bytes`` (writes beyond fail with EFBIG)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [*SEGAPP, *args], preexec_fn=limit, capture_output=True, text=True, env=_env(), timeout=timeout
    )


def error_lines(stderr: str) -> list[str]:
    """The lines segapp itself printed (``segapp: ...``), and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("segapp: ")]
