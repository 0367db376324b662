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
tilt (slice steps not along the normal; no shear correction), mixed pixel spacing, missing geometry.
A single-slice series is allowed (``K = 1``). Values are in modality units (RescaleSlope/Intercept
or a Modality LUT applied per slice) as float32; MONOCHROME1 images are inverted within their
stored-value range first, so that higher values always mean brighter (as MONOCHROME2).

The returned ``array`` is a Fortran-ordered view (``[k, j, i]`` in memory, each slice contiguous),
which is what decoding slice by slice fills fastest; call ``np.ascontiguousarray`` if needed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import UID

from app.errors import DicomError
from app.io.dicom_scan import (
    IOP_TOLERANCE,
    SeriesInfo,
    functional_group_item,
    is_enhanced_multiframe,
    scan,
    scan_folder,
    select_series,
)
from app.io.volume import SeriesVolume

logger = logging.getLogger(__name__)

# Positions closer than this (mm) along the normal are the same slice position.
_DUPLICATE_MM = 0.01
# Largest sideways drift of the slice positions from the normal line, as a fraction of the in-plane
# pixel size (with a floor for IPP rounding), before the series counts as tilted.
_TILT_DRIFT_PIXELS = 0.05
_TILT_DRIFT_FLOOR_MM = 0.01


@dataclass
class _Slice:
    """One 2D image of the series: a single-frame file or one frame of a multi-frame object."""

    file: str
    frame: int  # 1-based
    header: Dataset
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: np.ndarray  # (row spacing, column spacing) mm
    rows: int
    columns: int
    slope: float
    intercept: float
    thickness: float | None
    position: float = 0.0


def _floats(value, n: int, name: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DicomError(f"{name} is not numeric ({value!r})", path=where) from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise DicomError(f"{name} must hold {n} finite numbers, found {value!r}", path=where)
    return arr


def _opt_float(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


_MISSING = {
    "ImagePositionPatient": "missing ImagePositionPatient (0020,0032): cannot place the slice in space",
    "ImageOrientationPatient": "missing ImageOrientationPatient (0020,0037): the image plane is unknown",
    "PixelSpacing": "missing PixelSpacing (0028,0030): the pixel size is unknown",
}


def _single_frame_slice(file: str, ds: Dataset) -> _Slice:
    for name, message in _MISSING.items():
        if ds.get(name) in (None, ""):
            raise DicomError(message, path=file)
    for name in ("Rows", "Columns"):
        if ds.get(name) in (None, ""):
            raise DicomError(f"missing {name}: not an image", path=file)
    return _Slice(
        file=file,
        frame=1,
        header=ds,
        ipp=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", file),
        iop=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", file),
        pixel_spacing=_floats(ds.PixelSpacing, 2, "PixelSpacing", file),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        slope=_opt_float(ds.get("RescaleSlope")) or 1.0,
        intercept=_opt_float(ds.get("RescaleIntercept")) or 0.0,
        thickness=_opt_float(ds.get("SpacingBetweenSlices")) or _opt_float(ds.get("SliceThickness")),
    )


def _multiframe_slices(file: str, ds: Dataset) -> list[_Slice]:
    """One ``_Slice`` per frame of an enhanced multi-frame object (functional groups)."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if not is_enhanced_multiframe(ds):
        if n > 1:
            raise DicomError(
                f"multi-frame object ({n} frames) without per-frame positions "
                "(no functional groups): cannot build a volume",
                path=file,
            )
        return [_single_frame_slice(file, ds)]
    out = []
    for f in range(n):
        where = f"{file} frame {f + 1}"
        pos = functional_group_item(ds, f, "PlanePositionSequence")
        ori = functional_group_item(ds, f, "PlaneOrientationSequence")
        meas = functional_group_item(ds, f, "PixelMeasuresSequence")
        if pos is None or "ImagePositionPatient" not in pos:
            raise DicomError(_MISSING["ImagePositionPatient"] + " (PlanePositionSequence)", path=where)
        if ori is None or "ImageOrientationPatient" not in ori:
            raise DicomError(_MISSING["ImageOrientationPatient"] + " (PlaneOrientationSequence)", path=where)
        if meas is None or "PixelSpacing" not in meas:
            raise DicomError(_MISSING["PixelSpacing"] + " (PixelMeasuresSequence)", path=where)
        pvt = functional_group_item(ds, f, "PixelValueTransformationSequence")
        src = pvt if pvt is not None else ds
        out.append(
            _Slice(
                file=file,
                frame=f + 1,
                header=ds,
                ipp=_floats(pos.ImagePositionPatient, 3, "ImagePositionPatient", where),
                iop=_floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient", where),
                pixel_spacing=_floats(meas.PixelSpacing, 2, "PixelSpacing", where),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                slope=_opt_float(src.get("RescaleSlope")) or 1.0,
                intercept=_opt_float(src.get("RescaleIntercept")) or 0.0,
                thickness=_opt_float(meas.get("SpacingBetweenSlices")) or _opt_float(meas.get("SliceThickness")),
            )
        )
    return out


def _where(s: _Slice) -> str:
    return s.file if s.frame == 1 and not is_enhanced_multiframe(s.header) else f"{s.file} (frame {s.frame})"


def _check_and_sort(slices: list[_Slice], slice_tolerance: float, split_note: str) -> list[_Slice]:
    """Validate one stack's geometry and return it sorted along the normal."""
    ref = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (ref.rows, ref.columns):
            raise DicomError(
                f"inconsistent Rows/Columns in one series: {s.columns}x{s.rows} here, "
                f"{ref.columns}x{ref.rows} in {_where(ref)}",
                path=_where(s),
            )
        if np.max(np.abs(s.iop - ref.iop)) > IOP_TOLERANCE:
            angle = np.degrees(
                np.arccos(
                    np.clip(abs(np.dot(np.cross(s.iop[:3], s.iop[3:]), np.cross(ref.iop[:3], ref.iop[3:]))), 0, 1)
                )
            )
            raise DicomError(
                f"mixed image orientations in one series: this plane is {angle:.2f} deg from that of {_where(ref)}",
                path=_where(s),
            )
        if not np.allclose(s.pixel_spacing, ref.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise DicomError(
                f"inconsistent PixelSpacing in one series: {s.pixel_spacing.tolist()} mm here, "
                f"{ref.pixel_spacing.tolist()} mm in {_where(ref)}",
                path=_where(s),
            )
    row, col = ref.iop[:3], ref.iop[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(np.dot(row, col)) > 1e-2:
        raise DicomError(
            f"ImageOrientationPatient {ref.iop.tolist()} is not two orthogonal unit vectors", path=_where(ref)
        )
    normal /= np.linalg.norm(normal)
    for s in slices:
        s.position = float(np.dot(s.ipp, normal))
    slices = sorted(slices, key=lambda s: s.position)
    if len(slices) == 1:
        return slices

    pos = np.array([s.position for s in slices])
    steps = np.diff(pos)
    dup = np.flatnonzero(steps < _DUPLICATE_MM)
    if dup.size:
        a, b = slices[dup[0]], slices[dup[0] + 1]
        raise DicomError(
            f"duplicate slice positions ({dup.size} pair(s)): e.g. "
            f"{_where(a)} and {_where(b)} both at {a.position:.3f} mm along the normal "
            "(duplicate files, or a multi-echo/temporal series: select one stack)",
            path=_where(b),
        )
    base = float(np.min(steps))
    ratio = steps / base
    bad = np.flatnonzero(np.abs(ratio - 1) > slice_tolerance)
    if bad.size:
        n_missing = np.rint(ratio[bad]).astype(int) - 1
        gap_like = (n_missing >= 1) & (
            np.abs(ratio[bad] - np.rint(ratio[bad])) <= slice_tolerance * np.rint(ratio[bad])
        )
        if np.all(gap_like):
            b0 = bad[0]
            a, b = slices[b0], slices[b0 + 1]
            hint = f" ({split_note})" if split_note else ""
            raise DicomError(
                f"missing slice(s): {int(n_missing.sum())} slice(s) missing in {bad.size} gap(s); "
                f"e.g. {int(n_missing[0])} missing between {_where(a)} at {a.position:.3f} mm and "
                f"{_where(b)} at {b.position:.3f} mm (spacing {base:.3f} mm){hint}",
                path=_where(b),
            )
        b0 = bad[0]
        a, b = slices[b0], slices[b0 + 1]
        raise DicomError(
            f"uneven slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm "
            f"(tolerance {slice_tolerance:.0%}), e.g. {steps[b0]:.3f} mm between {_where(a)} and "
            f"{_where(b)}; resample the series to even spacing first",
            path=_where(b),
        )

    # Gantry tilt: slice positions drift sideways from the normal line through the first slice.
    offsets = np.array([s.ipp - slices[0].ipp for s in slices])
    lateral = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(lateral, axis=1)
    limit = max(_TILT_DRIFT_FLOOR_MM, _TILT_DRIFT_PIXELS * float(np.min(ref.pixel_spacing)))
    if drift.max() > limit:
        angle = np.degrees(np.arctan2(drift[-1], pos[-1] - pos[0]))
        raise DicomError(
            f"gantry/detector tilt: slice positions are not along the slice normal (tilted by "
            f"{angle:.2f} deg; {drift.max():.2f} mm sideways over the stack, from {_where(slices[0])} "
            f"to {_where(slices[int(np.argmax(drift))])}); tilted series are not supported, "
            "resample them first",
            path=_where(slices[-1]),
        )
    return slices


def _affine_lps(slices: list[_Slice]) -> np.ndarray:
    """Voxel (i = column, j = row, k = sorted slice) -> LPS (mm) affine of the sorted slices."""
    ref = slices[0]
    row, col = ref.iop[:3], ref.iop[3:]
    affine = np.eye(4)
    affine[:3, 0] = row * ref.pixel_spacing[1]
    affine[:3, 1] = col * ref.pixel_spacing[0]
    if len(slices) > 1:
        affine[:3, 2] = (slices[-1].ipp - slices[0].ipp) / (len(slices) - 1)
    else:
        normal = np.cross(row, col)
        affine[:3, 2] = normal / np.linalg.norm(normal) * (ref.thickness or 1.0)
    affine[:3, 3] = slices[0].ipp
    return affine


def _check_transfer_syntax(file: str, ds: Dataset) -> None:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None:
        raise DicomError("no TransferSyntaxUID in the file meta information", path=file)
    ts = UID(str(ts))
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise DicomError(
            f"unsupported transfer syntax {ts.name} ({ts}): no pixel data decoder for it", path=file
        ) from exc
    if not decoder.is_available:
        missing = (
            "; ".join(f"{k}: needs {', '.join(v)}" for k, v in decoder.missing_dependencies.items())
            if hasattr(decoder, "missing_dependencies")
            else ""
        )
        raise DicomError(
            f"transfer syntax {ts.name} ({ts}) cannot be decoded here ({missing or 'no plugin'})", path=file
        )


# Plugin order for compressed syntaxes. GDCM comes last and only when nothing else is installed for
# the syntax: on corrupt JPEG 2000 data it aborts the whole process (uncaught C++ exception) instead of
# raising, so it must never be the fallback after another plugin failed.
_PLUGIN_ORDER = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")


def _pixel_array(file: str, ds: Dataset, ts: UID) -> np.ndarray:
    decoder = get_decoder(ts)
    if decoder.is_native:
        plugins: list[str] = [""]
    else:
        available = set(decoder.available_plugins)
        plugins = [p for p in _PLUGIN_ORDER if p in available] or [p for p in available if p == "gdcm"]
    errors = []
    for plugin in plugins:
        try:
            return pixel_array(ds, decoding_plugin=plugin)
        except Exception as exc:  # noqa: BLE001 - decoders raise ValueError, RuntimeError, ...
            errors.append(f"{plugin + ': ' if plugin else ''}{type(exc).__name__}: {exc}".replace("\n", " "))
    hint = " (file truncated?)" if any("less than expected" in e for e in errors) else ""
    raise DicomError(
        f"cannot decode pixel data{hint} ({ts.name}, {ts}): {'; '.join(errors) or 'no decoder'}", path=file
    )


def _decode(file: str, slices: list[_Slice], ks: list[int], out: np.ndarray) -> None:
    """Decode ``file`` and write its frames ``slices`` to ``out[ks]`` ([k, j, i], float32)."""
    header = slices[0].header
    ts = UID(str(header.file_meta.TransferSyntaxUID))
    try:
        ds = pydicom.dcmread(file, force=False)
    except Exception as exc:  # noqa: BLE001
        raise DicomError(f"cannot read the file ({type(exc).__name__}: {exc})", path=file) from exc
    if "PixelData" not in ds:
        kind = "FloatPixelData/DoubleFloatPixelData" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else ""
        raise DicomError(
            f"no pixel data (7FE0,0010){' (float pixel data is not supported)' if kind else ''}", path=file
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            f"PhotometricInterpretation {photometric}: only greyscale (MONOCHROME1/2) images can be segmented",
            path=file,
        )
    arr = _pixel_array(file, ds, ts)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames == 1:
        arr = arr[None]
    if arr.shape[1:] != (slices[0].rows, slices[0].columns) or arr.ndim != 3:
        raise DicomError(
            f"decoded pixel array has shape {arr.shape}, expected {slices[0].rows}x{slices[0].columns} per frame",
            path=file,
        )
    modality_lut = "ModalityLUTSequence" in ds
    if photometric == "MONOCHROME1":
        bits = int(ds.get("BitsStored", ds.BitsAllocated))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    for s, k in zip(slices, ks):
        frame = arr[s.frame - 1]
        if photometric == "MONOCHROME1":
            frame = (lo + hi) - frame.astype(np.int64)  # min <-> max of the stored range
        if modality_lut:
            out[k] = apply_modality_lut(frame, ds)
        else:
            np.multiply(frame, np.float32(s.slope), out=out[k], casting="unsafe")
            if s.intercept:
                out[k] += np.float32(s.intercept)


def default_decode_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def read_series_info(
    info: SeriesInfo, *, slice_tolerance: float = 0.01, decode_workers: int | None = None, selection_reason: str = ""
) -> SeriesVolume:
    """Read a series found by ``scan_folder`` (see ``read_series``)."""
    if not info.is_image:
        raise DicomError(
            f"series {info.key} is a {info.modality} object, not an image series",
            path=info.files[0] if info.files else None,
        )
    slices: list[_Slice] = []
    for file, ds in zip(info.files, info.headers):
        slices.extend(_multiframe_slices(file, ds))
    slices = _check_and_sort(slices, slice_tolerance, info.split_note)
    affine_lps = _affine_lps(slices)
    for file, ds in dict(zip(info.files, info.headers)).items():
        _check_transfer_syntax(file, ds)

    by_file: dict[str, tuple[list[_Slice], list[int]]] = {}
    for k, s in enumerate(slices):
        lst = by_file.setdefault(s.file, ([], []))
        lst[0].append(s)
        lst[1].append(k)
    out = np.empty((len(slices), slices[0].rows, slices[0].columns), dtype=np.float32)
    workers = default_decode_workers() if decode_workers is None else max(1, int(decode_workers))
    jobs = [(f, sl, ks) for f, (sl, ks) in by_file.items()]
    if workers == 1 or len(jobs) == 1:
        for f, sl, ks in jobs:
            _decode(f, sl, ks, out)
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            # list() re-raises the first worker exception (a DicomError naming its file).
            list(pool.map(lambda job: _decode(*job, out), jobs))

    volume = SeriesVolume(
        array=out.transpose(2, 1, 0),  # [k, j, i] -> [i, j, k] (a view)
        affine_lps=affine_lps,
        datasets=[s.header for s in slices],
        frame_numbers=[s.frame for s in slices],
        series_instance_uid=info.uid,
        selection_reason=selection_reason,
        source_files=[s.file for s in slices],
    )
    logger.info(
        "read series %s: %d x %d x %d voxels, spacing %s mm (%s)",
        info.key,
        *volume.shape,
        np.round(volume.spacing, 4).tolist(),
        selection_reason or "given",
    )
    return volume


def read_series(
    path: str | os.PathLike,
    series_uid: str | None = None,
    rules: dict | None = None,
    *,
    slice_tolerance: float = 0.01,
    decode_workers: int | None = None,
) -> SeriesVolume:
    """Read one image series from a folder (recursive) or a single DICOM file.

    Args:
        path: folder with DICOM files (other files are skipped), or one DICOM file.
        series_uid: SeriesInstanceUID or ``SeriesInfo.key`` to read (``--series-uid``).
        rules: selection rules (see ``select_series``) used when ``series_uid`` is not given; with
            neither, the image series with the most slices is read.
        slice_tolerance: allowed relative deviation of each slice step from the smallest step
            (0.01 = 1 %); also the tolerance for recognising a gap of whole missing slices.
        decode_workers: threads decoding files in parallel (default ``min(8, cpu_count)``; 1 =
            serial).

    Returns:
        SeriesVolume with ``array`` [i, j, k] float32 in modality units, ``affine_lps`` (mm),
        headers (no pixel data), frame numbers, source files and the selection reason.

    Raises:
        DicomError: the path, series or files cannot give a correct volume (message names the file
            or folder and the problem; never patient data).
    """
    result = scan(path)
    if not result.series:
        detail = "; ".join(f"{Path(f).name}: {why}" for f, why in result.skipped[:5])
        more = f" (+{len(result.skipped) - 5} more)" if len(result.skipped) > 5 else ""
        raise DicomError(f"no DICOM files found among {result.n_files} file(s): {detail}{more}", path=path)
    if not any(s.is_image for s in result.series) and not series_uid:
        raise DicomError(
            "no DICOM image series found (only: " + ", ".join(sorted({s.modality or "?" for s in result.series})) + ")",
            path=path,
        )
    try:
        info, reason = select_series(result.series, series_uid, rules)
    except DicomError as exc:
        raise DicomError(str(exc), path=path) from exc
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
            info, slice_tolerance=slice_tolerance, decode_workers=decode_workers, selection_reason=reason
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
    "default_decode_workers",
    "load_dicom_as_metatensor",
    "read_series",
    "read_series_info",
    "scan_folder",
    "select_series",
    "SeriesInfo",
]
