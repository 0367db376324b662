"""Read one DICOM image series into a ``SeriesVolume``: sort, validate, decode, build the affine.

Geometry (see ``app.io.volume.SeriesVolume``): voxel ``[i, j, k]``, ``i`` along the row cosine
(column index), ``j`` along the column cosine (row index), ``k`` along the slice normal
``row_cos x col_cos``, slices sorted by ``ImagePositionPatient . normal``. The affine is

* ``affine_lps[:3, 0] = row_cos * PixelSpacing[1]`` (column spacing),
* ``affine_lps[:3, 1] = col_cos * PixelSpacing[0]`` (row spacing),
* ``affine_lps[:3, 2] = (IPP_last - IPP_first) / (K - 1)`` (one slice: ``normal *``
  SpacingBetweenSlices or SliceThickness),
* ``affine_lps[:3, 3] = IPP_first``.

Series that would give a wrong grid are refused with a ``DicomError`` naming the files: missing
slices, duplicate positions, uneven spacing (no resampling: the caller must fix the data), gantry
tilt (slice steps not along the normal; no shear correction), mixed pixel spacing, missing geometry,
non-positive or non-finite spacings, a non-finite or singular affine, frame counts that disagree.
A single-slice series is allowed (``K = 1``). Siemens mosaics are unpacked into their slices
(``app.io.mosaic``). Values are in modality units (RescaleSlope/Intercept or a Modality LUT applied
per slice) as float32; MONOCHROME1 images are inverted within their stored-value range first, so
that higher values always mean brighter (as MONOCHROME2).

Speed: each file's header is parsed once, by the scan, which also notes where the pixel data lies;
uncompressed pixel data is read from that offset straight into the volume, compressed frames are
decoded in worker processes (JPEG 2000 holds the GIL). ``fast=False`` decodes the plain pydicom way
(whole-file ``dcmread`` and ``pixel_array``), the reference the fast path is tested against.

The returned ``array`` is a Fortran-ordered view (``[k, j, i]`` in memory, each slice contiguous),
which is what decoding slice by slice fills fastest; call ``np.ascontiguousarray`` if needed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from app.errors import DicomError
from app.io import dicom_scan
from app.io.decode_pool import run_calls, shutdown_decode_pool
from app.io.dicom_decode import (
    codec_frames,
    decode_processes,
    frames_per_job,
    native_frames,
    pixel_description,
    pixel_vrs,
    reference_frames,
    transfer_syntax,
)
from app.io.dicom_geometry import Slice, affine_lps, check_and_sort, stack_slices
from app.io.dicom_info import PixelLocation, ScanResult, SeriesInfo, locate_pixel_data
from app.io.dicom_scan import scan_folder, select_series
from app.io.volume import SeriesVolume

logger = logging.getLogger(__name__)


def default_decode_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class _Job:
    """The frames of one file to decode and where each slice goes: ``(frame index, slice, k)``."""

    def __init__(self, file: str, header: Dataset, ts, loc: PixelLocation | None):
        self.file, self.header, self.ts, self.loc = file, header, ts, loc
        self.targets: list[tuple[int, Slice, int]] = []

    @property
    def frames(self) -> list[int]:
        return sorted({f for f, _, _ in self.targets})


def _check_pixels(job: _Job, fast: bool) -> None:
    """What the header says about the pixels, before decoding: present (fast path), greyscale."""
    loc = job.loc
    deflated = str(job.ts) == "1.2.840.10008.1.2.1.99"
    if fast and loc is None and not deflated:
        raise DicomError("no pixel data (7FE0,0010)", path=job.file)
    if fast and loc is not None and loc.keyword != "PixelData":
        raise DicomError("no pixel data (7FE0,0010) (float pixel data is not supported)", path=job.file)
    photometric = str(job.header.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            f"PhotometricInterpretation {photometric}: only greyscale (MONOCHROME1/2) images can be segmented",
            path=job.file,
        )


def _locate(file: str) -> PixelLocation | None:
    """Find the pixel data of a file the scan did not locate (a hand-made ``SeriesInfo``)."""
    import pydicom

    try:
        with open(file, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            return locate_pixel_data(fp, ds)
    except Exception:  # noqa: BLE001 - unreadable here: decoding the plain way will say why
        return None


def _store(job: _Job, stored: np.ndarray, frames: list[int], out: np.ndarray) -> None:
    """Write the decoded stored values of ``frames`` to ``out[k]`` in modality units (float32)."""
    ds = job.header
    expected = (int(ds.Rows), int(ds.Columns))
    if stored.ndim != 3 or stored.shape[1:] != expected:
        raise DicomError(
            f"decoded pixel array has shape {stored.shape}, expected {expected[0]}x{expected[1]} per frame",
            path=job.file,
        )
    index = {f: n for n, f in enumerate(frames)}
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    modality_lut = "ModalityLUTSequence" in ds
    if photometric == "MONOCHROME1":
        bits = int(ds.get("BitsStored", ds.BitsAllocated))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    for f, s, k in job.targets:
        frame = stored[index[f]]
        if s.tile is not None:
            r0, c0 = s.layout.tile_origin(s.tile)  # type: ignore[union-attr]
            frame = frame[r0 : r0 + s.rows, c0 : c0 + s.columns]
        if photometric == "MONOCHROME1":
            frame = (lo + hi) - frame.astype(np.int64)  # min <-> max of the stored range
        if modality_lut:
            out[k] = apply_modality_lut(frame, ds)
        elif s.slope == 1.0:  # one pass instead of two (most CT: slope 1, intercept -1024)
            np.add(frame, np.float32(s.intercept), out=out[k], casting="unsafe")
        else:
            np.multiply(frame, np.float32(s.slope), out=out[k], casting="unsafe")
            if s.intercept:
                out[k] += np.float32(s.intercept)


def _run_native(job: _Job, out: np.ndarray) -> bool:
    """Read ``job`` from its file offset; False when the pixel data needs pydicom."""
    if job.loc is None:
        return False
    frames = job.frames
    stored = native_frames(job.file, job.loc, pixel_description(job.header), job.ts, frames)
    if stored is None:
        return False
    _store(job, stored, frames, out)
    return True


def _in_threads(fn: Callable, args: list[tuple], workers: int) -> list[Any]:
    """``fn(*a)`` for every ``a`` in ``workers`` threads (uncompressed data: reading and numpy release
    the GIL), results in order; the first error in order is raised."""
    if workers <= 1 or len(args) <= 1:
        return [fn(*a) for a in args]
    with ThreadPoolExecutor(max_workers=min(workers, len(args))) as pool:
        futures = [pool.submit(fn, *a) for a in args]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _decode_all(jobs: list[_Job], out: np.ndarray, workers: int, fast: bool) -> None:
    """Decode every job into ``out`` ([k, j, i] float32)."""
    if not fast:

        def reference(job: _Job) -> None:
            frames = job.frames
            _store(job, reference_frames(job.file, frames), frames, out)

        _in_threads(reference, [(j,) for j in jobs], workers)
        return

    done = _in_threads(_run_native, [(j, out) for j in jobs], workers)
    pending = [j for j, ok in zip(jobs, done) if not ok]
    if not pending:
        return
    # Compressed (or unusual) pixel data: pydicom's decoders in worker processes, multi-frame objects
    # split into chunks of frames.
    units: list[tuple[_Job, list[int]]] = []
    n_proc = decode_processes(workers, sum(len(j.frames) for j in pending))
    for job in pending:
        frames = job.frames
        step = frames_per_job(len(frames), n_proc) if len(frames) > 1 else 1
        units.extend((job, frames[i : i + step]) for i in range(0, len(frames), step))
    calls: list[tuple[Callable, tuple]] = []
    for job, frames in units:
        if job.loc is None:  # deflated: pydicom must inflate the whole file
            calls.append((reference_frames, (job.file, frames)))
        else:
            calls.append(
                (
                    codec_frames,
                    (job.file, job.loc, pixel_description(job.header), pixel_vrs(job.header), str(job.ts), frames),
                )
            )
    results = run_calls(calls, n_proc if len(units) > 1 else 1)
    for (job, frames), stored in zip(units, results):
        sub = _Job(job.file, job.header, job.ts, job.loc)
        sub.targets = [t for t in job.targets if t[0] in set(frames)]
        _store(sub, stored, frames, out)


def read_series_info(
    info: SeriesInfo,
    *,
    slice_tolerance: float = 0.01,
    decode_workers: int | None = None,
    selection_reason: str = "",
    fast: bool = True,
) -> SeriesVolume:
    """Read a series found by ``scan``/``scan_folder`` (see ``read_series``); reuses the headers and
    pixel data locations the scan found, and parses no header again."""
    if not info.is_image:
        raise DicomError(
            f"series {info.key} is a {info.modality} object, not an image series",
            path=info.files[0] if info.files else None,
        )
    slices = stack_slices(info.files, info.headers, info.pixel_locations)
    slices = check_and_sort(slices, slice_tolerance, info.split_note)
    affine = affine_lps(slices)
    headers = dict(zip(info.files, info.headers))
    jobs: dict[str, _Job] = {}
    for file, ds in headers.items():
        loc = info.pixel_locations.get(file)
        jobs[file] = _Job(file, ds, transfer_syntax(file, ds), loc if loc is not None or not fast else _locate(file))
    for k, s in enumerate(slices):
        jobs[s.file].targets.append((s.frame - 1, s, k))
    ordered = [j for j in jobs.values() if j.targets]
    for job in ordered:
        _check_pixels(job, fast)
    out = np.empty((len(slices), slices[0].rows, slices[0].columns), dtype=np.float32)
    workers = default_decode_workers() if decode_workers is None else max(1, int(decode_workers))
    _decode_all(ordered, out, workers, fast)

    volume = SeriesVolume(
        array=out.transpose(2, 1, 0),  # [k, j, i] -> [i, j, k] (a view)
        affine_lps=affine,
        datasets=[s.header for s in slices],
        frame_numbers=[s.frame for s in slices],
        series_instance_uid=info.uid,
        stack_key=info.key,
        selection_reason=selection_reason,
        source_files=[s.file for s in slices],
        tile_numbers=[(s.tile or 0) + 1 for s in slices] if slices[0].tile is not None else [],
    )
    logger.info(
        "read series %s: %d x %d x %d voxels, spacing %s mm (%s)",
        info.key,
        *volume.shape,
        np.round(volume.spacing, 4).tolist(),
        selection_reason or "given",
    )
    return volume


def check_scan(result: ScanResult, path: str | os.PathLike, series_uid: str | None = None) -> None:
    """Raise ``DicomError`` (naming ``path``) when a scan found no DICOM series, or only non-image ones
    and no ``series_uid`` asks for one of them."""
    if not result.series:
        detail = "; ".join(f"{Path(f).name}: {why}" for f, why in result.skipped[:5])
        more = f" (+{len(result.skipped) - 5} more)" if len(result.skipped) > 5 else ""
        raise DicomError(f"no DICOM files found among {result.n_files} file(s): {detail}{more}", path=str(path))
    if not any(s.is_image for s in result.series) and not series_uid:
        raise DicomError(
            "no DICOM image series found (only: " + ", ".join(sorted({s.modality or "?" for s in result.series})) + ")",
            path=str(path),
        )


def scan_for_images(path: str | os.PathLike, series_uid: str | None = None) -> ScanResult:
    """``dicom_scan.scan(path)``, checked by :func:`check_scan`: what ``read_series`` does first (a CLI
    runs it before building the model, so that a folder without images fails at once)."""
    result = dicom_scan.scan(path)
    check_scan(result, path, series_uid)
    return result


def read_series(
    path: str | os.PathLike,
    series_uid: str | None = None,
    rules: dict | None = None,
    *,
    study_uid: str | None = None,
    volume: int | None = None,
    scan: ScanResult | None = None,
    slice_tolerance: float = 0.01,
    decode_workers: int | None = None,
    fast: bool = True,
) -> SeriesVolume:
    """Read one image series from a folder (recursive) or a single DICOM file.

    Args:
        path: folder with DICOM files (other files are skipped), or one DICOM file.
        series_uid: SeriesInstanceUID or ``SeriesInfo.key`` to read (``--series-uid``), e.g. ``UID``,
            ``UID#2`` (a split UID), ``UID#vol5`` / ``UID#echo2`` (one volume / echo of a 4D or
            multi-echo series).
        rules: selection rules (see ``select_series``) used when ``series_uid`` is not given; with
            neither, the image series with the most slices is read.
        study_uid: StudyInstanceUID to choose from (``--study-uid``): needed when the folder holds
            several studies or patients and no ``series_uid`` is given.
        volume: 1-based volume of a 4D series (``--volume``), instead of the ``#volN`` key.
        scan: the ``ScanResult`` of an earlier ``app.io.dicom_scan.scan(path)``: the folder is not
            scanned again (batch inference, a DICOM listener).
        slice_tolerance: allowed relative deviation of each slice step from the smallest step
            (0.01 = 1 %); also the tolerance for recognising a gap of whole missing slices.
        decode_workers: parallel decoding (threads for uncompressed files, processes for compressed
            ones; default ``min(8, cpu_count)``; 1 = serial).
        fast: False decodes the plain pydicom way (the reference for tests; slower).

    Returns:
        SeriesVolume with ``array`` [i, j, k] float32 in modality units, ``affine_lps`` (mm),
        headers (no pixel data), frame numbers, source files and the selection reason.

    Raises:
        DicomError: the path, series or files cannot give a correct volume (message names the file
            or folder and the problem; never patient data).
    """
    result = scan if scan is not None else dicom_scan.scan(path)
    check_scan(result, path, series_uid)
    try:
        info, reason = select_series(result.series, series_uid, rules, study_uid=study_uid, volume=volume)
    except DicomError as exc:
        raise DicomError(str(exc), path=str(path)) from exc
    damaged = result.damaged.get(info.uid, []) if info.uid else []
    if damaged:
        why = dict(result.skipped).get(damaged[0], "damaged header")
        more = f" (and {len(damaged) - 1} more file(s))" if len(damaged) > 1 else ""
        raise DicomError(
            f"a file of series {info.uid} was skipped: {why}{more}; refusing to read the series without it",
            path=damaged[0],
        )
    unreadable = [f for f, why in result.skipped if why.startswith("unreadable")]
    if unreadable:
        logger.warning(
            "%d file(s) under %s look like damaged DICOM and were skipped, e.g. %s",
            len(unreadable),
            path,
            unreadable[0],
        )
    logger.info("selected series %s: %s", info.key, reason)
    try:
        return read_series_info(
            info, slice_tolerance=slice_tolerance, decode_workers=decode_workers, selection_reason=reason, fast=fast
        )
    except DicomError as exc:
        if unreadable and "missing slice" in str(exc):
            raise DicomError(
                f"{exc} [{len(unreadable)} damaged DICOM file(s) were skipped, e.g. {unreadable[0]}]"
            ) from exc
        raise


def load_dicom_as_metatensor(
    path: str | os.PathLike, series_uid: str | None = None, rules: dict | None = None, **kwargs: Any
):
    """``read_series`` for MONAI: returns ``(MetaTensor (1, I, J, K) with the RAS affine, SeriesVolume)``.

    The MetaTensor's meta also carries ``series_instance_uid`` and ``selection_reason``.
    """
    volume = read_series(path, series_uid, rules, **kwargs)
    image = volume.to_metatensor()
    image.meta["series_instance_uid"] = volume.series_instance_uid
    image.meta["selection_reason"] = volume.selection_reason
    return image, volume


try:  # thin dictionary wrapper in MONAI's style
    from monai.transforms import MapTransform
except ImportError:  # pragma: no cover - monai is a dependency
    MapTransform = object  # type: ignore[misc,assignment]


class LoadDicomSeriesd(MapTransform):
    """Dictionary transform: replace ``data[key]`` (a DICOM folder/file path) with the series as a
    channel-first MetaTensor (RAS affine); the ``SeriesVolume`` goes to ``data[f"{key}_volume"]``."""

    def __init__(
        self,
        keys,
        series_uid: str | None = None,
        rules: dict | None = None,
        allow_missing_keys: bool = False,
        **read_kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_uid, self.rules, self.read_kwargs = series_uid, rules, read_kwargs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], d[f"{key}_volume"] = load_dicom_as_metatensor(
                d[key], self.series_uid, self.rules, **self.read_kwargs
            )
        return d


__all__: Sequence[str] = [
    "LoadDicomSeriesd",
    "SeriesInfo",
    "default_decode_workers",
    "load_dicom_as_metatensor",
    "read_series",
    "read_series_info",
    "scan_folder",
    "select_series",
    "shutdown_decode_pool",
]
