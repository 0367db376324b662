"""Load a bundle's configs the way MONAI's runner does, with segapp's overrides on top."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from monai.bundle import ConfigParser

from app.errors import ConfigError
from app.io.atomic import atomic_write_text
from app.paths import bundle_root as resolve_bundle_root


def bundle_parser(bundle: str, configs: Sequence[str] = ("train.json",), overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """A ConfigParser over ``configs`` (names in the bundle's ``configs/`` or paths), metadata as ``_meta_``.

    ``overrides`` use MONAI's ``#`` paths (``{"network_def#features": [8, 16, 32]}``) and win over files.
    """
    root = Path(resolve_bundle_root(bundle))
    files = []
    for c in configs:
        p = Path(c) if Path(c).is_file() else root / "configs" / c
        if not p.is_file():
            raise ConfigError("config file not found in the bundle", str(p))
        files.append(str(p))
    parser = ConfigParser()
    parser.read_config(files)
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser["bundle_root"] = str(root)
    for key, value in (overrides or {}).items():
        if value is not None:
            parser[key] = value
    return parser


def bundle_metadata(bundle: str) -> dict:
    return json.loads((Path(resolve_bundle_root(bundle)) / "configs" / "metadata.json").read_text())


def write_executed_config(parser: ConfigParser, path: str | Path) -> Path:
    """Save the merged, overridden config (before instantiation) for the record (MLflow artifact)."""
    return atomic_write_text(path, json.dumps(parser.get(), indent=2, default=str))


def run_sections(parser: ConfigParser, sections: Sequence[str] = ("initialize", "run")) -> None:
    """Evaluate the config's expression lists like ``monai.bundle run`` does; ``finalize`` always runs."""
    try:
        for section in sections:
            if section in parser:
                parser.get_parsed_content(section, instantiate=True)
    finally:
        if "finalize" in parser:
            parser.get_parsed_content("finalize", instantiate=True)
