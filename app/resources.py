"""Where the bundles and sample data shipped with segapp live.

In a wheel they are package data under ``app/_shipped/`` (``setup.py`` maps the repository's
``bundles/`` and ``sample_data/`` there); in a source checkout (``pip install -e .``) they are the
checkout's own folders.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    packaged = PACKAGE_DIR / "_shipped" / name
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / name


BUNDLES_DIR = _shipped("bundles")
SAMPLE_DATA_DIR = _shipped("sample_data")


def sample_manifest(name: str = "hippocampus") -> str:
    """The manifest of the sample data shipped with segapp (the demo's and the bundles' default data)."""
    return str(SAMPLE_DATA_DIR / name / "manifest.json")
