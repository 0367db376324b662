"""A DICOM series as one volume: voxels, the LPS affine and the source headers, in slice order."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from app.io.geometry import lps_to_ras, voxel_spacing


@dataclass
class SeriesVolume:
    """A decoded image series on its native grid.

    Attributes:
        array: voxels indexed ``[i, j, k]``: ``i`` = column index within a slice (along the row
            direction cosine), ``j`` = row index (along the column direction cosine), ``k`` = slice
            index, sorted by increasing position along the slice normal ``row_cos x col_cos``.
            Modality units after RescaleSlope/Intercept (HU for CT), float32.
        affine_lps: 4x4 map from voxel ``(i, j, k, 1)`` to DICOM patient coordinates (LPS, mm).
        datasets: the source headers (pydicom Datasets, pixel data may be dropped), one per slice in
            ``k`` order. For an enhanced multi-frame object, the same dataset repeated per frame.
        frame_numbers: 1-based frame number in ``datasets[k]`` for each slice (all 1 for
            single-frame series).
        series_instance_uid: the series' UID ('' when the files carry none).
        stack_key: the scan's key of the stack read (``UID``, or ``UID#vol2`` / ``UID#echo1`` for one volume
            or echo of a 4D / multi-echo series): what outputs are named after.
        selection_reason: human-readable note on why this series was chosen.
        source_files: the file path of each slice, in ``k`` order.
        tile_numbers: for a Siemens mosaic, the 1-based tile (in the mosaic image of
            ``datasets[k]``) each slice was cut from; empty for other series. A mosaic's slices are
            not frames of their file: objects that reference source images (SEG, RTSTRUCT) must
            reference the mosaic image itself.
    """

    array: np.ndarray
    affine_lps: np.ndarray
    datasets: list = field(default_factory=list)
    frame_numbers: list[int] = field(default_factory=list)
    series_instance_uid: str = ""
    stack_key: str = ""
    selection_reason: str = ""
    source_files: list[str] = field(default_factory=list)
    tile_numbers: list[int] = field(default_factory=list)

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 map from voxel ``(i, j, k, 1)`` to RAS (mm), as NIfTI and MONAI expect."""
        return lps_to_ras(self.affine_lps)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along ``i, j, k``."""
        return voxel_spacing(self.affine_lps)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    def to_metatensor(self):
        """Channel-first MONAI MetaTensor ``(1, I, J, K)`` with the RAS affine (MONAI's space)."""
        import torch
        from monai.data import MetaTensor

        meta = {"filename_or_obj": self.source_files[0] if self.source_files else "dicom", "space": "RAS"}
        return MetaTensor(
            torch.as_tensor(self.array[None], dtype=torch.float32),
            affine=torch.as_tensor(self.affine_ras, dtype=torch.float64),
            meta=meta,
        )


_TILE = 16  # voxels along i and k per tile of frame_stack's copy: a 16 x rows x 16 tile stays in cache


def frame_stack(array_ijk: np.ndarray) -> np.ndarray:
    """``array_ijk`` (``[i, j, k]``) as a C-contiguous ``[k, j, i]`` array: frame ``k``, row ``j``,
    column ``i``, as DICOM stores a frame stack.

    A view when the array is already laid out so (``read_series`` returns such arrays); otherwise a
    copy made tile by tile. numpy's plain transposed copy reads the source with a stride of
    ``rows x slices`` items per voxel and misses the cache at almost every voxel; copying 16 x 16
    ``(i, k)`` tiles over all rows is about 3x faster for a 512 x 512 x 300 uint8 map (218 -> 70 ms
    on the 2-core CPU machine).
    """
    kji = array_ijk.transpose(2, 1, 0)
    if kji.flags.c_contiguous:
        return kji
    out = np.empty(kji.shape, dtype=array_ijk.dtype)
    ni, _, nk = array_ijk.shape
    for i0 in range(0, ni, _TILE):
        for k0 in range(0, nk, _TILE):
            out[k0 : k0 + _TILE, :, i0 : i0 + _TILE] = array_ijk[i0 : i0 + _TILE, :, k0 : k0 + _TILE].transpose(2, 1, 0)
    return out
