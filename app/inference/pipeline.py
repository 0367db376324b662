"""The per-series pipeline: one NIfTI image or DICOM series in, labels on its exact source grid out.

:class:`Segmenter` holds a loaded model and its predictor; :meth:`Segmenter.dicom` and
:meth:`Segmenter.nifti` read the input, check it fits (memory, disk), predict, write the requested
outputs (NIfTI, DICOM SEG, RTSTRUCT, PNG overlay) all or nothing (``app.io.staging.OutputSet``: a
failure in any writer leaves none of them), then send the DICOM outputs to a PACS, and return a
:class:`SeriesResult`. ``<key>_summary.json`` records what happened, failures and failed sends
included. Nothing here prints; the CLI reports.

Output names come from :mod:`app.inference.jobs` (no patient data in them); an existing output is
replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LazyTrait, RandomizableTrait

from app.bundle.model import LoadedModel
from app.errors import ConfigError, SegappError, env_error
from app.inference.jobs import (
    DICOM_OUTPUTS,
    check_nifti_input,
    dicom_output_names,
    nifti_output_names,
    nifti_stem,
    safe_part,
    series_key,
    summary_name,
)
from app.inference.predictor import BundlePredictor, Prediction
from app.io.atomic import atomic_write_text
from app.io.geometry import ras_to_lps
from app.io.nifti import load_nifti, save_labels_nifti
from app.io.staging import OutputSet, refuse_existing
from app.runtime.prefetch import import_in_background
from app.runtime.preflight import check_free_space, check_memory, estimate_output_bytes, memory_budget_bytes

log = logging.getLogger(__name__)

# float32 copies of each grid alive at once (source image, its device copy, the network-grid image and
# its normalised copy, the resampling's scratch): a generous bound, not a measurement.
_SOURCE_COPIES, _NETWORK_COPIES = 3, 4


@dataclass
class SeriesResult:
    """What one series' run did.

    Attributes:
        key: the output file stem (``series_<hash>`` for DICOM, the input's relative path for NIfTI).
        kind: ``dicom`` | ``nifti``.
        selection: how the series was chosen (DICOM) or the input file name (NIfTI).
        shape: the source voxel grid ``(I, J, K)``.
        labels_present: foreground label values in the result.
        outputs: format -> file written (empty when the series failed: outputs are all or nothing).
        sent: one entry per PACS destination (``destination``, ``files``, ``attempts``, ``error`` if it failed).
        timings: seconds per stage.
        path: the predictor path (``fast`` | ``plain``) and ``note`` why the plain one.
        status: ``ok`` | ``failed`` (outputs not written) | ``send_failed`` (outputs written, a send failed).
        error: the one-line error when not ``ok``.
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
    status: str = "ok"
    error: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, SegappError):
        return str(exc).splitlines()[0]
    return f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class Segmenter:
    """A loaded model ready to segment series one after the other (one predictor, built once)."""

    def __init__(self, model: LoadedModel, fast: bool = True, seg_type: str = "binary"):
        """``seg_type``: ``binary`` (BINARY SEG, default) or ``labelmap`` (Label Map SEG, one frame per slice)."""
        if seg_type not in ("binary", "labelmap"):
            raise ConfigError(f"SEG type must be binary or labelmap, got {seg_type!r}", "--seg-type")
        self.model = model
        self.predictor = BundlePredictor.from_model(model, fast=fast)
        self.seg_type = seg_type.upper()
        self._stats_row: dict = {}

    # -- checks before the work ------------------------------------------------------------------------
    def network_grid(self, shape: Sequence[int], affine_ras: np.ndarray) -> tuple[int, ...] | None:
        """The grid the bundle's preprocessing moves an image of ``shape``/``affine_ras`` to, from MONAI's
        lazy transforms on a zero-stride tensor (no voxel allocated); None when it cannot be told."""
        probe = MetaTensor(
            torch.zeros((1,) * 4, dtype=torch.float32).expand(1, *(int(s) for s in shape[:3])),
            affine=torch.as_tensor(np.asarray(affine_ras, dtype=np.float64)),
        )
        data = {self.predictor.image_key: probe}
        try:
            for t in self.predictor.core.transforms:
                if isinstance(t, LazyTrait) and not isinstance(t, RandomizableTrait):
                    data = cast(Any, t)(data, lazy=True)
            return tuple(int(s) for s in data[self.predictor.image_key].peek_pending_shape())
        except Exception as exc:  # a transform that needs the voxels: no estimate, the run decides
            log.debug("no network-grid estimate: %s", exc)
            return None

    def check_fits(self, shape: Sequence[int], affine_ras: np.ndarray, path: str | os.PathLike) -> None:
        """EnvError when segmenting an image of this grid would need more memory than the budget."""
        src = math.prod(int(s) for s in shape[:3])
        net_shape = self.network_grid(shape, affine_ras)
        roi = self.predictor.spec.roi_size if self.predictor.spec is not None else (1, 1, 1)
        # the sliding window pads the grid to at least one window along each axis
        net = math.prod(max(n, r) for n, r in zip(net_shape, roi)) if net_shape else src
        classes = max(2, len(self.model.labels))
        plain = 0 if not self.predictor.fast_path_note() else classes * (src + net)  # full probability maps
        need = 4 * (_SOURCE_COPIES * src + _NETWORK_COPIES * net + plain)
        grid = " x ".join(map(str, net_shape)) if net_shape else "?"
        check_memory(need, f"segmenting it (network grid {grid} voxels)", path)

    def _check_disk(self, out: Path, shape: Sequence[int], formats: Sequence[str]) -> None:
        check_free_space(out, estimate_output_bytes(shape, len(self.model.segments), formats))

    # -- one DICOM series ------------------------------------------------------------------------------
    def dicom(
        self,
        folder: str | Path,
        output_dir: str | Path,
        formats: Sequence[str] = ("nifti", "seg"),
        series_uid: str | None = None,
        send_to: Sequence[str] = (),
        allow_generated_uids: bool = False,
        overwrite: bool = False,
        study_uid: str | None = None,
        volume_number: int | None = None,
        scan=None,
        scan_s: float = 0.0,
    ) -> SeriesResult:
        """Segment one DICOM series of ``folder``; write the requested outputs and ``<key>_summary.json``.

        ``series_uid`` / ``study_uid`` / ``volume_number`` choose the stack as in
        ``app.io.dicom_series.read_series`` (``--series-uid``, ``--study-uid``, ``--volume``); ``scan`` is a
        scan of ``folder`` already made (it is not scanned again), ``scan_s`` the seconds it took, counted
        in ``read_s`` (``segapp infer`` scans before it builds the model; a batch's one scan is not counted).

        Raises:
            SegappError: the series cannot be read or segmented, or an output exists (without
                ``overwrite``): no output is written. ``SendError`` after the outputs were written
                when a send failed (the summary records it; the files stay).
        """
        from app.io.dicom_series import read_series

        t0 = time.perf_counter() - scan_s  # the series' clock starts with its scan
        out = Path(output_dir)
        volume = read_series(
            folder,
            series_uid=series_uid,
            rules=self.model.series_rules,
            study_uid=study_uid,
            volume=volume_number,
            scan=scan,
        )
        t_read = time.perf_counter() - t0
        log.info("series: %s", volume.selection_reason)
        key = series_key(volume.stack_key or volume.series_instance_uid)  # one volume of a 4D series: its own
        result = SeriesResult(key, "dicom", volume.selection_reason, list(volume.shape), [])
        names = dicom_output_names(key, formats)
        refuse_existing(out, names.values(), overwrite)

        def run(outs: OutputSet, times: dict[str, float]) -> Prediction:
            self._check_disk(out, volume.shape, formats)
            self.check_fits(volume.shape, volume.affine_ras, folder)
            # highdicom's import (0.45 s) overlaps the network instead of delaying the SEG write
            prefetch = (lambda: import_in_background("highdicom")) if {"seg", "sr"} & set(formats) else None
            pred = self.predictor.predict_metatensor(volume.to_metatensor(), on_network=prefetch)
            self._write_dicom_outputs(outs, key, names, volume, pred, allow_generated_uids, times)
            return pred

        self._segment(result, out, overwrite, run, t0, {"read_s": t_read})
        if "stats" in result.outputs:  # the folder's table of every series (not one series' output)
            from app.reporting.report import CSV_NAME, update_statistics_csv

            result.outputs["csv"] = str(update_statistics_csv(out / CSV_NAME, self._stats_row))
            self._write_summary(out, result)
        dicom_files = [result.outputs[k] for k in DICOM_OUTPUTS if k in result.outputs]
        self._send(result, out, dicom_files, send_to)
        return result

    def _write_dicom_outputs(
        self,
        outs: OutputSet,
        key: str,
        names: dict[str, str],
        volume,
        pred: Prediction,
        allow_generated_uids: bool,
        times: dict[str, float],
    ) -> None:
        """Every output of a DICOM series into ``outs`` (one ``writing`` block per format)."""
        from app.io.seg_write import write_seg
        from app.io.segments import SegmentSpec
        from app.reporting.overlay import save_overlay_png

        algorithm = (self.model.name, self.model.version)
        if "nifti" in names:
            t = time.perf_counter()
            with outs.writing("nifti", names["nifti"]) as p:
                save_labels_nifti(pred.labels, volume.affine_ras, p)
            times["nifti_write_s"] = time.perf_counter() - t
        if "seg" in names:
            t = time.perf_counter()
            specs = [SegmentSpec.from_dict(s) for s in self.model.segments]
            with outs.writing("seg", names["seg"]) as p:
                write_seg(
                    volume,
                    pred.labels,
                    specs,
                    algorithm,
                    p,
                    allow_generated_uids=allow_generated_uids,
                    segmentation_type=cast(Any, self.seg_type),
                )
            times["seg_write_s"] = time.perf_counter() - t
        if "rtstruct" in names:
            from app.io.rtstruct import write_rtstruct

            t = time.perf_counter()
            labels = {int(s["label_value"]): str(s["label_name"]) for s in self.model.segments}
            with outs.writing("rtstruct", names["rtstruct"]) as p:
                write_rtstruct(
                    volume, pred.labels, labels, p, algorithm=algorithm, allow_generated_uids=allow_generated_uids
                )
            times["rtstruct_write_s"] = time.perf_counter() - t
        if "stats" in names or "sr" in names:  # reports: statistics.json, and the SR of the SEG's volumes
            from app.reporting.report import csv_row, series_statistics, write_statistics_json, write_volume_report

            t = time.perf_counter()
            stats = series_statistics(volume, pred.labels, self.model.segments, key)
            if "stats" in names:
                with outs.writing("stats", names["stats"]) as p:
                    write_statistics_json(stats, p)
                self._stats_row = csv_row(stats)
            if "sr" in names:
                with outs.writing("sr", names["sr"]) as p:
                    write_volume_report(volume, stats, outs.staged("seg"), algorithm, p)
            times["reports_s"] = time.perf_counter() - t
        if "overlay" in names:
            t = time.perf_counter()
            with outs.writing("overlay", names["overlay"]) as p:
                save_overlay_png(
                    volume.array, pred.labels, p, affine_lps=volume.affine_lps, segments=self.model.segments
                )
            times["overlay_s"] = time.perf_counter() - t

    # -- one NIfTI image -------------------------------------------------------------------------------
    def nifti(
        self,
        path: str | Path,
        output_dir: str | Path,
        stem: str | None = None,
        overwrite: bool = False,
        formats: Sequence[str] = ("nifti",),
    ) -> SeriesResult:
        """Segment one NIfTI image: ``<stem>_seg.nii.gz`` on its grid, ``<stem>_summary.json``, and with
        ``overlay`` in ``formats`` a PNG overlay.

        ``stem`` may hold subfolders (see :func:`output_keys`); default: the file name without suffix.

        Raises:
            SegappError: the file is not a usable 3D image, does not fit, or an output exists (without
                ``overwrite``): no output is written (the summary records the error).
        """
        from app.reporting.overlay import save_overlay_png

        t0 = time.perf_counter()
        path = Path(path)
        out = Path(output_dir)
        key = stem or safe_part(nifti_stem(path))
        names = nifti_output_names(key, formats)
        refuse_existing(out, names.values(), overwrite)
        result = SeriesResult(key, "nifti", path.name, [], [])

        def run(outs: OutputSet, times: dict[str, float]) -> Prediction:
            image = self.load_nifti_image(path)
            result.shape = [int(s) for s in image.shape[1:]]
            self._check_disk(out, result.shape, ["nifti"])
            pred = self.predictor.predict_metatensor(image)
            t = time.perf_counter()
            with outs.writing("nifti", names["nifti"]) as p:
                save_labels_nifti(pred.labels, pred.affine_ras, p)
            if "overlay" in names:
                with outs.writing("overlay", names["overlay"]) as p:
                    save_overlay_png(
                        image[0].numpy(),
                        pred.labels,
                        p,
                        affine_lps=ras_to_lps(pred.affine_ras),
                        segments=self.model.segments,
                    )
            times["write_s"] = time.perf_counter() - t
            return pred

        self._segment(result, out, overwrite, run, t0, {})
        log.info("%s -> %s (%s)", path.name, result.outputs.get("nifti"), _timings(result.timings))
        return result

    def load_nifti_image(self, path: Path) -> MetaTensor:
        """A NIfTI file as a ``(1, I, J, K)`` MetaTensor with its RAS affine, after every check: header
        (``check_nifti_input``), memory for the image and for the network grid, finite voxels."""
        from app.transforms.intensity import check_finite

        info = check_nifti_input(path)
        self.check_fits(info.shape, info.affine_ras, path)
        array, affine_ras = load_nifti(path, max_bytes=memory_budget_bytes() // _SOURCE_COPIES)
        array = array.reshape(info.shape[:3])  # trailing axes of size one
        image = MetaTensor(
            torch.as_tensor(np.asarray(array, dtype=np.float32)[None]),
            affine=torch.as_tensor(affine_ras),
            meta={"filename_or_obj": str(path), "space": "RAS"},
        )
        check_finite(image, str(path))
        return image

    # -- shared --------------------------------------------------------------------------------------
    def _segment(
        self,
        result: SeriesResult,
        out: Path,
        overwrite: bool,
        run: Callable[[OutputSet, dict[str, float]], Prediction],
        t0: float,
        times: dict[str, float],
    ) -> None:
        """Run ``run`` inside one OutputSet (all outputs or none), fill ``result``, write the summary."""
        try:
            with OutputSet(out, overwrite=overwrite) as outs:
                pred = run(outs, times)
        except BaseException as exc:
            result.status, result.error = "failed", _error_line(exc)
            result.timings = {**times, "total_s": time.perf_counter() - t0}
            if not isinstance(exc, KeyboardInterrupt):
                self._write_summary(out, result)
            raise
        result.outputs = {k: str(v) for k, v in outs.final.items()}
        result.labels_present = [int(v) for v in np.unique(pred.labels) if v != 0]
        result.shape = [int(s) for s in pred.labels.shape]
        result.timings = {**times, **pred.timings, "total_s": time.perf_counter() - t0}
        result.path, result.note = pred.path, pred.note
        self._write_summary(out, result)

    def _send(self, result: SeriesResult, out: Path, files: list[str], send_to: Sequence[str]) -> None:
        """Send after the outputs exist; a failed send keeps them, is recorded, and raised at the end."""
        from app.io.pacs import SendError, send

        first: SendError | None = None
        for dest in send_to:
            try:
                res = send(files, dest)
                result.sent.append({"destination": dest, "files": len(files), "attempts": res.attempts})
            except SendError as exc:
                result.sent.append({"destination": dest, "files": len(files), "error": _error_line(exc)})
                first = first or exc
        if send_to:
            if first is not None:
                result.status, result.error = "send_failed", _error_line(first)
            self._write_summary(out, result)
        if first is not None:
            raise first

    @staticmethod
    def _write_summary(out: Path, result: SeriesResult) -> None:
        try:
            atomic_write_text(out / summary_name(result.key), result.to_json())
        except OSError as exc:  # the summary is a record: never hide the real error behind its own
            log.warning("cannot write %s: %s", out / summary_name(result.key), exc)
            if result.status == "ok":
                raise env_error(exc, "cannot write the summary", out / summary_name(result.key)) from exc


def _timings(t: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in t.items())
