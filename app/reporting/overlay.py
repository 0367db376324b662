"""A quick-look PNG that reads without a viewer: the label map over the image on a few slices, with
orientation letters, the slices' positions in mm and a legend of the segments' names and colours.

Slices are ``k`` slices shown as stored (rows = ``j``, columns = ``i``), the way a DICOM viewer shows the
source slice. With the voxel -> LPS affine, each tile's edges carry the patient direction they face
(``L``/``R``, ``P``/``A``, ``S``/``I``; up to three letters, largest component first, for oblique
planes), and its caption gives the slice index and the slice's position in mm along the slice
direction (the DICOM SliceLocation sense: the unit slice direction dotted with the slice origin),
written the way viewers do: "S 12.0 mm" for +12 mm along S, "I 29.2 mm" for -29.2 mm.
Without an affine the tiles carry only their slice index. Colours are the segments' own
(``color_rgb`` of the bundle's segment descriptions) or a fixed palette by label value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from app.io.atomic import atomic_path

# Distinct colours for labels 1..N (RGB); the same order as the bundles' default segment colours.
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
# LPS axis letters for the positive and negative direction of x, y, z.
_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))
# A direction component smaller than this (of a unit vector) gets no letter (about 11.5 degrees).
_LETTER_MIN = 0.2
_CAPTION_PX = 22
_LEGEND_ROW_PX = 22
_FONT_PX = 14


def orientation_letters(direction_lps: Sequence[float] | np.ndarray) -> str:
    """Patient direction of an LPS vector: "L", "P", "S"..., several letters (largest first) if oblique."""
    d = np.asarray(direction_lps, np.float64)
    n = float(np.linalg.norm(d))
    if n == 0:
        return "?"
    d = d / n
    order = np.argsort(-np.abs(d), kind="stable")
    letters = [_LETTERS[a][0 if d[a] > 0 else 1] for a in order if abs(d[a]) >= _LETTER_MIN]
    return "".join(letters[:3])


@dataclass
class TileText:
    """What one tile says: ``k``, its caption, and the letters on its left/right/top/bottom edges."""

    k: int
    caption: str
    position_mm: float | None = None
    left: str = ""
    right: str = ""
    top: str = ""
    bottom: str = ""


@dataclass
class OverlayText:
    """The words of the figure: one :class:`TileText` per tile, and the legend ``(name, rgb, voxels)``."""

    tiles: list[TileText] = field(default_factory=list)
    legend: list[tuple[str, tuple[int, int, int], int]] = field(default_factory=list)


def _colours(labels_present: Sequence[int], segments: Sequence[Mapping[str, Any]] | None) -> dict[int, tuple]:
    own = {int(s["label_value"]): s for s in segments or ()}
    out = {}
    for v in sorted(set(labels_present) | set(own)):
        rgb = own.get(v, {}).get("color_rgb")
        out[v] = tuple(int(c) for c in rgb) if rgb else tuple(int(c) for c in _PALETTE[(v - 1) % len(_PALETTE)])
    return out


def _present(labels_ijk: np.ndarray) -> list[int]:
    return [int(v) for v in np.unique(labels_ijk) if v > 0]


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
    return (np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _pick_slices(labels_ijk: np.ndarray, n_slices: int) -> np.ndarray:
    ks = np.nonzero(labels_ijk.reshape(-1, labels_ijk.shape[2]).any(axis=0))[0]
    if ks.size == 0:
        ks = np.arange(labels_ijk.shape[2])
    return np.unique(ks[np.linspace(0, ks.size - 1, n_slices).round().astype(int)])


def overlay_slices(
    image_ijk: np.ndarray,
    labels_ijk: np.ndarray,
    n_slices: int = 3,
    alpha: float = 0.45,
    min_size: int = 256,
    colours: Mapping[int, Sequence[int]] | None = None,
) -> np.ndarray:
    """RGB mosaic (H, W, 3) of ``n_slices`` k-slices (through the labels when any), labels blended in,
    without any text (see :func:`overlay_figure`)."""
    labels_ijk = np.asarray(labels_ijk)
    picks = _pick_slices(labels_ijk, n_slices)
    return _mosaic(np.asarray(image_ijk, np.float32), labels_ijk, picks, alpha, min_size, colours)[0]


def _mosaic(image_ijk, labels_ijk, picks, alpha, min_size, colours) -> tuple[np.ndarray, int]:
    win = _window(image_ijk[:, :, picks])  # only the shown slices: a percentile of a whole CT takes seconds
    tiles = []
    for n, k in enumerate(picks):
        gray = win[:, :, n].T  # (rows=j, cols=i)
        rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
        lab = labels_ijk[:, :, k].T
        for value in np.unique(lab[lab > 0]):
            c = (colours or {}).get(int(value))
            colour = np.asarray(c if c is not None else _PALETTE[(int(value) - 1) % len(_PALETTE)], np.float32)
            m = lab == value
            rgb[m] = (1 - alpha) * rgb[m] + alpha * colour
        tiles.append(rgb.astype(np.uint8))
    mosaic = np.concatenate(tiles, axis=1)
    scale = max(1, int(np.ceil(min_size / mosaic.shape[0])))
    return (np.kron(mosaic, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else mosaic), scale


def overlay_annotations(
    labels_ijk: np.ndarray,
    picks: Sequence[int] | np.ndarray,
    affine_lps: np.ndarray | None = None,
    segments: Sequence[Mapping[str, Any]] | None = None,
) -> OverlayText:
    """The figure's text for tiles ``picks``: captions, edge letters (with an affine) and the legend."""
    labels_ijk = np.asarray(labels_ijk)
    counts = np.bincount(labels_ijk.ravel().astype(np.int64))
    colours = _colours(_present(labels_ijk), segments)
    names = {int(s["label_value"]): str(s.get("label_name", "")) for s in segments or ()}
    legend = [
        (names.get(v) or f"label {v}", colours[v], int(counts[v]) if v < counts.size else 0) for v in sorted(colours)
    ]
    tiles = []
    nk = labels_ijk.shape[2]
    for k in picks:
        if affine_lps is None:
            tiles.append(TileText(int(k), f"slice k={k} of {nk}"))
            continue
        a = np.asarray(affine_lps, np.float64)
        step = a[:3, 2]
        unit = step / np.linalg.norm(step)
        pos = float(unit @ (a[:3, 3] + k * step))
        tiles.append(
            TileText(
                int(k),
                f"k={k}/{nk}  {orientation_letters(unit if pos >= 0 else -unit)} {abs(pos):.1f} mm",
                position_mm=pos,
                left=orientation_letters(-a[:3, 0]),
                right=orientation_letters(a[:3, 0]),
                top=orientation_letters(-a[:3, 1]),
                bottom=orientation_letters(a[:3, 1]),
            )
        )
    return OverlayText(tiles=tiles, legend=legend)


