"""``segapp train``: a bundle's train config with the CLI's options as overrides.

The very same config runs under ``python -m monai.bundle run`` (from the bundle's folder); this
module checks inputs first (so errors name the file or option) and what the machine must provide
(``app.runtime.preflight``: the device, a writable output folder, an MLflow server that answers within
seconds, or with ``tracking_fallback="local"`` the local store instead), makes the run folder a bundle
of its own (``app.training.run_bundle``) and reports where the outputs are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.bundle.config import bundle_parser, read_configs, run_sections, write_config
from app.bundle.store import find_bundle
from app.bundle.trust import require_trusted
from app.data.manifest import check_manifest_fold
from app.errors import ConfigError, EnvError
from app.planning.fingerprint import load_plan
from app.runtime.preflight import check_device, check_output_dir, check_tracking_server
from app.training.run_bundle import write_run_bundle

log = logging.getLogger(__name__)


def train(
    bundle: str,
    manifest: str | None = None,
    fold: int = 0,
    epochs: int | None = None,
    device: str = "auto",
    output_dir: str | None = None,
    resume: bool = False,
    tracking_uri: str | None = None,
    seed: int | None = None,
    extra_configs: Sequence[str] = (),
    overrides: dict[str, Any] | None = None,
    check_checksums: bool = True,
    trust: bool = False,
    tracking_fallback: str = "fail",
    plan: str | None = None,
) -> dict:
    """Train a bundle on a manifest fold. Returns ``metrics.json``'s content plus run locations.

    ``tracking_fallback``: ``fail`` (an MLflow server that does not answer is an ``EnvError`` before
    training starts) or ``local`` (train anyway, tracking in the run folder's local store; the result's
    ``tracking_fallback`` says so).

    ``plan``: a ``segapp plan`` file, merged as a config overlay after the bundle's configs and before
    ``extra_configs`` (target spacing, normalisation, patch and batch size, the U-Net's features; a
    bundle whose network is not segapp's ``UNet3D`` keeps its own ``features`` and ``patch_size``).
    """
    if tracking_fallback not in ("fail", "local"):
        raise ConfigError(f"expected fail or local, got {tracking_fallback!r}", "--tracking-fallback")
    ref = find_bundle(bundle)
    check_device(device)  # fail early, naming --device
    opts: dict[str, Any] = {"fold": int(fold), "device_name": device, "resume": bool(resume)}
    if manifest:
        check_manifest_fold(manifest, fold, check_checksums)
        opts["manifest"] = str(Path(manifest).resolve())
    if epochs is not None:
        opts["epochs"] = int(epochs)
    if output_dir:
        opts["output_dir"] = str(Path(output_dir).resolve())
    if tracking_uri:
        opts["tracking_uri"] = tracking_uri
    if seed is not None:
        opts["seed"] = int(seed)
    if plan:
        plan_file = str(Path(plan).resolve())
        load_plan(plan_file)  # a clear error before anything runs
        extra_configs = [plan_file, *extra_configs]
        own = read_configs(ref.root, ["train", *extra_configs[1:]])
        net = own.get("fold_network_def", own.get("network_def", {}))  # an ensemble bundle trains its member
        target = str(net.get("_target_", "")) if isinstance(net, dict) else ""
        if not target.endswith("UNet3D"):  # the plan sizes segapp's UNet3D: its patch fits that network
            log.info("plan: %s is not UNet3D; keeping the bundle's features and patch size", target or "the network")
            for key in ("features", "patch_size"):
                if key in own:
                    opts.setdefault(key, own[key])
    opts.update(overrides or {})
    require_trusted(ref, trust)
    parser = bundle_parser(ref.root, ["train", *extra_configs], opts)
    out = check_output_dir(parser.get_parsed_content("output_dir"), "--out")
    fallback_note = _check_tracking(parser, tracking_fallback, out)
    if parser.get_parsed_content("is_main"):
        write_config(parser.get(), out / "executed_config.json")
        write_run_bundle(ref.root, out, extra_configs, opts)

    run_sections(parser)
    result = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    run_file = out / "mlflow_run.json"
    result["output_dir"] = str(out)
    result["mlflow"] = json.loads(run_file.read_text()) if run_file.is_file() else None
    result["tracking_fallback"] = fallback_note
    return result


def _check_tracking(parser, fallback: str, out: Path) -> str:
    """The config's tracking server must answer; with ``local`` fallback, switch to the local store.

    Returns a note for the user when it fell back ('' otherwise).
    """
    uri = parser.get("tracking_uri", "")
    if not isinstance(uri, str) or uri.startswith(("$", "@", "%")):
        uri = str(parser.get_parsed_content("tracking_uri") or "")
    try:
        check_tracking_server(uri)
    except EnvError as exc:
        if fallback != "local":
            raise
        parser["tracking_uri"] = ""  # the tracker's default: the SQLite store in the run folder
        note = f"the tracking server {uri} does not answer; tracking in the local store {out / 'mlflow.db'} instead"
        log.warning("%s (%s)", note, str(exc).split("(", 1)[-1].split(")", 1)[0])
        return note
    return ""
