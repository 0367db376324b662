"""NIfTI in and out: label maps and images as ``(array_ijk, affine_ras)``, written atomically.

Reading an untrusted file checks its header before any voxel is allocated (:func:`inspect_nifti`):
at least three non-empty axes, real or integer voxels, a finite non-singular voxel->RAS affine with
plausible voxel sizes, and voxel data that the file can actually hold: an uncompressed file must be
as long as its header says; a gzip file must be within deflate's best ratio of it and (unless its
trailer gives the exact length) must decompress, streamed and thrown away, to that length. Every
problem is an :class:`InputError` naming the file; too little memory for what is declared is an
:class:`EnvError`.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from app.errors import EnvError, InputError
from app.io.atomic import atomic_path

# Deflate cannot compress better than about 1032:1; a gzip file claiming more is lying or cut short.
MAX_GZIP_RATIO = 1100
# Voxel sizes outside this range (mm) are a broken header, not an image (0.1 um .. 10 m).
MIN_VOXEL_MM, MAX_VOXEL_MM = 1e-4, 1e4
_CHUNK = 1 << 20


@dataclass(frozen=True)
class NiftiInfo:
    """What a NIfTI header declares, checked against the file (see :func:`inspect_nifti`).

    Attributes:
        shape: the array shape ``(I, J, K[, T...])``.
        dtype: the stored voxel type (before scl_slope/inter).
        affine_ras: voxel ``(i, j, k, 1)`` -> RAS mm, as nibabel chooses it (sform, else qform, else pixdim).
        affine_source: ``sform`` | ``qform`` | ``pixdim`` (which header fields gave the affine).
        data_bytes: bytes of voxel data the header declares.
        compressed: a gzip file.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    affine_ras: np.ndarray
    affine_source: str
    data_bytes: int
    compressed: bool

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 kB`` (powers of 1000, as disk tools print them)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:160] + "..."


def _gzip_isize(path: Path) -> int | None:
    """The gzip trailer's ISIZE (uncompressed length mod 2**32 of the last member)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            return int(struct.unpack("<I", fh.read(4))[0])
    except OSError:
        return None


def _gzip_length_at_least(path: Path, needed: int) -> int:
    """Decompress ``path`` in chunks, keeping nothing, until ``needed`` bytes came out; return the count.

    Raises InputError for a corrupt or truncated stream that ends before ``needed``.
    """
    got = 0
    try:
        with gzip.open(path, "rb") as fh:
            while got < needed:
                chunk = fh.read(min(_CHUNK, needed - got))
                if not chunk:
                    break
                got += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        if got >= needed:
            return got
        raise InputError(
            f"truncated or corrupt gzip file ({_why(exc)}) after {format_bytes(got)} of the "
            f"{format_bytes(needed)} its header declares",
            path,
        ) from exc
    return got


def _gzip_problem(path: Path) -> str | None:
    """What is wrong with a ``.gz`` file's stream (read through, keeping nothing), or None."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(_CHUNK):
                pass
    except gzip.BadGzipFile as exc:
        if "not a gzipped file" in str(exc).lower():
            return f"not a gzip file, though its name ends in .gz ({_why(exc)})"
        return f"corrupt gzip file ({_why(exc)})"
    except (EOFError, OSError, zlib.error) as exc:
        return f"truncated or corrupt gzip file ({_why(exc)})"
    return None


