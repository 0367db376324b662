"""Find DICOM image series in a folder and pick one.

``scan_folder`` reads headers only (no pixel data), skips files that are not DICOM, groups the rest
by SeriesInstanceUID and, within one UID, splits stacks that cannot form one volume (different image
plane, Rows x Columns, SeriesNumber, or separate multi-frame objects). ``select_series`` picks one
image series by UID or by rules and says why.

Series identity:

* ``SeriesInfo.uid`` is the SeriesInstanceUID as written ('' when blank).
* ``SeriesInfo.key`` is what ``--series-uid`` accepts: the UID itself when it forms one stack,
  ``UID#1``, ``UID#2``... (largest first) when the UID had to be split, and ``noUID#1``... for files
  without a SeriesInstanceUID (grouped by StudyInstanceUID, SeriesNumber, Modality,
  FrameOfReferenceUID and SeriesDescription instead).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from app.errors import ConfigError, DicomError

logger = logging.getLogger(__name__)

# Direction cosines closer than this (absolute, per component; ~0.06 degrees) are the same plane.
# Scanners write IOP with different rounding on different slices (e.g. -0.059771 vs -0.0597709).
IOP_TOLERANCE = 1e-3
# A plane within this angle of a patient axis gets that axis' name, otherwise "oblique".
_ORIENTATION_LABEL_DEG = 1.0

_MEDIA_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"
# Modalities whose objects are not images to segment (they may reference images).
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "SR", "PR", "KO", "REG", "DOC", "FID", "PLAN"}
)
_RULE_KEYS = {"modality", "min_slices", "max_slices", "description_regex", "orientation"}


@dataclass
class SeriesInfo:
    """One stack of images that can form a volume (headers only).

    Attributes:
        key: unique name to select it with (see module docstring).
        uid: SeriesInstanceUID ('' when blank).
        modality, description: Modality and SeriesDescription.
        series_number: SeriesNumber (``None`` when absent).
        n_slices: number of images (frames for an enhanced multi-frame object).
        files: file paths (one per single-frame image; one for a multi-frame object).
        headers: the datasets read with ``stop_before_pixels=True``, in ``files`` order.
        orientation: "axial", "sagittal", "coronal", "oblique" or "unknown" (no IOP).
        image_orientation: the six direction cosines of the plane (``None`` when absent).
        rows, columns: Rows and Columns.
        is_image: False for SEG, RTSTRUCT, SR, PR and other objects without an image to segment.
        multiframe: True for a multi-frame object (one file, ``n_slices`` frames).
        study_uid, frame_of_reference_uid: StudyInstanceUID and FrameOfReferenceUID.
        split_note: when the UID was split into several stacks, a line describing all of them.
    """

    key: str
    uid: str
    modality: str
    description: str
    series_number: int | None
    n_slices: int
    files: list[str]
    headers: list[Dataset] = field(repr=False, default_factory=list)
    orientation: str = "unknown"
    image_orientation: tuple[float, ...] | None = None
    rows: int = 0
    columns: int = 0
    is_image: bool = True
    multiframe: bool = False
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    split_note: str = ""

    def summary(self) -> str:
        """One line for listings: key, modality, description, slice count, size, orientation."""
        kind = "" if self.is_image else " (not an image series)"
        return (
            f"{self.key or '(no UID)'} | {self.modality or '?'} | '{self.description}' | "
            f"{self.n_slices} {'frame(s)' if self.multiframe else 'slice(s)'} | {self.columns}x{self.rows} | "
            f"{self.orientation}{kind}"
        )


@dataclass
class ScanResult:
    """What ``scan`` found: the series, and the files it skipped with the reason for each."""

    root: str
    series: list[SeriesInfo]
    skipped: list[tuple[str, str]]
    n_files: int


def functional_group_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """The item of functional group ``sequence`` (e.g. "PlanePositionSequence") that applies to
    frame ``frame_index`` (0-based) of an enhanced multi-frame object: per-frame wins over shared."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > idx:
            inner = seq[idx].get(sequence)
            if inner is not None and len(inner) > 0:
                return inner[0]
    return None


