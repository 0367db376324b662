"""The ``segapp`` command line. Each subcommand is a thin layer over a function in ``app``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Sequence

from app.errors import SegappError

log = logging.getLogger("app")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("app").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("monai.data", "mlflow", "alembic", "urllib3", "pynetdicom", "highdicom", "pydicom", "ignite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# -- subcommands -------------------------------------------------------------------------------------
def cmd_manifest_create(a) -> int:
    from app.data.manifest import create_manifest

    labels = dict(item.split("=", 1) for item in a.labels) if a.labels else None
    doc = create_manifest(a.data_root, images_glob=a.images_glob, labels_dir=a.labels_dir,
                          labels={int(k): v for k, v in labels.items()} if labels else None,
                          name=a.name, num_folds=a.folds, seed=a.seed, output=a.output)
    print(f"wrote {a.output}: {len(doc['cases'])} cases, {doc['num_folds']} folds")
    return 0


def cmd_manifest_validate(a) -> int:
    from app.data.manifest import validate_manifest

    problems = validate_manifest(a.manifest, check_content=not a.quick, check_checksums=True, workers=a.workers)
    for p in problems:
        print(p)
    print(f"{a.manifest}: {'OK' if not problems else f'{len(problems)} problem(s)'}", file=sys.stderr)
    return 0 if not problems else 1


def cmd_train(a) -> int:
    from app.engine.train import train

    overrides = json.loads(a.override) if a.override else None
    if a.nproc and a.nproc > 1:
        from app.engine.launch import launch_torchrun

        return launch_torchrun(sys.argv[1:], a.nproc)
    res = train(a.bundle, a.manifest, a.fold, a.epochs, a.device, a.out, a.resume, a.tracking_uri, a.seed,
                extra_configs=a.config or (), overrides=overrides)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        _report_training(res)
    return 0


def _report_training(res: dict) -> None:
    final = res.get("final") or res.get("last") or {}
    dice = {k: v for k, v in final.items() if "dice" in k}
    print("validation: " + "  ".join(f"{k} {v:.4f}" for k, v in dice.items()))
    print(f"outputs:    {res['output_dir']}  (models/model.pt, models/best.pt, checkpoints/last.pt, metrics.json)")
    if res.get("mlflow"):
        m = res["mlflow"]
        print(f"mlflow:     run {m['run_name']} ({m['run_id']}) in {m['tracking_uri']}")


def cmd_evaluate(a) -> int:
    from app.engine.evaluate import evaluate

    metrics = evaluate(a.bundle, a.manifest, a.checkpoint, a.fold, a.device,
                       overrides=json.loads(a.override) if a.override else None, extra_configs=a.config or ())
    if a.json:
        _print_json(metrics)
    else:
        for k in sorted(metrics):
            print(f"{k:28s} {metrics[k]:.4f}")
    return 0


def cmd_infer(a) -> int:
    from app.engine.infer_cli import run_infer

    outputs = run_infer(a)
    for o in outputs:
        print(o)
    return 0


def cmd_infer_batch(a) -> int:
    from app.engine.batch_infer import infer_batch

    res = infer_batch(a.bundle, a.input, a.output, a.nproc, a.checkpoint, a.device, a.format, a.config or (),
                      json.loads(a.override) if a.override else None, a.send or (), a.allow_generated_uids,
                      a.retry_failed)
    for row in res["series"]:
        if row["status"] == "failed":
            print(f"failed  {row['key']}  {row['input']}: {row['error']}", file=sys.stderr)
    c = res["counts"]
    print(f"{c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped in {res['seconds']:.1f} s; "
          f"table: {a.output}/results.csv")
    return 1 if c["failed"] else 0


def cmd_seg2nifti(a) -> int:
    from app.io.dicom_seg import seg_to_nifti

    print(seg_to_nifti(a.seg, a.reference, a.output))
    return 0


def cmd_plan(a) -> int:
    from app.plan.fingerprint import plan_from_manifest

    plan = plan_from_manifest(a.manifest, a.output, modality=a.modality)
    _print_json({k: plan[k] for k in plan if k != "fingerprint"} if isinstance(plan, dict) else plan)
    return 0


def cmd_demo(a) -> int:
    from app.demo import run_demo

    return run_demo(a.out, epochs=a.epochs, device=a.device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segapp", description="3D medical image segmentation with MONAI bundles")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("manifest", help="create or validate a data manifest")
    msub = m.add_subparsers(dest="manifest_command", required=True)
    mc = msub.add_parser("create", help="list image/label pairs with checksums and folds")
    mc.add_argument("data_root")
    mc.add_argument("--output", "-o", required=True)
    mc.add_argument("--name", default="dataset")
    mc.add_argument("--images-glob", default="imagesTr/*.nii.gz")
    mc.add_argument("--labels-dir", default="labelsTr")
    mc.add_argument("--labels", nargs="*", help="VALUE=NAME pairs (default: dataset.json's labels)")
    mc.add_argument("--folds", type=int, default=5)
    mc.add_argument("--seed", type=int, default=0)
    mc.set_defaults(func=cmd_manifest_create)
    mv = msub.add_parser("validate", help="check files, checksums, shapes, affines, label values, NaNs")
    mv.add_argument("manifest")
    mv.add_argument("--quick", action="store_true", help="existence and checksums only")
    mv.add_argument("--workers", type=int, default=1)
    mv.set_defaults(func=cmd_manifest_validate)

    t = sub.add_parser("train", help="train a bundle on a manifest fold")
    t.add_argument("bundle", help="bundle name under bundles/ or a bundle folder")
    t.add_argument("--manifest", help="data manifest (default: the bundle's sample data)")
    t.add_argument("--fold", type=int, default=0)
    t.add_argument("--epochs", type=int)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--out", help="output folder (checkpoints, models, metrics, MLflow store)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    t.add_argument("--tracking-uri", help="MLflow tracking server (default: a local store in OUT/mlruns)")
    t.add_argument("--seed", type=int)
    t.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this machine, launched with torchrun")
    t.add_argument("--config", action="append", help="extra config file merged over train.json (repeatable)")
    t.add_argument("--override", help='JSON of config overrides, e.g. \'{"network_def#features": [8, 16, 32]}\'')
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="Dice and HD95 per label on a manifest fold")
    e.add_argument("bundle")
    e.add_argument("--manifest", required=True)
    e.add_argument("--checkpoint")
    e.add_argument("--fold", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true")
    e.add_argument("--config", action="append")
    e.add_argument("--override")
    e.set_defaults(func=cmd_evaluate)

    i = sub.add_parser("infer", help="segment NIfTI files or a DICOM folder; outputs on the source grid")
    i.add_argument("bundle")
    i.add_argument("--input", required=True, help="NIfTI file, folder of NIfTI files, or DICOM folder")
    i.add_argument("--output", required=True, help="output folder")
    i.add_argument("--checkpoint")
    i.add_argument("--device", default="auto")
    i.add_argument("--format", default=None, help="comma list of nifti,seg,rtstruct (DICOM input; default nifti,seg)")
    i.add_argument("--series-uid", help="DICOM series to use when the folder holds several")
    i.add_argument("--send", action="append", help="dicomweb://HOST:PORT/PATH or dimse://AET@HOST:PORT (repeatable)")
    i.add_argument("--config", action="append", help="extra config merged over the bundle's (e.g. demo.json)")
    i.add_argument("--allow-generated-uids", action="store_true",
                   help="source series with blank Study/Series/FrameOfReference UIDs: derive stable ones instead of refusing")
    i.add_argument("--override")
    i.set_defaults(func=cmd_infer)

    ib = sub.add_parser("infer-batch", help="segment every series under a folder (or of a manifest) in N processes")
    ib.add_argument("bundle")
    ib.add_argument("--input", required=True, help="folder of DICOM series and/or NIfTI files (recursive), or a manifest JSON")
    ib.add_argument("--output", required=True, help="output folder: one subfolder per series, results.csv/json")
    ib.add_argument("--nproc", type=int, default=1, help="worker processes (one model each; GPUs round robin)")
    ib.add_argument("--checkpoint")
    ib.add_argument("--device", default="auto")
    ib.add_argument("--format", default=None, help="comma list of nifti,seg,rtstruct for DICOM series (default nifti,seg)")
    ib.add_argument("--send", action="append", help="dicomweb://HOST:PORT/PATH or dimse://AET@HOST:PORT (repeatable)")
    ib.add_argument("--config", action="append", help="extra config merged over the bundle's")
    ib.add_argument("--override")
    ib.add_argument("--allow-generated-uids", action="store_true")
    ib.add_argument("--retry-failed", action="store_true", help="run again series that failed last time")
    ib.set_defaults(func=cmd_infer_batch)

    s = sub.add_parser("seg2nifti", help="read a DICOM SEG onto its source series' grid, write NIfTI")
    s.add_argument("seg")
    s.add_argument("--reference", required=True, help="folder with the source DICOM series")
    s.add_argument("--output", required=True)
    s.set_defaults(func=cmd_seg2nifti)

    pl = sub.add_parser("plan", help="dataset fingerprint and normalisation/spacing plan")
    pl.add_argument("--manifest", required=True)
    pl.add_argument("--output", default=None)
    pl.add_argument("--modality", default="auto", help="CT | MR | auto")
    pl.set_defaults(func=cmd_plan)

    d = sub.add_parser("demo", help="train, evaluate and infer end to end on the bundled sample data (CPU ok)")
    d.add_argument("--out", default="segapp_demo")
    d.add_argument("--epochs", type=int, default=None)
    d.add_argument("--device", default="auto")
    d.set_defaults(func=cmd_demo)
    return p


def _segapp_cause(exc: BaseException | None) -> SegappError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SegappError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if not args.verbose:  # library deprecation chatter hides the messages that matter
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # MONAI's config parser wraps our errors in RuntimeError: unwrap them
        err = _segapp_cause(exc)
        if err is None:
            raise
        print(f"segapp: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("segapp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
