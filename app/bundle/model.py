"""The one way to build a model from a bundle: ``load_model`` (evaluate, infer, export and serve use it).

A model is the bundle's *inference* config (``configs/inference.json|yaml``, standalone as in the
model zoo) plus weights:

* ``load_model("hippocampus_unet3d")``: a bundle by name (shipped or in the store) or by folder,
  weights from its ``models/model.pt``;
* ``checkpoint=PATH``: other weights for the same config (a state dict or a segapp training
  checkpoint);
* ``run=DIR``: a segapp training-run folder, itself a bundle (``configs/inference.json`` written with
  the run's overlays and overrides, ``models/model.pt``), whose configs must carry the digest segapp
  recorded when it wrote them (``app.bundle.trust``).

Before any of the bundle's code runs, the bundle must be trusted (``app.bundle.trust``), and its
metadata must describe a one-channel 3D input. Weights load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from app.bundle.config import bundle_parser, config_path
from app.bundle.metadata import check_network_def, check_single_channel_3d, label_names, segment_descriptions
from app.bundle.store import BundleRef, find_bundle, is_bundle
from app.bundle.trust import require_trusted
from app.bundle.weights import load_network_weights
from app.errors import ConfigError, SegappError
from app.runtime.device import resolve_device

log = logging.getLogger(__name__)

INFERENCE_CONFIG = "inference"


@dataclass
class LoadedModel:
    """A bundle's network with weights, and what it takes to run it.

    Attributes:
        ref: the bundle folder and where it came from.
        parser: the inference config (with overrides) as MONAI parsed it.
        network: the network in eval mode on ``device``, weights loaded.
        preprocessing, inferer, postprocessing: the bundle's own objects (postprocessing may be None).
        device: where the network runs; ``amp`` whether it autocasts (CUDA only).
        labels: ``{value: name}`` of the output (0 = background).
        segments: DICOM segment descriptions, one per foreground label (``app.bundle.metadata``).
        metadata: the bundle's ``configs/metadata.json``.
        checkpoint: the weights file.
        config_file: the inference config file.
    """

    ref: BundleRef
    parser: ConfigParser
    network: torch.nn.Module
    preprocessing: Any
    inferer: Any
    postprocessing: Any
    device: torch.device
    amp: bool
    labels: dict[int, str]
    segments: list[dict]
    metadata: dict
    checkpoint: Path
    config_file: Path
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.parser.get("bundle_name") or self.ref.name)

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "0"))

    @property
    def series_rules(self) -> dict | None:
        rules = self.metadata.get("series_rules")
        return rules if isinstance(rules, dict) else None


def run_bundle(run: str | Path) -> BundleRef:
    """A training-run folder as a bundle (it holds configs/inference.json, metadata and models/)."""
    root = Path(run).expanduser()
    if not root.is_dir():
        raise ConfigError("run folder not found", str(root))
    if not is_bundle(root):
        raise ConfigError(
            "not a segapp training-run folder (no configs/metadata.json; runs of an older segapp "
            "or of another tool: pass the bundle and --checkpoint instead)",
            str(root),
        )
    return BundleRef(root.resolve(), "run")


def _parsed(parser: ConfigParser, key: str, where: Path, required: bool = True) -> Any:
    if key not in parser:
        if required:
            raise ConfigError(
                f"the inference config has no {key!r} (a model-zoo inference config defines "
                "network_def, preprocessing, inferer and postprocessing)",
                str(where),
            )
        return None
    try:
        return parser.get_parsed_content(key, instantiate=True)
    except SegappError:
        raise
    except Exception as exc:  # the bundle's own code failed: name the config and the key
        cause: BaseException = exc
        while cause.__cause__ is not None and not isinstance(cause, SegappError):
            cause = cause.__cause__
        if isinstance(cause, SegappError):
            raise cause from exc
        raise ConfigError(
            f"cannot build {key!r}: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}",
            str(where),
        ) from exc


def load_model(
    bundle: str | Path | None = None,
    checkpoint: str | Path | None = None,
    run: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device = "auto",
    configs: Sequence[str] = (),
    trust: bool = False,
    segments_file: str | Path | None = None,
    only_known_overrides: bool = False,
    tracking_uri: str | None = None,
) -> LoadedModel:
    """Build a bundle's inference model with its weights (see the module docstring).

    Args:
        bundle: name (shipped or in the store) or folder; may be None with ``run``.
        checkpoint: weights file (default: ``models/model.pt`` of the bundle or run).
        run: a segapp training-run folder.
        overrides: config values (``#`` paths) over the inference config.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        configs: extra config files merged over the inference config (names in ``configs/`` or paths).
        trust: run an untrusted bundle's code this once (``--trust-bundle``).
        segments_file: DICOM segment descriptions overriding the bundle's (``--segments``).
        only_known_overrides: skip overrides of keys the inference config does not have.
        tracking_uri: MLflow server of a ``runs:/`` or ``models:/`` bundle (``app.bundle.mlflow_source``).
    """
    if isinstance(bundle, str) and bundle.startswith(("runs:/", "models:/")):  # an MLflow model: a local copy
        from app.bundle.mlflow_source import fetch_mlflow_bundle

        bundle = fetch_mlflow_bundle(bundle, tracking_uri)
    if run is None and bundle is None:
        raise ConfigError("name a bundle or a training run (--run DIR)")
    ref = run_bundle(run) if run is not None else find_bundle(bundle)  # type: ignore[arg-type]
    if run is not None and bundle is not None and find_bundle(bundle).name != ref.metadata.get("name", ref.name):
        log.info("run %s holds bundle %s", ref.root, ref.metadata.get("name", "?"))
    meta_file = ref.root / "configs" / "metadata.json"
    meta = ref.metadata
    check_single_channel_3d(meta, str(meta_file))
    config_file = config_path(ref.root, INFERENCE_CONFIG)
    ckpt = Path(checkpoint) if checkpoint else ref.root / "models" / "model.pt"
    if not ckpt.is_file():
        hint = (
            ""
            if checkpoint
            else (" (this bundle ships no trained weights: train it, then pass --run RUN_DIR or --checkpoint)")
        )
        raise ConfigError(f"checkpoint not found{hint}", str(ckpt))
    dev = resolve_device(device)
    # reading and merging the configs runs nothing (macros are file reads); parsing content does
    parser = bundle_parser(ref.root, [str(config_file), *configs], overrides, only_known=only_known_overrides)
    check_network_def(parser.get("network_def"), str(config_file))
    require_trusted(ref, trust)  # nothing of the bundle's code has run before this line
    parser["device"] = dev
    network = _parsed(parser, "network_def", config_file)
    if not isinstance(network, torch.nn.Module):
        raise ConfigError(f"network_def builds a {type(network).__name__}, not a torch network", str(config_file))
    network = network.to(dev)
    load_network_weights(network, ckpt, dev)
    network.eval()
    preprocessing = _parsed(parser, "preprocessing", config_file)
    inferer = _parsed(parser, "inferer", config_file)
    postprocessing = _parsed(parser, "postprocessing", config_file, required=False)
    labels = label_names(meta, parser.get("labels"))
    if not labels:
        raise ConfigError(
            "the bundle names no labels (metadata network_data_format.outputs.pred.channel_def)", str(meta_file)
        )
    return LoadedModel(
        ref=ref,
        parser=parser,
        network=network,
        preprocessing=preprocessing,
        inferer=inferer,
        postprocessing=postprocessing,
        device=dev,
        amp=dev.type == "cuda",
        labels=labels,
        segments=segment_descriptions(meta, labels, segments_file),
        metadata=meta,
        checkpoint=ckpt.resolve(),
        config_file=config_file,
    )
