"""Data manifests: which image/label files make up a data set, their checksums and CV folds.

A manifest is a JSON file (format ``segapp-manifest/1``, documented in ``data_manifests/README.md``,
schema in :data:`MANIFEST_SCHEMA`) that lists cases with paths relative to a data root, the label
map and a fixed assignment of every case to one of ``num_folds`` cross-validation folds.

Typical use::

    create_manifest("data/Task04", labels={0: "background", 1: "anterior", 2: "posterior"},
                    name="hippocampus", output="data_manifests/hippocampus.json")
    problems = validate_manifest("data_manifests/hippocampus.json")
    train = fold_datalist("data_manifests/hippocampus.json", fold=0, split="train")

Fold assignment (deterministic, independent of file listing order): each case id is ranked by
``sha256(f"{seed}:{case_id}")`` (hex digest, ties broken by the id) and the case at rank ``r`` goes
to fold ``r % num_folds``; fold sizes differ by at most one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.data.checks import FORMAT, LABEL_FORMATS, MANIFEST_SCHEMA, check_case, file_sha256, structure_problems
from app.errors import ConfigError, InputError, ManifestError
from app.io.atomic import atomic_write_text

__all__ = [
    "FORMAT",
    "LABEL_FORMATS",
    "MANIFEST_SCHEMA",
    "Case",
    "Manifest",
    "assign_folds",
    "create_manifest",
    "fold_datalist",
    "load_manifest",
    "manifest_to_json",
    "validate_manifest",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "all")
_IMAGE_SUFFIXES = (".nii.gz", ".nii")
# nnU-Net names images "<case>_0000.nii.gz" (channel 0) and labels "<case>.nii.gz".
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


@dataclass(frozen=True)
class Case:
    """One image/label pair. ``image`` and ``label`` are absolute paths."""

    id: str
    image: Path
    label: Path
    fold: int
    sha256: dict[str, str] = field(default_factory=dict)
    label_format: str = "nifti"


@dataclass
class Manifest:
    """A loaded manifest with paths resolved against its data root.

    Attributes:
        path: the manifest file (absolute).
        name, description: from the file.
        data_root: absolute data root.
        labels: label value -> name.
        ignore_value: label value meaning "not annotated" (sparse labels), or None.
        num_folds: number of cross-validation folds.
        cases: cases in file order.
        content_hash: hex SHA-256 of the manifest file's bytes (log it with a run to track the data).
    """

    path: Path
    name: str
    description: str
    data_root: Path
    labels: dict[int, str]
    ignore_value: int | None
    num_folds: int
    cases: list[Case]
    content_hash: str

    @property
    def case_ids(self) -> list[str]:
        return [c.id for c in self.cases]

    @property
    def folds(self) -> dict[int, list[str]]:
        """Fold number -> case ids in that fold (every fold ``0..num_folds-1`` present)."""
        out: dict[int, list[str]] = {f: [] for f in range(self.num_folds)}
        for c in self.cases:
            out.setdefault(c.fold, []).append(c.id)
        return out

    @property
    def allowed_label_values(self) -> set[int]:
        """Values a label voxel may take: the label map's keys plus the ignore value."""
        return set(self.labels) | ({self.ignore_value} if self.ignore_value is not None else set())

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise KeyError(case_id)

    def validate(self, check_content: bool = True, check_checksums: bool = True, workers: int = 1) -> list[str]:
        """All problems with this manifest and its files (see :func:`validate_manifest`)."""
        return validate_manifest(
            self.path, check_content=check_content, check_checksums=check_checksums, workers=workers
        )

    def raise_if_invalid(self, check_content: bool = True, check_checksums: bool = True) -> None:
        """Raise :class:`ManifestError` listing every problem, if there is any."""
        problems = self.validate(check_content=check_content, check_checksums=check_checksums)
        if problems:
            raise ManifestError(f"{len(problems)} problem(s) in the data manifest", problems=problems, path=self.path)


# ----------------------------------------------------------------------------------------------
# Folds


