"""DICOM conformance checks for tests: dciodvfy (dicom3tools) on written objects."""

from __future__ import annotations

import subprocess
from pathlib import Path

DCIODVFY = "/usr/bin/dciodvfy"


def dciodvfy(path: str | Path) -> tuple[list[str], list[str]]:
    """Run dciodvfy on one file; return (error lines, warning lines)."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings


def assert_dciodvfy_clean(path: str | Path) -> list[str]:
    """Fail the test if dciodvfy reports any error (warnings allowed); return the warnings."""
    errors, warnings = dciodvfy(path)
    assert not errors, f"dciodvfy errors in {path}:\n" + "\n".join(errors)
    return warnings
