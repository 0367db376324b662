"""Benchmark (not a test): what the fold ensemble and mirroring TTA gain on cases no model has seen.

In a cross-validation every case is in four of the five training sets, so the five-fold ensemble
cannot be scored on the CV cases. This holds one fold of the manifest out as a test set, runs an
inner ``--inner-folds``-fold cross-validation (``segapp train --fold all``, the bundle's recipe) on the
other cases, and scores on the held-out cases, with ``app.evaluation.metrics.case_metrics`` on the
network grid: each inner model alone, the ensemble of them, each with and without the bundle's
mirroring, and the mean seconds per case of each.

    python bench/ensemble_gain.py --bundle hippocampus_unet3d_small --plan plan.json --inner-folds 3 --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.bundle.model import load_model  # noqa: E402
from app.data.manifest import fold_datalist, load_manifest  # noqa: E402
from app.evaluation.metrics import case_metrics  # noqa: E402
from app.io.geometry import voxel_spacing  # noqa: E402
from app.networks.ensemble import set_mirroring  # noqa: E402
from app.training.cv import train_cv  # noqa: E402


def _inner_manifest(manifest: str, test_fold: int, inner: int, out: Path) -> Path:
    """The manifest without ``test_fold``, its cases dealt round-robin into ``inner`` folds."""
    doc = json.loads(Path(manifest).read_text())
    m = load_manifest(manifest)
    doc["data_root"] = str(m.data_root)
    keep = [c for c in doc["cases"] if int(c["fold"]) != test_fold]
    for i, c in enumerate(sorted(keep, key=lambda c: c["id"])):
        c["fold"] = i % inner
    doc["cases"], doc["num_folds"] = keep, inner
    path = out / "inner_manifest.json"
    path.write_text(json.dumps(doc))
    return path


@torch.no_grad()
def _score(model, cases: list[dict], axes: list[int]) -> tuple[dict, float]:
    net, _ = set_mirroring(model.network, "mirror" if axes else "none", axes or (0, 1, 2))
    rows, seconds = [], []
    labels = {int(k): v for k, v in model.labels.items()}
    for case in cases:
        d = model.preprocessing({"image": case["image"], "label": case["label"]})
        x = d["image"].to(model.device)[None]
        t0 = time.perf_counter()
        pred = torch.argmax(model.inferer(x, net), 1)[0].cpu().numpy()
        seconds.append(time.perf_counter() - t0)
        spacing = voxel_spacing(np.asarray(d["image"].affine, dtype=np.float64)).tolist()
        rows += case_metrics(pred, np.asarray(d["label"][0]).astype(int), spacing, labels)
    out = {}
    for name in sorted({r["label"] for r in rows}):
        vals = [r["dice"] for r in rows if r["label"] == name and math.isfinite(r["dice"])]
        out[name] = round(float(np.mean(vals)), 4)
    out["mean"] = round(float(np.mean(list(out.values()))), 4)
    return out, float(np.mean(seconds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="hippocampus_unet3d_small")
    ap.add_argument("--manifest", default=str(REPO / "data_manifests" / "hippocampus.json"))
    ap.add_argument("--plan", default=None)
    ap.add_argument("--test-fold", type=int, default=4)
    ap.add_argument("--inner-folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="ensemble_gain_"))
    out.mkdir(parents=True, exist_ok=True)
    inner = _inner_manifest(a.manifest, a.test_fold, a.inner_folds, out)
    t0 = time.perf_counter()
    train_cv(a.bundle, str(inner), epochs=a.epochs, device=a.device, output_dir=str(out / "cv"), plan=a.plan,
             resume=True)  # fmt: skip
    train_s = time.perf_counter() - t0
    test = fold_datalist(a.manifest, a.test_fold, "val")
    ens = load_model(run=out / "cv", device=a.device)
    axes = list(ens.network.mirror_axes)  # the bundle's mirroring
    result: dict = {
        "device": f"{a.device} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
        "test_cases": len(test),
        "inner_folds": a.inner_folds,
        "cv_training_seconds": round(train_s, 1),
        "single": [],
    }
    for k in range(a.inner_folds):
        single = load_model(run=out / "cv" / f"fold_{k}", device=a.device)
        plain, s_plain = _score(single, test, [])
        tta, s_tta = _score(single, test, axes)
        result["single"].append({"fold": k, "dice": plain, "seconds": s_plain})
        if axes:
            result["single"][-1].update({"dice_tta": tta, "seconds_tta": s_tta})
    for key in ("dice", "dice_tta"):
        if key in result["single"][0]:
            result[f"single_mean_{key}"] = {
                lab: round(float(np.mean([s[key][lab] for s in result["single"]])), 4)
                for lab in result["single"][0][key]
            }
    (d, s), (dt, st) = _score(ens, test, []), _score(ens, test, axes)
    result["ensemble"] = {"dice": d, "seconds": s, "dice_tta": dt, "seconds_tta": st, "mirror_axes": axes}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
