"""Read a bundle's config files the way MONAI's runner does, from any working directory.

MONAI resolves a macro ``"%configs/common.json#network_def"`` relative to the working directory,
so the model zoo runs bundles from their root (``bundle_root: "."``). segapp reads each file,
replaces such macros by the content they name (paths relative to the bundle root), merges the
files in order (later files win; ``a#b`` keys reach into nested values, ``+key`` appends, as
MONAI's ``merge_kv``) and sets ``bundle_root`` to the bundle's real folder. Nothing here runs a
``$`` expression: that happens when a caller asks the parser for parsed content, after the trust
check (``app.bundle.trust``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.utils import MACRO_KEY, merge_kv

from app.errors import ConfigError
from app.io.atomic import atomic_write_text

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def config_path(root: str | Path, name: str) -> Path:
    """``name`` as a path, or the bundle's ``configs/<name>`` (``inference`` finds ``inference.json|yaml``)."""
    p = Path(name)
    if p.is_file():
        return p
    base = Path(root) / "configs"
    for candidate in [base / name, *(base / f"{name}{s}" for s in CONFIG_SUFFIXES)]:
        if candidate.is_file():
            return candidate
    raise ConfigError("config file not found in the bundle", str(base / name))


def has_config(root: str | Path, name: str) -> bool:
    try:
        config_path(root, name)
        return True
    except ConfigError:
        return False


def load_config_file(path: str | Path) -> dict:
    """One JSON/YAML config file as a dict; a clear error naming the file when it does not parse."""
    try:
        content = ConfigParser.load_config_file(str(path))
    except Exception as exc:  # JSON/YAML syntax errors from the parsers
        raise ConfigError(f"cannot parse config: {str(exc).splitlines()[0]}", str(path)) from exc
    if not isinstance(content, dict):
        raise ConfigError("a bundle config must hold a JSON/YAML object at its top level", str(path))
    return content


def expand_macros(value: Any, root: Path, seen: tuple[Path, ...] = ()) -> Any:
    """Replace ``"%relative/file.json#a#b"`` macros by that content (files relative to ``root``).

    Same-file macros (``"%#key"``, ``"%key"``) and paths that do not exist under ``root`` are left
    for MONAI's own resolution.
    """
    if isinstance(value, dict):
        return {k: expand_macros(v, root, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_macros(v, root, seen) for v in value]
    if isinstance(value, str) and value.startswith(MACRO_KEY):
        path, ids = ConfigParser.split_path_id(value[len(MACRO_KEY) :])
        target = (root / path).resolve() if path else None
        if target is None or not target.is_file():
            return value
        if target in seen:
            raise ConfigError(f"macro {value!r} refers back to a file that includes it", str(target))
        parser = ConfigParser(config=load_config_file(target))
        try:
            content = deepcopy(parser[ids])
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"macro {value!r}: no key {ids!r} in that file", str(target)) from exc
        return expand_macros(content, root, (*seen, target))
    return value


def read_configs(root: str | Path, configs: Sequence[str]) -> dict:
    """Merge ``configs`` (names in ``configs/`` or paths) in order, macros expanded per file."""
    root = Path(root)
    merged = ConfigParser(config={})
    for name in configs:
        path = config_path(root, name)
        for key, value in expand_macros(load_config_file(path), root).items():
            try:
                merge_kv(merged, key, value)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise ConfigError(f"cannot merge key {key!r}: {exc}", str(path)) from exc
    return merged.get()


def bundle_parser(
    root: str | Path,
    configs: Sequence[str] = ("train.json",),
    overrides: Mapping[str, Any] | None = None,
    only_known: bool = False,
) -> ConfigParser:
    """A ConfigParser over ``configs`` of the bundle at ``root``, metadata as ``_meta_``.

    ``overrides`` use MONAI's ``#`` paths (``{"features": [8, 16, 32]}``, ``{"train#handlers#0": ...}``)
    and win over the files; ``None`` values are skipped. ``only_known``: skip overrides whose top-level
    key the configs do not have (one set of overrides for several configs, e.g. evaluate and inference).
    """
    root = Path(root).resolve()
    parser = ConfigParser(read_configs(root, configs))
    meta = root / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(root)
    top_keys = set(parser.get() or {})
    for key, value in (overrides or {}).items():
        if value is None or (only_known and key.lstrip("+").split("#", 1)[0] not in top_keys):
            continue
        try:
            merge_kv(parser, key, value)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ConfigError(f"cannot apply override {key!r}: {exc}", "--override") from exc
    return parser


def bundle_metadata(root: str | Path) -> dict:
    path = Path(root) / "configs" / "metadata.json"
    if not path.is_file():
        raise ConfigError("bundle has no configs/metadata.json", str(path.parent.parent))
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"metadata is not valid JSON: {exc}", str(path)) from exc


def write_config(config: Mapping, path: str | Path) -> Path:
    """Save a (merged) config for the record or as a run's own bundle config."""
    return atomic_write_text(path, json.dumps(config, indent=2, default=str))


def run_sections(parser: ConfigParser, sections: Sequence[str] = ("initialize", "run")) -> None:
    """Evaluate the config's expression lists like ``monai.bundle run`` does; ``finalize`` always runs."""
    try:
        for section in sections:
            if section in parser:
                parser.get_parsed_content(section, instantiate=True)
    finally:
        if "finalize" in parser:
            parser.get_parsed_content("finalize", instantiate=True)
