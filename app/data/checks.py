"""Checks behind ``app.data.manifest.validate_manifest``: the manifest schema and cross-field
rules (:func:`structure_problems`) and each case's files (:func:`check_case`).

Every check returns a list of problems (strings of the form ``"<file>: case <id>: <problem>"``)
instead of raising, so that one validation run reports everything that is wrong with a data set.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Affines of an image and its label may differ by float rounding (e.g. after a qform/sform round
# trip through float32) but not by a real shift: 1e-3 mm is far below any voxel size.
AFFINE_ATOL_MM = 1e-3

FORMAT = "segapp-manifest/1"
LABEL_FORMATS = ("nifti", "dicom-seg")

_SHA256 = {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}
_REL_PATH = {"type": "string", "minLength": 1}

#: JSON schema of a manifest (draft 2020-12). ``data_manifests/manifest.schema.json`` is this dict,
#: written out (a test keeps the two equal); it lives in code so the installed package needs no data files.
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://segapp.invalid/schemas/segapp-manifest-1.json",
    "title": "segapp data manifest",
    "type": "object",
    "required": ["format", "name", "data_root", "labels", "num_folds", "cases"],
    "additionalProperties": False,
    "properties": {
        "format": {"const": FORMAT},
        "name": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "data_root": {"type": "string", "minLength": 1, "description": "relative to the manifest file, or absolute"},
        "labels": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": "^(0|[1-9][0-9]*)$"},
            "additionalProperties": {"type": "string", "minLength": 1},
        },
        "ignore_value": {"type": ["integer", "null"], "minimum": 0},
        "num_folds": {"type": "integer", "minimum": 1},
        "seed": {"type": "integer", "description": "seed used for the fold assignment (informative)"},
        "cases": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "image", "label", "fold"],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"},
                    "image": _REL_PATH,
                    "label": _REL_PATH,
                    "sha256": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"image": _SHA256, "label": _SHA256},
                    },
                    "fold": {"type": "integer", "minimum": 0},
                    "label_format": {"enum": list(LABEL_FORMATS)},
                },
            },
        },
    },
}


# Label formats whose voxels this module can decode; others (e.g. "dicom-seg") get existence and
# checksum checks only.
DECODABLE_LABEL_FORMATS = ("nifti",)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks, so large files are fine)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass
class _Loaded:
    """A decoded NIfTI file: voxels as stored (after scl_slope/inter), affine (RAS, mm)."""

    data: np.ndarray
    affine: np.ndarray


def _load(path: Path, where: str, problems: list[str]) -> _Loaded | None:
    """Decode a NIfTI file fully (a truncated .gz only fails when the voxels are read)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # type: ignore[attr-defined]  # a spatial image: NIfTI
        affine = np.asarray(img.affine, dtype=np.float64)  # type: ignore[attr-defined]
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        problems.append(f"{path}: {where}: unreadable or corrupt ({type(exc).__name__}: {exc})")
        return None
    return _Loaded(data=data, affine=affine)


