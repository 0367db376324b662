"""``segapp bundle verify``: MONAI's own checks of a bundle (``verify_metadata``, ``verify_net_in_out``).

The metadata is checked against segapp's offline copy of the bundle schema (this machine may have
no network to fetch the one the metadata names); the network is built from the inference config
and run on fake data of the shape ``network_data_format`` declares (CPU). MONAI resolves config
macros relative to the working directory, so both run from the bundle's folder.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from app import resources
from app.bundle.config import config_path
from app.bundle.store import find_bundle, quiet_monai_logs
from app.bundle.trust import require_trusted
from app.errors import ConfigError, SegappError

SCHEMA = resources.BUNDLES_DIR / "schema" / "meta_schema.json"


def verify_bundle(path: str | Path, trust: bool = False, net_id: str = "network_def") -> list[str]:
    """Run both checks; returns one line per passed check, raises ConfigError naming the failed one."""
    from monai.bundle import verify_metadata, verify_net_in_out

    ref = find_bundle(path)
    meta = ref.root / "configs" / "metadata.json"
    inference = config_path(ref.root, "inference")
    lines = []
    with contextlib.chdir(ref.root), quiet_monai_logs():
        try:
            verify_metadata(meta_file=str(meta), filepath=str(SCHEMA))
        except Exception as exc:  # jsonschema's ValidationError, or an unreadable file
            raise ConfigError(
                f"metadata does not follow the bundle schema: {str(exc).splitlines()[0]}", str(meta)
            ) from exc
        lines.append(f"verify_metadata: OK ({meta})")
        require_trusted(ref, trust)  # building the network runs the bundle's code
        try:
            verify_net_in_out(net_id=net_id, meta_file=str(meta), config_file=str(inference), device="cpu")
        except SegappError:
            raise
        except Exception as exc:  # wrong output channels or dtype, or the network cannot be built
            raise ConfigError(
                f"verify_net_in_out failed: {type(exc).__name__}: {str(exc).splitlines()[0]}", str(inference)
            ) from exc
        lines.append(f"verify_net_in_out {net_id}: OK ({inference.relative_to(ref.root)})")
    return lines
