"""Cross-validation: every fold of a manifest, a per-case summary, post-processing learned on it, and
the fold ensemble as a bundle (``segapp train BUNDLE --fold all``).

Layout of the output folder ``CV``::

    CV/fold_<k>/          one training run per fold (a run folder, itself a bundle)
    CV/cv_cases.csv       per case and label: Dice, HD95 (mm), surface Dice at ``tolerance_mm``,
                          reference/predicted volume and volume error (mL), with the model as predicted
    CV/cv_summary.json    mean and sd per label and metric, per fold and pooled over all folds; the
                          post-processing choice and the mirroring (TTA) comparison
    CV/configs/           the ensemble as a bundle: ``network_def`` is a ``FoldEnsemble`` over the fold
                          networks (``app.networks.ensemble``), the learned post-processing after the
                          argmax in ``inference.json``; ``segapp infer --run CV`` uses it
    CV/models/model.pt    the folds' weights in one state dict (``members.<k>.*``)
    CV/mlflow.db          (without --tracking-uri) the MLflow store: one parent run, one child per fold

Each fold's validation cases are predicted by that fold's model (its ``models/model.pt``, the
checkpoint chosen on the smoothed validation Dice) with the run's own preprocessing and
sliding-window inferer, on the network grid, both plain and with mirroring over ``mirror_axes``.
Metrics are computed there (spacing from the network grid's affine).

**Post-processing** (nnU-Net's): for each label, keeping only its largest connected component is
adopted when it raises that label's mean Dice over all CV cases; the choice is written as a MONAI
``KeepLargestConnectedComponentd`` after the argmax of ``configs/inference.json``, which segapp's
predictor runs on the label map on the source grid.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import multiprocessing
import shutil
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from app.bundle.config import bundle_parser, read_configs, write_config
from app.bundle.model import load_model
from app.bundle.store import find_bundle
from app.bundle.trust import require_trusted, trust_bundle
from app.data.manifest import check_manifest_fold, fold_datalist, load_manifest
from app.errors import ConfigError, EnvError
from app.evaluation.metrics import CASE_COLUMNS, case_metrics, summarize_rows
from app.io.atomic import atomic_path, atomic_write_text
from app.io.geometry import voxel_spacing
from app.networks.ensemble import MirrorTTA
from app.runtime.preflight import check_tracking_server
from app.training.tracking import local_artifact_location, local_tracking_uri
from app.training.train import train

log = logging.getLogger(__name__)

__all__ = ["ensemble_state_dict", "learn_postprocessing", "summarize_cv", "train_cv", "write_ensemble_bundle"]

PARENT_FILE = "mlflow_parent_run.json"
CSV_FIELDS = ("fold", "case", "label", *CASE_COLUMNS)
LCC = "KeepLargestConnectedComponentd"


# -- post-processing -----------------------------------------------------------------------------------
def keep_largest(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``labels`` with only the largest connected component of each of ``values`` kept (MONAI's
    ``KeepLargestConnectedComponent``, 26-connectivity, as in the inference config)."""
    if not values:
        return labels
    t = KeepLargestConnectedComponent(applied_labels=list(values), is_onehot=False, independent=True)
    return np.asarray(t(torch.tensor(labels)[None]))[0].astype(labels.dtype)  # a copy: MONAI edits in place


