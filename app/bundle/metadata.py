"""What a bundle's metadata says about its input and output: label names, DICOM segment codes.

Label names come from ``network_data_format.outputs.pred.channel_def`` (the model zoo's place), else
the metadata's or the config's ``labels``. DICOM segment descriptions come, per label, from a
``--segments`` JSON file (a list in the same format as ``segments``), else the metadata's ``segments``
(segapp's bundles), else :data:`COMMON_STRUCTURES` (SNOMED CT codes of DICOM PS3.16 for common
structures, matched on the label name; a side in the name gives a laterality modifier), else a code
of segapp's private scheme that carries the label name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.errors import ConfigError

# DICOM PS3.16 CID 7150 (Segmentation Property Category), SNOMED CT
ANATOMY = ("91723000", "SCT", "Anatomical Structure")
TISSUE = ("85756007", "SCT", "Tissue")
ABNORMAL = ("49755003", "SCT", "Morphologically Abnormal Structure")
# CID 244 (Laterality), for SegmentedPropertyTypeModifierCodeSequence
LATERALITY = {"left": ("7771000", "SCT", "Left"), "right": ("24028007", "SCT", "Right")}

# (category, type) per normalised name: SNOMED CT codes and code meanings of DICOM PS3.16 CID 7151
# (Segmentation Property Type) and its sub-groups 7140 / 7153 / 7154 / 7155 / 7159 / 7160 / 7166,
# checked against pydicom's copy of PS3.16 (tests/bundle/test_segment_codes.py)
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
    "urinary bladder": (ANATOMY, ("89837001", "SCT", "Bladder")),
    "prostate": (ANATOMY, ("41216001", "SCT", "Prostate")),
    "heart": (ANATOMY, ("80891009", "SCT", "Heart")),
    "lung": (ANATOMY, ("39607008", "SCT", "Lung")),
    "trachea": (ANATOMY, ("44567001", "SCT", "Trachea")),
    "thyroid gland": (ANATOMY, ("69748006", "SCT", "Thyroid")),
    "brain": (ANATOMY, ("12738006", "SCT", "Brain")),
    "brainstem": (ANATOMY, ("119238007", "SCT", "Brain Stem")),
    "cerebellum": (ANATOMY, ("113305005", "SCT", "Cerebellum")),
    "hippocampus": (ANATOMY, ("5366008", "SCT", "Hippocampus")),
    "spinal cord": (ANATOMY, ("2748008", "SCT", "Spinal cord")),
    "femur": (ANATOMY, ("71341001", "SCT", "Femur")),
    "bone": (TISSUE, ("3138006", "SCT", "Bone")),
    "tumor": (ABNORMAL, ("108369006", "SCT", "Neoplasm")),
    "lesion": (ABNORMAL, ("52988006", "SCT", "Lesion")),
    "mass": (ABNORMAL, ("4147007", "SCT", "Mass")),
    "cyst": (ABNORMAL, ("367643001", "SCT", "Cyst")),
}
_ALIASES = {
    "gall bladder": "gallbladder",
    "oesophagus": "esophagus",
    "bladder": "urinary bladder",
    "ivc": "inferior vena cava",
    "thyroid": "thyroid gland",
    "small intestine": "small bowel",
    "brain stem": "brainstem",
    "tumour": "tumor",
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


def _side(name: str) -> str | None:
    """``left`` | ``right`` when the label name says so (``kidney_left``, ``Left lung``, ``L kidney``)."""
    sides = {m.group(1) for m in _SIDES.finditer(re.sub(r"[_\-.]+", " ", name.lower()))}
    sides = {"left" if s in ("left", "l") else "right" for s in sides}
    return next(iter(sides)) if len(sides) == 1 else None


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


def _read_segments_file(path: str | Path, labels: Mapping[int, str]) -> dict[int, dict]:
    """``--segments``: a JSON list of descriptions, each checked as a DICOM segment, per label value."""
    from app.io.segments import SegmentSpec

    try:
        given = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the segment descriptions: {exc}", str(path)) from exc
    if not isinstance(given, list) or not all(isinstance(s, dict) and "label_value" in s for s in given):
        raise ConfigError(
            "expected a JSON list of objects with label_value, label_name, category_code, type_code", str(path)
        )
    out: dict[int, dict] = {}
    for s in given:
        for key in ("category_code", "type_code", "type_modifier_code"):
            code = s.get(key)
            if code is not None and not (
                isinstance(code, list) and len(code) == 3 and all(isinstance(c, str) and c for c in code)
            ):
                raise ConfigError(f"label {s['label_value']}: {key} must be [value, scheme, meaning]", str(path))
        try:
            spec = SegmentSpec.from_dict(s)
        except ConfigError as exc:
            raise ConfigError(str(exc), str(path)) from exc
        if spec.label_value not in labels or spec.label_value == 0:
            known = ", ".join(str(v) for v in sorted(labels) if v != 0)
            raise ConfigError(f"label value {spec.label_value} is not one of the bundle's labels ({known})", str(path))
        out[spec.label_value] = s
    return out


def segment_descriptions(
    meta: Mapping[str, Any], labels: Mapping[int, str], segments_file: str | Path | None = None
) -> list[dict]:
    """One description per foreground label: ``label_value``, ``label_name``, ``category_code``,
    ``type_code`` (each ``[value, scheme, meaning]``), ``color_rgb`` and, for a sided name without a
    bundle description, ``type_modifier_code`` (CID 244 laterality).

    Per label, the first of: the ``--segments`` file's description, the metadata's ``segments``,
    :data:`COMMON_STRUCTURES` by name, a code of segapp's private scheme ``99SEGAPP`` carrying the name.
    """
    given = _read_segments_file(segments_file, labels) if segments_file is not None else {}
    own = {int(s["label_value"]): s for s in meta.get("segments", []) if isinstance(s, dict) and "label_value" in s}
    out = []
    for i, (value, name) in enumerate(sorted((v, n) for v, n in labels.items() if v != 0)):
        if value in given or value in own:
            out.append(given.get(value) or own[value])
            continue
        category, type_code = COMMON_STRUCTURES.get(_normalise(name), (ANATOMY, None))
        desc: dict[str, Any] = {"label_value": value, "label_name": name}
        if type_code is None:  # a code of our own (private scheme) that carries the label name
            type_code = (f"L{value}", "99SEGAPP", name[:64])
        elif _side(name):
            desc["type_modifier_code"] = list(LATERALITY[_side(name)])  # type: ignore[index]
        desc.update(category_code=list(category), type_code=list(type_code), color_rgb=list(PALETTE[i % len(PALETTE)]))
        out.append(desc)
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


def check_network_def(network_def: Any, where: str) -> None:
    """The same refusal from the config's raw ``network_def`` (no code is run to read it): a literal
    ``spatial_dims``/``dimensions`` of 2 or ``in_channels`` above 1, where the metadata says nothing."""
    if not isinstance(network_def, Mapping):
        return
    dims = network_def.get("spatial_dims", network_def.get("dimensions"))
    if isinstance(dims, int) and not isinstance(dims, bool) and dims == 2:
        raise ConfigError("this bundle is a 2D model (network_def spatial_dims 2); segapp runs 3D models only", where)
    channels = network_def.get("in_channels")
    if isinstance(channels, int) and not isinstance(channels, bool) and channels > 1:
        raise ConfigError(
            f"this bundle's network takes {channels} input channels (network_def in_channels); segapp feeds "
            "one image or series, so it cannot run it",
            where,
        )
