"""Finding bundles: the ones shipped with segapp, the local store of downloaded ones, or a folder.

The store is ``$SEGAPP_BUNDLES`` (default ``~/.cache/segapp/bundles``, or under ``$XDG_CACHE_HOME``):
one folder per bundle name, filled by :func:`download_bundle` on top of MONAI's
``monai.bundle.download`` (the model zoo's hosting, a GitHub release, or any URL of a bundle zip).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app import resources
from app.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# MONAI's bundle and apps loggers print to stdout themselves (their own handlers, no propagation)
MONAI_LOGGERS = ("monai.bundle.scripts", "monai.apps")


@contextlib.contextmanager
def quiet_monai_logs(names: tuple[str, ...] = MONAI_LOGGERS) -> Iterator[None]:
    """Silence MONAI's own progress and error lines while segapp reports the outcome itself."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


Source = Literal["shipped", "store", "folder", "run"]


@dataclass(frozen=True)
class BundleRef:
    """A bundle folder and where it came from (which decides whether it is trusted by default)."""

    root: Path
    source: Source

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def metadata(self) -> dict:
        path = self.root / "configs" / "metadata.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read bundle metadata: {exc}", str(path)) from exc


def store_dir() -> Path:
    """The local bundle store (created on first download)."""
    env = os.environ.get("SEGAPP_BUNDLES")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "segapp" / "bundles"


def is_bundle(folder: Path) -> bool:
    return (folder / "configs" / "metadata.json").is_file()


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def classify(folder: str | os.PathLike) -> BundleRef:
    """The :class:`BundleRef` of a bundle folder given by path."""
    root = Path(folder).resolve()
    if _inside(root, resources.BUNDLES_DIR):
        return BundleRef(root, "shipped")
    if _inside(root, store_dir()):
        return BundleRef(root, "store")
    return BundleRef(root, "folder")


def known_bundles() -> list[BundleRef]:
    """Shipped bundles, then the store's (a store bundle with a shipped name is listed too)."""
    out = []
    for base, source in ((resources.BUNDLES_DIR, "shipped"), (store_dir(), "store")):
        if base.is_dir():
            out += [BundleRef(d.resolve(), source) for d in sorted(base.iterdir()) if d.is_dir() and is_bundle(d)]  # type: ignore[arg-type]
    return out


def find_bundle(name_or_path: str | os.PathLike) -> BundleRef:
    """A bundle given as a folder path, or by name among the shipped bundles and the store (in that order)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not is_bundle(p):
            raise ConfigError("not a MONAI bundle (expected configs/metadata.json in it)", str(p))
        return classify(p)
    name = str(name_or_path)
    if "/" not in name and os.sep not in name:
        for ref in known_bundles():
            if ref.name == name:
                return ref
    names = sorted({r.name for r in known_bundles()})
    raise ConfigError(
        f"no bundle of that name or folder; known bundles: {', '.join(names) or 'none'} "
        f"(download one with 'segapp bundle download NAME')",
        name,
    )


def list_bundles() -> list[dict]:
    """Name, version, source, folder and task of every known bundle."""
    rows = []
    for ref in known_bundles():
        try:
            meta = ref.metadata
        except ConfigError as exc:
            meta = {"task": f"unreadable metadata ({exc})"}
        rows.append(
            {
                "name": ref.name,
                "version": str(meta.get("version", "?")),
                "source": ref.source,
                "path": str(ref.root),
                "task": str(meta.get("task", "")),
            }
        )
    return rows


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def download_bundle(
    name: str,
    version: str | None = None,
    url: str | None = None,
    source: str = "monaihosting",
    sha256: str | None = None,
) -> BundleRef:
    """Fetch a bundle into the store with ``monai.bundle.download`` and record it as trusted.

    The download lands in a temporary folder first; only a complete bundle (``configs/metadata.json``
    present) whose zip has the expected SHA-256 (``sha256``, when given) replaces ``<store>/<name>``;
    on any failure the store is left as it was. MONAI checks no hash for a ``url`` download, so
    ``sha256`` is segapp's own check of the zip it fetched.
    """
    from monai.bundle import download

    from app.bundle.trust import trust_bundle

    if not name or "/" in name or name.startswith("."):
        raise ConfigError("a bundle name is one folder name", name)
    where = url or f"{source} {name}{' ' + version if version else ''}"
    store = store_dir()
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=store) as tmp:
        try:
            with quiet_monai_logs(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*No hash value provided.*")  # checked below
                download(name=name, version=version, bundle_dir=tmp, url=url, source=source, progress=False)
        except Exception as exc:  # network, HTTP, zip and lookup errors from MONAI/urllib/huggingface
            raise InputError(
                f"bundle download failed: {type(exc).__name__}: {str(exc).splitlines()[0]}", where
            ) from exc
        zips = sorted(Path(tmp).glob("*.zip"))
        if sha256 is not None:
            got_hash = _sha256(zips[0]) if zips else "(no zip file)"
            if got_hash != sha256.strip().lower():
                raise InputError(f"the downloaded zip's SHA-256 is {got_hash}, not {sha256}", where)
        else:
            log.info("integrity of the download not checked (no SHA-256 given)")
        got = Path(tmp) / name
        if not is_bundle(got):
            found = [p.name for p in Path(tmp).iterdir() if p.is_dir()]
            raise InputError(
                f"the download holds no bundle folder {name!r} with configs/metadata.json "
                f"(found: {found or 'nothing'})",
                where,
            )
        final = store / name
        old = store / f".old-{name}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        got.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    ref = BundleRef(final.resolve(), "store")
    trust_bundle(ref.root, reason=f"downloaded from {where}")
    log.info("bundle %s -> %s", name, ref.root)
    return ref