def learn_postprocessing(
    predictions: Sequence[np.ndarray], references: Sequence[np.ndarray], labels: Mapping[int, str]
) -> dict:
    """Per label: keep its largest component when that raises its mean Dice over all cases.

    Args:
        predictions, references: integer label maps, case by case (same grids pairwise).
        labels: ``{value: name}`` (0 = background, skipped).

    Returns:
        ``{"largest_component": [values adopted], "per_label": {name: {"dice_before", "dice_after",
        "adopted"}}, "description"}``.
    """
    from monai.metrics import compute_dice

    def mean_dice(preds: Sequence[np.ndarray], v: int) -> float:
        vals = []
        for p, r in zip(preds, references):
            if not ((p == v).any() or (r == v).any()):
                continue
            d = compute_dice(torch.as_tensor(p == v)[None, None].float(), torch.as_tensor(r == v)[None, None].float())
            vals.append(float(d))
        return float(np.mean(vals)) if vals else math.nan

    adopted: list[int] = []
    per: dict[str, dict] = {}
    for v in sorted(int(k) for k in labels if int(k) != 0):
        before = mean_dice(predictions, v)
        after = mean_dice([keep_largest(p, [v]) for p in predictions], v)
        take = math.isfinite(before) and math.isfinite(after) and after > before
        per[str(labels[v])] = {"dice_before": before, "dice_after": after, "adopted": bool(take)}
        if take:
            adopted.append(v)
    names = [str(labels[v]) for v in adopted]
    desc = f"keep the largest connected component of {', '.join(names)}" if names else "none (it did not help)"
    return {"largest_component": adopted, "per_label": per, "description": desc}


# -- the ensemble bundle ----------------------------------------------------------------------------------
def ensemble_state_dict(paths: Sequence[str | Path]) -> dict[str, torch.Tensor]:
    """The fold weights as one ``FoldEnsemble`` state dict (``members.<k>.<key>``)."""
    from app.bundle.weights import load_checkpoint, state_dict_of

    out: dict[str, torch.Tensor] = {}
    for k, path in enumerate(paths):
        for key, value in state_dict_of(load_checkpoint(path), path).items():
            out[f"members.{k}.{key}"] = value
    return out


def _ensemble_config(cfg: dict, num_members: int, mirror_axes: Sequence[int]) -> dict:
    cfg = dict(cfg)
    if not (isinstance(cfg.get("network_def"), str) and cfg["network_def"] == "@fold_network_def"):
        cfg["fold_network_def"] = cfg["network_def"]
    cfg["num_folds"] = int(num_members)
    cfg["mirror_axes"] = [int(a) for a in mirror_axes]
    cfg["network_def"] = {
        "_target_": "app.networks.ensemble.FoldEnsemble",
        "member": "@fold_network_def",
        "num_members": "@num_folds",
        "mirror_axes": "@mirror_axes",
    }
    return cfg


def _with_postprocessing(cfg: dict, largest: Sequence[int]) -> dict:
    post = cfg.get("postprocessing")
    steps = post.get("transforms") if isinstance(post, dict) else post
    if not isinstance(steps, list):
        raise ConfigError("the run's inference config has no postprocessing list to extend", "configs/inference.json")
    steps = [s for s in steps if not (isinstance(s, dict) and s.get("_target_") == LCC)]
    at = next((i + 1 for i, s in enumerate(steps) if isinstance(s, dict) and s.get("_target_") == "AsDiscreted"), None)
    if largest:
        if at is None:
            raise ConfigError(
                "the run's inference postprocessing has no argmax (AsDiscreted)", "configs/inference.json"
            )
        steps.insert(at, {"_target_": LCC, "keys": "pred", "applied_labels": list(largest), "independent": True})
    cfg = dict(cfg)
    cfg["postprocessing"] = {**post, "transforms": steps} if isinstance(post, dict) else steps
    return cfg


def write_ensemble_bundle(
    cv_dir: str | Path,
    fold_dirs: Sequence[str | Path],
    mirror_axes: Sequence[int] = (),
    largest_component: Sequence[int] = (),
    half: bool = False,
) -> Path:
    """Make ``cv_dir`` a bundle: the fold ensemble (see the module docstring). ``half`` stores float16 weights."""
    cv_dir, first = Path(cv_dir), Path(fold_dirs[0])
    for name in ("inference", "evaluate"):
        path = first / "configs" / f"{name}.json"
        if not path.is_file():
            continue
        cfg = _ensemble_config(json.loads(path.read_text()), len(fold_dirs), mirror_axes)
        if name == "inference":
            cfg = _with_postprocessing(cfg, largest_component)
        write_config(cfg, cv_dir / "configs" / f"{name}.json")
    shutil.copy2(first / "configs" / "metadata.json", cv_dir / "configs" / "metadata.json")
    if (first / "LICENSE").is_file():
        shutil.copy2(first / "LICENSE", cv_dir / "LICENSE")
    state = ensemble_state_dict([Path(d) / "models" / "model.pt" for d in fold_dirs])
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(cv_dir / "models" / "model.pt") as tmp:
        torch.save(state, tmp)
    trust_bundle(cv_dir, reason="written by segapp train --fold all")
    return cv_dir