def assign_folds(case_ids: list[str], num_folds: int = 5, seed: int = 0) -> dict[str, int]:
    """Deterministic, balanced fold assignment: case id -> fold in ``0..num_folds-1``.

    Ids are ranked by ``sha256(f"{seed}:{id}")`` and dealt round-robin, so the result depends only
    on the set of ids and the seed (not on their order); fold sizes differ by at most one.
    """
    if len(set(case_ids)) != len(case_ids):
        raise ConfigError("case ids must be unique")
    if not 1 <= num_folds <= max(1, len(case_ids)):
        raise ConfigError(f"num_folds must be between 1 and the number of cases ({len(case_ids)}), got {num_folds}")
    ranked = sorted(case_ids, key=lambda cid: (hashlib.sha256(f"{seed}:{cid}".encode()).hexdigest(), cid))
    return {cid: rank % num_folds for rank, cid in enumerate(ranked)}


# ----------------------------------------------------------------------------------------------
# Reading


def _read_doc(path: Path) -> tuple[Any, bytes]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest ({exc.strerror or exc})", path=path) from exc
    try:
        return json.loads(raw.decode("utf-8")), raw
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"not valid JSON ({exc})", path=path) from exc


def _build(doc: dict, path: Path, raw: bytes) -> Manifest:
    root = Path(doc["data_root"]).expanduser()
    root = (root if root.is_absolute() else path.parent / root).resolve()
    cases = [
        Case(
            id=c["id"],
            image=root / c["image"],
            label=root / c["label"],
            fold=int(c["fold"]),
            sha256=dict(c.get("sha256", {})),
            label_format=c.get("label_format", "nifti"),
        )
        for c in doc["cases"]
    ]
    return Manifest(
        path=path,
        name=doc["name"],
        description=doc.get("description", ""),
        data_root=root,
        labels={int(k): v for k, v in sorted(doc["labels"].items(), key=lambda kv: int(kv[0]))},
        ignore_value=doc.get("ignore_value"),
        num_folds=int(doc["num_folds"]),
        cases=cases,
        content_hash=hashlib.sha256(raw).hexdigest(),
    )


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and structurally check a manifest (files are not opened; see :func:`validate_manifest`).

    Raises:
        ManifestError: unreadable file, invalid JSON, or a manifest that breaks the schema (all
            problems listed in ``.problems``).
    """
    path = Path(path).expanduser().resolve()
    doc, raw = _read_doc(path)
    problems = structure_problems(doc, str(path))
    if problems:
        raise ManifestError("invalid data manifest", problems=problems, path=path)
    return _build(doc, path, raw)


def validate_manifest(
    path: str | os.PathLike | Manifest,
    check_content: bool = True,
    check_checksums: bool = True,
    workers: int = 1,
) -> list[str]:
    """Every problem with a manifest and its data, one string per problem, each naming its file.

    Always checked: JSON and schema, unique ids, folds in range, files present. With
    ``check_checksums``: SHA-256 of each file against the manifest. With ``check_content``: each file
    decodes (corrupt/truncated files reported, not raised), image and label shapes agree, their
    affines agree within 1e-3 mm, label values are in the label map (or the ignore value), image
    voxels are finite. Never raises for bad data; returns ``[]`` when all is well.

    ``workers > 1`` checks cases in that many threads (hashing and gzip decoding release the GIL);
    problems keep the manifest's case order either way.
    """
    path = path.path if isinstance(path, Manifest) else Path(path).expanduser().resolve()
    try:
        doc, raw = _read_doc(path)
    except ManifestError as exc:
        return [str(exc)]
    problems = structure_problems(doc, str(path))
    if problems:
        return problems
    manifest = _build(doc, path, raw)
    if not manifest.data_root.is_dir():
        return [f"{manifest.data_root}: data_root (from {path}) is not a directory"]
    allowed = manifest.allowed_label_values

    def one(case: Case) -> list[str]:
        return check_case(case, allowed, check_checksums=check_checksums, check_content=check_content)

    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            per_case = list(pool.map(one, manifest.cases))
    else:
        per_case = [one(case) for case in manifest.cases]
    for case_problems in per_case:
        problems.extend(case_problems)
    logger.info("validated %d cases of manifest %s: %d problem(s)", len(manifest.cases), path.name, len(problems))
    return problems


# ----------------------------------------------------------------------------------------------
# Data lists for MONAI


def fold_datalist(
    manifest: str | os.PathLike | Manifest, fold: int, split: str = "train", max_cases: int | None = None
) -> list[dict[str, str]]:
    """MONAI-style data list for one cross-validation split.

    Usable from a bundle config: ``{"_target_": "app.data.manifest.fold_datalist",
    "manifest": "@manifest_path", "fold": "@fold", "split": "train"}``.

    Args:
        manifest: a manifest path or a loaded :class:`Manifest`.
        fold: the held-out fold, ``0 <= fold < num_folds`` (an int, or a string of digits).
        split: ``"train"`` (every fold but ``fold``), ``"val"`` (fold ``fold``) or ``"all"``.
        max_cases: keep only the first ``max_cases`` entries (manifest order), e.g. for smoke runs.

    Returns:
        ``[{"image": abs_path, "label": abs_path, "id": case_id}, ...]`` in manifest order; entries
        whose case has a ``label_format`` other than ``"nifti"`` also carry ``"label_format"``.

    Raises:
        ConfigError: fold, split or max_cases out of range.
    """
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    # Command-line overrides may arrive as "0"; numpy integers are fine too.
    if isinstance(fold, str) and fold.strip().isdigit():
        fold = int(fold)
    if isinstance(fold, bool) or not isinstance(fold, numbers.Integral) or not 0 <= fold < m.num_folds:
        raise ConfigError(f"fold must be an integer in 0..{m.num_folds - 1} for manifest {m.path.name}, got {fold!r}")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    fold = int(fold)
    if max_cases is not None and (isinstance(max_cases, bool) or not isinstance(max_cases, int) or max_cases < 1):
        raise ConfigError(f"max_cases must be a positive integer or None, got {max_cases!r}")
    keep = {"train": lambda c: c.fold != fold, "val": lambda c: c.fold == fold, "all": lambda c: True}[split]
    out = []
    for c in m.cases:
        if keep(c):
            item = {"image": str(c.image), "label": str(c.label), "id": c.id}
            if c.label_format != "nifti":
                item["label_format"] = c.label_format
            out.append(item)
    if not out:
        logger.warning("manifest %s: fold %d split %r is empty", m.path.name, fold, split)
    return out[:max_cases] if max_cases is not None else out


# ----------------------------------------------------------------------------------------------
# Creating manifests


def _stem(file_name: str) -> str:
    for suffix in _IMAGE_SUFFIXES:
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return Path(file_name).stem


def _find_label(image: Path, labels_dir: Path) -> tuple[str, Path] | None:
    """``(case_id, label)``: the label with the image's file name (id = stem) or, for nnU-Net
    images ``<case>_0000.nii.gz``, the label ``<case>.nii.gz`` (id = ``<case>``)."""
    stem = _stem(image.name)
    if (labels_dir / image.name).is_file():
        return stem, labels_dir / image.name
    if _CHANNEL_SUFFIX.search(stem):
        case = _CHANNEL_SUFFIX.sub("", stem)
        for suffix in _IMAGE_SUFFIXES:
            if (labels_dir / (case + suffix)).is_file():
                return case, labels_dir / (case + suffix)
    return None


def _read_dataset_json(data_root: Path) -> dict:
    path = data_root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable dataset.json ({exc})", path=path) from exc


def _labels_from_dataset_json(info: dict, where: Path) -> dict[int, str]:
    """MSD style ``{"0": "background", ...}`` or nnU-Net v2 style ``{"background": 0, ...}``."""
    raw = info.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("no labels given and dataset.json has no 'labels' map", path=where)
    try:
        if all(isinstance(v, int) for v in raw.values()):
            return {int(v): str(k) for k, v in raw.items()}
        return {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot read the 'labels' map ({exc})", path=where) from exc


def manifest_to_json(doc: dict) -> str:
    """Serialise a manifest dict: one key per line, one case per line (readable diffs)."""
    head = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k != "cases"]
    cases = ",\n".join("    " + json.dumps(c) for c in doc.get("cases", []))
    return "{\n" + ",\n".join(head + [f'  "cases": [\n{cases}\n  ]']) + "\n}\n"


def create_manifest(
    data_root: str | os.PathLike,
    images_glob: str = "imagesTr/*.nii.gz",
    labels_dir: str = "labelsTr",
    labels: dict[int, str] | None = None,
    name: str | None = None,
    num_folds: int = 5,
    seed: int = 0,
    output: str | os.PathLike | None = None,
    description: str | None = None,
    ignore_value: int | None = None,
) -> dict:
    """Build a manifest for a folder of images and labels, and write it (atomically) to ``output``.

    Images matching ``images_glob`` (relative to ``data_root``; hidden files such as macOS ``._*``
    are skipped) are paired with ``labels_dir/<same file name>`` (or, for nnU-Net names
    ``<case>_0000.nii.gz``, ``labels_dir/<case>.nii.gz``). The case id is the file stem.

    Args:
        data_root: folder holding the data.
        images_glob: glob for the images, relative to ``data_root``.
        labels_dir: folder of the labels, relative to ``data_root``.
        labels: label value -> name; when None, read from an MSD/nnU-Net ``data_root/dataset.json``.
        name: data set name; default: dataset.json's ``name``, else the folder name.
        num_folds: number of cross-validation folds (see :func:`assign_folds`).
        seed: seed of the fold assignment.
        output: manifest file to write; ``data_root`` is stored relative to its folder (absolute
            if no relative path exists). When None nothing is written and ``data_root`` is absolute.
        description: free text; default: dataset.json's ``description``.
        ignore_value: label value meaning "not annotated", if any.

    Returns:
        The manifest as a dict (what was written).

    Raises:
        InputError: missing data root or no images. ManifestError: images without a label (all
        listed). ConfigError: no label map available, bad num_folds.
    """
    root = Path(data_root).expanduser().resolve()
    if not root.is_dir():
        raise InputError("data root is not a directory", path=root)
    images = sorted(p for p in root.glob(images_glob) if p.is_file() and not p.name.startswith("."))
    if not images:
        raise InputError(f"no images match {images_glob!r}", path=root)
    info = _read_dataset_json(root)
    if labels is None:
        labels = _labels_from_dataset_json(info, root / "dataset.json")
    labels = {int(k): str(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))}

    pairs, problems = [], []
    for image in images:
        found = _find_label(image, root / labels_dir)
        if found is None:
            problems.append(f"{image}: no label with this file name in {root / labels_dir}")
        else:
            pairs.append((found[0], image, found[1]))
    if problems:
        raise ManifestError("images without labels", problems=problems, path=root)
    ids = [cid for cid, _, _ in pairs]
    dupes = sorted({cid for cid in ids if ids.count(cid) > 1})
    if dupes:
        raise ManifestError("several images map to the same case id", problems=dupes, path=root)
    folds = assign_folds(ids, num_folds=num_folds, seed=seed)

    stored_root = str(root)
    if output is not None:
        out_dir = Path(output).expanduser().resolve().parent
        try:
            stored_root = Path(os.path.relpath(root, out_dir)).as_posix()
        except ValueError:  # different drive (Windows): keep absolute
            pass
    doc: dict[str, Any] = {
        "format": FORMAT,
        "name": name or info.get("name") or root.name,
        "description": description if description is not None else str(info.get("description", "")),
        "data_root": stored_root,
        "labels": {str(k): v for k, v in labels.items()},
        "ignore_value": ignore_value,
        "num_folds": num_folds,
        "seed": seed,
        "cases": [
            {
                "id": cid,
                "image": image.relative_to(root).as_posix(),
                "label": label.relative_to(root).as_posix(),
                "sha256": {"image": file_sha256(image), "label": file_sha256(label)},
                "fold": folds[cid],
            }
            for cid, image, label in pairs
        ],
    }
    problems = structure_problems(doc, str(output or root))
    if problems:  # e.g. a label map with duplicate names or ignore_value colliding with a label
        raise ManifestError("the manifest would be invalid", problems=problems, path=output)
    if output is not None:
        atomic_write_text(output, manifest_to_json(doc))
        logger.info("wrote manifest with %d cases to %s", len(pairs), output)
    return doc


def check_manifest_fold(manifest: str | Path, fold: int, check_checksums: bool = True) -> Manifest:
    """The manifest, after checking it matches its data (files, checksums) and has fold ``fold``;
    a :class:`ManifestError` listing every problem otherwise."""
    problems = validate_manifest(manifest, check_content=False, check_checksums=check_checksums)
    if problems:
        raise ManifestError("the manifest does not match its data", problems, manifest)
    m = load_manifest(manifest)
    if not 0 <= int(fold) < m.num_folds:
        raise ManifestError(f"--fold {fold} is outside 0..{m.num_folds - 1}", path=manifest)
    return m
