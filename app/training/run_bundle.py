"""A training run folder is itself a bundle: ``segapp infer/evaluate --run DIR`` rebuilds the model as trained.

``write_run_bundle`` writes ``DIR/configs/inference.json`` and ``evaluate.json``: the bundle's own
configs with the run's overlays (e.g. ``demo.json``) and overrides applied where they touch a key of
that config (the network's width, the patch size), macros expanded so the folder stands alone,
``bundle_root`` ``"."``. ``metadata.json`` and the licence are copied. The folder's config digest
is recorded as trusted (``app.bundle.trust``): segapp wrote these configs, and an edited copy is no
longer trusted. ``models/model.pt`` is written by the checkpointer at the end of training.
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
        cfg = ConfigParser(read_configs(root, [name]))
        for layer in layers:
            for key, value in layer.items():
                if _top(key) in cfg.get() and _top(key) not in RUNTIME_KEYS:
                    merge_kv(cfg, key, value)
        cfg["bundle_root"] = "."
        write_config(cfg.get(), out / "configs" / f"{name}.json")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "configs" / "metadata.json", out / "configs" / "metadata.json")
    if (root / "LICENSE").is_file():
        shutil.copy2(root / "LICENSE", out / "LICENSE")
    trust_bundle(out, reason="written by segapp train")
    return out