# -- per-case evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def _predict_fold(fold_dir: Path, cases: list[dict], device: str, mirror_axes: Sequence[int]) -> list[dict]:
    """Each case's reference and predicted labels (plain and mirrored) on the network grid, with timings."""
    model = load_model(run=fold_dir, device=device)
    net = model.network
    tta = MirrorTTA(net, mirror_axes).eval() if mirror_axes else None
    out = []
    for case in cases:
        data = model.preprocessing({"image": case["image"], "label": case["label"], "id": case.get("id")})
        image = data["image"].to(model.device)[None]
        ref = np.asarray(data["label"].cpu())[0].astype(np.int16)
        spacing = voxel_spacing(np.asarray(data["image"].affine, dtype=np.float64)).tolist()
        t0 = time.perf_counter()
        plain = torch.argmax(model.inferer(image, net), dim=1)[0].cpu().numpy().astype(np.int16)
        t1 = time.perf_counter()
        mirrored = None
        if tta is not None:
            mirrored = torch.argmax(model.inferer(image, tta), dim=1)[0].cpu().numpy().astype(np.int16)
        t2 = time.perf_counter()
        out.append(
            {
                "id": case.get("id", Path(case["image"]).name),
                "ref": ref,
                "plain": plain,
                "mirrored": mirrored,
                "spacing": spacing,
                "seconds_plain": t1 - t0,
                "seconds_mirrored": t2 - t1,
            }
        )
    return out


def _rows(preds: list[dict], key: str, fold: int, labels: Mapping[int, str], tol: float, lcc: Sequence[int]) -> list:
    rows = []
    for p in preds:
        pred = keep_largest(p[key], lcc) if lcc else p[key]
        for r in case_metrics(pred, p["ref"], p["spacing"], labels, tol):
            rows.append({"fold": fold, "case": p["id"], **r})
    return rows


