"""``segapp infer``: NIfTI or DICOM in; NIfTI, DICOM SEG and RTSTRUCT out on the source grid; optional PACS send."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from app.engine.evaluate import make_predictor
from app.engine.infer import BundlePredictor, find_nifti_inputs, predict_paths
from app.errors import ConfigError, InputError
from app.io.atomic import atomic_write_text

log = logging.getLogger(__name__)

FORMATS = ("nifti", "seg", "rtstruct")


def parse_formats(text: str | None, dicom: bool) -> list[str]:
    if not text:
        return ["nifti", "seg"] if dicom else ["nifti"]
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ConfigError(f"unknown output format(s) {bad}; choose from {', '.join(FORMATS)}", "--format")
    if not dicom and set(formats) - {"nifti"}:
        raise ConfigError("DICOM SEG/RTSTRUCT need a DICOM series as input", "--format")
    return formats


def series_key(series_uid: str) -> str:
    """A file-name stem for a series that carries no patient data (a hash of the UID)."""
    return "series_" + hashlib.sha1(series_uid.encode()).hexdigest()[:12] if series_uid else "series"


def infer_dicom(predictor: BundlePredictor, meta: dict, bundle_name: str, folder: str | Path, output_dir: str | Path,
                formats: Sequence[str] = ("nifti", "seg"), series_uid: str | None = None,
                send_to: Sequence[str] = (), allow_generated_uids: bool = False) -> dict:
    """Segment one DICOM series and write the requested outputs; returns paths, timings and the series choice."""
    from app.io.dicom_seg import SegmentSpec, write_seg
    from app.io.dicom_series import read_series
    from app.io.nifti import save_labels_nifti
    from app.viz.overlay import save_overlay_png

    t0 = time.perf_counter()
    volume = read_series(folder, series_uid=series_uid, rules=meta.get("series_rules"))
    t_read = time.perf_counter() - t0
    log.info("series: %s", volume.selection_reason)
    pred = predictor.predict_metatensor(volume.to_metatensor())
    out = Path(output_dir)
    stem = series_key(volume.series_instance_uid)
    outputs: dict[str, str] = {}
    t1 = time.perf_counter()
    write_times: dict[str, float] = {}

    def timed(name: str, t_start: float) -> None:
        write_times[f"{name}_write_s"] = time.perf_counter() - t_start

    if "nifti" in formats:
        outputs["nifti"] = str(save_labels_nifti(pred.labels, volume.affine_ras, out / f"{stem}_seg.nii.gz"))
        timed("nifti", t1)
    if "seg" in formats:
        t_seg = time.perf_counter()
        specs = [SegmentSpec.from_dict(s) for s in meta.get("segments", [])]
        if not specs:
            raise ConfigError("bundle metadata has no 'segments' (label codes) for DICOM SEG", "configs/metadata.json")
        outputs["seg"] = str(write_seg(volume, pred.labels, specs, (bundle_name, str(meta.get("version", "0"))),
                                       out / f"{stem}_seg.dcm", allow_generated_uids=allow_generated_uids))
        timed("seg", t_seg)
    if "rtstruct" in formats:
        from app.io.rtstruct import write_rtstruct

        t_rt = time.perf_counter()
        names = {int(s["label_value"]): s["label_name"] for s in meta.get("segments", [])}
        outputs["rtstruct"] = str(write_rtstruct(volume, pred.labels, names, out / f"{stem}_rtstruct.dcm",
                                                 algorithm=(bundle_name, str(meta.get("version", "0"))),
                                                 allow_generated_uids=allow_generated_uids))
        timed("rtstruct", t_rt)
    t_png = time.perf_counter()
    outputs["overlay"] = str(save_overlay_png(volume.array, pred.labels, out / f"{stem}_overlay.png"))
    timed("overlay", t_png)
    t_write = time.perf_counter() - t1
    sent = []
    dicom_files = [outputs[k] for k in ("seg", "rtstruct") if k in outputs]
    for dest in send_to:
        from app.io.pacs import send

        res = send(dicom_files, dest)
        sent.append({"destination": dest, "files": len(dicom_files), "attempts": res.attempts})
    timings = {"read_s": t_read, **pred.timings, **write_times, "write_s": t_write,
               "total_s": time.perf_counter() - t0}
    summary = {"series_uid_hash": stem, "selection": volume.selection_reason, "shape": list(volume.shape),
               "labels_present": [int(v) for v in np.unique(pred.labels) if v != 0],
               "outputs": outputs, "sent": sent, "timings": timings}
    atomic_write_text(out / f"{stem}_summary.json", json.dumps(summary, indent=2))
    return summary


def is_dicom_input(path: Path) -> bool:
    """A folder without NIfTI files (or a single non-NIfTI file) is treated as DICOM."""
    if path.is_file():
        return not path.name.endswith((".nii", ".nii.gz"))
    return path.is_dir() and not find_nifti_inputs(path)


def run_infer(a) -> list[str]:
    src = Path(a.input)
    if not src.exists():
        raise InputError("input not found", str(src))
    dicom = is_dicom_input(src)
    formats = parse_formats(a.format, dicom)
    overrides = json.loads(a.override) if getattr(a, "override", None) else None
    predictor, meta = make_predictor(a.bundle, a.checkpoint, a.device, overrides, a.config or ())
    bundle_name = Path(a.bundle).name
    if dicom:
        summary = infer_dicom(predictor, meta, bundle_name, src, a.output, formats, a.series_uid, a.send or (),
                              allow_generated_uids=getattr(a, "allow_generated_uids", False))
        t = summary["timings"]
        print("series:  " + summary["selection"])
        print("timings: " + "  ".join(f"{k} {v:.2f}" for k, v in t.items()))
        for dest in summary["sent"]:
            print(f"sent {dest['files']} file(s) to {dest['destination']}")
        return list(summary["outputs"].values())
    return [str(p) for p in predict_paths(predictor, find_nifti_inputs(src), a.output)]
