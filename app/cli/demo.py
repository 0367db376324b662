"""``segapp demo``: the main job end to end on the sample data shipped with segapp.

Trains the hippocampus 3D U-Net (CPU-sized overlay ``configs/demo.json``) on fold 0 of the sample
manifest, tracks the run in a local MLflow store, evaluates the run with the bundle's evaluate
config, segments a NIfTI image and the sample MR DICOM series (NIfTI + DICOM SEG + RTSTRUCT + PNG)
with the run's model, and prints where everything is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from app.bundle.model import load_model
from app.evaluation.evaluate import evaluate
from app.inference.pipeline import Segmenter
from app.resources import SAMPLE_DATA_DIR, sample_manifest
from app.training.train import train

BUNDLE = "hippocampus_unet3d"


def run_demo(out: str = "segapp_demo", epochs: int | None = None, device: str = "auto") -> int:
    out_dir = Path(out).resolve()
    run = out_dir / "train"
    t0 = time.perf_counter()
    manifest = sample_manifest("hippocampus")
    print(f"[1/4] training {BUNDLE} (demo size) on {manifest}, fold 0 -> {run}", flush=True)
    res = train(
        BUNDLE, manifest, fold=0, epochs=epochs, device=device, output_dir=str(run), extra_configs=["demo.json"]
    )
    print(f"[2/4] evaluating the run {run} on fold 0 (the bundle's evaluate config)", flush=True)
    metrics = evaluate(None, manifest, run=str(run), fold=0, device=device)
    segmenter = Segmenter(load_model(run=run, device=device))
    print("[3/4] segmenting a NIfTI image (output on its own grid)", flush=True)
    first_case = json.loads(Path(manifest).read_text())["cases"][0]["image"]
    # the demo owns its folder: a second demo replaces the first one's outputs
    nifti = segmenter.nifti(
        SAMPLE_DATA_DIR / "hippocampus" / first_case, out_dir / "infer_nifti", overwrite=True, formats=("overlay",)
    )
    print("[4/4] segmenting the sample MR DICOM series -> NIfTI, DICOM SEG, RTSTRUCT, PNG overlay", flush=True)
    dicom = segmenter.dicom(
        SAMPLE_DATA_DIR / "mr_dicom_series",
        out_dir / "infer_dicom",
        formats=("nifti", "seg", "rtstruct", "overlay"),
        overwrite=True,
    )
    print()
    print("validation (fold 0): " + "  ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if "dice" in k))
    print("validation HD95 (mm):     " + "  ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items()) if "hd95" in k))
    print(f"model:        {run / 'models' / 'model.pt'}  (segapp infer --run {run} ...)")
    print(f"metrics:      {run / 'metrics.json'}")
    m = res.get("mlflow") or {}
    print(f"MLflow run:   {m.get('run_name')} in {m.get('tracking_uri')}")
    print(f"              (browse: mlflow ui --backend-store-uri {m.get('tracking_uri')})")
    print(f"NIfTI output: {nifti.outputs['nifti']}")
    for kind, path in dicom.outputs.items():
        print(f"DICOM {kind + ':':8s}{path}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
