"""What ``segapp infer`` segments and where each output goes: input discovery, output names, formats.

NIfTI inputs keep their path below the input folder, sanitised (:func:`output_keys`), so two inputs
never share an output; DICOM outputs are named by a hash of the series UID (:func:`series_key`): no
patient data in file names. :func:`plan_nifti_jobs` checks every input, existing output and the disk
space before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.errors import ConfigError, InputError
from app.io.nifti import NiftiInfo, format_bytes, inspect_nifti
from app.io.staging import refuse_existing
from app.runtime.preflight import check_free_space, estimate_output_bytes

log = logging.getLogger(__name__)

FORMATS = ("nifti", "seg", "rtstruct", "stats", "sr", "overlay")
DICOM_OUTPUTS = ("seg", "rtstruct", "sr")  # what --send sends
NIFTI_FORMATS = ("nifti", "overlay")  # what a NIfTI input can give
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def parse_formats(text: str | None, dicom: bool) -> list[str]:
    """``--format``: a comma list of nifti, seg, rtstruct, the reports stats (``<key>_statistics.json``
    and a row of ``statistics.csv``) and sr (a DICOM SR of the SEG's volumes), and overlay (a PNG quick
    look, only on request: it costs time on every series); default nifti,seg for DICOM, nifti for NIfTI."""
    if not text:
        return ["nifti", "seg"] if dicom else ["nifti"]
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ConfigError(f"unknown output format(s) {bad}; choose from {', '.join(FORMATS)}", "--format")
    if not dicom and set(formats) - set(NIFTI_FORMATS):
        raise ConfigError("SEG, RTSTRUCT, stats and SR need a DICOM series as input", "--format")
    if "sr" in formats and "seg" not in formats:
        raise ConfigError("the SR references the SEG's segments: add seg (--format seg,sr)", "--format")
    return formats


def series_key(series_uid: str) -> str:
    """A file-name stem for a series that carries no patient data (a hash of the UID)."""
    return "series_" + hashlib.sha1(series_uid.encode()).hexdigest()[:12] if series_uid else "series"


def _is_nifti_name(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def find_nifti_inputs(path: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """A NIfTI file, or every NIfTI file in a folder (recursive, sorted), leaving out segapp's own outputs:
    the folder ``exclude`` (the output folder) when it lies inside the input, and every file a
    ``*_summary.json`` there lists (the output folder may be the input folder itself). A NIfTI name that
    is not a readable file (a broken link) is an ``InputError``, not silently left out."""
    p = Path(path)
    if p.is_file():
        return [p]
    root = p.resolve()
    excluded = Path(exclude).resolve() if exclude is not None else None
    skip_folder = excluded is not None and root in excluded.parents
    ours = _listed_outputs(excluded) if excluded is not None and (excluded == root or skip_folder) else set()
    found = []
    for f in p.rglob("*"):
        if not _is_nifti_name(f.name):
            continue
        full = f.resolve()
        if (skip_folder and excluded in full.parents) or full in ours:
            continue
        if f.is_file():
            found.append(f)
        elif not f.is_dir():
            raise InputError("a NIfTI name that is not a readable file (broken link?)", f)
    return sorted(found)


def _listed_outputs(folder: Path) -> set[Path]:
    """Files that segapp summaries under ``folder`` list as outputs."""
    listed: set[Path] = set()
    for summary in folder.rglob("*_summary.json") if folder.is_dir() else []:
        try:
            outputs = json.loads(summary.read_text()).get("outputs") or {}
            listed |= {Path(v).resolve() for v in outputs.values()}
        except (OSError, ValueError, AttributeError):
            continue
    return listed


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def safe_part(part: str) -> str:
    """A path component safe on every file system: letters, digits, ``._+-``; no leading dot."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", part).lstrip(".")[:120] or "_"


