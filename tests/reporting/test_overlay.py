"""The overlay PNG reads without a viewer: orientation letters from the affine, slice positions in mm that equal
the source files' SliceLocation, and a legend with the segments' names and colours drawn into the figure."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_phantoms import write_phantom_series
from PIL import Image

from app.io.dicom_series import read_series
from app.reporting.overlay import orientation_letters, overlay_figure, overlay_slices, save_overlay_png

SEGMENTS = [
    {"label_value": 1, "label_name": "box", "color_rgb": [0, 0, 255]},
    {"label_value": 2, "label_name": "sphere", "color_rgb": [255, 0, 255]},
    {"label_value": 3, "label_name": "bar"},
    {"label_value": 4, "label_name": "cyst", "color_rgb": [0, 255, 255]},
]

# (left, right, top, bottom) edge letters: rows run along the column cosine, columns along the row cosine
EXPECTED = {
    "axial": ("R", "L", "A", "P"),  # row (1,0,0), column (0,1,0)
    "sagittal": ("A", "P", "S", "I"),  # row (0,1,0), column (0,0,-1)
    "coronal": ("R", "L", "S", "I"),  # row (1,0,0), column (0,0,-1)
}


def test_orientation_letters():
    assert orientation_letters([1, 0, 0]) == "L" and orientation_letters([-1, 0, 0]) == "R"
    assert orientation_letters([0, -2, 0]) == "A" and orientation_letters([0, 0, 5]) == "S"
    assert orientation_letters([0.3, -0.9, 0.1]) == "AL"  # largest first, small parts dropped
    assert orientation_letters([-0.6, 0.5, -0.62]) == "IRP"


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_letters_and_positions_follow_the_geometry(tmp_path, orientation):
    info = write_phantom_series(tmp_path / "s", orientation=orientation, reverse_file_order=True)
    vol = read_series(tmp_path / "s")
    _, text = overlay_figure(vol.array, info.mask_ijk, affine_lps=vol.affine_lps, segments=SEGMENTS)
    assert len(text.tiles) == 3
    for tile in text.tiles:
        edges = (tile.left, tile.right, tile.top, tile.bottom)
        if orientation in EXPECTED:
            assert edges == EXPECTED[orientation]
        else:  # oblique: opposite edges carry opposite letters
            swap = str.maketrans("LRPASI", "RLAPIS")
            assert tile.left == tile.right.translate(swap) and tile.top == tile.bottom.translate(swap)
            assert all(len(e) >= 2 for e in edges)
        # the position in mm is the source slice's SliceLocation (normal . ImagePositionPatient)
        source = pydicom.dcmread(vol.source_files[tile.k], stop_before_pixels=True)
        assert tile.position_mm == pytest.approx(float(source.SliceLocation), abs=0.01)
        assert f"{abs(tile.position_mm):.1f} mm" in tile.caption and f"k={tile.k}/" in tile.caption
    assert [(name, rgb) for name, rgb, _ in text.legend] == [
        ("box", (0, 0, 255)),
        ("sphere", (255, 0, 255)),
        ("bar", (255, 225, 25)),  # no colour given: the palette's third
        ("cyst", (0, 255, 255)),
    ]
    assert [n for _, _, n in text.legend] == [int((info.mask_ijk == v).sum()) for v in (1, 2, 3, 4)]


def test_figure_draws_legend_and_text(tmp_path):
    info = write_phantom_series(tmp_path / "s", orientation="sagittal")
    vol = read_series(tmp_path / "s")
    path = save_overlay_png(vol.array, info.mask_ijk, tmp_path / "o.png", affine_lps=vol.affine_lps, segments=SEGMENTS)
    figure = np.asarray(Image.open(path).convert("RGB"))
    mosaic = overlay_slices(vol.array, info.mask_ijk, colours={s["label_value"]: s.get("color_rgb") for s in SEGMENTS})
    assert figure.shape[1] == mosaic.shape[1] and figure.shape[0] > mosaic.shape[0]
    top = 22  # the caption strip above the tiles
    caption, tiles, legend = figure[:top], figure[top : top + mosaic.shape[0]], figure[top + mosaic.shape[0] :]
    assert (caption == 255).all(axis=2).any()  # white caption text
    assert (tiles != mosaic).any(axis=2).sum() > 50  # yellow edge letters drawn over the tiles
    for rgb in ((0, 0, 255), (255, 0, 255), (0, 255, 255)):  # every swatch, also the absent segment's
        assert (legend == rgb).all(axis=2).sum() >= 100, rgb
    # the blended segment colour is the legend's colour: blue box pixels in the tiles are blue-ish
    box = tiles[..., 2].astype(int) - tiles[..., 0].astype(int)
    assert box.max() > 80


def test_without_affine_only_slice_numbers(tmp_path):
    info = write_phantom_series(tmp_path / "s", shape=(12, 10, 8))
    _, text = overlay_figure(info.array_ijk, info.mask_ijk)
    assert all(t.left == t.right == "" and t.position_mm is None and "of 8" in t.caption for t in text.tiles)
    assert [name for name, _, _ in text.legend] == ["label 1", "label 2", "label 3"]
