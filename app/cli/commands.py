"""The subcommands: each turns parsed options into one call of the library and prints the result."""

from __future__ import annotations

import json
import os
import sys
import time
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


def _mlflow_bundle(a) -> Any:
    """The bundle argument, or the local folder a ``runs:/`` or ``models:/`` URI was fetched into."""
    from app.bundle.mlflow_source import fetch_mlflow_bundle, is_mlflow_uri

    if is_mlflow_uri(a.bundle):
        return str(fetch_mlflow_bundle(a.bundle, a.tracking_uri))
    return a.bundle


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
        if a.register:
            raise ConfigError("registers one model; a cross-validation run has one per fold", "--register")
        return _train_cv(a)
    if not str(a.fold).strip().isdigit():
        raise ConfigError(f"expected a fold number or 'all', got {a.fold!r}", "--fold")
    if a.nproc and a.nproc > 1:
        return _launch(a)
    res = run_train(a.bundle, a.manifest, int(a.fold), **_training_options(a))
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        final = res.get("final") or res.get("last") or {}
        dice = {k: v for k, v in final.items() if "dice" in k}
        print("validation: " + "  ".join(f"{k} {v:.4f}" for k, v in dice.items()))
        print(
            f"outputs:    {res['output_dir']}  (models/model.pt, models/best.pt, checkpoints/last.pt, metrics.json; "
            f"use it with --run {res['output_dir']})"
        )
        if res.get("tracking_fallback"):
            print(f"mlflow:     {res['tracking_fallback']}", file=sys.stderr)
        if res.get("mlflow"):
            m = res["mlflow"]
            print(f"mlflow:     run {m['run_name']} ({m['run_id']}) in {m['tracking_uri']}")
        if a.register:
            _register(a.register, res.get("mlflow"))
    return 0


def _training_options(a) -> dict:
    """The options one fold's training and a cross-validation share."""
    return dict(
        epochs=a.epochs,
        device=a.device,
        output_dir=a.out,
        resume=a.resume,
        tracking_uri=a.tracking_uri,
        seed=a.seed,
        extra_configs=a.config or (),
        overrides=_overrides(a),
        trust=a.trust_bundle,
        tracking_fallback=a.tracking_fallback,
        plan=a.plan,
    )


def _register(name: str, run: dict | None) -> None:
    from app.bundle.mlflow_source import FINAL_MODEL, redact, register_bundle_model

    if not run:
        raise ConfigError("no MLflow run was recorded for this training (mlflow_run.json)", "--register")
    mv = register_bundle_model(run["tracking_uri"], run["run_id"], name, FINAL_MODEL)
    print(
        f"registry:   models:/{mv.name}/{mv.version} (from runs:/{mv.run_id}/{FINAL_MODEL}) "
        f"in {redact(run['tracking_uri'])}"
    )


def _train_cv(a) -> int:
    """``--fold all``: every fold (``--nproc N``: N folds at a time), the CV summary and the ensemble."""
    from app.training.cv import train_cv

    res = train_cv(a.bundle, a.manifest, nproc=a.nproc or 1, **_training_options(a))
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
        _mlflow_bundle(a),
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
    from app.io.pull import is_remote, pulled

    if not is_remote(a.input):
        return _infer(a, Path(a.input))
    with pulled(a.input) as got:  # a temporary folder, deleted afterwards
        print(f"pulled:  {got.instances} instance(s) of {len(got.series_uids)} series from {got.source}")
        if a.series_uid is None and len(got.series_uids) == 1:
            a.series_uid = got.series_uids[0]
        return _infer(a, got.folder)


