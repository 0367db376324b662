"""What a bundle's metadata says about its input and output: label names, DICOM segment codes.

Label names come from ``network_data_format.outputs.pred.channel_def`` (the model zoo's place), else
the metadata's or the config's ``labels``. DICOM segment descriptions come, per label, from the
metadata's ``segments`` (segapp's bundles), else from :data:`COMMON_STRUCTURES` (SNOMED CT codes of
common structures, matched on the label name), else a generic code that carries the label name.
A ``--segments`` JSON file (a list in the same format as ``segments``) overrides all three.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.errors import ConfigError

ANATOMY = ("123037004", "SCT", "Anatomical Structure")
ALTERED = ("49755003", "SCT", "Morphologically Altered Structure")

# SNOMED CT codes (DICOM CID 7140 / 7150 / 7151 style), keyed by a normalised name
COMMON_STRUCTURES: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]] = {
    "spleen": (ANATOMY, ("78961009", "SCT", "Spleen")),
    "liver": (ANATOMY, ("10200004", "SCT", "Liver")),
    "kidney": (ANATOMY, ("64033007", "SCT", "Kidney")),
    "pancreas": (ANATOMY, ("15776009", "SCT", "Pancreas")),
    "stomach": (ANATOMY, ("69695003", "SCT", "Stomach")),
    "gallbladder": (ANATOMY, ("28231008", "SCT", "Gallbladder")),
    "esophagus": (ANATOMY, ("32849002", "SCT", "Esophagus")),
    "duodenum": (ANATOMY, ("38848004", "SCT", "Duodenum")),
    "small bowel": (ANATOMY, ("30315005", "SCT", "Small intestine")),
    "colon": (ANATOMY, ("71854001", "SCT", "Colon")),
    "aorta": (ANATOMY, ("15825003", "SCT", "Aorta")),
    "inferior vena cava": (ANATOMY, ("64131007", "SCT", "Inferior vena cava")),
    "portal vein": (ANATOMY, ("32764006", "SCT", "Portal vein")),
    "adrenal gland": (ANATOMY, ("23451007", "SCT", "Adrenal gland")),
    "urinary bladder": (ANATOMY, ("89837001", "SCT", "Urinary bladder")),
    "prostate": (ANATOMY, ("41216001", "SCT", "Prostate")),
    "heart": (ANATOMY, ("80891009", "SCT", "Heart")),
    "lung": (ANATOMY, ("39607008", "SCT", "Lung")),
    "trachea": (ANATOMY, ("44567001", "SCT", "Trachea")),
    "thyroid gland": (ANATOMY, ("69748006", "SCT", "Thyroid")),
    "brain": (ANATOMY, ("12738006", "SCT", "Brain")),
    "brainstem": (ANATOMY, ("15926001", "SCT", "Brainstem")),
    "cerebellum": (ANATOMY, ("113305005", "SCT", "Cerebellum")),
    "hippocampus": (ANATOMY, ("5300000", "SCT", "Hippocampus")),
    "spinal cord": (ANATOMY, ("2748008", "SCT", "Spinal cord")),
    "femur": (ANATOMY, ("71341001", "SCT", "Femur")),
    "bone": (ANATOMY, ("272673000", "SCT", "Bone")),
    "tumor": (ALTERED, ("108369006", "SCT", "Neoplasm")),
}
_ALIASES = {
    "gall bladder": "gallbladder",
    "oesophagus": "esophagus",
    "bladder": "urinary bladder",
    "ivc": "inferior vena cava",
    "thyroid": "thyroid gland",
    "small intestine": "small bowel",
    "tumour": "tumor",
    "lesion": "tumor",
    "neoplasm": "tumor",
    "adrenal": "adrenal gland",
}
_SIDES = re.compile(r"\b(left|right|l|r)\b")
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
]


def _normalise(name: str) -> str:
    words = re.sub(r"[_\-.]+", " ", name.lower()).strip()
    words = re.sub(r"\s+", " ", _SIDES.sub("", words)).strip()
    return _ALIASES.get(words, words)


def label_names(meta: Mapping[str, Any], config_labels: Mapping | None = None) -> dict[int, str]:
    """``{value: name}`` including background 0 when the bundle names it."""
    pred = (meta.get("network_data_format") or {}).get("outputs", {}).get("pred", {})
    for source in (pred.get("channel_def"), meta.get("labels"), config_labels):
        if isinstance(source, Mapping) and source:
            try:
                return {int(k): str(v) for k, v in source.items()}
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"label values must be integers: {exc}", "configs/metadata.json") from exc
    return {}


def segment_descriptions(
    meta: Mapping[str, Any], labels: Mapping[int, str], segments_file: str | Path | None = None
) -> list[dict]:
    """One description per foreground label: ``label_value``, ``label_name``, ``category_code``,
    ``type_code`` (each ``[value, scheme, meaning]``), ``color_rgb``."""
    if segments_file is not None:
        try:
            given = json.loads(Path(segments_file).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the segment descriptions: {exc}", str(segments_file)) from exc
        if not isinstance(given, list) or not all(isinstance(s, dict) and "label_value" in s for s in given):
            raise ConfigError(
                "expected a JSON list of objects with label_value, label_name, category_code, type_code",
                str(segments_file),
            )
        return given
    own = {int(s["label_value"]): s for s in meta.get("segments", []) if isinstance(s, dict) and "label_value" in s}
    out = []
    for i, (value, name) in enumerate(sorted((v, n) for v, n in labels.items() if v != 0)):
        if value in own:
            out.append(own[value])
            continue
        category, type_code = COMMON_STRUCTURES.get(_normalise(name), (ANATOMY, None))
        if type_code is None:  # a code of our own (private scheme) that carries the label name
            type_code = (f"L{value}", "99SEGAPP", name[:64])
        out.append(
            {
                "label_value": value,
                "label_name": name,
                "category_code": list(category),
                "type_code": list(type_code),
                "color_rgb": list(PALETTE[i % len(PALETTE)]),
            }
        )
    return out


def check_single_channel_3d(meta: Mapping[str, Any], where: str) -> None:
    """Refuse bundles that need several input channels or 2D input (segapp reads one 3D image)."""
    image = (meta.get("network_data_format") or {}).get("inputs", {}).get("image", {})
    channels = image.get("num_channels", 1)
    if isinstance(channels, int) and channels != 1:
        raise ConfigError(
            f"this bundle needs {channels} input channels (e.g. several MR sequences); segapp feeds "
            "one image or series, so it cannot run it",
            where,
        )
    shape = image.get("spatial_shape")
    if isinstance(shape, (list, tuple)) and len(shape) == 2:
        raise ConfigError("this bundle is a 2D model (spatial_shape has 2 axes); segapp runs 3D models only", where)
