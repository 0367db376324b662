"""Benchmark (not a test): dense vs sparse-label training of the same 3D U-Net, plus the V-Net bundle.

Trains ``hippocampus_unet3d`` (dense labels) and ``hippocampus_unet3d_sparse`` (a few orthogonal
planes per case, the rest ignored) with the same budget (epochs, cases, network, patches, seed) on
one fold of the MSD hippocampus data, evaluates both on the fold's DENSE validation labels with
``app.evaluation.evaluate.evaluate`` and prints both mean Dice values, their ratio (goal >= 0.95), the
labelled-slice fraction of the sparse training labels, and the ``hippocampus_vnet`` bundle's Dice on
the same fold.

    # CPU, small setting (demo-sized networks, 40 training cases)
    python bench/sparse_vs_dense.py --device cpu --config demo.json --max-train-cases 40 --epochs 12
    # GPU, the bundles' own settings
    python bench/sparse_vs_dense.py --device cuda --epochs 100

Labelled-slice fraction: annotated planes / all planes along the three axes (sum of the volume's
sizes), over the training cases after preprocessing; the voxel fraction is printed as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from budget import train_with_budget  # noqa: E402  (bench/budget.py)

from app.bundle.config import bundle_parser  # noqa: E402
from app.bundle.store import find_bundle  # noqa: E402
from app.data.manifest import fold_datalist  # noqa: E402
from app.evaluation.evaluate import evaluate  # noqa: E402
from app.io.atomic import atomic_write_text  # noqa: E402

DENSE, SPARSE, VNET = "hippocampus_unet3d", "hippocampus_unet3d_sparse", "hippocampus_vnet"
log = logging.getLogger("bench.sparse_vs_dense")


def _data_overrides(a: argparse.Namespace) -> dict:
    """Same cases for every bundle: the first N training / M validation cases of the fold."""
    tr = "None" if a.max_train_cases is None else str(a.max_train_cases)
    va = "None" if a.max_val_cases is None else str(a.max_val_cases)
    return {
        "train#dataset#data": f"$app.data.manifest.fold_datalist(@manifest, @fold, 'train', max_cases={tr})",
        "validate#dataset#data": f"$app.data.manifest.fold_datalist(@manifest, @fold, 'val', max_cases={va})",
    }


def _overrides(a: argparse.Namespace, bundle: str) -> dict:
    opts = {
        "manifest": str(Path(a.manifest).resolve()),
        "fold": a.fold,
        "device_name": a.device,
        "output_dir": str((Path(a.out) / bundle).resolve()),
        "seed": a.seed,
        **_data_overrides(a),
    }
    if a.epochs:
        opts["epochs"] = a.epochs
        # validate only at the end (CPU time goes to training); evaluation below is on the final weights
        opts["val_interval"] = a.epochs
    if bundle == SPARSE and a.slices_per_axis:
        opts["sparse_slices_per_axis"] = a.slices_per_axis
    return opts


def train_and_evaluate(a: argparse.Namespace, bundle: str) -> dict:
    """Train ``bundle`` under the shared budget, then Dice/HD95 on the fold's dense validation labels."""
    overrides = _overrides(a, bundle)
    parser = bundle_parser(find_bundle(bundle).root, ["train", *a.config], overrides)
    epochs_run, train_s, model = train_with_budget(parser, Path(overrides["output_dir"]), a.minutes)
    eval_overrides = {"dataset#data": _data_overrides(a)["validate#dataset#data"]}
    metrics = evaluate(
        bundle, a.manifest, str(model), a.fold, a.device, overrides=eval_overrides, extra_configs=a.config
    )
    return {
        "bundle": bundle,
        "epochs_run": epochs_run,
        "train_seconds": round(train_s, 1),
        **{k: round(v, 4) for k, v in metrics.items()},
    }


def labelled_fraction(a: argparse.Namespace) -> dict:
    """Planes and voxels that keep a label in the sparse bundle's training cases (after preprocessing)."""
    parser = bundle_parser(find_bundle(SPARSE).root, ["train", *a.config], _overrides(a, SPARSE))
    transforms = [*parser.get_parsed_content("preprocessing"), parser.get_parsed_content("train#sparsify")]
    ignore = int(parser.get_parsed_content("ignore_value"))
    planes = slices = voxels = total = 0
    worst = 0.0
    for case in fold_datalist(a.manifest, a.fold, "train", max_cases=a.max_train_cases):
        d = dict(case)
        for t in transforms:
            d = t(d)
        lab = np.asarray(d["label"][0]) != ignore
        n = sum(int(lab.all(axis=tuple(x for x in range(3) if x != ax)).sum()) for ax in range(3))
        planes, slices = planes + n, slices + sum(lab.shape)
        voxels, total = voxels + int(lab.sum()), total + lab.size
        worst = max(worst, n / sum(lab.shape))
    return {
        "slices_per_axis": parser.get_parsed_content("sparse_slices_per_axis"),
        "labelled_slice_fraction": round(planes / slices, 4),
        "max_case_slice_fraction": round(worst, 4),
        "labelled_voxel_fraction": round(voxels / total, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=str(REPO / "data_manifests" / "hippocampus.json"))
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=None, help="epochs for every model (default: the bundles')")
    ap.add_argument("--minutes", type=float, default=None, help="also stop each model's training after this wall time")
    ap.add_argument("--max-train-cases", type=int, default=None, help="first N training cases of the fold")
    ap.add_argument("--max-val-cases", type=int, default=None, help="first M validation cases (default: all)")
    ap.add_argument("--slices-per-axis", type=int, nargs=3, default=None, help="override the sparse bundle's planes")
    ap.add_argument("--config", action="append", default=[], help="overlay from each bundle's configs/, e.g. demo.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-vnet", action="store_true", help="skip the V-Net bundle")
    ap.add_argument("--out", default="bench_runs/sparse_vs_dense")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("monai", "mlflow", "alembic", "ignite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    t0 = time.perf_counter()
    fraction = labelled_fraction(a)
    log.info("sparse labels: %s", fraction)
    results = {}
    for bundle in (DENSE, SPARSE) + (() if a.no_vnet else (VNET,)):
        log.info("training %s", bundle)
        results[bundle] = train_and_evaluate(a, bundle)
        log.info("%s: %s", bundle, results[bundle])
    dense, sparse = results[DENSE]["val_mean_dice"], results[SPARSE]["val_mean_dice"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and a.device != "cpu" else "CPU"
    summary = {
        "device": device,
        "fold": a.fold,
        "epochs": a.epochs,
        "minutes": a.minutes,
        "max_train_cases": a.max_train_cases,
        "max_val_cases": a.max_val_cases,
        "configs": a.config,
        "dense_mean_dice": dense,
        "sparse_mean_dice": sparse,
        "ratio_sparse_to_dense": round(sparse / dense, 4) if dense > 0 else None,
        **fraction,
        "vnet_mean_dice": results[VNET]["val_mean_dice"] if VNET in results else None,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "runs": results,
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(a.out) / "results.json", json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