def output_keys(files: Iterable[Path], root: Path) -> dict[Path, str]:
    """One output stem per NIfTI input, unique: its path below ``root`` without the suffix, each part
    sanitised (``a/case.nii.gz`` -> ``a/case``); stems that still collide (``a b`` and ``a_b``, ``x.nii``
    and ``x.nii.gz``, names differing only in case) get a hash of their relative path appended."""
    keys: dict[Path, str] = {}
    rels: dict[Path, str] = {}
    root = Path(root).resolve()
    for f in files:
        full = Path(f).resolve()
        rel = full.relative_to(root) if root in full.parents else Path(full.name)
        rels[f] = rel.as_posix()
        keys[f] = "/".join(safe_part(p) for p in (*rel.parent.parts, nifti_stem(rel)))
    groups: dict[str, list[Path]] = defaultdict(list)
    for f, k in keys.items():
        groups[k.casefold()].append(f)
    for same in groups.values():
        if len(same) > 1:
            for f in same:
                keys[f] = f"{keys[f]}_{hashlib.sha1(rels[f].encode()).hexdigest()[:8]}"
    return keys


def is_dicom_input(path: Path, exclude: str | Path | None = None) -> bool:
    """A folder without NIfTI files (or a single non-NIfTI file) is taken as DICOM."""
    if path.is_file():
        return not _is_nifti_name(path.name)
    return path.is_dir() and not find_nifti_inputs(path, exclude)


def dicom_output_names(key: str, formats: Sequence[str]) -> dict[str, str]:
    """``{kind: file name}`` of a DICOM series' outputs (a new output format adds its entry here)."""
    names = {
        "nifti": f"{key}_seg.nii.gz",
        "seg": f"{key}_seg.dcm",
        "rtstruct": f"{key}_rtstruct.dcm",
        "stats": f"{key}_statistics.json",
        "sr": f"{key}_sr.dcm",
        "overlay": f"{key}_overlay.png",
    }
    return {k: v for k, v in names.items() if k in formats}


def nifti_output_names(key: str, formats: Sequence[str] = ("nifti",)) -> dict[str, str]:
    """``{kind: file name}`` of a NIfTI image's outputs (the label map, and the PNG overlay on request)."""
    names = {"nifti": f"{key}_seg.nii.gz", "overlay": f"{key}_overlay.png"}
    return {k: v for k, v in names.items() if k == "nifti" or k in formats}


def summary_name(key: str) -> str:
    return f"{key}_summary.json"


def check_nifti_input(path: Path, info: NiftiInfo | None = None) -> NiftiInfo:
    """The header checks of ``inspect_nifti`` plus: one 3D volume (a one-channel model's input)."""
    info = info or inspect_nifti(path)
    extra = info.shape[3:]
    if math.prod(extra) > 1:
        raise InputError(
            f"a {len(info.shape)}D image with {math.prod(extra)} volumes (shape {info.shape}); the model takes "
            "one 3D image (1 channel): split the volumes and segment each",
            path,
        )
    return info


@dataclass
class NiftiJob:
    """One NIfTI input of ``segapp infer`` and its output stem."""

    path: Path
    key: str
    info: NiftiInfo | None = None


def plan_nifti_jobs(
    source: str | Path, output: str | Path, overwrite: bool = False, formats: Sequence[str] = ("nifti",)
) -> list[NiftiJob]:
    """Every NIfTI input under ``source`` with a unique output stem, checked before any work: headers
    (``check_nifti_input``), existing outputs (without ``overwrite``) and the disk space they need.

    Raises:
        InputError: no NIfTI inputs, or one that is not a usable 3D image (naming it).
        ConfigError: an output exists. EnvError: not enough free space.
    """
    src, out = Path(source), Path(output)
    files = find_nifti_inputs(src, exclude=out)
    if not files:
        raise InputError("no NIfTI files (.nii, .nii.gz) found", src)
    keys = output_keys(files, src if src.is_dir() else src.parent)
    jobs = [NiftiJob(f, keys[f]) for f in files]
    for job in jobs:
        refuse_existing(out, nifti_output_names(job.key, formats).values(), overwrite)
    need = 0
    for job in jobs:
        job.info = check_nifti_input(job.path)
        need += estimate_output_bytes(job.info.shape, 0, ["nifti"])
    check_free_space(out, need, f"the outputs of {len(jobs)} image(s)")
    log.info("%d NIfTI input(s), outputs need about %s", len(jobs), format_bytes(need))
    return jobs