def _summary(rows: list[dict]) -> dict:
    folds = sorted({int(r["fold"]) for r in rows})
    return {
        "per_fold": {str(k): summarize_rows([r for r in rows if int(r["fold"]) == k]) for k in folds},
        "pooled": summarize_rows(rows),
    }


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def summarize_cv(
    cv_dir: str | Path,
    manifest: str | Path,
    folds: Sequence[int],
    device: str = "auto",
    mirror_axes: Sequence[int] = (),
    tolerance_mm: float = 1.0,
    half: bool = False,
) -> dict:
    """Evaluate each fold on its validation cases, learn the post-processing, write ``cv_cases.csv``,
    ``cv_summary.json`` and the ensemble bundle (see the module docstring). Returns the summary."""
    cv_dir = Path(cv_dir)
    fold_dirs = [cv_dir / f"fold_{k}" for k in folds]
    labels = {int(k): str(v) for k, v in load_manifest(manifest).labels.items()}
    preds: dict[int, list[dict]] = {}
    t0 = time.perf_counter()
    for k, fold_dir in zip(folds, fold_dirs):
        preds[k] = _predict_fold(fold_dir, fold_datalist(manifest, k, "val"), device, mirror_axes)
    eval_s = time.perf_counter() - t0
    use = "mirrored" if mirror_axes else "plain"
    every = [p for k in folds for p in preds[k]]
    pp = learn_postprocessing([p[use] for p in every], [p["ref"] for p in every], labels)
    lcc = pp["largest_component"]
    rows = [r for k in folds for r in _rows(preds[k], use, k, labels, tolerance_mm, lcc)]
    summary: dict[str, Any] = {
        "labels": [labels[v] for v in sorted(labels) if v != 0],
        "folds": list(folds),
        "num_cases": len(every),
        "metrics": list(CASE_COLUMNS),
        "surface_dice_tolerance_mm": float(tolerance_mm),
        "prediction": {"mirror_axes": list(mirror_axes), "largest_component": lcc},
        **_summary(rows),
        "postprocessing": pp,
    }
    compare = {
        "plain": summarize_rows([r for k in folds for r in _rows(preds[k], "plain", k, labels, tolerance_mm, [])])
    }
    seconds = {"plain": float(np.mean([p["seconds_plain"] for p in every]))}
    if mirror_axes:
        compare["mirrored"] = summarize_rows(
            [r for k in folds for r in _rows(preds[k], "mirrored", k, labels, tolerance_mm, [])]
        )
        seconds["mirrored"] = float(np.mean([p["seconds_mirrored"] for p in every]))
    summary["tta"] = {
        "mirror_axes": list(mirror_axes),
        "dice": {
            name: {lab: s[lab]["mean"] for lab in summary["labels"]} | {"mean": s["mean"]}
            for name, s in ((n, c["dice"]) for n, c in compare.items())
        },
        "seconds_per_case": seconds,
    }
    summary["evaluation_seconds"] = eval_s
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(cv_dir / "cv_cases.csv", buf.getvalue())
    atomic_write_text(cv_dir / "cv_summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")
    write_ensemble_bundle(cv_dir, fold_dirs, mirror_axes, lcc, half=half)
    return summary


# -- training every fold ------------------------------------------------------------------------------------
def _fold_done(fold_dir: Path) -> bool:
    metrics = fold_dir / "metrics.json"
    if not (metrics.is_file() and (fold_dir / "models" / "model.pt").is_file()):
        return False
    try:
        return json.loads(metrics.read_text()).get("final") is not None
    except ValueError:
        return False


def _parent_run(cv_dir: Path, uri: str, experiment: str, name: str, params: Mapping[str, Any], resume: bool):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    info_file = cv_dir / PARENT_FILE
    if resume and info_file.is_file():
        info = json.loads(info_file.read_text())
        if info.get("tracking_uri") == uri:
            client.update_run(info["run_id"], status="RUNNING")
            return client, info
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        location = local_artifact_location(cv_dir) if uri.startswith("sqlite:") else None
        exp_id = client.create_experiment(experiment, artifact_location=location)
    run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(
        exp_id, run_name=run_name, tags={"segapp.output_dir": str(cv_dir.resolve()), "segapp.cv": "parent"}
    )
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    info = {"run_id": run.info.run_id, "tracking_uri": uri, "experiment": experiment, "run_name": run_name}
    atomic_write_text(info_file, json.dumps(info))
    return client, info