def inspect_nifti(path: str | os.PathLike) -> NiftiInfo:
    """Read and check a NIfTI header against its file, allocating no voxels (see the module docstring).

    Raises:
        InputError: unreadable or not NIfTI, fewer than 3 or more than 4 dimensions, an empty axis, an
            unsupported voxel type, a NaN/Inf or singular affine, implausible voxel sizes, or voxel data
            that the file cannot hold (truncated file or lying header).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or exc})", p) from exc
    if not p.is_file():
        raise InputError("not a file", p)
    try:
        img = nib.load(str(p))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(f"not a NIfTI-1/-2 image (nibabel reads it as {type(img).__name__})", p)
        hdr = img.header
        shape = tuple(int(s) for s in img.shape)
        dtype = np.dtype(img.get_data_dtype())
        type_name = str(hdr.get_value_label("datatype"))
        offset = int(img.dataobj.offset)  # type: ignore[attr-defined]
        sform_code = int(hdr.get_sform(coded=True)[1] or 0)
        qform_code = int(hdr.get_qform(coded=True)[1] or 0)
        with np.errstate(all="ignore"):
            affine = np.asarray(img.affine, dtype=np.float64)
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # nibabel's errors on a malformed header are many; all mean "bad file"
        problem = _gzip_problem(p) if p.name.lower().endswith(".gz") else None
        if problem:  # a cut or corrupt stream says so, rather than nibabel's "cannot work out file type"
            raise InputError(problem, p) from exc
        raise InputError(f"not a readable NIfTI file ({_why(exc)})", p) from exc
    if len(shape) < 3:
        raise InputError(f"a {len(shape)}D image (shape {shape}); segapp segments 3D volumes", p)
    if any(s <= 0 for s in shape):
        raise InputError(f"the header declares an axis of length zero or less (shape {shape})", p)
    if len(shape) > 4 and any(s != 1 for s in shape[4:]):
        raise InputError(f"a {len(shape)}D image (shape {shape}); segapp reads 3D volumes (or 4D with one)", p)
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise InputError(f"voxel type {type_name} is not supported (integer or real voxels only)", p)
    source = "sform" if sform_code > 0 else "qform" if qform_code > 0 else "pixdim"
    _check_affine(affine, source, p)
    data_bytes = math.prod(shape) * dtype.itemsize
    needed = offset + data_bytes
    dims = " x ".join(str(s) for s in shape)
    declared = f"{dims} voxels of {dtype} ({format_bytes(data_bytes)} from byte {offset})"
    compressed = p.name.lower().endswith(".gz")
    if not compressed:
        if size < needed:
            raise InputError(
                f"the header declares {declared} but the file has {size} bytes (truncated, or a wrong header)", p
            )
    else:
        if needed > size * MAX_GZIP_RATIO:
            raise InputError(
                f"the header declares {declared}, more than a {format_bytes(size)} gzip file can hold "
                "(truncated, or a wrong header)",
                p,
            )
        if _gzip_isize(p) != needed % (1 << 32):  # the usual, exact trailer saves a pass over the stream
            got = _gzip_length_at_least(p, needed)
            if got < needed:
                raise InputError(
                    f"the header declares {declared} but the file decompresses to {got} bytes "
                    "(truncated, or a wrong header)",
                    p,
                )
    return NiftiInfo(shape, dtype, affine, source, data_bytes, compressed)


def _check_affine(affine: np.ndarray, source: str, path: Path) -> None:
    """A usable voxel->RAS affine: finite, affine bottom row, non-singular, plausible voxel sizes."""
    where = {"sform": "the sform (srow_x/y/z)", "qform": "the qform (quatern_*, qoffset_*, pixdim)"}.get(
        source, "pixdim (no sform or qform code)"
    )
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(f"the voxel-to-world affine from {where} holds NaN or Inf", path)
    m = affine[:3, :3]
    sizes = np.linalg.norm(m, axis=0)
    shown = ", ".join(f"{s:.3g}" for s in sizes)
    if not np.all(sizes > 0) or abs(np.linalg.det(m)) <= 1e-6 * float(np.prod(sizes)):
        raise InputError(
            f"the voxel-to-world affine from {where} is singular (voxel size {shown} mm; its axes do not span 3D)",
            path,
        )
    if np.any(sizes < MIN_VOXEL_MM) or np.any(sizes > MAX_VOXEL_MM):
        raise InputError(
            f"implausible voxel size {shown} mm from {where} (expected {MIN_VOXEL_MM:g} to {MAX_VOXEL_MM:g} mm)", path
        )


def save_nifti(array_ijk: np.ndarray, affine_ras: np.ndarray, output_path: str | Path, *, dtype=None) -> Path:
    """Save ``array_ijk`` with its voxel->RAS (mm) affine as NIfTI (``.nii`` or ``.nii.gz``).

    Both sform and qform are set (code 1, scanner anatomical) so every reader sees the same grid.
    """
    array_ijk = np.asarray(array_ijk)
    if array_ijk.ndim not in (3, 4):
        raise ValueError(f"NIfTI output needs a 3D or 4D array, got shape {array_ijk.shape}")
    if dtype is not None:
        array_ijk = array_ijk.astype(dtype, copy=False)
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    img = nib.Nifti1Image(array_ijk, affine_ras)
    img.set_sform(affine_ras, code=1)
    img.set_qform(affine_ras, code=1)
    img.header.set_xyzt_units("mm")
    output_path = Path(output_path)
    with atomic_path(output_path) as tmp:
        nib.save(img, str(tmp))
    return output_path


def save_labels_nifti(labels_ijk: np.ndarray, affine_ras: np.ndarray, output_path: str | Path) -> Path:
    """Save an integer label map: uint8, or uint16 when a label exceeds 255."""
    labels_ijk = np.asarray(labels_ijk)
    if labels_ijk.dtype != bool and not np.issubdtype(labels_ijk.dtype, np.integer):
        raise ValueError(f"a label map must be integer, got {labels_ijk.dtype}")
    top = int(labels_ijk.max()) if labels_ijk.size else 0
    if labels_ijk.size and int(labels_ijk.min()) < 0:
        raise ValueError("a label map cannot hold negative labels")
    return save_nifti(labels_ijk, affine_ras, output_path, dtype=np.uint8 if top < 256 else np.uint16)


def load_nifti(path: str | Path, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI file as ``(array_ijk, affine_ras)`` after :func:`inspect_nifti` checked its header.

    Data are scaled by scl_slope/inter when set (float32); integer files without scaling keep their type.

    Args:
        path: ``.nii`` or ``.nii.gz``.
        max_bytes: refuse (``EnvError``) when the array as float32 would be larger (None: no limit).
    """
    info = inspect_nifti(path)
    if max_bytes is not None and info.voxels * 4 > max_bytes:
        raise EnvError(
            f"{' x '.join(map(str, info.shape))} voxels need {format_bytes(info.voxels * 4)} in memory as float32, "
            f"more than the {format_bytes(max_bytes)} allowed (free memory, or SEGAPP_MEMORY_LIMIT)",
            path,
        )
    try:
        img: Any = nib.load(str(path))
        # the array proxy holds scl_slope/inter (nibabel clears them in the loaded header)
        slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
        if np.issubdtype(img.get_data_dtype(), np.integer) and slope == 1.0 and inter == 0.0:
            array = np.asarray(img.dataobj)
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are the caller's check
                array = img.get_fdata(dtype=np.float32)
    except MemoryError as exc:
        raise EnvError(f"out of memory reading {format_bytes(info.voxels * 4)} of voxels", path) from exc
    except Exception as exc:  # a header that passed the checks but data nibabel cannot read
        raise InputError(f"cannot read the voxel data ({_why(exc)})", path) from exc
    return array, info.affine_ras.copy()
