"""The subcommands: each turns parsed options into one call of the library and prints the result."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from app.errors import ConfigError, InputError

MULTI_GPU_CONFIG = "multi_gpu_train.json"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _overrides(a) -> dict | None:
    text = getattr(a, "override", None)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"not valid JSON: {exc}", "--override") from exc
    if not isinstance(value, dict):
        raise ConfigError("expected a JSON object of config keys and values", "--override")
    return value


# -- data --------------------------------------------------------------------------------------------
def manifest_create(a) -> int:
    from app.data.manifest import create_manifest

    labels = None
    if a.labels:
        try:
            labels = {int(k): v for k, v in (item.split("=", 1) for item in a.labels)}
        except ValueError as exc:
            raise ConfigError("labels are VALUE=NAME pairs with integer values", "--labels") from exc
    doc = create_manifest(
        a.data_root,
        images_glob=a.images_glob,
        labels_dir=a.labels_dir,
        labels=labels,
        name=a.name,
        num_folds=a.folds,
        seed=a.seed,
        output=a.output,
    )
    print(f"wrote {a.output}: {len(doc['cases'])} cases, {doc['num_folds']} folds")
    return 0


def manifest_validate(a) -> int:
    from app.data.manifest import validate_manifest

    problems = validate_manifest(a.manifest, check_content=not a.quick, check_checksums=True, workers=a.workers)
    for p in problems:
        print(p)
    print(f"{a.manifest}: {'OK' if not problems else f'{len(problems)} problem(s)'}", file=sys.stderr)
    return 0 if not problems else 1


def plan(a) -> int:
    from app.planning.fingerprint import plan_from_manifest

    result = plan_from_manifest(
        a.manifest,
        a.output,
        modality=a.modality,
        gpu_memory_gb=a.gpu_memory,
        base_features=a.base_features,
        amp=not a.float32,
    )
    _print_json({k: result[k] for k in result if k != "fingerprint"} if isinstance(result, dict) else result)
    return 0


# -- training and evaluation -------------------------------------------------------------------------
def train(a) -> int:
    from app.training.train import train as run_train

    if str(a.fold).strip().lower() == "all":
        return _train_cv(a)
    if not str(a.fold).strip().isdigit():
        raise ConfigError(f"expected a fold number or 'all', got {a.fold!r}", "--fold")
    if a.nproc and a.nproc > 1:
        return _launch(a)
    res = run_train(
        a.bundle,
        a.manifest,
        int(a.fold),
        a.epochs,
        a.device,
        a.out,
        a.resume,
        a.tracking_uri,
        a.seed,
        extra_configs=a.config or (),
        overrides=_overrides(a),
        trust=a.trust_bundle,
        plan=a.plan,
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        final = res.get("final") or res.get("last") or {}
        dice = {k: v for k, v in final.items() if "dice" in k}
        print("validation: " + "  ".join(f"{k} {v:.4f}" for k, v in dice.items()))
        print(
            f"outputs:    {res['output_dir']}  (models/model.pt, models/best.pt, checkpoints/last.pt, metrics.json; "
            f"use it with --run {res['output_dir']})"
        )
        if res.get("mlflow"):
            m = res["mlflow"]
            print(f"mlflow:     run {m['run_name']} ({m['run_id']}) in {m['tracking_uri']}")
    return 0


def _train_cv(a) -> int:
    """``--fold all``: every fold (``--nproc N``: N folds at a time), the CV summary and the ensemble."""
    from app.training.cv import train_cv

    res = train_cv(
        a.bundle,
        a.manifest,
        epochs=a.epochs,
        device=a.device,
        output_dir=a.out,
        resume=a.resume,
        tracking_uri=a.tracking_uri,
        seed=a.seed,
        extra_configs=a.config or (),
        overrides=_overrides(a),
        trust=a.trust_bundle,
        plan=a.plan,
        nproc=a.nproc or 1,
    )
    s = res["summary"]
    for name in s["labels"]:
        st = s["pooled"]["dice"][name]
        per_fold = "  ".join(f"{s['per_fold'][k]['dice'][name]['mean']:.4f}" for k in sorted(s["per_fold"]))
        print(f"CV dice {name:12s} {st['mean']:.4f} ± {st['sd']:.4f}  (folds: {per_fold})")
    pp = s["postprocessing"]
    print(f"postprocessing: {pp['description']}")
    out = res["output_dir"]
    print(f"outputs:    {out}  (cv_summary.json, cv_cases.csv, fold_*/; use it with --run {out})")
    if res.get("mlflow"):
        m = res["mlflow"]
        print(f"mlflow:     parent run {m['run_name']} ({m['run_id']}) in {m['tracking_uri']}")
    return 0


def _launch(a) -> int:
    """``--nproc N``: the same command in N processes under torchrun, with the bundle's DDP overlay."""
    from app.bundle.store import find_bundle
    from app.runtime.launch import launch_torchrun, strip_nproc

    argv = strip_nproc(sys.argv[1:])
    given = [Path(c).name for c in (a.config or [])]
    if MULTI_GPU_CONFIG not in given:
        if (find_bundle(a.bundle).root / "configs" / MULTI_GPU_CONFIG).is_file():
            argv += ["--config", MULTI_GPU_CONFIG]
        else:
            print(
                f"segapp: warning: bundle {a.bundle} has no configs/{MULTI_GPU_CONFIG}: the network is not "
                "wrapped in DDP",
                file=sys.stderr,
            )
    return launch_torchrun(argv, a.nproc)


