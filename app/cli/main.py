"""``segapp``: the argument parser, logging, and how errors reach the user.

A ``SegappError`` (bad input, option, config or environment) ends in one line naming the file or
option and its exit code (``app.errors``). So do the machine's own faults that reach the top without
one (an ``OSError`` such as a full disk or a read-only folder, ``MemoryError``): exit 4. Any other
exception is a bug in segapp and prints its traceback with a line asking for a report (exit 70).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from app import __version__
from app.cli import commands as c
from app.errors import ENV_ERRNOS, EnvError, SegappError, env_error, root_os_error

BUG_EXIT = 70  # EX_SOFTWARE
REPORT = "this is a bug in segapp: please report it with the traceback above"
TRACKING_HELP = "MLflow tracking server of a runs:/ or models:/ bundle (default: $MLFLOW_TRACKING_URI)"

# Known library warnings that say nothing to a segapp user (filtered by message, not by category).
NOISE = (
    r".*NvImgCodecPydicomReader.*",
    r".*nvImageCodec.*",
    r".*pkg_resources is deprecated.*",
    r".*`torch.cuda.amp.autocast\(args...\)` is deprecated.*",
    r".*Using a non-tuple sequence for multidimensional indexing.*",
    r".*TypedStorage is deprecated.*",
    r".*The given NumPy array is not writable.*",
    r".*Orientationd.__init__:labels.*",
    r".*get_mask_edges:always_return_as_numpy.*",
)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("app").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("monai.data", "mlflow", "alembic", "urllib3", "pynetdicom", "highdicom", "pydicom", "ignite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # no GPU decoder: expected
    if not verbose:  # pynetdicom logs each refused connection as errors; segapp's own error says it in one line
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        # nibabel "fixes" broken headers with a log line each; segapp's own check says what is wrong
        logging.getLogger("nibabel.global").setLevel(logging.CRITICAL)
        for message in NOISE:
            warnings.filterwarnings("ignore", message=message)


def _model_options(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    """Options that pick the model: --run, --checkpoint, --config, --override, --trust-bundle, --device."""
    p.add_argument("--run", help="a segapp training-run folder: its own configs and models/model.pt")
    if checkpoint:
        p.add_argument("--checkpoint", help="weights (default: the bundle's or run's models/model.pt)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--config", action="append", help="extra config merged over the bundle's (repeatable)")
    p.add_argument("--override", help="JSON of config overrides, e.g. '{\"features\": [8, 16, 32]}'")
    p.add_argument("--trust-bundle", action="store_true", help="run this bundle's code once without recording trust")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segapp", description="3D medical image segmentation with MONAI bundles")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"segapp {__version__}")
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
    mc.set_defaults(func=c.manifest_create)
    mv = msub.add_parser("validate", help="check files, checksums, shapes, affines, label values, NaNs")
    mv.add_argument("manifest")
    mv.add_argument("--quick", action="store_true", help="existence and checksums only")
    mv.add_argument("--workers", type=int, default=1)
    mv.set_defaults(func=c.manifest_validate)

    t = sub.add_parser("train", help="train a bundle on a manifest fold")
    t.add_argument("bundle", help="bundle name (shipped or downloaded) or a bundle folder")
    t.add_argument("--manifest", help="data manifest (default: the bundle's sample data)")
    t.add_argument("--fold", default="0", help="fold K, or 'all': every fold, a CV summary and the fold ensemble")
    t.add_argument("--plan", help="a `segapp plan` file: its spacing, normalisation, patch, batch and network")
    t.add_argument("--epochs", type=int)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--out", help="output folder (checkpoints, models, metrics, MLflow store); a bundle of its own")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    t.add_argument("--tracking-uri", help="MLflow tracking server (default: a local store in OUT)")
    t.add_argument(
        "--register", metavar="NAME", help="register the final model in the MLflow model registry (a new version)"
    )
    t.add_argument(
        "--tracking-fallback",
        choices=("fail", "local"),
        default="fail",
        help="when the --tracking-uri server does not answer: fail (default) or track in the local store in OUT",
    )
    t.add_argument("--seed", type=int)
    t.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this machine, launched with torchrun")
    t.add_argument("--config", action="append", help="extra config file merged over train.json (repeatable)")
    t.add_argument("--override", help="JSON of config overrides, e.g. '{\"features\": [8, 16, 32]}'")
    t.add_argument("--trust-bundle", action="store_true", help="run this bundle's code once without recording trust")
    t.set_defaults(func=c.train)

    e = sub.add_parser("evaluate", help="the bundle's evaluate config: Dice and HD95 per label on a manifest fold")
    e.add_argument("bundle", nargs="?", help="bundle name or folder, runs:/ or models:/ URI (optional with --run)")
    e.add_argument("--manifest", required=True)
    e.add_argument("--fold", type=int, default=0)
    e.add_argument("--json", action="store_true")
    _model_options(e)
    e.set_defaults(func=c.evaluate)

    i = sub.add_parser("infer", help="segment NIfTI files or a DICOM folder; outputs on the source grid")
    i.add_argument(
        "bundle", nargs="?", help="bundle name or folder, MLflow runs:/ or models:/ URI (optional with --run)"
    )
    i.add_argument(
        "--input",
        required=True,
        help="NIfTI file, folder of NIfTI files, DICOM folder, or a study/series on a PACS: "
        "dicomweb://HOST:PORT/PATH/studies/UID[/series/UID] or "
        "dimse://AET@HOST:PORT?StudyInstanceUID=UID[&SeriesInstanceUID=UID] (pulled into a temporary folder)",
    )
    i.add_argument("--output", required=True, help="output folder")
    i.add_argument(
        "--format",
        default=None,
        help="comma list of nifti,seg,rtstruct, the reports stats (statistics.json + CSV row) and sr (DICOM SR "
        "of the SEG's volumes) (DICOM input only; default nifti,seg), and overlay (a PNG quick look)",
    )
    i.add_argument(
        "--series-uid", help="DICOM series (or stack key: UID#volN, UID#echoE) when the folder holds several"
    )
    i.add_argument("--study-uid", help="DICOM study to use when the folder holds several studies")
    i.add_argument("--volume", type=int, help="volume N (1-based) of a 4D series")
    i.add_argument("--segments", help="JSON list of DICOM segment descriptions overriding the bundle's")
    i.add_argument(
        "--seg-type",
        choices=("binary", "labelmap"),
        default="binary",
        help="DICOM SEG type: binary (default; every viewer) or labelmap (one frame per slice; newer viewers)",
    )
    i.add_argument("--send", action="append", help="dicomweb://HOST:PORT/PATH or dimse://AET@HOST:PORT (repeatable)")
    i.add_argument(
        "--allow-generated-uids",
        action="store_true",
        help="source series with blank Study/Series/FrameOfReference UIDs: derive stable ones instead of refusing",
    )
    i.add_argument("--overwrite", action="store_true", help="replace outputs that exist (default: refuse)")
    i.add_argument(
        "--tta",
        choices=("auto", "mirror", "none"),
        default="auto",
        help="mirroring test-time augmentation: the bundle's setting (auto), all 8 flips (mirror), or none",
    )
    _model_options(i)
    i.set_defaults(func=c.infer)

    ib = sub.add_parser("infer-batch", help="segment every series under a folder (or of a manifest) in N processes")
    ib.add_argument("bundle", nargs="?", help="bundle name or folder, runs:/ or models:/ URI (optional with --run)")
    ib.add_argument(
        "--input", required=True, help="folder of DICOM series and/or NIfTI files (recursive), or a manifest JSON"
    )
    ib.add_argument("--output", required=True, help="output folder: one subfolder per series, results.csv/json")
    ib.add_argument("--nproc", type=int, default=1, help="worker processes (one model each; GPUs round robin)")
    ib.add_argument(
        "--format", default=None, help="as segapp infer's (default nifti,seg; NIfTI inputs: nifti, overlay)"
    )
    ib.add_argument("--send", action="append", help="dicomweb://HOST:PORT/PATH or dimse://AET@HOST:PORT (repeatable)")
    ib.add_argument("--allow-generated-uids", action="store_true")
    ib.add_argument("--retry-failed", action="store_true", help="run again series that failed last time")
    _model_options(ib)
    ib.set_defaults(func=c.infer_batch)

    sv = sub.add_parser(
        "serve", help="a DICOM node: receive studies (C-STORE, STOW-RS), route to bundles, segment, send back"
    )
    sv.add_argument("--config", required=True, help="node config, TOML or YAML (see docs/node.md)")
    sv.set_defaults(func=c.serve)

    ls = sub.add_parser("list-series", help="the DICOM series and stacks in a folder (no patient data)")
    ls.add_argument("folder")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=c.list_series)

    s = sub.add_parser("seg2nifti", help="read a DICOM SEG onto its source series' grid, write NIfTI")
    s.add_argument("seg")
    s.add_argument("--reference", required=True, help="folder with the source DICOM series")
    s.add_argument("--output", required=True)
    s.set_defaults(func=c.seg2nifti)

    pl = sub.add_parser("plan", help="dataset fingerprint and normalisation/spacing plan")
    pl.add_argument("--manifest", required=True)
    pl.add_argument("--output", default=None)
    pl.add_argument("--modality", default="auto", help="CT | MR | auto")
    pl.add_argument("--gpu-memory", type=float, default=8.0, help="training memory budget in GiB (default 8)")
    pl.add_argument("--base-features", type=int, default=32, help="the U-Net's first width (default 32)")
    pl.add_argument("--float32", action="store_true", help="plan float32 training (CPU) rather than AMP (GPU)")
    pl.set_defaults(func=c.plan)

    b = sub.add_parser("bundle", help="list, download, trust and verify MONAI bundles")
    bsub = b.add_subparsers(dest="bundle_command", required=True)
    bl = bsub.add_parser("list", help="shipped and downloaded bundles")
    bl.add_argument("--json", action="store_true")
    bl.set_defaults(func=c.bundle_list)
    bd = bsub.add_parser("download", help="fetch a bundle into the local store (monai.bundle.download)")
    bd.add_argument("name")
    bd.add_argument("--version")
    bd.add_argument("--url", help="a bundle zip to fetch instead of the model zoo's hosting")
    bd.add_argument("--source", default="monaihosting", help="monaihosting | github | ngc | huggingface_hub")
    bd.add_argument("--sha256", help="expected SHA-256 of the bundle zip (nothing is stored when it differs)")
    bd.set_defaults(func=c.bundle_download)
    bt = bsub.add_parser("trust", help="allow a bundle folder's code to run (recorded with its configs' hash)")
    bt.add_argument("path")
    bt.set_defaults(func=c.bundle_trust)
    bv = bsub.add_parser("verify", help="MONAI's verify_metadata and verify_net_in_out on a bundle")
    bv.add_argument("path")
    bv.add_argument("--trust-bundle", action="store_true")
    bv.set_defaults(func=c.bundle_verify)

    x = sub.add_parser("export", help="a bundle's network with weights as TorchScript or ONNX, checked against it")
    x.add_argument("bundle", nargs="?", help="bundle name or folder, runs:/ or models:/ URI (optional with --run)")
    x.add_argument("--run", help="a segapp training-run folder: its own configs and models/model.pt")
    x.add_argument("--checkpoint", help="weights (default: the bundle's or run's models/model.pt)")
    x.add_argument("--format", required=True, choices=["torchscript", "onnx"], help="onnx needs segapp[onnx]")
    x.add_argument("--output", "-o", required=True, help="the file to write (.ts / .onnx)")
    x.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="example input size in voxels "
                   "(default: the inferer's roi_size, else the metadata's spatial_shape)")  # fmt: skip
    x.add_argument("--config", action="append", help="extra config merged over the bundle's (repeatable)")
    x.add_argument("--override", help="JSON of config overrides, e.g. '{\"features\": [8, 16, 32]}'")
    x.add_argument("--trust-bundle", action="store_true", help="run this bundle's code once without recording trust")
    x.add_argument("--tracking-uri", help=TRACKING_HELP)
    x.set_defaults(func=c.export)

    d = sub.add_parser("demo", help="train, evaluate and infer end to end on the bundled sample data (CPU ok)")
    d.add_argument("--out", default="segapp_demo")
    d.add_argument("--epochs", type=int, default=None)
    d.add_argument("--device", default="auto")
    d.set_defaults(func=c.demo)
    return p


def _segapp_cause(exc: BaseException | None) -> SegappError | None:
    """The SegappError an exception was raised from (MONAI's config parser wraps ours in RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SegappError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def _environment_cause(exc: BaseException) -> EnvError | None:
    """An EnvError for the machine's faults that reached the top unwrapped: full disk, permissions, memory."""
    if isinstance(exc, MemoryError):
        return EnvError("out of memory (close other programs, or segment a smaller image or on a bigger machine)")
    root = root_os_error(exc)
    if root is not None and root.errno in ENV_ERRNOS:
        return env_error(root, "cannot read or write")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("segapp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `segapp ... | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # 128 + SIGPIPE, as a shell reports it
    except Exception as exc:
        err = _segapp_cause(exc) or _environment_cause(exc)
        if err is None:
            traceback.print_exc()
            print(f"segapp: internal error: {type(exc).__name__}: {exc}; {REPORT}", file=sys.stderr)
            return BUG_EXIT
        print(f"segapp: error: {err}", file=sys.stderr)
        return err.exit_code
