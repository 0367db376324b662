"""Which bundles may run their code.

A bundle config's ``$`` expressions and ``imports`` are Python, and a ``_target_`` names any
callable to instantiate; a bundle's ``scripts/`` folder is Python too. segapp runs that code only
for bundles it trusts:

* bundles shipped with segapp;
* bundles fetched by ``segapp bundle download`` and training-run folders segapp wrote (both
  recorded at that moment);
* any other folder after ``segapp bundle trust PATH`` (or with ``--trust-bundle`` for one run).

A record is the SHA-256 digest of the bundle's ``configs/`` and ``scripts/`` files (names and
bytes), kept in ``$SEGAPP_HOME/trusted_bundles.json`` (default ``~/.config/segapp``), so an edited
config is untrusted again. A folder whose configs hold no code (no ``$`` expression, no
``_target_`` outside MONAI and torch) needs no record.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from app.bundle.config import CONFIG_SUFFIXES, load_config_file
from app.bundle.store import BundleRef
from app.errors import ConfigError
from app.io.atomic import atomic_write_text, locked

# _target_ values that instantiate MONAI / torch components only (short names are MONAI's)
SAFE_TARGET_PREFIXES = ("monai.", "torch.nn.", "torch.optim.")


def segapp_home() -> Path:
    env = os.environ.get("SEGAPP_HOME")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "segapp"


def trust_file() -> Path:
    return segapp_home() / "trusted_bundles.json"


def _code_files(root: Path) -> list[Path]:
    files = []
    for sub in ("configs", "scripts"):
        folder = root / sub
        if folder.is_dir():
            files += [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files)


def bundle_digest(root: str | Path) -> str:
    """SHA-256 over the relative names and bytes of ``configs/**`` and ``scripts/**``."""
    root = Path(root)
    h = hashlib.sha256()
    for p in _code_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _records() -> dict:
    path = trust_file()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(
            f"the trust records are not valid JSON ({exc}); remove or repair the file", str(path)
        ) from exc
    return data if isinstance(data, dict) else {}


def trust_bundle(root: str | Path, reason: str = "segapp bundle trust") -> str:
    """Record the bundle's current digest as trusted; returns it."""
    root = Path(root).resolve()
    digest = bundle_digest(root)
    try:
        with locked(trust_file()):  # training folds record their run folders from parallel processes
            records = _records()
            records[digest] = {"path": str(root), "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_text(trust_file(), json.dumps(records, indent=2))
    except OSError as exc:
        raise ConfigError(f"cannot write the trust records: {exc.strerror or exc}", str(trust_file())) from exc
    return digest


def is_recorded(root: str | Path) -> bool:
    return bundle_digest(root) in _records()


def _walk(value: object, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{key}#{k}" if key else str(k)
            if k == "_target_" and isinstance(v, str):
                yield sub, v
            else:
                yield from _walk(v, sub)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{key}#{i}")
    elif isinstance(value, str):
        yield key, value


def _is_code(key: str, value: str) -> bool:
    if key.endswith("_target_"):
        return "." in value and not value.startswith(SAFE_TARGET_PREFIXES)
    return value.startswith("$")


def code_location(root: str | Path) -> tuple[Path, str, str] | None:
    """The first place where the bundle holds code: ``(file, key, value)``; None when it holds none."""
    root = Path(root)
    for p in _code_files(root):
        if p.suffix not in CONFIG_SUFFIXES:
            if p.suffix == ".py":
                return p, "", "Python source"
            continue
        if p.parent.name != "configs" and p.parent.parent.name != "configs":
            continue
        for key, value in _walk(load_config_file(p)):
            if _is_code(key, value):
                return p, key, value
    return None


def require_trusted(ref: BundleRef, allow: bool = False) -> None:
    """Raise a ConfigError naming the file that holds code unless the bundle may run it."""
    if allow or ref.source == "shipped":
        return
    if is_recorded(ref.root):
        return
    where = code_location(ref.root)
    if where is None:
        return
    path, key, value = where
    shown = value if len(value) <= 60 else value[:57] + "..."
    what = (
        "a training run folder whose configs segapp did not record or that changed since"
        if ref.source == "run"
        else "an untrusted bundle"
    )
    raise ConfigError(
        f"{what}: its configs hold Python code ({key}: {shown!r}); nothing was run. "
        f"Trust it once with 'segapp bundle trust {ref.root}' or pass --trust-bundle",
        str(path),
    )