def _infer(a, src: Path) -> int:
    from app.bundle.model import load_model
    from app.inference.jobs import is_dicom_input, parse_formats, plan_nifti_jobs
    from app.inference.pipeline import Segmenter
    from app.io.dicom_series import scan_for_images
    from app.runtime.preflight import check_device, check_output_dir

    if not src.exists():
        raise InputError("input not found", str(src))
    # everything that can be checked before the model is built: options, output folder, inputs, space
    check_device(a.device)
    out = check_output_dir(a.output)
    dicom = is_dicom_input(src, exclude=out)
    formats = parse_formats(a.format, dicom)
    jobs = [] if dicom else plan_nifti_jobs(src, out, overwrite=a.overwrite, formats=formats)
    t_scan = time.perf_counter()
    scan = scan_for_images(src, a.series_uid) if dicom else None  # a folder without images fails here
    t_scan = time.perf_counter() - t_scan
    model = load_model(
        _mlflow_bundle(a),
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
    segmenter = Segmenter(model, seg_type=a.seg_type)
    if dicom:
        res = segmenter.dicom(
            src,
            out,
            formats,
            a.series_uid,
            a.send or (),
            allow_generated_uids=a.allow_generated_uids,
            overwrite=a.overwrite,
            study_uid=a.study_uid,
            volume_number=a.volume,
            scan=scan,
            scan_s=t_scan,
        )
        print("series:  " + res.selection)
        _print_series(res)
    else:  # each image all or nothing; the first failure stops (the finished ones keep their outputs)
        for job in jobs:
            _print_series(segmenter.nifti(job.path, out, stem=job.key, overwrite=a.overwrite, formats=formats))
    return 0


def _print_series(res) -> None:
    if res.path != "fast":
        print(f"path:    MONAI's plain path ({res.note})")
    print("timings: " + "  ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))
    for dest in res.sent:
        print(f"sent {dest['files']} file(s) to {dest['destination']}")
    for path in res.outputs.values():
        print(path)


def infer_batch(a) -> int:
    from app.inference.batch import infer_batch as run_batch

    res = run_batch(
        _mlflow_bundle(a),
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


def serve(a) -> int:
    import logging
    import signal

    from app.node.config import load_config
    from app.node.server import Node

    cfg = load_config(a.config)
    node = Node(cfg, log_level=logging.DEBUG if a.verbose else logging.INFO)
    node.start()
    http = f"; status http://{cfg.http_host}:{node.http.port}/status" if node.http else ""
    port = node.scp.port if node.scp else cfg.port
    print(f"segapp node {cfg.ae_title} on {cfg.host}:{port}{http}; SIGTERM or Ctrl-C stops it", flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: node.request_stop())
    try:
        node.wait()
    finally:
        node.stop()
    return 0


def list_series(a) -> int:
    from app.io.dicom_scan import scan
    from app.io.dicom_select import list_series as rows_of

    src = Path(a.folder)
    if not src.exists():
        raise InputError("input not found", str(src))
    rows = rows_of(scan(src).series)
    if a.json:
        _print_json(rows)
        return 0
    print("key | modality | description | slices | volumes x echoes | size | plane")
    for r in rows:
        keys = (
            r["key"]
            if len(r["selectable_keys"]) == 1
            else f"{r['key']} (choose one of {', '.join(r['selectable_keys'])})"
        )
        print(
            f"{keys} | {r['modality'] or '?'} | {r['description']!r} | {r['n_slices']} | "
            f"{r['n_volumes']} x {r['n_echoes']} | {r['columns']}x{r['rows']} | {r['orientation']}"
        )
    return 0


def seg2nifti(a) -> int:
    from app.io.seg_read import seg_to_nifti

    print(seg_to_nifti(a.seg, a.reference, a.output))
    return 0


def demo(a) -> int:
    from app.cli.demo import run_demo

    return run_demo(a.out, epochs=a.epochs, device=a.device)


def export(a) -> int:
    from app.bundle.export import export_bundle

    res = export_bundle(
        _mlflow_bundle(a),
        a.output,
        a.format,
        run=a.run,
        checkpoint=a.checkpoint,
        overrides=_overrides(a),
        configs=a.config or (),
        trust=a.trust_bundle,
        spatial=a.shape,
    )
    shape = "x".join(str(s) for s in res.input_shape)
    print(
        f"{res.path}: {res.format} ({res.method}), {res.path.stat().st_size / 2**20:.1f} MiB; on a random "
        f"{shape} input it matches the network to {res.max_abs_diff:.2g}"
    )
    return 0


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

    ref = download_bundle(a.name, a.version, a.url, a.source, sha256=a.sha256)
    print(f"{ref.name} -> {ref.root} ({'SHA-256 checked' if a.sha256 else 'integrity not checked: no --sha256'})")
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
