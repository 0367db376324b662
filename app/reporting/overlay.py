"""A quick-look PNG: the label map over the image on a few slices through the labelled region."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from app.io.atomic import atomic_path

# Distinct colours for labels 1..N (RGB).
_PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ],
    np.uint8,
)


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
    return (np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def overlay_slices(
    image_ijk: np.ndarray, labels_ijk: np.ndarray, n_slices: int = 3, alpha: float = 0.45, min_size: int = 256
) -> np.ndarray:
    """RGB mosaic (H, W, 3) of ``n_slices`` k-slices (through the labels when any), labels blended in.

    Slices are shown as stored (rows = j, columns = i), the way a DICOM viewer shows the source slice.
    """
    image_ijk = np.asarray(image_ijk, np.float32)
    labels_ijk = np.asarray(labels_ijk)
    ks = np.nonzero(labels_ijk.reshape(-1, labels_ijk.shape[2]).any(axis=0))[0]
    if ks.size == 0:
        ks = np.arange(labels_ijk.shape[2])
    picks = np.unique(ks[np.linspace(0, ks.size - 1, n_slices).round().astype(int)])
    win = _window(image_ijk[:, :, picks])  # only the shown slices: a percentile of a whole CT takes seconds
    tiles = []
    for n, k in enumerate(picks):
        gray = win[:, :, n].T  # (rows=j, cols=i)
        rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
        lab = labels_ijk[:, :, k].T
        for value in np.unique(lab[lab > 0]):
            colour = _PALETTE[(int(value) - 1) % len(_PALETTE)].astype(np.float32)
            m = lab == value
            rgb[m] = (1 - alpha) * rgb[m] + alpha * colour
        tiles.append(rgb.astype(np.uint8))
    mosaic = np.concatenate(tiles, axis=1)
    scale = max(1, int(np.ceil(min_size / mosaic.shape[0])))
    return np.kron(mosaic, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else mosaic


def save_overlay_png(image_ijk: np.ndarray, labels_ijk: np.ndarray, output_path: str | Path, n_slices: int = 3) -> Path:
    """Write the overlay mosaic as a PNG (atomically)."""
    output_path = Path(output_path)
    with atomic_path(output_path) as tmp:
        Image.fromarray(overlay_slices(image_ijk, labels_ijk, n_slices)).save(tmp, format="PNG")
    return output_path
