"""The node's configuration file (TOML, read with ``tomllib``, or YAML): what to listen on, where to spool and
keep the queue, which bundles to run on which series, where to send the results.

Sections (paths are relative to the config file's folder)::

    [node]
    ae_title = "SEGAPP"                 # our AE title (1-16 characters)
    host = "0.0.0.0"                    # the DICOM port's bind address
    port = 11112
    allowed_calling_aets = ["PACS"]     # who may send to us; ["*"] lets any AE in
    spool = "spool"                     # received instances, one folder per series
    state = "state"                     # the job queue (queue.db) and the results
    idle_timeout_s = 10                 # a series is complete when nothing arrived for this long
    workers = 1                         # processes, one model each (GPUs round robin)
    device = "auto"                     # auto | cpu | cuda
    retries = 2                         # a failed job runs again this many times, then is reported failed
    retry_delay_s = 10
    send_retries = 3                    # per destination, inside one attempt (app.io.pacs.send)
    keep_spool = false                  # keep the received files of finished series
    destinations = ["dimse://PACS@pacs.example:104"]   # C-STORE or STOW-RS (dicomweb://...)

    [http]                              # the status endpoint (and STOW-RS when stow = true)
    host = "127.0.0.1"
    port = 8080                         # 0: no HTTP server
    stow = false

    [bundles.hippo]                     # a bundle this node runs, by a name of our choosing
    bundle = "hippocampus_unet3d"       # name or folder; or run = "RUN_DIR"; checkpoint = "FILE"
    formats = ["seg", "sr"]             # nifti, seg, rtstruct, stats, sr
    use_series_rules = true             # route series that match the bundle's own metadata series_rules

    [[routes]]                          # tried in order before the bundles' own rules; first match wins
    bundle = "hippo"
    modality = "MR"
    description_regex = "t1"            # also min_slices, max_slices, orientation

A bundle section may also set ``configs`` (overlay files), ``overrides`` (config values), ``device``,
``destinations`` (instead of the node's) and ``trust`` (run its code without a trust record).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import ConfigError
from app.io.dicom_scan import check_rules
from app.io.pacs import parse_destination

FORMATS = ("nifti", "seg", "rtstruct", "stats", "sr")
_NODE_KEYS = {
    "ae_title",
    "host",
    "port",
    "allowed_calling_aets",
    "spool",
    "state",
    "idle_timeout_s",
    "workers",
    "device",
    "retries",
    "retry_delay_s",
    "send_retries",
    "keep_spool",
    "destinations",
    "lease_s",
}
_HTTP_KEYS = {"host", "port", "stow"}
_BUNDLE_KEYS = {
    "bundle",
    "run",
    "checkpoint",
    "configs",
    "overrides",
    "formats",
    "destinations",
    "use_series_rules",
    "device",
    "trust",
}


@dataclass(frozen=True)
class BundleConfig:
    """One bundle the node runs (see the module docstring for the keys)."""

    name: str
    bundle: str | None = None
    run: str | None = None
    checkpoint: str | None = None
    configs: tuple[str, ...] = ()
    overrides: dict = field(default_factory=dict)
    formats: tuple[str, ...] = ("seg",)
    destinations: tuple[str, ...] | None = None
    use_series_rules: bool = True
    device: str | None = None
    trust: bool = False


@dataclass(frozen=True)
class Route:
    """A config rule: series matching ``rules`` (``app.io.dicom_scan.select_series`` keys) go to ``bundle``."""

    bundle: str
    rules: dict


@dataclass
class NodeConfig:
    """The parsed configuration (defaults as in the module docstring); ``source`` is the file it came from."""

    source: Path
    bundles: dict[str, BundleConfig]
    routes: list[Route] = field(default_factory=list)
    ae_title: str = "SEGAPP"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    spool: Path = Path("spool")
    state: Path = Path("state")
    idle_timeout_s: float = 10.0
    workers: int = 1
    device: str = "auto"
    retries: int = 2
    retry_delay_s: float = 10.0
    send_retries: int = 3
    keep_spool: bool = False
    destinations: tuple[str, ...] = ()
    lease_s: float = 60.0
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    stow: bool = False

    @property
    def any_calling_aet(self) -> bool:
        return "*" in self.allowed_calling_aets

    def destinations_for(self, bundle: str) -> tuple[str, ...]:
        own = self.bundles[bundle].destinations
        return self.destinations if own is None else own


def _read(path: Path) -> dict:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the node config: {exc.strerror}", str(path)) from exc
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text) or {}
        else:
            doc = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            f"not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'TOML'}: {exc}", str(path)
        ) from exc
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"not valid YAML: {str(exc).splitlines()[0]}", str(path)) from exc
    if not isinstance(doc, dict):
        raise ConfigError("the node config must be a table of sections", str(path))
    return doc


def _section(doc: dict, name: str, keys: set[str], where: str) -> dict:
    sec = doc.get(name, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"[{name}] must be a table", where)
    unknown = sorted(set(sec) - keys)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{name}]; allowed: {sorted(keys)}", where)
    return sec


def _typed(sec: dict, key: str, kind: type | tuple[type, ...], default: Any, where: str, section: str) -> Any:
    value = sec.get(key, default)
    if kind in (float, int) and isinstance(value, bool):
        raise ConfigError(f"[{section}] {key} must be a number", where)
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConfigError(f"[{section}] {key} must be {names}, got {value!r}", where)
    return value


def _strings(sec: dict, key: str, default: Any, where: str, section: str) -> tuple[str, ...] | None:
    value = sec.get(key, default)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"[{section}] {key} must be a list of strings", where)
    return tuple(value)


def _destinations(values: tuple[str, ...] | None, where: str, section: str) -> tuple[str, ...] | None:
    for d in values or ():
        try:
            parse_destination(d)
        except ConfigError as exc:
            raise ConfigError(f"[{section}] destinations: {exc}", where) from exc
    return values


def _bundle(name: str, sec: Any, base: Path, where: str) -> BundleConfig:
    section = f"bundles.{name}"
    if not isinstance(sec, dict):
        raise ConfigError(f"[{section}] must be a table", where)
    unknown = sorted(set(sec) - _BUNDLE_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{section}]; allowed: {sorted(_BUNDLE_KEYS)}", where)
    if not sec.get("bundle") and not sec.get("run"):
        raise ConfigError(f"[{section}] needs bundle = NAME_OR_FOLDER or run = RUN_DIR", where)
    formats = tuple(f.lower() for f in (_strings(sec, "formats", ["seg"], where, section) or ()))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"[{section}] formats {list(formats)}: choose from {', '.join(FORMATS)}", where)
    if "sr" in formats and "seg" not in formats:
        raise ConfigError(f"[{section}] formats: the SR references the SEG: add seg", where)
    overrides = sec.get("overrides", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"[{section}] overrides must be a table of config keys and values", where)

    def path_of(key: str) -> str | None:
        value = sec.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"[{section}] {key} must be a string", where)
        p = Path(value).expanduser()
        # a bundle name stays a name; anything that looks like a path is taken relative to the config
        if key == "bundle" and "/" not in value and not (base / p).exists():
            return value
        return str(p if p.is_absolute() else (base / p).resolve())

    return BundleConfig(
        name=name,
        bundle=path_of("bundle"),
        run=path_of("run"),
        checkpoint=path_of("checkpoint"),
        configs=tuple(_strings(sec, "configs", [], where, section) or ()),
        overrides=dict(overrides),
        formats=formats,
        destinations=_destinations(_strings(sec, "destinations", None, where, section), where, section),
        use_series_rules=_typed(sec, "use_series_rules", bool, True, where, section),
        device=_typed(sec, "device", (str, type(None)), None, where, section),
        trust=_typed(sec, "trust", bool, False, where, section),
    )


def load_config(path: str | Path) -> NodeConfig:
    """Read and check a node config (``.toml``, or ``.yaml``/``.yml``); every problem is a ``ConfigError``
    naming the file and the section."""
    path = Path(path).expanduser().resolve()
    where = str(path)
    doc = _read(path)
    unknown = sorted(set(doc) - {"node", "http", "bundles", "routes"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; allowed: node, http, bundles, routes", where)
    node = _section(doc, "node", _NODE_KEYS, where)
    http = _section(doc, "http", _HTTP_KEYS, where)
    base = path.parent
    raw_bundles = doc.get("bundles", {})
    if not isinstance(raw_bundles, dict) or not raw_bundles:
        raise ConfigError("[bundles.NAME] sections: name at least one bundle to run", where)
    bundles = {str(n): _bundle(str(n), sec, base, where) for n, sec in raw_bundles.items()}
    routes = []
    raw_routes = doc.get("routes", [])
    if not isinstance(raw_routes, list):
        raise ConfigError("[[routes]] must be an array of tables", where)
    for n, r in enumerate(raw_routes, start=1):
        if not isinstance(r, dict) or r.get("bundle") not in bundles:
            raise ConfigError(f"[[routes]] #{n} needs bundle = one of {sorted(bundles)}", where)
        try:
            rules = check_rules({k: v for k, v in r.items() if k != "bundle"})
        except ConfigError as exc:
            raise ConfigError(f"[[routes]] #{n}: {exc}", where) from exc
        routes.append(Route(str(r["bundle"]), rules))
    aet = _typed(node, "ae_title", str, "SEGAPP", where, "node")
    if not 0 < len(aet.strip()) <= 16:
        raise ConfigError(f"[node] ae_title {aet!r} must be 1-16 characters", where)
    allowed = _strings(node, "allowed_calling_aets", None, where, "node")
    if not allowed:
        raise ConfigError('[node] allowed_calling_aets: list the AE titles that may send to us (["*"]: any)', where)

    def folder(key: str) -> Path:
        p = Path(_typed(node, key, str, key, where, "node")).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    cfg = NodeConfig(
        source=path,
        bundles=bundles,
        routes=routes,
        ae_title=aet.strip(),
        host=_typed(node, "host", str, "0.0.0.0", where, "node"),
        port=_typed(node, "port", int, 11112, where, "node"),
        allowed_calling_aets=tuple(a.strip() for a in allowed),
        spool=folder("spool"),
        state=folder("state"),
        idle_timeout_s=_typed(node, "idle_timeout_s", float, 10.0, where, "node"),
        workers=_typed(node, "workers", int, 1, where, "node"),
        device=_typed(node, "device", str, "auto", where, "node"),
        retries=_typed(node, "retries", int, 2, where, "node"),
        retry_delay_s=_typed(node, "retry_delay_s", float, 10.0, where, "node"),
        send_retries=_typed(node, "send_retries", int, 3, where, "node"),
        keep_spool=_typed(node, "keep_spool", bool, False, where, "node"),
        destinations=_destinations(_strings(node, "destinations", [], where, "node"), where, "node") or (),
        lease_s=_typed(node, "lease_s", float, 60.0, where, "node"),
        http_host=_typed(http, "host", str, "127.0.0.1", where, "http"),
        http_port=_typed(http, "port", int, 8080, where, "http"),
        stow=_typed(http, "stow", bool, False, where, "http"),
    )
    for key, low in (("port", 0), ("workers", 1), ("retries", 0), ("send_retries", 0)):
        if getattr(cfg, key) < low:
            raise ConfigError(f"[node] {key} must be at least {low}", where)
    if cfg.idle_timeout_s <= 0 or cfg.lease_s <= 0:
        raise ConfigError("[node] idle_timeout_s and lease_s must be positive", where)
    if cfg.spool == cfg.state:
        raise ConfigError("[node] spool and state must be different folders", where)
    return cfg