def overlay_figure(
    image_ijk: np.ndarray,
    labels_ijk: np.ndarray,
    n_slices: int = 3,
    *,
    affine_lps: np.ndarray | None = None,
    segments: Sequence[Mapping[str, Any]] | None = None,
    alpha: float = 0.45,
    min_size: int = 256,
) -> tuple[np.ndarray, OverlayText]:
    """The annotated figure (H, W, 3 uint8) and its text (see the module docstring)."""
    image_ijk = np.asarray(image_ijk, np.float32)
    labels_ijk = np.asarray(labels_ijk)
    picks = _pick_slices(labels_ijk, n_slices)
    text = overlay_annotations(labels_ijk, picks, affine_lps, segments)
    colours = _colours(_present(labels_ijk), segments)
    mosaic, scale = _mosaic(image_ijk, labels_ijk, picks, alpha, min_size, colours)
    font = ImageFont.load_default(size=_FONT_PX)
    tile_w = labels_ijk.shape[0] * scale
    tile_h = mosaic.shape[0]
    legend_h = _LEGEND_ROW_PX * _legend_rows(text, mosaic.shape[1], font) + 6
    canvas = Image.new("RGB", (mosaic.shape[1], _CAPTION_PX + tile_h + legend_h), (0, 0, 0))
    canvas.paste(Image.fromarray(mosaic), (0, _CAPTION_PX))
    draw = ImageDraw.Draw(canvas)
    white, outline = (255, 255, 255), (0, 0, 0)
    for n, tile in enumerate(text.tiles):
        x0, y0 = n * tile_w, _CAPTION_PX
        draw.text((x0 + 4, 3), tile.caption, fill=white, font=font)
        mid_x, mid_y = x0 + tile_w // 2, y0 + tile_h // 2
        spots = {
            "left": ((x0 + 4, mid_y), "lm"),
            "right": ((x0 + tile_w - 4, mid_y), "rm"),
            "top": ((mid_x, y0 + 4), "mt"),
            "bottom": ((mid_x, y0 + tile_h - 4), "mb"),
        }
        for side, (xy, anchor) in spots.items():
            letters = getattr(tile, side)
            if letters:
                draw.text(
                    xy, letters, fill=(255, 255, 0), font=font, anchor=anchor, stroke_width=2, stroke_fill=outline
                )
    x, y = 6, _CAPTION_PX + tile_h + 4
    for name, rgb, voxels in text.legend:
        label = name if voxels else f"{name} (none)"
        width = 18 + int(draw.textlength(label, font=font)) + 14
        if x > 6 and x + width > canvas.width:
            x, y = 6, y + _LEGEND_ROW_PX
        draw.rectangle([x, y + 3, x + 13, y + 16], fill=tuple(rgb), outline=white)
        draw.text((x + 18, y + 2), label, fill=white if voxels else (150, 150, 150), font=font)
        x += width
    return np.asarray(canvas), text


def _legend_rows(text: OverlayText, width: int, font) -> int:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows, x = 1, 6
    for name, _, voxels in text.legend:
        w = 18 + int(probe.textlength(name if voxels else f"{name} (none)", font=font)) + 14
        if x > 6 and x + w > width:
            rows, x = rows + 1, 6
        x += w
    return rows


def save_overlay_png(
    image_ijk: np.ndarray,
    labels_ijk: np.ndarray,
    output_path: str | Path,
    n_slices: int = 3,
    *,
    affine_lps: np.ndarray | None = None,
    segments: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write the annotated overlay (:func:`overlay_figure`) as a PNG (atomically)."""
    output_path = Path(output_path)
    figure, _ = overlay_figure(image_ijk, labels_ijk, n_slices, affine_lps=affine_lps, segments=segments)
    with atomic_path(output_path) as tmp:
        Image.fromarray(figure).save(tmp, format="PNG")
    return output_path
