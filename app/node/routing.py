"""Which bundle runs on a received series: the config's ``[[routes]]`` in order, then the bundles' own
``series_rules`` (metadata) in config order; the first match wins.

Rules are ``app.io.dicom_scan`` selection rules (modality, description_regex, min_slices, max_slices,
orientation) matched against the series' headers. A bundle whose metadata has no ``series_rules`` is
routed to only by ``[[routes]]``. A series that matches nothing, or is no image (SEG, SR...), is
``skipped``; a folder without one readable image is ``failed`` (no worker needs to try it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app.bundle.model import run_bundle
from app.bundle.store import find_bundle
from app.errors import SegappError
from app.io.dicom_scan import SeriesInfo, check_rules, scan_folder, select_series
from app.node.config import NodeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """``state`` ``pending`` (run ``bundle``), ``skipped`` or ``failed``; ``route`` says why (no patient data)."""

    state: str
    bundle: str | None
    route: str
    error: str = ""


def bundle_series_rules(cfg: NodeConfig) -> dict[str, dict | None]:
    """``{bundle name: its metadata's series_rules (checked) or None}`` (no bundle code runs)."""
    out: dict[str, dict | None] = {}
    for name, b in cfg.bundles.items():
        ref = run_bundle(b.run) if b.run else find_bundle(b.bundle)  # type: ignore[arg-type]
        rules = ref.metadata.get("series_rules")
        out[name] = check_rules(rules) if isinstance(rules, dict) and b.use_series_rules else None
    return out


def _rules_text(rules: dict) -> str:
    return ", ".join(f"{k}={'/'.join(v) if isinstance(v, list) else v}" for k, v in sorted(rules.items()))


def _matches(info: SeriesInfo, rules: dict) -> bool:
    try:
        select_series([info], None, rules)
        return True
    except SegappError:
        return False


def route_series(folder: str, series_uid: str, cfg: NodeConfig, bundle_rules: dict[str, dict | None]) -> Decision:
    """Decide what to do with the series ``series_uid`` spooled in ``folder``."""
    try:
        found = [s for s in scan_folder(folder) if s.uid == series_uid]
    except SegappError as exc:
        return Decision("failed", None, "unreadable", f"no readable DICOM series: {str(exc).split(': ')[-1]}")
    if not found:
        return Decision("failed", None, "unreadable", "no readable DICOM file of this series in the spool")
    images = [s for s in found if s.is_image]
    if not images:
        return Decision("skipped", None, "not an image", f"a {found[0].modality or '?'} object, not an image series")
    info = max(images, key=lambda s: s.n_slices)
    for n, route in enumerate(cfg.routes, start=1):
        if _matches(info, route.rules):
            return Decision("pending", route.bundle, f"route #{n} ({_rules_text(route.rules)})")
    for name, rules in bundle_rules.items():
        if rules is not None and _matches(info, rules):
            return Decision("pending", name, f"series_rules of {name} ({_rules_text(rules)})")
    return Decision(
        "skipped",
        None,
        "no route",
        f"no route or bundle series_rules matches this {info.modality or '?'} {info.orientation} series "
        f"of {info.n_slices} slice(s)",
    )
