"""Benchmark (not a test): segapp's recipe against the MONAI-tutorial DynUNet pipeline on the MSD
hippocampus cases, each trained under the same wall-clock budget, scored the same way.

    python bench/hippo_accuracy.py --device cuda --budget-min 10                 # 2 min per fold, 5 folds
    python bench/hippo_accuracy.py --device cpu --budget-min 20 --folds 0        # one fold on a CPU

Both pipelines train fold after fold of ``--manifest`` (default ``data_manifests/hippocampus.json``,
data in ``$SEGAPP_SHARED_DATA`` or ``../shared/data`` beside the checkout) for ``--budget-min /
number of folds`` minutes each, the learning rate following its schedule over the *time* budget, and
are scored on the fold's validation cases with ``app.evaluation.metrics.case_metrics`` (Dice per label
on the 1 mm RAS grid both predict on); the printed CV Dice is the mean over all folds' cases.

* **segapp**: ``segapp train --plan`` with the bundle (``hippocampus_unet3d`` on CUDA, its plan for
  8 GiB; ``hippocampus_unet3d_small`` on the CPU, its CPU plan: 4 base features, batch 2): the plan's
  patch, batch and depth, Dice + CE with deep supervision, poly LR (power 0.9) over the budget, the
  bundle's on-device batch augmentation; no validation during training (the budget would pay for it),
  so the final weights; prediction by the fold model with the bundle's mirroring.
* **monai**: written from MONAI's public tutorial recipe as the field notes describe it: DynUNet with
  filters 32-64-128-256 (kernels 3, strides 1-2-2-2), instance norm, whole volumes padded to 48x64x48,
  random flips (every axis), affine (rotation, scaling) and intensity (scale, shift) transforms,
  Dice + CE, AdamW (lr 1e-3, weight decay 1e-5) with a cosine schedule over the budget, batch 8,
  sliding-window prediction (48x64x48, Gaussian). Known figures (H100): mean Dice 0.887 after 100 s,
  0.890 plateau.

Prints, per pipeline: epochs and samples trained, seconds, CV Dice per label and mean, and the device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # the configs name hippo_accuracy.TimeBudget

from ignite.engine import Engine, Events  # noqa: E402

from app.data.manifest import fold_datalist, load_manifest  # noqa: E402
from app.evaluation.metrics import case_metrics  # noqa: E402

LABELS = {0: "background", 1: "anterior", 2: "posterior"}


class TimeBudget:
    """Ignite handler: the learning rate follows ``schedule`` over elapsed wall time (poly or cosine),
    and training stops when ``seconds`` have passed (checked every iteration)."""

    def __init__(self, optimizer, seconds: float, schedule: str = "poly", power: float = 0.9):
        self.optimizer, self.seconds, self.schedule, self.power = optimizer, float(seconds), schedule, power
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.t0 = 0.0

    def factor(self) -> float:
        f = min(1.0, (time.perf_counter() - self.t0) / self.seconds)
        return (1 - f) ** self.power if self.schedule == "poly" else 0.5 * (1 + math.cos(math.pi * f))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_STARTED, self._set_lr)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _start(self, engine: Engine) -> None:
        self.t0 = time.perf_counter()

    def _set_lr(self, engine: Engine) -> None:
        for g, b in zip(self.optimizer.param_groups, self.base):
            g["lr"] = b * self.factor()

    def _check(self, engine: Engine) -> None:
        if time.perf_counter() - self.t0 >= self.seconds:
            engine.terminate()


def _scores(rows: list[dict]) -> dict:
    out = {}
    for name in ("anterior", "posterior"):
        vals = [r["dice"] for r in rows if r["label"] == name and math.isfinite(r["dice"])]
        out[name] = float(np.mean(vals)) if vals else math.nan
    out["mean"] = float(np.mean([out["anterior"], out["posterior"]]))
    return out


# -- segapp --------------------------------------------------------------------------------------------
def run_segapp(manifest: str, folds: list[int], seconds: float, device: str, out: Path, cpu: bool) -> dict:
    from app.planning import plan_from_manifest
    from app.training.cv import summarize_cv
    from app.training.train import train

    bundle = "hippocampus_unet3d_small" if cpu else "hippocampus_unet3d"
    plan = out / "plan.json"
    if cpu:
        plan_from_manifest(manifest, plan, gpu_memory_gb=0.2, base_features=4, amp=False)
    else:
        plan_from_manifest(manifest, plan, gpu_memory_gb=8.0)
    budget = {"_target_": "hippo_accuracy.TimeBudget", "optimizer": "@optimizer", "seconds": seconds}
    overrides = {
        "+train#handlers": [budget],
        "val_interval": 10**6,  # no validation inside the budget
        "num_workers": 0 if cpu else 4,
        "cache_workers": 0 if cpu else 4,
        "network_def#deep_supervision": True,
    }
    if cpu:
        overrides.pop("network_def#deep_supervision")  # the small bundle's fold network has it already
    epochs, samples, t_train = 0, 0, 0.0
    batch = json.loads(plan.read_text())["batch_size"]
    for k in folds:
        t0 = time.perf_counter()
        res = train(
            bundle, manifest, k, epochs=10**6, device=device, output_dir=str(out / f"fold_{k}"),
            overrides=overrides, plan=str(plan),
        )  # fmt: skip
        t_train += time.perf_counter() - t0
        done = int(res["final"]["epoch"]) if res.get("final") else 0
        epochs += done
        n_train = len(fold_datalist(manifest, k, "train"))
        samples += done * (n_train // batch) * batch  # the last epoch may have stopped early: an upper bound
    mirror = [0] if cpu else []
    t0 = time.perf_counter()
    summary = summarize_cv(out, manifest, folds, device, mirror_axes=mirror)
    scores = {lab: summary["pooled"]["dice"][lab]["mean"] for lab in ("anterior", "posterior")}
    scores["mean"] = summary["pooled"]["dice"]["mean"]
    plain = summary["tta"]["dice"]["plain"]
    return {
        "bundle": bundle,
        "plan": {k: json.loads(plan.read_text())[k] for k in ("patch_size", "batch_size", "features")},
        "epochs": epochs,
        "samples_at_most": samples,
        "train_seconds": round(t_train, 1),
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "cv_dice": scores,
        "cv_dice_without_mirroring_or_postprocessing": plain,
        "postprocessing": summary["postprocessing"]["description"],
    }


# -- the MONAI-tutorial baseline ---------------------------------------------------------------------------
def run_monai(manifest: str, folds: list[int], seconds: float, device: str, workers: int) -> dict:
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import DynUNet
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        RandAffined,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        Spacingd,
        SpatialPadd,
    )

    keys = ["image", "label"]
    roi = (48, 64, 48)
    base = [
        LoadImaged(keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=(1.0, 1.0, 1.0), mode=("bilinear", "nearest")),
        NormalizeIntensityd("image", nonzero=True, channel_wise=True),
    ]
    train_tf = Compose(
        [
            *base,
            SpatialPadd(keys, spatial_size=roi),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandAffined(
                keys,
                prob=0.2,
                rotate_range=(0.26,) * 3,
                scale_range=(0.1,) * 3,
                mode=("bilinear", "nearest"),
                spatial_size=roi,
                padding_mode="zeros",
            ),  # fmt: skip
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    )
    dev = torch.device(device)
    amp = dev.type == "cuda"
    rows: list[dict] = []
    epochs = samples = 0
    t_train = 0.0
    for k in folds:
        torch.manual_seed(k)
        ds = CacheDataset(fold_datalist(manifest, k, "train"), train_tf, cache_rate=1.0, num_workers=workers,
                          progress=False)  # fmt: skip
        loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers, drop_last=True)
        net = DynUNet(3, 1, 3, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2],
                      filters=[32, 64, 128, 256], norm_name="instance").to(dev)  # fmt: skip
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        t0 = time.perf_counter()
        done = False
        while not done:
            for batch in loader:
                f = min(1.0, (time.perf_counter() - t0) / seconds)
                for g in opt.param_groups:
                    g["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * f))
                x, y = batch["image"].to(dev), batch["label"].to(dev)
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", enabled=amp):
                    loss = loss_fn(net(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                samples += x.shape[0]
                if time.perf_counter() - t0 >= seconds:
                    done = True
                    break
            epochs += 1
        t_train += time.perf_counter() - t0
        net.eval()
        val_tf = Compose(base)
        with torch.no_grad():
            for case in fold_datalist(manifest, k, "val"):
                d = val_tf({"image": case["image"], "label": case["label"]})
                with torch.autocast("cuda", enabled=amp):
                    logits = sliding_window_inference(d["image"][None].to(dev), roi, 4, net, overlap=0.5,
                                                      mode="gaussian")  # fmt: skip
                pred = torch.argmax(logits, 1)[0].cpu().numpy()
                spacing = np.abs(np.asarray(d["image"].affine)[:3, :3]).max(axis=0).tolist()
                for r in case_metrics(pred, np.asarray(d["label"][0]).astype(int), spacing, LABELS):
                    rows.append({"fold": k, **r})
    return {"epochs": epochs, "samples": samples, "train_seconds": round(t_train, 1), "cv_dice": _scores(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=str(REPO / "data_manifests" / "hippocampus.json"))
    ap.add_argument("--budget-min", type=float, required=True, help="training minutes per pipeline, all folds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--folds", default="all", help="'all' or a comma list, e.g. 0")
    ap.add_argument("--only", choices=("segapp", "monai"), help="run one pipeline")
    ap.add_argument("--workers", type=int, default=0 if not torch.cuda.is_available() else 4)
    ap.add_argument("--out", default=None, help="folder for segapp's runs (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    manifest = a.manifest
    m = load_manifest(manifest)
    if not m.data_root.is_dir():  # the manifest's data root, else the shared data beside the checkout
        shared = Path(os.environ.get("SEGAPP_SHARED_DATA", REPO.parent / "shared" / "data")) / "msd_hippocampus"
        doc = json.loads(Path(manifest).read_text())
        doc["data_root"] = str(shared.resolve())
        tmp = Path(tempfile.mkdtemp()) / Path(manifest).name
        tmp.write_text(json.dumps(doc))
        manifest = str(tmp)
    folds = list(range(m.num_folds)) if a.folds == "all" else [int(f) for f in a.folds.split(",")]
    seconds = a.budget_min * 60 / len(folds)
    cpu = a.device == "cpu"
    result: dict = {
        "device": torch.cuda.get_device_name(0)
        if not cpu
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.machine()})",
        "folds": folds,
        "seconds_per_fold": seconds,
    }
    out = Path(a.out or tempfile.mkdtemp(prefix="hippo_accuracy_"))
    if a.only in (None, "segapp"):
        result["segapp"] = run_segapp(manifest, folds, seconds, a.device, out, cpu)
        print(json.dumps({"segapp": result["segapp"]}, indent=2), flush=True)
    if a.only in (None, "monai"):
        result["monai_tutorial"] = run_monai(manifest, folds, seconds, a.device, a.workers)
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
