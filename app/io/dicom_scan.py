"""Find DICOM image series in a folder and pick one.

``scan`` reads headers only (no pixel data; each file's header is parsed once and kept, with where
its pixel data lies), skips files that are not DICOM, groups the rest by SeriesInstanceUID and,
within one UID, splits stacks that cannot form one volume (different image plane, Rows x Columns,
SeriesNumber, or separate multi-frame objects), then splits a stack whose slices repeat positions
into the echoes (EchoNumbers) and volumes (TemporalPositionIdentifier, diffusion b-value and
direction, AcquisitionNumber, TriggerTime) that tell them apart. ``select_series`` (in
``app.io.dicom_select``, re-exported here) picks one stack by key, study or rules and says why.

Series identity:

* ``SeriesInfo.uid`` is the SeriesInstanceUID as written ('' when blank).
* ``SeriesInfo.key`` is what ``--series-uid`` accepts: the UID itself when it forms one stack,
  ``UID#1``, ``UID#2``... (largest first) when the UID had to be split, and ``noUID#1``... for files
  without a SeriesInstanceUID (grouped by StudyInstanceUID, SeriesNumber, Modality,
  FrameOfReferenceUID and SeriesDescription instead).
* One volume or echo of a 4D / multi-echo stack with key ``K`` is ``K#vol1``, ``K#vol2``... (in
  the order of the attribute that tells them apart), ``K#echo1``, ``K#echo2``... (EchoNumbers), or
  ``K#echo1#vol1``... for both; ``SeriesInfo.group_key`` is then ``K``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from app.errors import DicomError
from app.io.dicom_info import (
    IOP_TOLERANCE,
    PixelLocation,
    ScanResult,
    SeriesInfo,
    convert_element,
    damaged_element,
    functional_group_item,
    header_int,
    header_orientation,
    header_position,
    is_enhanced_multiframe,
    is_mosaic,
    locate_pixel_data,
    n_frames,
    orientation_label,
)
from app.io.dicom_select import check_rules, describe_series, list_series, select_series
from app.io.gc_pause import gc_paused
from app.io.mosaic import mosaic_n_images

logger = logging.getLogger(__name__)

_MEDIA_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"
# Modalities whose objects are not images to segment (they may reference images).
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "SR", "PR", "KO", "REG", "DOC", "FID", "PLAN"}
)
# Positions closer than this (mm) along the normal are the same slice position (as the reader).
_SAME_POSITION_MM = 0.01

_Member = tuple[str, Dataset]


def _diffusion(ds: Dataset) -> str | None:
    b = ds.get("DiffusionBValue")
    if b in (None, ""):
        return None
    direction = ds.get("DiffusionGradientOrientation")
    try:
        dirs = tuple(round(float(v), 4) for v in direction) if direction is not None else ()
        return f"{float(b):.6g}|{dirs}"
    except (TypeError, ValueError):
        return None


def _plain(name: str):
    def get(ds: Dataset) -> str | None:
        try:
            value = ds.get(name)
        except Exception:  # noqa: BLE001 - a damaged value cannot tell volumes apart
            return None
        return None if value in (None, "") else str(value).strip()

    return get


# Attributes that tell the volumes of a 4D stack apart, tried in this order.
VOLUME_ATTRIBUTES = (
    ("TemporalPositionIdentifier", _plain("TemporalPositionIdentifier")),
    ("DiffusionBValue/DiffusionGradientOrientation", _diffusion),
    ("AcquisitionNumber", _plain("AcquisitionNumber")),
    ("TriggerTime", _plain("TriggerTime")),
)


def _is_image(ds: Dataset) -> bool:
    modality = str(ds.get("Modality", "") or "").upper()
    return modality not in NON_IMAGE_MODALITIES and "Rows" in ds and "Columns" in ds


def _iter_files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def read_header(path: Path) -> tuple[Dataset | None, PixelLocation | None, str]:
    """Read one file's header (no pixel data) and find its pixel data.

    Returns:
        ``(header, location, '')`` for a usable file; ``(header, None, why)`` for a file whose header
        was read but is damaged (a value the reader needs, or the pixel data element); ``(None, None,
        why)`` for a file that is skipped (not DICOM, DICOMDIR, unreadable).
    """
    try:
        # pydicom only warns when a file ends inside an element: catch that as truncation.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with open(path, "rb") as fp:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False)
                try:
                    loc = locate_pixel_data(fp, ds)
                except ValueError as exc:
                    return ds, None, f"unreadable DICOM header ({exc})"
            meta = getattr(ds, "file_meta", None)
            if meta is not None:
                for tag in list(meta.keys()):
                    convert_element(meta, tag)  # converts (and so checks) every file meta element
            directory = meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _MEDIA_DIRECTORY_SOP_CLASS
    except InvalidDicomError:
        return None, None, "not a DICOM file (no DICM prefix)"
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
        return None, None, f"unreadable DICOM header ({type(exc).__name__}: {exc})".replace("\n", " ")
    if directory:
        return None, None, "DICOMDIR (media directory), not an image"
    if "DirectoryRecordSequence" in ds:
        return None, None, "DICOMDIR (media directory), not an image"
    eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower() or "EOF" in str(w.message)]
    if eof:
        return None, None, "unreadable DICOM header (file truncated: ends inside an element)"
    if "Modality" not in ds and "Rows" not in ds and "SOPClassUID" not in ds:
        return None, None, f"unreadable DICOM header (truncated or damaged: only {len(ds)} data elements)"
    if bad := damaged_element(ds):
        return ds, None, f"unreadable DICOM header ({bad})"
    return ds, loc, ""


def scan(path: str | os.PathLike) -> ScanResult:
    """Read the headers of every file under ``path`` (a folder, searched recursively, or one file)
    and group them into series. Raises ``DicomError`` when the path does not exist or has no files.

    The result can be passed on (``read_series(path, scan=result)``, ``read_series_info``) so that
    no file is parsed twice."""
    root = Path(path)
    if not root.exists():
        raise DicomError("does not exist", path=str(root))
    files = [root] if root.is_file() else list(_iter_files(root))
    if not files:
        raise DicomError("folder contains no files", path=str(root))
    return scan_files(files, root)


def scan_files(files: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> ScanResult:
    """``scan`` of a list of files (e.g. what a DICOM listener received, or one batch item's files);
    ``root`` names them in messages (default: their common folder)."""
    paths = [Path(f) for f in files]
    if root is None:
        root = os.path.commonpath([str(f.parent) for f in paths]) if paths else "."
    root = Path(root)
    if not paths:
        raise DicomError("no files given", path=str(root))
    skipped: list[tuple[str, str]] = []
    headers: list[_Member] = []
    locations: dict[str, PixelLocation] = {}
    damaged: dict[str, list[str]] = defaultdict(list)
    with gc_paused():  # tens of thousands of new, lasting objects (app.io.gc_pause says why)
        for f in paths:
            ds, loc, why = read_header(f)
            if ds is not None and why:  # read, but damaged: reading its series is refused
                if uid := _text(ds, "SeriesInstanceUID"):
                    damaged[uid].append(str(f))
                ds = None
            if ds is None:
                skipped.append((str(f), why))
                (logger.warning if why.startswith("unreadable") else logger.debug)("skipping %s: %s", f, why)
                continue
            headers.append((str(f), ds))
            if loc is not None:
                locations[str(f)] = loc
        try:
            series = _group(headers, locations)
        except Exception as exc:
            logger.debug("grouping failed", exc_info=True)
            raise DicomError(
                f"cannot group the DICOM files into series ({type(exc).__name__}: {exc})", path=str(root)
            ) from exc
    return ScanResult(root=str(root), series=series, skipped=skipped, n_files=len(files), damaged=dict(damaged))


def scan_folder(folder: str | os.PathLike) -> list[SeriesInfo]:
    """All series under ``folder`` (recursive; a single file is accepted too), image and non-image,
    ordered by study, series number and key. Non-DICOM files are skipped (logged at debug level)."""
    return scan(folder).series


def _text(ds: Dataset, name: str) -> str:
    try:
        return str(ds.get(name, "") or "").strip()
    except Exception:  # noqa: BLE001
        return ""


def _base_key(ds: Dataset) -> tuple:
    uid = _text(ds, "SeriesInstanceUID")
    if uid:
        return (uid,)
    # Blank UID (anonymised data): group by what else identifies a series.
    return (
        "",
        _text(ds, "StudyInstanceUID"),
        _text(ds, "SeriesNumber"),
        _text(ds, "Modality"),
        _text(ds, "FrameOfReferenceUID"),
        _text(ds, "SeriesDescription"),
    )


def _group(headers: list[_Member], locations: dict[str, PixelLocation]) -> list[SeriesInfo]:
    by_base: dict[tuple, list[_Member]] = defaultdict(list)
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
        infos: list[SeriesInfo] = []
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
        for info in infos:
            out.extend(_split_volumes(info))
    out.sort(key=lambda s: (s.study_uid, s.series_number if s.series_number is not None else -1, s.key))
    for s in out:
        s.pixel_locations = {f: locations[f] for f in s.files if f in locations}
    return out


def _split_stacks(members: list[_Member]) -> list[tuple[list[_Member], int]]:
    """Split one series' files into stacks: each multi-frame object alone; single frames by
    (SeriesNumber, Rows, Columns) and then by image plane within ``IOP_TOLERANCE``."""
    stacks: list[tuple[list[_Member], int]] = []
    singles: dict[tuple, list[_Member]] = defaultdict(list)
    for f, ds in members:
        if n_frames(ds) > 1 or is_enhanced_multiframe(ds):
            stacks.append(([(f, ds)], n_frames(ds)))
        else:
            singles[
                (_text(ds, "SeriesNumber"), header_int(ds, "Rows"), header_int(ds, "Columns"), is_mosaic(ds))
            ].append((f, ds))
    for group in singles.values():
        planes: list[tuple[np.ndarray, list[_Member]]] = []
        no_iop: list[_Member] = []
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
            planes.append((np.zeros(6), no_iop))
        stacks.extend((lst, _n_images(lst)) for _, lst in planes)
    return stacks


def _n_images(stack: list[_Member]) -> int:
    """2D images in a stack of single-frame files: one per file, a mosaic's tiles each."""
    return sum((mosaic_n_images(ds) or 1) if is_mosaic(ds) else 1 for _, ds in stack)


def _patient_token(ds: Dataset) -> str:
    pid, name = _text(ds, "PatientID"), _text(ds, "PatientName")
    if not pid and not name:
        return ""
    return hashlib.sha256(f"{pid}\0{name}".encode("utf-8", "replace")).hexdigest()[:16]


def _make_info(key: str, uid: str, stack: list[_Member]) -> SeriesInfo:
    first = stack[0][1]
    iop = next((v for v in (header_orientation(ds) for _, ds in stack) if v is not None), None)
    if iop is None and is_enhanced_multiframe(first):
        iop = header_orientation(first)
    multiframe = len(stack) == 1 and (n_frames(first) > 1 or is_enhanced_multiframe(first))
    mosaic = not multiframe and any(is_mosaic(ds) for _, ds in stack)
    rows, columns = header_int(first, "Rows", 0) or 0, header_int(first, "Columns", 0) or 0
    n_tiles = mosaic_n_images(first) if mosaic else None
    if n_tiles:
        grid = int(np.ceil(np.sqrt(n_tiles)))
        if rows % grid == 0 and columns % grid == 0:
            rows, columns = rows // grid, columns // grid
    return SeriesInfo(
        key=key,
        uid=uid,
        modality=_text(first, "Modality"),
        description=_text(first, "SeriesDescription"),
        series_number=header_int(first, "SeriesNumber"),
        n_slices=n_frames(first) if multiframe else _n_images(stack),
        files=[f for f, _ in stack],
        headers=[ds for _, ds in stack],
        orientation=orientation_label(iop),
        image_orientation=tuple(float(v) for v in iop) if iop is not None else None,
        rows=rows,
        columns=columns,
        is_image=all(_is_image(ds) for _, ds in stack),
        multiframe=multiframe,
        mosaic=mosaic,
        study_uid=_text(first, "StudyInstanceUID"),
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID"),
        patient_token=_patient_token(first),
    )


def _positions(stack: list[_Member], iop: tuple[float, ...] | None) -> list[int | None]:
    """A position label per file (equal = same slice position along the normal); ``None`` without IPP."""
    if iop is None:
        return [None] * len(stack)
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        return [None] * len(stack)
    normal = normal / norm
    values = []
    for _, ds in stack:
        ipp = header_position(ds)
        values.append(None if ipp is None else float(np.dot(ipp, normal)))
    # Cluster sorted positions: consecutive ones closer than the tolerance are the same position.
    order = sorted((v, i) for i, v in enumerate(values) if v is not None)
    labels: list[int | None] = [None] * len(stack)
    label, previous = -1, None
    for v, i in order:
        if previous is None or v - previous >= _SAME_POSITION_MM:
            label += 1
        labels[i] = label
        previous = v
    return labels


def _repeats(labels: list[int | None]) -> bool:
    seen = [x for x in labels if x is not None]
    return len(seen) != len(set(seen))


def _split_by(stack: list[_Member], labels: list[int | None], values: list[str | None]) -> list[list[int]] | None:
    """Indices grouped by ``values`` when these tell every repeated position apart, else ``None``."""
    if any(v is None for v in values) or len(set(values)) < 2:
        return None
    seen: set[tuple] = set()
    for label, v in zip(labels, values):
        if label is None:
            continue
        if (label, v) in seen:
            return None  # two images at one position share the value: it does not tell them apart
        seen.add((label, v))
    groups: dict[str, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        groups[v].append(i)  # type: ignore[index]
    # As many volumes as images at the most repeated position: an attribute that is different for
    # every image (some scanners number each slice's acquisition) describes no volumes.
    counts: dict[int, int] = defaultdict(int)
    for label in labels:
        if label is not None:
            counts[label] += 1
    if len(groups) != max(counts.values(), default=0):
        return None

    def order(v: str):
        try:
            return (0, float(v.split("|")[0]), v)
        except ValueError:
            return (1, 0.0, v)

    return [groups[v] for v in sorted(groups, key=order)]


def _sub_info(info: SeriesInfo, idx: list[int], key: str, **fields) -> SeriesInfo:
    stack = [(info.files[i], info.headers[i]) for i in idx]
    sub = _make_info(key, info.uid, stack)
    sub.split_note = info.split_note
    for name, value in fields.items():
        setattr(sub, name, value)
    return sub


def _split_volumes(info: SeriesInfo) -> list[SeriesInfo]:
    """A stack whose single-frame images repeat positions, split into echoes and/or volumes."""
    if info.multiframe or len(info.files) < 2:
        return [info]
    stack = list(zip(info.files, info.headers))
    labels = _positions(stack, info.image_orientation)
    if not _repeats(labels):
        return [info]
    echoes = [header_int(ds, "EchoNumbers") for _, ds in stack]
    echo_groups: list[tuple[int | None, list[int]]] | None = None
    if all(e is not None for e in echoes) and len(set(echoes)) > 1:
        groups: dict[int, list[int]] = defaultdict(list)
        for i, number in enumerate(echoes):
            groups[number or 0].append(i)
        echo_groups = [(number, groups[number]) for number in sorted(groups)]
    out: list[SeriesInfo] = []
    for echo, idx in echo_groups or [(None, list(range(len(stack))))]:
        sub_labels = [labels[i] for i in idx]
        prefix = info.key + (f"#echo{echo}" if echo is not None else "")
        volumes = None
        attribute = ""
        if _repeats(sub_labels):
            for attribute, getter in VOLUME_ATTRIBUTES:  # noqa: B007  (the attribute that split is kept)
                volumes = _split_by([stack[i] for i in idx], sub_labels, [getter(stack[i][1]) for i in idx])
                if volumes is not None:
                    break
        if volumes is None:
            if echo is None:
                return [info]  # nothing tells the repeats apart: reading reports the duplicates
            out.append(_sub_info(info, idx, prefix, group_key=info.key, echo=echo))
            continue
        for v, vidx in enumerate(volumes, start=1):
            out.append(
                _sub_info(
                    info,
                    [idx[i] for i in vidx],
                    f"{prefix}#vol{v}",
                    group_key=info.key,
                    echo=echo,
                    volume=v,
                    volume_attribute=attribute,
                )
            )
    return out


__all__ = [
    "IOP_TOLERANCE",
    "NON_IMAGE_MODALITIES",
    "ScanResult",
    "SeriesInfo",
    "check_rules",
    "describe_series",
    "functional_group_item",
    "header_orientation",
    "is_enhanced_multiframe",
    "list_series",
    "orientation_label",
    "read_header",
    "scan",
    "scan_files",
    "scan_folder",
    "select_series",
]
