"""The per-series pipeline: one NIfTI image or DICOM series in, labels on its exact source grid out.

:class:`Segmenter` holds a loaded model and its predictor; :meth:`Segmenter.dicom` and
:meth:`Segmenter.nifti` read the input, predict, write the requested outputs (NIfTI, DICOM SEG,
RTSTRUCT, PNG overlay), optionally send the DICOM outputs to a PACS, and return a
:class:`SeriesResult`. Nothing here prints; the CLI reports. File names carry no patient data: DICOM
outputs are named by a hash of the series UID, NIfTI outputs by the input's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from app.bundle.model import LoadedModel
from app.errors import ConfigError
from app.inference.predictor import BundlePredictor, load_image_metatensor
from app.io.atomic import atomic_write_text
from app.io.nifti import save_labels_nifti

log = logging.getLogger(__name__)

FORMATS = ("nifti", "seg", "rtstruct")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def parse_formats(text: str | None, dicom: bool) -> list[str]:
    """``--format``: a comma list of nifti, seg, rtstruct (default nifti,seg for DICOM, nifti for NIfTI)."""
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


def find_nifti_inputs(path: str | Path) -> list[Path]:
    """A NIfTI file, or every NIfTI file in a folder (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(NIFTI_SUFFIXES))


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_dicom_input(path: Path) -> bool:
    """A folder without NIfTI files (or a single non-NIfTI file) is taken as DICOM."""
    if path.is_file():
        return not path.name.endswith(NIFTI_SUFFIXES)
    return path.is_dir() and not find_nifti_inputs(path)


