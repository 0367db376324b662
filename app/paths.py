"""Where the repository's bundles and sample data live (segapp is installed from its checkout)."""

from __future__ import annotations

from pathlib import Path

from app.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"
SAMPLE_DATA_DIR = REPO_ROOT / "sample_data"


def bundle_root(name_or_path: str) -> str:
    """Resolve a bundle given as a folder path or as a name under ``bundles/``."""
    p = Path(name_or_path)
    for candidate in (p, BUNDLES_DIR / name_or_path):
        if (candidate / "configs" / "metadata.json").is_file():
            return str(candidate.resolve())
    raise ConfigError(f"no MONAI bundle here (expected configs/metadata.json); known bundles: "
                      f"{', '.join(sorted(d.name for d in BUNDLES_DIR.iterdir() if d.is_dir()))}", name_or_path)


def sample_manifest(name: str = "hippocampus") -> str:
    """The manifest of the sample data shipped in the repository (used by the demo and bundle defaults)."""
    return str(SAMPLE_DATA_DIR / name / "manifest.json")