def is_enhanced_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def header_orientation(ds: Dataset) -> np.ndarray | None:
    """ImageOrientationPatient (6 floats) of a single-frame image or of frame 1 of a multi-frame one."""
    value = ds.get("ImageOrientationPatient")
    if value is None and is_enhanced_multiframe(ds):
        item = functional_group_item(ds, 0, "PlaneOrientationSequence")
        value = item.get("ImageOrientationPatient") if item is not None else None
    if value is None or len(value) != 6:
        return None
    try:
        return np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def orientation_label(iop: np.ndarray | None) -> str:
    """'axial', 'sagittal', 'coronal' (slice normal within 1 degree of a patient axis) or 'oblique'."""
    if iop is None:
        return "unknown"
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        return "unknown"
    normal = np.abs(normal / norm)
    axis = int(np.argmax(normal))
    if np.degrees(np.arccos(min(1.0, normal[axis]))) > _ORIENTATION_LABEL_DEG:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _n_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _is_image(ds: Dataset) -> bool:
    modality = str(ds.get("Modality", "") or "").upper()
    return modality not in NON_IMAGE_MODALITIES and "Rows" in ds and "Columns" in ds


def _iter_files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _read_header(path: Path) -> tuple[Dataset | None, str]:
    """(header, '') or (None, why it was skipped)."""
    try:
        # pydicom only warns when a file ends inside an element: catch that as truncation.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except InvalidDicomError:
        return None, "not a DICOM file (no DICM prefix)"
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
        return None, f"unreadable DICOM header ({type(exc).__name__}: {exc})"
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _MEDIA_DIRECTORY_SOP_CLASS:
        return None, "DICOMDIR (media directory), not an image"
    if "DirectoryRecordSequence" in ds:
        return None, "DICOMDIR (media directory), not an image"
    eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower() or "EOF" in str(w.message)]
    if eof:
        return None, "unreadable DICOM header (file truncated: ends inside an element)"
    if "Modality" not in ds and "Rows" not in ds and "SOPClassUID" not in ds:
        return None, f"unreadable DICOM header (truncated or damaged: only {len(ds)} data elements)"
    return ds, ""


def scan(path: str | os.PathLike) -> ScanResult:
    """Read the headers of every file under ``path`` (a folder, searched recursively, or one file)
    and group them into series. Raises ``DicomError`` when the path does not exist or has no files."""
    root = Path(path)
    if not root.exists():
        raise DicomError("does not exist", path=root)
    files = [root] if root.is_file() else list(_iter_files(root))
    if not files:
        raise DicomError("folder contains no files", path=root)
    skipped: list[tuple[str, str]] = []
    headers: list[tuple[str, Dataset]] = []
    for f in files:
        ds, why = _read_header(f)
        if ds is None:
            skipped.append((str(f), why))
            (logger.warning if why.startswith("unreadable") else logger.debug)("skipping %s: %s", f, why)
            continue
        headers.append((str(f), ds))
    return ScanResult(root=str(root), series=_group(headers), skipped=skipped, n_files=len(files))


def scan_folder(folder: str | os.PathLike) -> list[SeriesInfo]:
    """All series under ``folder`` (recursive; a single file is accepted too), image and non-image,
    ordered by study, series number and key. Non-DICOM files are skipped (logged at debug level)."""
    return scan(folder).series


def _base_key(ds: Dataset) -> tuple:
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return (uid,)
    # Blank UID (anonymised data): group by what else identifies a series.
    return (
        "",
        str(ds.get("StudyInstanceUID", "") or ""),
        str(ds.get("SeriesNumber", "") or ""),
        str(ds.get("Modality", "") or ""),
        str(ds.get("FrameOfReferenceUID", "") or ""),
        str(ds.get("SeriesDescription", "") or ""),
    )