@dataclass
class SeriesResult:
    """What one series' run did.

    Attributes:
        key: the output file stem (``series_<hash>`` for DICOM, the input's name for NIfTI).
        kind: ``dicom`` | ``nifti``.
        selection: how the series was chosen (DICOM) or the input file name (NIfTI).
        shape: the source voxel grid ``(I, J, K)``.
        labels_present: foreground label values in the result.
        outputs: format -> file written.
        sent: one entry per PACS destination (``destination``, ``files``, ``attempts``).
        timings: seconds per stage.
        path: the predictor path (``fast`` | ``plain``) and ``note`` why the plain one.
    """

    key: str
    kind: str
    selection: str
    shape: list[int]
    labels_present: list[int]
    outputs: dict[str, str] = field(default_factory=dict)
    sent: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    path: str = "fast"
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class Segmenter:
    """A loaded model ready to segment series one after the other (one predictor, built once)."""

    def __init__(self, model: LoadedModel, fast: bool = True):
        self.model = model
        self.predictor = BundlePredictor.from_model(model, fast=fast)

    def dicom(
        self,
        folder: str | Path,
        output_dir: str | Path,
        formats: Sequence[str] = ("nifti", "seg"),
        series_uid: str | None = None,
        send_to: Sequence[str] = (),
        allow_generated_uids: bool = False,
    ) -> SeriesResult:
        """Segment one DICOM series of ``folder`` and write the requested outputs and ``<key>_summary.json``."""
        from app.io.dicom_seg import SegmentSpec, write_seg
        from app.io.dicom_series import read_series
        from app.reporting.overlay import save_overlay_png

        t0 = time.perf_counter()
        volume = read_series(folder, series_uid=series_uid, rules=self.model.series_rules)
        t_read = time.perf_counter() - t0
        log.info("series: %s", volume.selection_reason)
        pred = self.predictor.predict_metatensor(volume.to_metatensor())
        out = Path(output_dir)
        stem = series_key(volume.series_instance_uid)
        algorithm = (self.model.name, self.model.version)
        outputs: dict[str, str] = {}
        times: dict[str, float] = {}
        if "nifti" in formats:
            t = time.perf_counter()
            outputs["nifti"] = str(save_labels_nifti(pred.labels, volume.affine_ras, out / f"{stem}_seg.nii.gz"))
            times["nifti_write_s"] = time.perf_counter() - t
        if "seg" in formats:
            t = time.perf_counter()
            specs = [SegmentSpec.from_dict(s) for s in self.model.segments]
            outputs["seg"] = str(
                write_seg(
                    volume,
                    pred.labels,
                    specs,
                    algorithm,
                    out / f"{stem}_seg.dcm",
                    allow_generated_uids=allow_generated_uids,
                )
            )
            times["seg_write_s"] = time.perf_counter() - t
        if "rtstruct" in formats:
            from app.io.rtstruct import write_rtstruct

            t = time.perf_counter()
            names = {int(s["label_value"]): str(s["label_name"]) for s in self.model.segments}
            outputs["rtstruct"] = str(
                write_rtstruct(
                    volume,
                    pred.labels,
                    names,
                    out / f"{stem}_rtstruct.dcm",
                    algorithm=algorithm,
                    allow_generated_uids=allow_generated_uids,
                )
            )
            times["rtstruct_write_s"] = time.perf_counter() - t
        t = time.perf_counter()
        outputs["overlay"] = str(save_overlay_png(volume.array, pred.labels, out / f"{stem}_overlay.png"))
        times["overlay_s"] = time.perf_counter() - t
        sent = []
        dicom_files = [outputs[k] for k in ("seg", "rtstruct") if k in outputs]
        for dest in send_to:
            from app.io.pacs import send

            res = send(dicom_files, dest)
            sent.append({"destination": dest, "files": len(dicom_files), "attempts": res.attempts})
        # -- reports (formats "stats", "sr"): statistics.json + CSV row, and the SR, sent where the SEG went --
        if {"stats", "sr"} & set(formats):
            from app.io.pacs import send as send_report
            from app.reporting.report import write_series_reports

            t = time.perf_counter()
            reports = write_series_reports(
                volume,
                pred.labels,
                self.model.segments,
                out,
                stem,
                formats,
                seg_path=outputs.get("seg"),
                algorithm=algorithm,
            )
            outputs.update(reports)
            for dest in send_to if "sr" in reports else ():
                res = send_report([reports["sr"]], dest)
                sent.append({"destination": dest, "files": 1, "attempts": res.attempts})
            times["reports_s"] = time.perf_counter() - t
        result = SeriesResult(
            key=stem,
            kind="dicom",
            selection=volume.selection_reason,
            shape=list(volume.shape),
            labels_present=[int(v) for v in np.unique(pred.labels) if v != 0],
            outputs=outputs,
            sent=sent,
            timings={"read_s": t_read, **pred.timings, **times, "total_s": time.perf_counter() - t0},
            path=pred.path,
            note=pred.note,
        )
        atomic_write_text(out / f"{stem}_summary.json", result.to_json())
        return result

    def nifti(self, path: str | Path, output_dir: str | Path, stem: str | None = None) -> SeriesResult:
        """Segment one NIfTI image: ``<stem>_seg.nii.gz`` on its grid and a PNG overlay."""
        from app.reporting.overlay import save_overlay_png

        t0 = time.perf_counter()
        path = Path(path)
        image = load_image_metatensor(path)
        pred = self.predictor.predict_metatensor(image)
        stem = stem or nifti_stem(path)
        out = Path(output_dir)
        outputs = {
            "nifti": str(save_labels_nifti(pred.labels, pred.affine_ras, out / f"{stem}_seg.nii.gz")),
            "overlay": str(save_overlay_png(image[0].numpy(), pred.labels, out / f"{stem}_overlay.png")),
        }
        log.info(
            "%s -> %s (%s)", path.name, outputs["nifti"], ", ".join(f"{k} {v:.2f}" for k, v in pred.timings.items())
        )
        return SeriesResult(
            key=stem,
            kind="nifti",
            selection=path.name,
            shape=list(pred.labels.shape),
            labels_present=[int(v) for v in np.unique(pred.labels) if v != 0],
            outputs=outputs,
            timings={**pred.timings, "total_s": time.perf_counter() - t0},
            path=pred.path,
            note=pred.note,
        )
