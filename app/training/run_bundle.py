"""A training run folder is itself a bundle: ``segapp infer/evaluate --run DIR`` rebuilds the model as trained.

``write_run_bundle`` writes ``DIR/configs/inference.json`` and ``evaluate.json``: the bundle's own
configs with the run's overlays (e.g. ``demo.json``) and overrides applied where they touch a key of
that config (the network's width, the patch size), macros expanded so the folder stands alone,
``bundle_root`` ``"."``. An overlay's ``preprocessing`` list (a plan's, ``segapp train --plan``) replaces
the transforms of a config whose ``preprocessing`` is a ``Compose``. A bundle whose ``network_def``
is an ensemble over ``fold_network_def`` (a shipped cross-validation model) trains one fold network,
so a one-fold run's ``network_def`` is that fold network. ``metadata.json`` and the licence are
copied. The folder's config digest is recorded as trusted (``app.bundle.trust``): segapp wrote
these configs, and an edited copy is no longer trusted. ``models/model.pt`` is written by the
checkpointer at the end of training.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.utils import merge_kv

from app.bundle.config import config_path, expand_macros, has_config, load_config_file, read_configs, write_config
from app.bundle.trust import trust_bundle

RUN_CONFIGS = ("inference", "evaluate")
RUNTIME_KEYS = frozenset({"device_name", "device", "output_dir", "resume", "tracking_uri", "bundle_root"})


def _top(key: str) -> str:
    return key.lstrip("+").split("#", 1)[0]


def write_run_bundle(
    root: str | Path, out: str | Path, extra_configs: Sequence[str] = (), overrides: Mapping[str, Any] | None = None
) -> Path:
    """Write the run folder's bundle configs (see the module docstring); returns the folder."""
    root, out = Path(root), Path(out)
    layers = [expand_macros(load_config_file(config_path(root, c)), root) for c in extra_configs]
    layers.append({k: v for k, v in (overrides or {}).items() if v is not None})
    for name in RUN_CONFIGS:
        if not has_config(root, name):
            continue
        raw = read_configs(root, [name])
        cfg = ConfigParser(raw)
        for layer in layers:
            for key, value in layer.items():
                if _top(key) in raw and _top(key) not in RUNTIME_KEYS:
                    current = raw.get(key)
                    if key == "preprocessing" and isinstance(value, list) and isinstance(current, dict):
                        key = "preprocessing#transforms"
                    merge_kv(cfg, key, value)
        if "fold_network_def" in raw:
            cfg["network_def"] = "@fold_network_def"
        cfg["bundle_root"] = "."
        write_config(cfg.get(), out / "configs" / f"{name}.json")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "configs" / "metadata.json", out / "configs" / "metadata.json")
    if (root / "LICENSE").is_file():
        shutil.copy2(root / "LICENSE", out / "LICENSE")
    trust_bundle(out, reason="written by segapp train")
    return out