def _train_fold(kwargs: dict) -> dict:
    """One fold (a module-level function so that ``spawn`` workers can run it)."""
    threads = kwargs.pop("torch_threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    return train(**kwargs)


def train_cv(
    bundle: str,
    manifest: str | None = None,
    epochs: int | None = None,
    device: str = "auto",
    output_dir: str | None = None,
    resume: bool = False,
    tracking_uri: str | None = None,
    seed: int | None = None,
    extra_configs: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
    trust: bool = False,
    plan: str | None = None,
    nproc: int = 1,
    folds: Sequence[int] | None = None,
    tolerance_mm: float = 1.0,
    mirror_axes: Sequence[int] | None = None,
    half: bool = False,
    tracking_fallback: str = "fail",
) -> dict:
    """Train every fold (``nproc`` at a time, each in its own process when > 1), then :func:`summarize_cv`.

    A finished fold (``metrics.json`` final, ``models/model.pt``) is kept; with ``resume`` an
    unfinished one continues from its checkpoint. ``mirror_axes``: the ensemble's mirroring (default:
    the bundle's ``mirror_axes`` config value, else none). ``tracking_fallback`` as in
    :func:`app.training.train.train` (checked once, for the parent run and every fold). Returns
    ``{"output_dir", "summary", "folds": [fold results], "mlflow": parent run}``.
    """
    ref = find_bundle(bundle)
    require_trusted(ref, trust)
    raw = read_configs(ref.root, ["train", *extra_configs])
    if manifest is None:
        manifest = str(bundle_parser(ref.root, ["train", *extra_configs]).get_parsed_content("manifest"))
    m = check_manifest_fold(manifest, 0)
    fold_list = list(range(m.num_folds)) if folds is None else [int(f) for f in folds]
    out = Path(output_dir or f"{raw.get('output_dir', 'runs/' + ref.name)}_cv").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if mirror_axes is None:  # the bundle's own prediction setting (its inference config's mirror_axes)
        infer_cfg = read_configs(ref.root, ["inference"]) if (ref.root / "configs").is_dir() else {}
        mirror_axes = list(infer_cfg.get("mirror_axes") or raw.get("mirror_axes") or [])
    axes = [int(a) for a in mirror_axes]
    uri = tracking_uri or local_tracking_uri(out)
    try:
        check_tracking_server(tracking_uri)
    except EnvError:
        if tracking_fallback != "local":
            raise
        log.warning("MLflow at --tracking-uri does not answer: tracking in %s instead", out)
        uri = local_tracking_uri(out)
    params = {
        "bundle": ref.name,
        "folds": json.dumps(fold_list),
        "manifest": Path(manifest).name,
        "plan": Path(plan).name if plan else "",
        "mirror_axes": json.dumps(axes),
    }
    client, parent = _parent_run(out, uri, str(raw.get("experiment_name", "segapp")), f"{ref.name}-cv", params, resume)
    jobs = []
    for k in fold_list:
        fold_dir = out / f"fold_{k}"
        if _fold_done(fold_dir):
            log.info("fold %d: finished earlier, kept (%s)", k, fold_dir)
            continue
        jobs.append(
            dict(
                bundle=bundle,
                manifest=manifest,
                fold=k,
                epochs=epochs,
                device=device,
                output_dir=str(fold_dir),
                resume=bool(resume and (fold_dir / "checkpoints" / "last.pt").is_file()),
                tracking_uri=uri,
                seed=seed,
                extra_configs=list(extra_configs),
                overrides={**(overrides or {}), "parent_run_id": parent["run_id"]},
                trust=trust,
                plan=plan,
            )
        )
    t0 = time.perf_counter()
    try:
        if nproc > 1 and len(jobs) > 1:
            threads = max(1, torch.get_num_threads() // nproc)
            with ProcessPoolExecutor(max_workers=nproc, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_train_fold, [{**j, "torch_threads": threads} for j in jobs]))
        else:
            results = [_train_fold(j) for j in jobs]
        train_s = time.perf_counter() - t0
        summary = summarize_cv(out, manifest, fold_list, device, axes, tolerance_mm, half=half)
        summary["training_seconds_this_call"] = train_s
        atomic_write_text(out / "cv_summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")
        run_id = parent["run_id"]
        for lab, st in summary["pooled"]["dice"].items():
            if isinstance(st, dict) and math.isfinite(st["mean"]):
                client.log_metric(run_id, f"cv_dice_{lab}", st["mean"])
        if math.isfinite(summary["pooled"]["dice"]["mean"]):
            client.log_metric(run_id, "cv_mean_dice", summary["pooled"]["dice"]["mean"])
        for name in ("cv_summary.json", "cv_cases.csv"):
            client.log_artifact(run_id, str(out / name))
        client.set_terminated(run_id, status="FINISHED")
    except BaseException:
        client.set_terminated(parent["run_id"], status="FAILED")
        raise
    return {"output_dir": str(out), "summary": summary, "folds": results, "mlflow": parent}