def _group(headers: list[tuple[str, Dataset]]) -> list[SeriesInfo]:
    by_base: dict[tuple, list[tuple[str, Dataset]]] = defaultdict(list)
    for f, ds in headers:
        by_base[_base_key(ds)].append((f, ds))

    out: list[SeriesInfo] = []
    no_uid_count = 0
    for base, members in by_base.items():
        stacks = _split_stacks(members)
        stacks.sort(key=lambda s: (-s[1], s[0][0][0]))
        uid = base[0]
        if not uid:
            no_uid_count += 1
        infos = []
        for n, (stack, _) in enumerate(stacks, start=1):
            if uid:
                key = uid if len(stacks) == 1 else f"{uid}#{n}"
            else:
                key = f"noUID#{no_uid_count}" if len(stacks) == 1 else f"noUID#{no_uid_count}.{n}"
            infos.append(_make_info(key, uid, stack))
        if len(infos) > 1:
            note = (
                f"series UID {uid or '(blank)'} holds {len(infos)} stacks that differ in image plane, "
                f"Rows x Columns, SeriesNumber or object: " + "; ".join(i.summary() for i in infos)
            )
            for info in infos:
                info.split_note = note
        out.extend(infos)
    out.sort(key=lambda s: (s.study_uid, s.series_number if s.series_number is not None else -1, s.key))
    return out


def _split_stacks(members: list[tuple[str, Dataset]]) -> list[tuple[list[tuple[str, Dataset]], int]]:
    """Split one series' files into stacks: each multi-frame object alone; single frames by
    (SeriesNumber, Rows, Columns) and then by image plane within ``IOP_TOLERANCE``."""
    stacks: list[tuple[list[tuple[str, Dataset]], int]] = []
    singles: dict[tuple, list[tuple[str, Dataset]]] = defaultdict(list)
    for f, ds in members:
        if _n_frames(ds) > 1 or is_enhanced_multiframe(ds):
            stacks.append(([(f, ds)], _n_frames(ds)))
        else:
            singles[(str(ds.get("SeriesNumber", "")), ds.get("Rows"), ds.get("Columns"))].append((f, ds))
    for group in singles.values():
        planes: list[tuple[np.ndarray, list]] = []
        no_iop: list[tuple[str, Dataset]] = []
        for f, ds in group:
            iop = header_orientation(ds)
            if iop is None:
                no_iop.append((f, ds))
                continue
            for ref, lst in planes:
                if np.max(np.abs(iop - ref)) <= IOP_TOLERANCE:
                    lst.append((f, ds))
                    break
            else:
                planes.append((iop, [(f, ds)]))
        # Images without IOP stay with the largest plane so that reading reports them by name.
        if planes:
            max(planes, key=lambda p: len(p[1]))[1].extend(no_iop)
        elif no_iop:
            planes.append((None, no_iop))
        stacks.extend((lst, len(lst)) for _, lst in planes)
    return stacks


def _make_info(key: str, uid: str, stack: list[tuple[str, Dataset]]) -> SeriesInfo:
    first = stack[0][1]
    iop = next((v for v in (header_orientation(ds) for _, ds in stack) if v is not None), None)
    multiframe = len(stack) == 1 and (_n_frames(first) > 1 or is_enhanced_multiframe(first))
    try:
        series_number = int(first.get("SeriesNumber")) if first.get("SeriesNumber") not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    return SeriesInfo(
        key=key,
        uid=uid,
        modality=str(first.get("Modality", "") or ""),
        description=str(first.get("SeriesDescription", "") or ""),
        series_number=series_number,
        n_slices=_n_frames(first) if multiframe else len(stack),
        files=[f for f, _ in stack],
        headers=[ds for _, ds in stack],
        orientation=orientation_label(iop),
        image_orientation=tuple(float(v) for v in iop) if iop is not None else None,
        rows=int(first.get("Rows", 0) or 0),
        columns=int(first.get("Columns", 0) or 0),
        is_image=all(_is_image(ds) for _, ds in stack),
        multiframe=multiframe,
        study_uid=str(first.get("StudyInstanceUID", "") or ""),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "") or ""),
    )


def describe_series(series: list[SeriesInfo]) -> str:
    """Multi-line listing of series for error messages (no patient data)."""
    if not series:
        return "  (none)"
    return "\n".join(f"  {s.summary()}" for s in series)


