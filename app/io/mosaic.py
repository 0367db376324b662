"""Siemens mosaic images: one file holds all slices of a 2D multi-slice acquisition as tiles.

Siemens writes EPI (fMRI, DWI) slices as a ``grid x grid`` mosaic of ``tile_rows x tile_columns``
tiles, ``grid = ceil(sqrt(n))``, tiles filled row by row from the top left (ImageType contains
MOSAIC). Read as written it is one huge slice: a wrong volume. This module finds the layout and the
place of each tile:

* ``n`` (NumberOfImagesInMosaic) comes from the CSA image header (0029,xx10), or else from the
  private element (0019,xx0A) of "SIEMENS MR HEADER"; with neither the file is refused.
* ImagePositionPatient of a mosaic is the corner of the whole tiled image as if it were one slice
  of ``Rows x Columns`` pixels centred on the tiles' centre. The first voxel of every tile is
  therefore at ``IPP + row_cos * dc * (Columns - tile_columns) / 2 + col_cos * dr * (Rows -
  tile_rows) / 2`` (dc, dr = column and row spacing; PixelSpacing is ``[dr, dc]``); this is the
  shift dcm2niix and nibabel apply (``tests/io/test_mosaic.py`` checks it against dcm2niix's output).
* Tile ``t`` lies ``t * spacing`` further along the CSA SliceNormalVector. That vector is parallel
  to ``row_cos x col_cos``; its sign says whether the tiles run along that normal or against it.
  Without a CSA header the tiles are taken to run along ``row_cos x col_cos`` (logged).
* The slice spacing is SpacingBetweenSlices (0018,0088, centre to centre, what dcm2niix uses), or
  SliceThickness (0018,0050) when that is absent (logged): a mosaic file holds one position only,
  so the spacing cannot be measured from positions.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from app.errors import DicomError
from app.io.csa import CsaError, csa_floats, csa_image_header, parse_csa

logger = logging.getLogger(__name__)

# |cos| between the CSA slice normal and row x col below which the file contradicts itself (~0.8 deg).
_NORMAL_PARALLEL = 0.9999


@dataclass(frozen=True)
class MosaicLayout:
    """How a mosaic's tiles are laid out.

    Attributes:
        n_images: number of slices (tiles holding data).
        grid: tiles per mosaic row and per mosaic column.
        tile_rows, tile_columns: size of one tile (one slice) in pixels.
        direction: +1 when tile ``t + 1`` lies one spacing further along ``row_cos x col_cos``
            than tile ``t``, -1 when it lies against it.
        count_source, direction_source: where ``n_images`` and ``direction`` came from (for messages).
    """

    n_images: int
    grid: int
    tile_rows: int
    tile_columns: int
    direction: float
    count_source: str
    direction_source: str

    def tile_origin(self, t: int) -> tuple[int, int]:
        """(first row, first column) of tile ``t`` (0-based) in the mosaic image, in pixels."""
        return (t // self.grid) * self.tile_rows, (t % self.grid) * self.tile_columns


def _siemens_mr_count(ds: Dataset) -> int | None:
    """(0019,xx0A) NumberOfImagesInMosaic under "SIEMENS MR HEADER" (US; bytes when read as UN)."""
    try:
        elem = ds.get_private_item(0x0019, 0x0A, "SIEMENS MR HEADER")
        value = elem.value
    except Exception:  # noqa: BLE001 - absent or damaged private block
        return None
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 2:
            return None
        little = getattr(ds, "original_encoding", (None, True))[1] is not False
        return int(struct.unpack("<H" if little else ">H", bytes(value))[0])
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) == 1 else None
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def mosaic_layout(ds: Dataset, row_cos: np.ndarray, col_cos: np.ndarray, where: str) -> MosaicLayout:
    """The tile layout of the mosaic ``ds`` (its plane given by the direction cosines).

    Raises:
        DicomError: no NumberOfImagesInMosaic, a damaged CSA header, counts that disagree, a mosaic
            that does not divide into the tiles, or a slice normal that contradicts the plane.
    """
    csa_bytes = csa_image_header(ds)
    csa: dict[str, list[str]] | None = None
    if csa_bytes is not None:
        try:
            csa = parse_csa(csa_bytes)
        except CsaError as exc:
            raise DicomError(f"Siemens mosaic with a damaged CSA image header (0029,1010): {exc}", path=where) from exc
    try:
        csa_n = csa_floats(csa, "NumberOfImagesInMosaic") if csa else None
        csa_normal = csa_floats(csa, "SliceNormalVector") if csa else None
    except CsaError as exc:
        raise DicomError(f"Siemens mosaic with a damaged CSA image header (0029,1010): {exc}", path=where) from exc
    tag_n = _siemens_mr_count(ds)
    if csa_n is not None:
        if len(csa_n) != 1 or not math.isfinite(csa_n[0]) or csa_n[0] != int(csa_n[0]):
            raise DicomError(f"Siemens mosaic: CSA NumberOfImagesInMosaic is not one integer ({csa_n!r})", path=where)
        n, source = int(csa_n[0]), "CSA NumberOfImagesInMosaic"
        if tag_n is not None and tag_n != n:
            raise DicomError(
                f"Siemens mosaic: CSA NumberOfImagesInMosaic {n} disagrees with (0019,100A) {tag_n}", path=where
            )
    elif tag_n is not None:
        n, source = tag_n, "(0019,100A) NumberOfImagesInMosaic"
    else:
        raise DicomError(
            "Siemens MOSAIC image without NumberOfImagesInMosaic (no CSA image header (0029,1010) "
            "value and no (0019,100A)): cannot unpack its slices",
            path=where,
        )
    rows, columns = int(ds.Rows), int(ds.Columns)
    if not 1 <= n <= rows * columns:
        raise DicomError(f"Siemens mosaic: NumberOfImagesInMosaic {n} ({source}) is out of range", path=where)
    grid = math.ceil(math.sqrt(n))
    if rows % grid or columns % grid:
        raise DicomError(
            f"Siemens mosaic of {columns}x{rows} pixels does not divide into a {grid}x{grid} grid of "
            f"tiles ({n} images, {source})",
            path=where,
        )

    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    if csa_normal is not None:
        v = np.asarray(csa_normal, dtype=np.float64)
        norm = float(np.linalg.norm(v)) if v.shape == (3,) and np.all(np.isfinite(v)) else 0.0
        if norm < 1e-6:
            raise DicomError(f"Siemens mosaic: CSA SliceNormalVector {csa_normal!r} is not a 3-vector", path=where)
        cos = float(np.dot(v / norm, normal))
        if abs(cos) < _NORMAL_PARALLEL:
            raise DicomError(
                f"Siemens mosaic: CSA SliceNormalVector {np.round(v, 6).tolist()} is not along the "
                f"image plane's normal {np.round(normal, 6).tolist()} "
                f"({math.degrees(math.acos(min(1.0, abs(cos)))):.2f} deg apart)",
                path=where,
            )
        direction, dsource = (1.0 if cos > 0 else -1.0), "CSA SliceNormalVector"
    else:
        direction, dsource = 1.0, "row x column cosines (no CSA SliceNormalVector)"
        logger.warning(
            "%s: Siemens mosaic without a CSA SliceNormalVector: assuming its slices run along row x column cosines",
            where,
        )
    return MosaicLayout(n, grid, rows // grid, columns // grid, direction, source, dsource)


def mosaic_spacing(ds: Dataset, where: str) -> tuple[float, str]:
    """(slice spacing in mm, which attribute gave it): SpacingBetweenSlices, else SliceThickness.

    Raises:
        DicomError: neither is a finite positive number.
    """
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        raw = ds.get(name)
        if raw in (None, ""):
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError) as exc:
            raise DicomError(f"{name} is not numeric ({raw!r})", path=where) from exc
        if not math.isfinite(value) or value <= 0:
            raise DicomError(f"{name} must be a finite positive spacing in mm, found {raw!r}", path=where)
        if name == "SliceThickness":
            logger.warning(
                "%s: Siemens mosaic without SpacingBetweenSlices: slice spacing from SliceThickness (%.4g mm)",
                where,
                value,
            )
        return value, name
    raise DicomError(
        "Siemens mosaic without SpacingBetweenSlices or SliceThickness: the slice spacing is unknown", path=where
    )


def tile_positions(
    ipp: np.ndarray,
    row_cos: np.ndarray,
    col_cos: np.ndarray,
    pixel_spacing: np.ndarray,
    rows: int,
    columns: int,
    layout: MosaicLayout,
    spacing: float,
) -> np.ndarray:
    """LPS position (mm) of the first voxel of every tile, ``(n_images, 3)`` in tile order.

    Args:
        ipp: the mosaic's ImagePositionPatient (mm).
        row_cos, col_cos: the direction cosines (ImageOrientationPatient).
        pixel_spacing: PixelSpacing ``[row spacing, column spacing]`` (mm).
        rows, columns: the mosaic's Rows and Columns (pixels).
        layout: from ``mosaic_layout``.
        spacing: slice spacing (mm), from ``mosaic_spacing``.
    """
    dr, dc = float(pixel_spacing[0]), float(pixel_spacing[1])
    first = (
        np.asarray(ipp, dtype=np.float64)
        + row_cos * dc * (columns - layout.tile_columns) / 2.0
        + col_cos * dr * (rows - layout.tile_rows) / 2.0
    )
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    step = normal * spacing * layout.direction
    return first[None, :] + np.arange(layout.n_images)[:, None] * step[None, :]


def mosaic_n_images(ds: Dataset) -> int | None:
    """NumberOfImagesInMosaic for listings (CSA first, then (0019,100A)); ``None`` when unknown or damaged."""
    try:
        raw = csa_image_header(ds)
        values = csa_floats(parse_csa(raw), "NumberOfImagesInMosaic") if raw is not None else None
    except CsaError:
        values = None
    if values and len(values) == 1 and math.isfinite(values[0]) and values[0] >= 1:
        return int(values[0])
    n = _siemens_mr_count(ds)
    return n if n is not None and n >= 1 else None


__all__ = ["MosaicLayout", "mosaic_layout", "mosaic_n_images", "mosaic_spacing", "tile_positions"]
