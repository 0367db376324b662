"""Load one training case whatever its storage: NIfTI image or DICOM series; NIfTI or DICOM SEG label.

A manifest case may be ``{"image": "<dicom series folder>", "label": "<seg.dcm>", "label_format":
"dicom-seg"}``, so clinical annotations stored as DICOM SEG are training data as they are. The SEG is
read onto the image series' grid (frames matched by source instance and position), and the label gets
the image's RAS affine.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform

from app.errors import InputError
from app.io.geometry import lps_to_ras, same_grid


def _is_dicom_image(path: str) -> bool:
    p = Path(path)
    return p.is_dir() or p.suffix.lower() in (".dcm", ".dicom")


class LoadCased(MapTransform):
    """Load ``image`` (NIfTI file or DICOM series folder) and ``label`` (NIfTI or DICOM SEG), channel first.

    Args:
        keys: the image key first, then the label key (the label may be missing, e.g. at inference).
        format_key: per-case key naming the label's format (``nifti`` | ``dicom-seg``); a ``.dcm`` label
            is taken as a SEG as well.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        format_key: str = "label_format",
        allow_missing_keys: bool = True,
    ):
        super().__init__(keys, allow_missing_keys)
        self.image_key, *rest = self.keys
        self.label_key = rest[0] if rest else None
        self.format_key = format_key
        self._nifti = LoadImaged(self.keys, ensure_channel_first=True, image_only=True, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image_path = str(d[self.image_key])
        label_path = str(d[self.label_key]) if self.label_key and self.label_key in d else None
        label_is_seg = label_path is not None and (
            d.get(self.format_key) == "dicom-seg" or label_path.lower().endswith(".dcm")
        )
        if not _is_dicom_image(image_path):
            if label_is_seg:
                raise InputError("a DICOM SEG label needs its DICOM image series as the case's image", label_path)
            return self._nifti(d)
        from app.io.dicom_series import read_series

        volume = read_series(image_path)
        d[self.image_key] = volume.to_metatensor()
        if label_path is None:
            return d
        if label_is_seg:
            from app.io.seg_read import read_seg

            labels_ijk, affine_lps = read_seg(label_path, volume)  # on the series' voxel grid
            dtype = np.int16 if labels_ijk.size == 0 or int(labels_ijk.max()) <= np.iinfo(np.int16).max else np.int32
            d[self.label_key] = MetaTensor(
                torch.as_tensor(labels_ijk[None].astype(dtype)),
                affine=torch.as_tensor(lps_to_ras(affine_lps)),
                meta={"filename_or_obj": label_path, "space": "RAS"},
            )
        else:
            label = self._nifti({self.label_key: label_path})[self.label_key]
            if not same_grid(volume.affine_ras, volume.shape, np.asarray(label.affine), label.shape[1:], atol=1e-3):
                raise InputError(
                    f"the label's grid (shape {tuple(label.shape[1:])}) differs from its DICOM image's "
                    f"(shape {tuple(volume.shape)}) in shape or affine",
                    label_path,
                )
            d[self.label_key] = label
        return d