def _fmt_values(values: Iterable, limit: int = 10) -> str:
    values = list(values)
    text = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit])
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def structure_problems(doc: Any, where: str) -> list[str]:
    """Schema and cross-field problems of a parsed manifest (no file access), each prefixed with ``where``."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)
    problems = [
        f"{where}: {'/'.join(str(p) for p in err.absolute_path) or '(top level)'}: {err.message}"
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if problems:
        return problems
    labels = {int(k): v for k, v in doc["labels"].items()}
    if len(set(labels.values())) != len(labels):
        problems.append(f"{where}: labels: label names must be unique, got {sorted(labels.values())}")
    ignore = doc.get("ignore_value")
    if ignore is not None and ignore in labels:
        problems.append(f"{where}: ignore_value {ignore} is also a label ({labels[ignore]!r})")
    seen: dict[str, int] = {}
    for i, case in enumerate(doc["cases"]):
        if case["id"] in seen:
            problems.append(f"{where}: cases/{i}: duplicate case id {case['id']!r} (also cases/{seen[case['id']]})")
        seen.setdefault(case["id"], i)
        if case["fold"] >= doc["num_folds"]:
            problems.append(f"{where}: cases/{i}: fold {case['fold']} is not below num_folds={doc['num_folds']}")
        for role in ("image", "label"):
            if os.path.isabs(case[role]):
                problems.append(f"{where}: cases/{i}/{role}: path must be relative to data_root, got {case[role]!r}")
    empty = sorted(set(range(doc["num_folds"])) - {c["fold"] for c in doc["cases"]})
    if empty:
        problems.append(f"{where}: folds {empty} have no cases")
    return problems


def check_label_values(label: np.ndarray, allowed: set[int]) -> tuple[list[float], list[int]]:
    """Split the label's distinct values into non-integers (NaN included) and integers outside ``allowed``.

    Args:
        label: label voxels of any numeric dtype.
        allowed: permitted integer values (the label map's keys plus the ignore value, if any).

    Returns:
        ``(non_integer_values, unknown_integer_values)``, both sorted; empty lists mean the label is valid.
    """
    values = np.unique(label)
    if np.issubdtype(values.dtype, np.floating):
        is_int = np.isfinite(values) & (values == np.round(values))
        non_int = [float(v) for v in values[~is_int]]
        values = values[is_int]
    else:
        non_int = []
    unknown = sorted(int(v) for v in values if int(v) not in allowed)
    return non_int, unknown


def check_case(
    case,
    allowed_labels: set[int],
    check_checksums: bool = True,
    check_content: bool = True,
    affine_atol_mm: float = AFFINE_ATOL_MM,
) -> list[str]:
    """Check one manifest case (``app.data.manifest.Case``) against its files.

    Args:
        case: the case; ``case.image``/``case.label`` are absolute paths.
        allowed_labels: integer values a label voxel may take (label map keys + ignore value).
        check_checksums: compare the files' SHA-256 with ``case.sha256``.
        check_content: decode the files and check shapes, affines (tolerance ``affine_atol_mm``,
            in mm), label values and that image voxels are finite.

    Returns:
        Problems found, each naming the offending file; empty when the case is fine.
    """
    problems: list[str] = []
    where = f"case {case.id}"
    present = {}
    for role in ("image", "label"):
        path = Path(getattr(case, role))
        if not path.is_file():
            problems.append(f"{path}: {where}: {role} file is missing")
            continue
        present[role] = path
        expected = (case.sha256 or {}).get(role)
        if check_checksums and expected:
            actual = file_sha256(path)
            if actual != expected.lower():
                problems.append(
                    f"{path}: {where}: {role} checksum mismatch (manifest {expected[:12]}..., file {actual[:12]}...)"
                )
    if not check_content:
        return problems

    image = _load(present["image"], where, problems) if "image" in present else None
    label = None
    if "label" in present:
        if case.label_format in DECODABLE_LABEL_FORMATS:
            label = _load(present["label"], where, problems)
        else:
            logger.debug("case %s: label_format %r: content checks skipped", case.id, case.label_format)

    if image is not None:
        if image.data.ndim not in (3, 4):
            problems.append(
                f"{case.image}: {where}: image must be 3D or 4D (channels last), got shape {image.data.shape}"
            )
        elif np.issubdtype(image.data.dtype, np.floating):
            n_bad = int(image.data.size - np.count_nonzero(np.isfinite(image.data)))
            if n_bad:
                problems.append(f"{case.image}: {where}: image has {n_bad} NaN/Inf voxel(s)")

    if label is not None:
        data = label.data
        while data.ndim > 3 and data.shape[-1] == 1:  # some writers add a singleton 4th axis
            data = data[..., 0]
        if data.ndim != 3:
            problems.append(f"{case.label}: {where}: label must be 3D, got shape {label.data.shape}")
        else:
            non_int, unknown = check_label_values(data, allowed_labels)
            if non_int:
                problems.append(f"{case.label}: {where}: label has non-integer values {_fmt_values(non_int)}")
            if unknown:
                problems.append(
                    f"{case.label}: {where}: label values {_fmt_values(unknown)} are not in the label map "
                    f"(allowed {_fmt_values(sorted(allowed_labels))})"
                )

    if image is not None and label is not None and image.data.ndim in (3, 4):
        img_shape = tuple(image.data.shape[:3])
        lab_shape = tuple(label.data.shape[:3])
        if img_shape != lab_shape:
            problems.append(f"{case.label}: {where}: label shape {lab_shape} differs from image shape {img_shape}")
        diff = float(np.max(np.abs(image.affine - label.affine)))
        if not diff <= affine_atol_mm:  # "not <=" also catches NaN
            problems.append(
                f"{case.label}: {where}: label affine differs from the image's by up to {diff:.4g} mm "
                f"(tolerance {affine_atol_mm:g} mm)"
            )
    return problems
