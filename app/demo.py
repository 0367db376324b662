"""``segapp demo``: the main job end to end on the sample data shipped in the repository.

Trains the hippocampus 3D U-Net (CPU-sized overlay ``configs/demo.json``) on fold 0 of the sample
manifest, tracks the run in a local MLflow store, evaluates the final model, segments a NIfTI image
and the sample MR DICOM series (NIfTI + DICOM SEG + RTSTRUCT + PNG), and prints where everything is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from app.engine.evaluate import evaluate, make_predictor
from app.engine.infer import predict_paths
from app.engine.infer_cli import infer_dicom
from app.engine.train import train
from app.paths import SAMPLE_DATA_DIR, sample_manifest

BUNDLE = "hippocampus_unet3d"


def run_demo(out: str = "segapp_demo", epochs: int | None = None, device: str = "auto") -> int:
    out_dir = Path(out).resolve()
    t0 = time.perf_counter()
    manifest = sample_manifest("hippocampus")
    print(f"[1/4] training {BUNDLE} (demo size) on {manifest}, fold 0 -> {out_dir / 'train'}", flush=True)
    res = train(BUNDLE, manifest, fold=0, epochs=epochs, device=device, output_dir=str(out_dir / "train"),
                extra_configs=["demo.json"])
    model = out_dir / "train" / "models" / "model.pt"
    print(f"[2/4] evaluating {model.relative_to(out_dir.parent)} on fold 0", flush=True)
    metrics = evaluate(BUNDLE, manifest, str(model), fold=0, device=device, extra_configs=["demo.json"])
    predictor, meta = make_predictor(BUNDLE, str(model), device)
    print("[3/4] segmenting a NIfTI image (output on its own grid)", flush=True)
    first_case = json.loads(Path(manifest).read_text())["cases"][0]["image"]
    nifti_out = predict_paths(predictor, [SAMPLE_DATA_DIR / "hippocampus" / first_case], out_dir / "infer_nifti")
    print("[4/4] segmenting the sample MR DICOM series -> NIfTI, DICOM SEG, RTSTRUCT", flush=True)
    dicom = infer_dicom(predictor, meta, BUNDLE, SAMPLE_DATA_DIR / "mr_dicom_series", out_dir / "infer_dicom",
                        formats=("nifti", "seg", "rtstruct"))
    print()
    print("validation (fold 0): " + "  ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if "dice" in k))
    print("validation HD95 (mm):     " + "  ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items()) if "hd95" in k))
    print(f"model:        {model}")
    print(f"metrics:      {out_dir / 'train' / 'metrics.json'}")
    m = res.get("mlflow") or {}
    print(f"MLflow run:   {m.get('run_name')} in {m.get('tracking_uri')}")
    print(f"              (browse: mlflow ui --backend-store-uri {m.get('tracking_uri')})")
    print(f"NIfTI output: {nifti_out[0]}")
    for kind, path in dicom["outputs"].items():
        print(f"DICOM {kind + ':':8s}{path}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
