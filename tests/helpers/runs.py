"""Model folders for tests: an untrained small network saved as a segapp training-run folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from app.bundle.config import bundle_parser
from app.bundle.store import find_bundle
from app.training.run_bundle import write_run_bundle

TINY_NET = {"features": [4, 8]}


def tiny_run(
    folder: Path,
    bundle: str = "hippocampus_unet3d",
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    configs: tuple[str, ...] = ("demo.json",),
) -> Path:
    """A run folder (configs written by segapp, so trusted) with seeded random weights in models/model.pt."""
    write_run_bundle(find_bundle(bundle).root, folder, configs, {**TINY_NET, **(overrides or {})})
    torch.manual_seed(seed)
    network = bundle_parser(folder, ["inference"]).get_parsed_content("network_def")
    (folder / "models").mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder
