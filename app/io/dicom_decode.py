"""Decode the stored pixel values of DICOM files whose headers the scan already read.

Three ways, all returning the stored values of the asked frames as ``(n, Rows, Columns)`` arrays of
the dtype pydicom gives (BitsAllocated and PixelRepresentation), before any rescale:

* ``native_frames``: uncompressed little/big endian pixel data read straight from its file offset
  (found by the scan, ``PixelLocation``) into a preallocated array, with pydicom's handling of
  BitsStored < BitsAllocated (unused high bits cleared or sign-extended). ``None`` for anything
  unusual (1-bit, colour, deflated...), which then goes to pydicom.
* ``codec_frames``: the pixel data element read from its offset into a small dataset that holds
  only the Image Pixel module, decoded by pydicom's decoders (a plugin order that avoids GDCM
  aborting the process on corrupt JPEG 2000). A top-level function: it runs in worker processes,
  since the JPEG 2000 decoders hold the GIL and threads would not run them in parallel.
* ``reference_frames``: the plain pydicom path (``dcmread`` of the whole file, ``pixel_array``),
  kept as the reference the fast paths are tested against (``read_series(..., fast=False)``).

Errors are ``DicomError`` naming the file; they are raised in workers and pickled back intact.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from app.errors import DicomError
from app.io.dicom_info import PixelLocation

# Plugin order for compressed syntaxes. GDCM comes last and only when nothing else is installed for
# the syntax: on corrupt JPEG 2000 data it aborts the whole process (uncaught C++ exception) instead of
# raising, so it must never be the fallback after another plugin failed.
_PLUGIN_ORDER = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")
_NATIVE = {str(ExplicitVRLittleEndian): "<", str(ImplicitVRLittleEndian): "<", str(ExplicitVRBigEndian): ">"}
PIXEL_MODULE = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "PlanarConfiguration",
)
_ITEM, _SEQ_END = 0xFFFEE000, 0xFFFEE0DD
# What pydicom requires to decode native pixel data (the fast path asks no less).
_REQUIRED = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PhotometricInterpretation",
)


def transfer_syntax(file: str, ds: Dataset) -> UID:
    """The file's TransferSyntaxUID, checked to be decodable here.

    Raises:
        DicomError: none in the file meta, unsupported, or its decoder needs a missing plugin.
    """
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
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
        missing = "; ".join(str(m) for m in getattr(decoder, "missing_dependencies", []))
        raise DicomError(
            f"transfer syntax {ts.name} ({ts}) cannot be decoded here ({missing or 'no plugin'})", path=file
        )
    return ts


def pixel_description(ds: Dataset) -> dict[str, Any]:
    """The Image Pixel module of ``ds`` as plain values (picklable, for worker processes)."""
    return {name: value for name in PIXEL_MODULE if (value := ds.get(name)) is not None}


def pixel_vrs(ds: Dataset) -> dict[str, str]:
    """The VRs of the Image Pixel module's elements as written (a damaged file may use others)."""
    return {name: str(ds[name].VR) for name in PIXEL_MODULE if name in ds}


def _int(desc: dict[str, Any], name: str, default: int | None = None) -> int | None:
    try:
        value = desc.get(name, default)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def stored_dtype(desc: dict[str, Any]) -> np.dtype | None:
    """The dtype pydicom decodes to (BitsAllocated 8/16/32, PixelRepresentation), ``None`` otherwise."""
    bits = _int(desc, "BitsAllocated")
    signed = _int(desc, "PixelRepresentation", 0) == 1
    if bits not in (8, 16, 32):
        return None
    return np.dtype(f"{'i' if signed else 'u'}{bits // 8}")


def frame_bytes(desc: dict[str, Any]) -> int | None:
    """Bytes of one native frame (Rows x Columns x SamplesPerPixel x BitsAllocated / 8), ``None`` if unknown."""
    rows, cols, spp, bits = (_int(desc, k) for k in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated"))
    if not rows or not cols or not bits or bits % 8:
        return None
    return rows * cols * (spp or 1) * bits // 8


def _short_error(file: str, ts: UID, have: int, expected: int) -> DicomError:
    return DicomError(
        f"cannot decode pixel data (file truncated?) ({ts.name}, {ts}): the pixel data holds {have} "
        f"bytes, less than expected {expected}",
        path=file,
    )


def native_frames(file: str, loc: PixelLocation, desc: dict[str, Any], ts: UID, frames: list[int]) -> np.ndarray | None:
    """Stored values of ``frames`` (0-based) read from the file offset; ``None`` when pydicom must decode
    (not little/big endian native, not 8/16/32 bits, colour, float pixel data).

    Raises:
        DicomError: the pixel data is shorter than Rows x Columns x NumberOfFrames (truncated).
    """
    order = _NATIVE.get(str(ts))
    dtype = stored_dtype(desc)
    if order is None or dtype is None or loc.encapsulated or loc.keyword != "PixelData":
        return None
    if any(desc.get(name) in (None, "") for name in _REQUIRED) or not all(
        isinstance(desc[name], int) for name in (*_REQUIRED[:-1], "NumberOfFrames") if name in desc
    ):
        return None  # pydicom refuses such data (missing, or not integers): let it say what is wrong
    rows, cols, bits, stored = (int(desc[k]) for k in ("Rows", "Columns", "BitsAllocated", "BitsStored"))
    n_total = int(desc.get("NumberOfFrames", 1))
    # What pydicom checks before decoding (so that both refuse the same files).
    if (
        int(desc["SamplesPerPixel"]) != 1
        or int(desc["PixelRepresentation"]) not in (0, 1)
        or n_total < 1
        or not 0 < rows < 65536
        or not 0 < cols < 65536
        or not 1 <= stored <= bits
    ):
        return None
    per_frame = rows * cols * dtype.itemsize
    expected = per_frame * n_total
    if loc.length < expected:
        raise _short_error(file, ts, loc.length, expected)
    out = np.empty((len(frames), rows, cols), dtype=dtype.newbyteorder("<" if order == "<" else ">"))
    try:
        with open(file, "rb", buffering=0) as f:
            available = min(loc.length, os.fstat(f.fileno()).st_size - loc.offset)
            if available < expected:
                raise _short_error(file, ts, max(0, available), expected)
            pos = 0
            for first, count in _runs(frames):  # consecutive frames in one read
                f.seek(loc.offset + first * per_frame)
                view = memoryview(out[pos : pos + count].reshape(-1).view(np.uint8))  # type: ignore[arg-type]
                got = 0
                while got < len(view):  # raw reads may return short counts
                    more = f.readinto(view[got:])
                    if not more:
                        raise _short_error(file, ts, first * per_frame + got, expected)
                    got += more
                pos += count
    except OSError as exc:
        raise DicomError(f"cannot read the pixel data ({type(exc).__name__}: {exc})", path=file) from exc
    if not out.dtype.isnative:
        out = out.astype(dtype)
    if stored < bits:  # as pydicom: clear (unsigned) or sign-extend (signed) the unused high bits
        shift = bits - stored
        np.left_shift(out, shift, out=out)
        np.right_shift(out, shift, out=out)
    return out


def _runs(frames: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of frame indices: [(first, count), ...] in the given order."""
    runs: list[tuple[int, int]] = []
    for f in frames:
        if runs and runs[-1][0] + runs[-1][1] == f:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((f, 1))
    return runs


def _encapsulated_value(file: str, loc: PixelLocation) -> bytes:
    """The encapsulated PixelData value (items up to, not including, the sequence delimiter)."""
    with open(file, "rb") as f:
        f.seek(loc.offset)
        data = f.read()
    pos, end = 0, len(data)
    while pos + 8 <= end:
        tag = struct.unpack_from("<HH", data, pos)
        tag_value = tag[0] << 16 | tag[1]
        length = struct.unpack_from("<I", data, pos + 4)[0]
        if tag_value == _SEQ_END:
            return data[:pos]
        if tag_value != _ITEM or length == 0xFFFFFFFF:
            break  # damaged: let pydicom say what is wrong
        pos += 8 + length
    return data[:pos] if pos <= end else data


def count_encapsulated_frames(file: str, loc: PixelLocation, n_declared: int) -> int | None:
    """Frames held by encapsulated pixel data when that is certain: the Basic Offset Table's entries,
    or the number of fragments when it is below ``n_declared`` (a frame takes at least one); else ``None``."""
    try:
        value = _encapsulated_value(file, loc)
    except OSError:
        return None
    if len(value) < 8 or struct.unpack_from("<HH", value, 0) != (0xFFFE, 0xE000):
        return None
    bot = struct.unpack_from("<I", value, 4)[0]
    if bot:
        return bot // 4
    pos, n = 8, 0
    while pos + 8 <= len(value):
        n += 1
        pos += 8 + struct.unpack_from("<I", value, pos + 4)[0]
    return n if n < n_declared else None


def _decode_with_plugins(file: str, ds: Dataset, ts: UID, index: int | None) -> np.ndarray:
    decoder = get_decoder(ts)
    if decoder.is_native:
        plugins: list[str] = [""]
    else:
        available = set(decoder.available_plugins)
        plugins = [p for p in _PLUGIN_ORDER if p in available] or [p for p in available if p == "gdcm"]
    errors = []
    for plugin in plugins:
        try:
            return pixel_array(ds, index=index, decoding_plugin=plugin)
        except Exception as exc:  # noqa: BLE001 - decoders raise ValueError, RuntimeError, ...
            errors.append(f"{plugin + ': ' if plugin else ''}{type(exc).__name__}: {exc}".replace("\n", " "))
    hint = " (file truncated?)" if any("less than expected" in e for e in errors) else ""
    raise DicomError(
        f"cannot decode pixel data{hint} ({ts.name}, {ts}): {'; '.join(errors) or 'no decoder'}", path=file
    )


def _frames_of(file: str, ds: Dataset, ts: UID, frames: list[int]) -> np.ndarray:
    raw = ds.get("NumberOfFrames", 1)
    n_total = max(1, int(raw or 1)) if isinstance(raw, int) else 0
    # Whole-object decoding unless frames are asked for (and NumberOfFrames is an integer: pydicom
    # decodes single frames of objects it refuses as a whole).
    if n_total <= 1 or len(frames) == n_total:
        arr = _decode_with_plugins(file, ds, ts, None)
        arr = arr[None] if arr.ndim == 2 else arr
        if arr.ndim != 3:
            raise DicomError(
                f"decoded pixel array has shape {arr.shape}, expected {ds.get('Rows')}x{ds.get('Columns')} per frame",
                path=file,
            )
        return arr if frames == list(range(n_total)) else arr[frames]
    return np.stack([_decode_with_plugins(file, ds, ts, f) for f in frames])


def codec_frames(
    file: str, loc: PixelLocation, desc: dict[str, Any], vrs: dict[str, str], ts_uid: str, frames: list[int]
) -> np.ndarray:
    """Stored values of ``frames`` (0-based) decoded by pydicom from the pixel data at ``loc`` (any syntax
    pydicom decodes), without parsing the rest of the header. Runs in worker processes.

    Args:
        desc, vrs: ``pixel_description`` and ``pixel_vrs`` of the file's header.
    """
    ts = UID(ts_uid)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    for name, value in desc.items():
        ds[name] = DataElement(tag_for_keyword(name) or 0, vrs.get(name) or dictionary_VR(name), value)
    try:
        if loc.encapsulated:
            ds.PixelData = _encapsulated_value(file, loc)
            ds["PixelData"].VR = "OB"
        else:
            with open(file, "rb") as f:
                f.seek(loc.offset)
                ds.PixelData = f.read(loc.length)
            ds["PixelData"].VR = "OB" if (_int(desc, "BitsAllocated") or 0) <= 8 else "OW"
    except OSError as exc:
        raise DicomError(f"cannot read the pixel data ({type(exc).__name__}: {exc})", path=file) from exc
    return _frames_of(file, ds, ts, frames)


def reference_frames(file: str, frames: list[int]) -> np.ndarray:
    """Stored values of ``frames`` the plain pydicom way: read the whole file, decode with ``pixel_array``."""
    try:
        ds = pydicom.dcmread(file, force=False)
    except Exception as exc:
        raise DicomError(f"cannot read the file ({type(exc).__name__}: {exc})", path=file) from exc
    if "PixelData" not in ds:
        floats = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        raise DicomError(
            f"no pixel data (7FE0,0010){' (float pixel data is not supported)' if floats else ''}", path=file
        )
    return _frames_of(file, ds, UID(str(ds.file_meta.TransferSyntaxUID)), frames)


def decode_processes(requested: int | None, n_jobs: int) -> int:
    """How many processes to decode ``n_jobs`` compressed files with (1 = in this process)."""
    if n_jobs < 2:
        return 1
    n = requested if requested is not None else min(8, os.cpu_count() or 1)
    return max(1, min(int(n), n_jobs))


def frames_per_job(n_frames: int, workers: int) -> int:
    """Frames per job when one multi-frame file is split between ``workers`` processes."""
    return max(1, math.ceil(n_frames / max(1, workers * 2)))