def evaluate(a) -> int:
    from app.evaluation.evaluate import evaluate as run_evaluate

    metrics = run_evaluate(
        a.bundle,
        a.manifest,
        a.checkpoint,
        a.fold,
        a.device,
        overrides=_overrides(a),
        extra_configs=a.config or (),
        run=a.run,
        trust=a.trust_bundle,
    )
    if a.json:
        _print_json(metrics)
    else:
        for k in sorted(metrics):
            print(f"{k:28s} {metrics[k]:.4f}")
    return 0


# -- inference ---------------------------------------------------------------------------------------
def infer(a) -> int:
    from app.bundle.model import load_model
    from app.inference.pipeline import Segmenter, find_nifti_inputs, is_dicom_input, parse_formats

    src = Path(a.input)
    if not src.exists():
        raise InputError("input not found", str(src))
    dicom = is_dicom_input(src)
    formats = parse_formats(a.format, dicom)
    model = load_model(
        a.bundle,
        a.checkpoint,
        run=a.run,
        overrides=_overrides(a),
        device=a.device,
        configs=a.config or (),
        trust=a.trust_bundle,
        segments_file=a.segments,
    )
    from app.networks.ensemble import describe, set_mirroring

    model.network, _ = set_mirroring(model.network, getattr(a, "tta", "auto"))
    print("model:   " + describe(model.network))
    segmenter = Segmenter(model)
    if dicom:
        res = segmenter.dicom(
            src, a.output, formats, a.series_uid, a.send or (), allow_generated_uids=a.allow_generated_uids
        )
        results = [res]
        print("series:  " + res.selection)
    else:
        files = find_nifti_inputs(src)
        if not files:
            raise InputError("no NIfTI files (.nii, .nii.gz) found", str(src))
        results = [segmenter.nifti(f, a.output) for f in files]
    for res in results:
        if res.path != "fast":
            print(f"path:    MONAI's plain path ({res.note})")
        print("timings: " + "  ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))
        for dest in res.sent:
            print(f"sent {dest['files']} file(s) to {dest['destination']}")
        for path in res.outputs.values():
            print(path)
    return 0


def infer_batch(a) -> int:
    from app.inference.batch import infer_batch as run_batch

    res = run_batch(
        a.bundle,
        a.input,
        a.output,
        a.nproc,
        a.checkpoint,
        a.device,
        a.format,
        a.config or (),
        _overrides(a),
        a.send or (),
        a.allow_generated_uids,
        a.retry_failed,
        run=a.run,
        trust=a.trust_bundle,
    )
    for row in res["series"]:
        if row["status"] == "failed":
            print(f"failed  {row['key']}  {row['input']}: {row['error']}", file=sys.stderr)
    c = res["counts"]
    print(
        f"{c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped in {res['seconds']:.1f} s; "
        f"table: {a.output}/results.csv"
    )
    return 1 if c["failed"] else 0


def seg2nifti(a) -> int:
    from app.io.dicom_seg import seg_to_nifti

    print(seg_to_nifti(a.seg, a.reference, a.output))
    return 0


def demo(a) -> int:
    from app.cli.demo import run_demo

    return run_demo(a.out, epochs=a.epochs, device=a.device)


# -- bundles -----------------------------------------------------------------------------------------
def bundle_list(a) -> int:
    from app.bundle.store import list_bundles, store_dir

    rows = list_bundles()
    if a.json:
        _print_json(rows)
        return 0
    for r in rows:
        print(f"{r['name']:32s} {r['version']:10s} {r['source']:8s} {r['path']}")
    print(f"store: {store_dir()}", file=sys.stderr)
    return 0


def bundle_download(a) -> int:
    from app.bundle.store import download_bundle

    ref = download_bundle(a.name, a.version, a.url, a.source)
    print(f"{ref.name} -> {ref.root}")
    return 0


def bundle_trust(a) -> int:
    from app.bundle.store import find_bundle
    from app.bundle.trust import trust_bundle, trust_file

    ref = find_bundle(a.path)
    digest = trust_bundle(ref.root)
    print(f"trusted {ref.root} (configs sha256 {digest[:16]}...) in {trust_file()}")
    return 0


def bundle_verify(a) -> int:
    from app.bundle.verify import verify_bundle

    for line in verify_bundle(a.path, trust=a.trust_bundle):
        print(line)
    return 0
