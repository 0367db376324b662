"""``segapp evaluate`` and ``segapp infer`` (NIfTI) on top of a bundle's configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from app.data.manifest import check_manifest_fold
from app.engine.bundle_config import bundle_parser
from app.engine.checkpoint import load_network_weights
from app.engine.device import resolve_device
from app.engine.infer import BundlePredictor, find_nifti_inputs, predict_paths
from app.errors import InputError
from app.paths import bundle_root


def default_checkpoint(bundle: str, checkpoint: str | None) -> str:
    """``--checkpoint`` or the bundle's ``models/model.pt``; a clear error when neither exists."""
    path = Path(checkpoint) if checkpoint else Path(bundle_root(bundle)) / "models" / "model.pt"
    if not path.is_file():
        hint = "" if checkpoint else " (this bundle ships no trained weights: train it first, or pass --checkpoint)"
        raise InputError(f"checkpoint not found{hint}", str(path))
    return str(path)


def evaluate(bundle: str, manifest: str, checkpoint: str | None = None, fold: int = 0, device: str = "auto",
             overrides: dict[str, Any] | None = None, extra_configs: Sequence[str] = ()) -> dict[str, float]:
    """Per-label Dice and HD95 (and their means) of a checkpoint on a manifest fold's validation cases."""
    ckpt = default_checkpoint(bundle, checkpoint)
    check_manifest_fold(manifest, fold)
    resolve_device(device)
    opts = {"manifest": str(Path(manifest).resolve()), "fold": int(fold), "device_name": device, **(overrides or {})}
    parser = bundle_parser(bundle, ["train.json", *extra_configs], opts)
    network = parser.get_parsed_content("network")
    load_network_weights(network, ckpt, parser.get_parsed_content("device"))
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    return {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}


def make_predictor(bundle: str, checkpoint: str | None = None, device: str = "auto",
                   overrides: dict[str, Any] | None = None, extra_configs: Sequence[str] = ()) -> tuple[BundlePredictor, dict]:
    """The bundle's inference predictor with weights loaded, and the bundle metadata."""
    ckpt = default_checkpoint(bundle, checkpoint)
    resolve_device(device)
    parser = bundle_parser(bundle, [*run_config(ckpt), "inference.json", *extra_configs],
                           {"device_name": device, "checkpoint": "", **(overrides or {})})
    predictor = parser.get_parsed_content("inference#predictor")
    predictor.load_weights(ckpt)
    return predictor, parser.get("_meta_", {})


def run_config(checkpoint: str) -> list[str]:
    """The training run's executed config when the checkpoint lies in a segapp run folder, else train.json.

    So a model trained with overrides (e.g. the demo's small network) is rebuilt exactly as trained.
    """
    for folder in (Path(checkpoint).parent, Path(checkpoint).parent.parent):
        executed = folder / "executed_config.json"
        if executed.is_file():
            return [str(executed)]
    return ["train.json"]


def infer_nifti(bundle: str, inputs: str, output_dir: str, checkpoint: str | None = None, device: str = "auto",
                overrides: dict[str, Any] | None = None, extra_configs: Sequence[str] = ()) -> list[Path]:
    """Label maps for a NIfTI file or folder, each on its input's exact grid."""
    if not Path(inputs).exists():
        raise InputError("input not found", inputs)
    files = find_nifti_inputs(inputs)
    if not files:
        raise InputError("no NIfTI files (.nii, .nii.gz) found", inputs)
    predictor, _ = make_predictor(bundle, checkpoint, device, overrides, extra_configs)
    return predict_paths(predictor, files, output_dir)