def check_rules(rules: dict | None) -> dict:
    """Validate selection rules; raises ``ConfigError`` on unknown keys or bad values."""
    rules = dict(rules or {})
    unknown = set(rules) - _RULE_KEYS
    if unknown:
        raise ConfigError(f"unknown series selection rule(s) {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
    for name in ("modality", "orientation"):
        if name in rules and isinstance(rules[name], str):
            rules[name] = [rules[name]]
    if "description_regex" in rules:
        try:
            re.compile(rules["description_regex"])
        except re.error as exc:
            raise ConfigError(f"bad description_regex {rules['description_regex']!r}: {exc}") from exc
    return rules


def _rules_text(rules: dict) -> str:
    parts = []
    if "modality" in rules:
        parts.append("modality " + "/".join(rules["modality"]))
    if "orientation" in rules:
        parts.append("orientation " + "/".join(rules["orientation"]))
    if "min_slices" in rules:
        parts.append(f"with >= {rules['min_slices']} slices")
    if "max_slices" in rules:
        parts.append(f"with <= {rules['max_slices']} slices")
    if "description_regex" in rules:
        parts.append(f"description matching /{rules['description_regex']}/")
    return " ".join(parts)


def _matches(s: SeriesInfo, rules: dict) -> bool:
    if "modality" in rules and s.modality.upper() not in {m.upper() for m in rules["modality"]}:
        return False
    if "orientation" in rules and s.orientation not in set(rules["orientation"]):
        return False
    if "min_slices" in rules and s.n_slices < int(rules["min_slices"]):
        return False
    if "max_slices" in rules and s.n_slices > int(rules["max_slices"]):
        return False
    if "description_regex" in rules and not re.search(rules["description_regex"], s.description, re.IGNORECASE):
        return False
    return True


def select_series(
    series: list[SeriesInfo], series_uid: str | None = None, rules: dict | None = None
) -> tuple[SeriesInfo, str]:
    """Pick one image series and say why.

    Args:
        series: from ``scan_folder``.
        series_uid: a ``SeriesInfo.key`` or SeriesInstanceUID (``--series-uid``); overrides ``rules``.
            A UID that was split into several stacks selects its largest stack (the reason says so);
            ``UID#n`` selects another.
        rules: ``{"modality": [...], "min_slices": n, "max_slices": n, "description_regex": str,
            "orientation": [...]}`` (all optional) from the bundle metadata.

    Returns:
        (the series, a human-readable reason).

    Raises:
        DicomError: nothing matches, the UID is unknown or not an image series; lists what is there.
        ConfigError: malformed rules.
    """
    rules = check_rules(rules)
    images = [s for s in series if s.is_image]
    if series_uid:
        chosen = [s for s in series if s.key == series_uid]
        if not chosen:
            chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise DicomError(f"no series with UID {series_uid}; available series:\n{describe_series(series)}")
        pick = chosen[0]  # stacks are ordered largest first
        if not pick.is_image:
            raise DicomError(
                f"series {series_uid} is a {pick.modality} object, not an image series; "
                f"available series:\n{describe_series(series)}"
            )
        reason = f"chosen by --series-uid {series_uid}"
        if len(chosen) > 1:
            if chosen[1].n_slices == pick.n_slices:
                raise DicomError(f"{pick.split_note}; pass one of their keys to --series-uid")
            reason += (
                f" ({pick.split_note}; used the largest, {pick.key}, {pick.n_slices} slices; "
                f"pass another key to use it)"
            )
        if rules and not _matches(pick, rules):
            logger.warning(
                "series %s does not match the bundle's rules (%s); using it as asked", pick.key, _rules_text(rules)
            )
        return pick, reason

    matching = [s for s in images if _matches(s, rules)]
    wanted = _rules_text(rules)
    what = f"series matching {wanted}" if wanted else "image series"
    if not matching:
        raise DicomError(
            f"no image series matches {wanted or 'the request'}; available series:\n{describe_series(series)}"
        )
    if len(matching) == 1:
        pick = matching[0]
        reason = f"only {what} ({pick.key}, {pick.n_slices} slices)"
    else:
        matching.sort(key=lambda s: -s.n_slices)
        pick = matching[0]
        tie = matching[1].n_slices == pick.n_slices
        others = ", ".join(f"{s.key} ({s.n_slices})" for s in matching[1:])
        reason = (
            f"largest of {len(matching)} {what}: {pick.key} with {pick.n_slices} slices"
            f"{' (tie; first in study/series-number order)' if tie else ''}; others: {others}"
        )
    if pick.split_note:
        reason += f"; note: {pick.split_note}"
    return pick, reason
