"""Data manifests: create, load, validate (every problem type), folds, data lists, bundled data."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TEST_DATA

from app.data.checks import structure_problems
from app.data.manifest import (
    MANIFEST_SCHEMA,
    Manifest,
    assign_folds,
    create_manifest,
    fold_datalist,
    load_manifest,
    validate_manifest,
)
from app.errors import ConfigError, InputError, ManifestError

REPO = Path(__file__).resolve().parents[2]
SHARED = TEST_DATA
SAMPLE = REPO / "sample_data" / "hippocampus"
LABELS = {0: "background", 1: "anterior", 2: "posterior"}
CASES = ["hippocampus_003", "hippocampus_004", "hippocampus_006"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A private copy of three sample cases (+ dataset.json) in MSD layout."""
    root = tmp_path / "data"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for cid in CASES:
            shutil.copyfile(SAMPLE / sub / f"{cid}.nii.gz", root / sub / f"{cid}.nii.gz")
    shutil.copyfile(SAMPLE / "dataset.json", root / "dataset.json")
    return root


def _create(root: Path, **kw) -> Path:
    out = root.parent / "manifests" / "m.json"
    kw.setdefault("labels", LABELS)
    create_manifest(root, name="t", num_folds=3, output=out, **kw)
    return out


def _rewrite(path: Path, fn) -> None:
    """Replace a NIfTI file by ``fn(array, affine) -> (array, affine)`` applied to it."""
    img = nib.load(str(path))
    arr, aff = fn(np.asanyarray(img.dataobj).copy(), img.affine.copy())
    nib.save(nib.Nifti1Image(arr, aff), str(path))


def _only_problem(problems: list[str], path: Path, *words: str) -> str:
    assert len(problems) == 1, problems
    (p,) = problems
    assert p.startswith(str(path)), p
    for w in words:
        assert w in p, p
    return p


# ---------------------------------------------------------------------------------------------
# create / load


def test_schema_file_is_the_code_schema():
    on_disk = json.loads((REPO / "data_manifests" / "manifest.schema.json").read_text())
    assert on_disk == MANIFEST_SCHEMA


def test_create_load_and_validate_clean_copy(data: Path):
    out = _create(data)
    doc = json.loads(out.read_text())
    assert doc["data_root"] == "../data"  # stored relative to the manifest's folder
    assert [c["id"] for c in doc["cases"]] == CASES
    assert doc["cases"][0]["image"] == "imagesTr/hippocampus_003.nii.gz"
    assert sorted(c["fold"] for c in doc["cases"]) == [0, 1, 2]
    assert validate_manifest(out) == []

    m = load_manifest(out)
    assert isinstance(m, Manifest)
    assert m.data_root == data.resolve()
    assert m.labels == LABELS
    assert m.cases[1].image == data.resolve() / "imagesTr" / "hippocampus_004.nii.gz"
    assert m.cases[1].label.is_file()
    assert len(m.content_hash) == 64
    m.raise_if_invalid()

    # Same content -> same hash; moving manifest + data together keeps it loadable.
    moved = data.parent.parent / "moved"
    shutil.copytree(data.parent, moved)
    m2 = load_manifest(moved / "manifests" / "m.json")
    assert m2.content_hash == m.content_hash
    assert m2.data_root == (moved / "data").resolve()


def test_create_reads_labels_from_dataset_json(data: Path):
    out = _create(data, labels=None)
    assert load_manifest(out).labels == {0: "background", 1: "Anterior", 2: "Posterior"}


def test_create_accepts_nnunet_v2_labels_and_file_names(data: Path):
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "anterior": 1, "posterior": 2}}))
    for p in (data / "imagesTr").iterdir():
        p.rename(p.with_name(p.name.replace(".nii.gz", "_0000.nii.gz")))
    m = load_manifest(_create(data, labels=None))
    assert m.labels == LABELS
    assert m.case_ids == CASES
    assert m.cases[0].image.name == "hippocampus_003_0000.nii.gz"
    assert m.cases[0].label.name == "hippocampus_003.nii.gz"


def test_create_skips_hidden_files_and_reports_unpaired_images(data: Path):
    (data / "imagesTr" / "._hippocampus_003.nii.gz").write_bytes(b"\0\5\26\7")  # macOS AppleDouble
    assert load_manifest(_create(data)).case_ids == CASES
    (data / "labelsTr" / "hippocampus_004.nii.gz").unlink()
    with pytest.raises(ManifestError) as err:
        _create(data)
    assert len(err.value.problems) == 1
    assert "hippocampus_004.nii.gz" in err.value.problems[0]
    with pytest.raises(InputError):
        create_manifest(data / "nope", labels=LABELS, output=data / "x.json")
    with pytest.raises(InputError, match="no images"):
        create_manifest(data, images_glob="imagesTs/*.nii.gz", labels=LABELS, output=data / "x.json")


def test_create_rejects_bad_label_maps(data: Path):
    with pytest.raises(ManifestError, match="ignore_value"):
        _create(data, ignore_value=2)
    (data / "dataset.json").unlink()
    with pytest.raises(ConfigError, match="labels"):
        _create(data, labels=None)
    with pytest.raises(ConfigError, match="num_folds"):
        create_manifest(data, labels=LABELS, num_folds=4, output=data / "x.json")


# ---------------------------------------------------------------------------------------------
# validate: each problem found, naming the file


def test_missing_file(data: Path):
    out = _create(data)
    label = data / "labelsTr" / "hippocampus_004.nii.gz"
    label.unlink()
    _only_problem(validate_manifest(out), label, "missing", "hippocampus_004")
    _only_problem(validate_manifest(out, check_content=False, check_checksums=False), label, "missing")


def test_checksum_mismatch(data: Path):
    out = _create(data)
    image = data / "imagesTr" / "hippocampus_006.nii.gz"
    _rewrite(image, lambda a, aff: (a + 1, aff))  # still a valid image, different bytes
    _only_problem(validate_manifest(out), image, "checksum mismatch")
    assert validate_manifest(out, check_checksums=False) == []
    with pytest.raises(ManifestError) as err:
        load_manifest(out).raise_if_invalid()
    assert len(err.value.problems) == 1 and str(image) in str(err.value)


def test_shape_mismatch(data: Path):
    label = data / "labelsTr" / "hippocampus_003.nii.gz"
    _rewrite(label, lambda a, aff: (a[:, :-2], aff))
    _only_problem(validate_manifest(_create(data)), label, "shape", "(34, 50, 35)", "(34, 52, 35)")


def test_affine_mismatch_beyond_tolerance_only(data: Path):
    label = data / "labelsTr" / "hippocampus_003.nii.gz"
    shift = np.eye(4)
    shift[0, 3] = 1e-5  # float rounding: within 1e-3 mm
    _rewrite(label, lambda a, aff: (a, shift @ aff))
    assert validate_manifest(_create(data)) == []
    shift[0, 3] = 0.01
    _rewrite(label, lambda a, aff: (a, shift @ aff))
    _only_problem(validate_manifest(_create(data)), label, "affine", "mm")


def test_label_value_outside_label_map(data: Path):
    label = data / "labelsTr" / "hippocampus_004.nii.gz"

    def put7(a, aff):
        a[0, 0, 0] = 7
        return a, aff

    _rewrite(label, put7)
    _only_problem(validate_manifest(_create(data)), label, "label values 7", "not in the label map")
    assert validate_manifest(_create(data, ignore_value=7)) == []  # the ignore value is allowed


def test_non_integer_label_values(data: Path):
    label = data / "labelsTr" / "hippocampus_004.nii.gz"
    _rewrite(label, lambda a, aff: (a.astype(np.float32) * 0.5, aff))
    _only_problem(validate_manifest(_create(data)), label, "non-integer", "0.5")


def test_nan_image(data: Path):
    image = data / "imagesTr" / "hippocampus_006.nii.gz"

    def nan(a, aff):
        a[1, 2, 3] = np.nan
        a[2, 2, 3] = np.inf
        return a, aff

    _rewrite(image, nan)
    out = _create(data)
    _only_problem(validate_manifest(out), image, "2 NaN/Inf")
    assert validate_manifest(out, check_content=False) == []


def test_truncated_file(data: Path):
    image = data / "imagesTr" / "hippocampus_003.nii.gz"
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 2])
    _only_problem(validate_manifest(_create(data)), image, "unreadable or corrupt")
    image.write_bytes(raw[:100])  # not even a full header
    _only_problem(validate_manifest(_create(data)), image, "unreadable or corrupt")


def test_several_problems_all_reported(data: Path):
    out = _create(data)
    (data / "labelsTr" / "hippocampus_003.nii.gz").unlink()
    (data / "imagesTr" / "hippocampus_006.nii.gz").write_bytes(b"garbage")
    problems = validate_manifest(out)
    assert validate_manifest(out, workers=2) == problems  # threads keep the case order
    assert len(problems) == 3  # missing label; checksum and corrupt for the image
    assert sum("missing" in p for p in problems) == 1
    assert sum("checksum" in p for p in problems) == 1
    assert sum("unreadable" in p for p in problems) == 1


def test_structural_problems(data: Path):
    out = _create(data)
    doc = json.loads(out.read_text())

    def check(mutate, *words):
        bad = json.loads(json.dumps(doc))
        mutate(bad)
        out.write_text(json.dumps(bad))
        problems = validate_manifest(out)
        assert problems and all(p.startswith(str(out.resolve())) for p in problems), problems
        assert any(all(w in p for w in words) for p in problems), problems
        with pytest.raises(ManifestError):
            load_manifest(out)

    check(lambda d: d["cases"][0].update(fold=3), "fold 3", "num_folds=3")
    check(lambda d: d["cases"][1].update(id="hippocampus_003"), "duplicate case id")
    check(lambda d: d["cases"][0].update(extra=1), "cases/0", "extra")
    check(lambda d: d.update(format="other/2"), "format")
    check(lambda d: d["cases"][0].update(image=str(data / "imagesTr" / "hippocampus_003.nii.gz")), "relative")
    check(lambda d: d["cases"][0]["sha256"].update(image="xyz"), "sha256")
    check(lambda d: d.update(labels={"0": "a", "1": "a"}), "unique")
    check(lambda d: [c.update(fold=0) for c in d["cases"]], "no cases")
    out.write_text("{not json")
    assert "not valid JSON" in validate_manifest(out)[0]
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(out)
    assert "cannot read" in validate_manifest(out.with_name("absent.json"))[0]


def test_missing_data_root(data: Path):
    out = _create(data)
    shutil.rmtree(data)
    (problem,) = validate_manifest(out)
    assert problem.startswith(str(data)) and "not a directory" in problem


# ---------------------------------------------------------------------------------------------
# folds and data lists


def test_fold_assignment_deterministic_balanced_disjoint():
    ids = [f"case_{i:03d}" for i in range(53)]
    folds = assign_folds(ids, num_folds=5, seed=0)
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert assign_folds(shuffled, num_folds=5, seed=0) == folds  # order-independent
    assert set(folds) == set(ids)
    sizes = sorted(np.bincount(list(folds.values()), minlength=5))
    assert sizes == [10, 10, 11, 11, 11]
    assert assign_folds(ids, num_folds=5, seed=1) != folds
    with pytest.raises(ConfigError):
        assign_folds(ids[:3], num_folds=5)
    with pytest.raises(ConfigError):
        assign_folds(["a", "a", "b"], num_folds=2)


def test_fold_datalist_splits():
    path = SAMPLE / "manifest.json"
    m = load_manifest(path)
    all_ids = set(m.case_ids)
    seen_val: list[str] = []
    for fold in range(m.num_folds):
        train = fold_datalist(str(path), fold=fold, split="train")
        val = fold_datalist(m, fold=fold, split="val")
        t_ids, v_ids = {d["id"] for d in train}, {d["id"] for d in val}
        assert t_ids.isdisjoint(v_ids) and (t_ids | v_ids) == all_ids
        assert 9 <= len(v_ids) <= 10
        seen_val += v_ids
        assert all(Path(d["image"]).is_absolute() and Path(d["label"]).is_file() for d in train + val)
        assert set(train[0]) == {"image", "label", "id"}
    assert sorted(seen_val) == sorted(all_ids)  # each case validated exactly once
    assert len(fold_datalist(m, 0, "all")) == 48
    assert fold_datalist(m, "3", "val") == fold_datalist(m, np.int64(3), "val") == fold_datalist(m, 3, "val")
    assert [d["id"] for d in fold_datalist(m, 0, "train", max_cases=4)] == [
        d["id"] for d in fold_datalist(m, 0, "train")[:4]
    ]
    for bad in (-1, 5, "5", "x", None, 1.0, True):
        with pytest.raises(ConfigError, match="fold"):
            fold_datalist(m, bad, "train")
    with pytest.raises(ConfigError, match="split"):
        fold_datalist(m, 0, "test")
    with pytest.raises(ConfigError, match="max_cases"):
        fold_datalist(m, 0, "train", max_cases=0)


def test_label_format_passes_through(data: Path):
    out = _create(data)
    doc = json.loads(out.read_text())
    doc["cases"][0]["label_format"] = "dicom-seg"
    out.write_text(json.dumps(doc))
    m = load_manifest(out)
    assert m.cases[0].label_format == "dicom-seg" and m.cases[1].label_format == "nifti"
    items = {d["id"]: d for d in fold_datalist(m, 0, "all")}
    assert items["hippocampus_003"]["label_format"] == "dicom-seg"
    assert "label_format" not in items["hippocampus_004"]
    assert validate_manifest(out) == []  # not decoded, but present and checksummed


def test_fold_datalist_from_bundle_config_and_monai_loading():
    from monai.bundle import ConfigParser
    from monai.transforms import LoadImaged

    parser = ConfigParser(
        {
            "manifest_path": str(SAMPLE / "manifest.json"),
            "fold": 2,
            "val": {
                "_target_": "app.data.manifest.fold_datalist",
                "manifest": "@manifest_path",
                "fold": "@fold",
                "split": "val",
            },
        }
    )
    val = parser.get_parsed_content("val")
    assert [d["id"] for d in val] == load_manifest(SAMPLE / "manifest.json").folds[2]
    item = LoadImaged(keys=["image", "label"], ensure_channel_first=True)(val[0])
    assert item["image"].shape[1:] == item["label"].shape[1:]
    assert item["image"].shape[0] == 1 and item["image"].ndim == 4


# ---------------------------------------------------------------------------------------------
# bundled manifests and sample data


def test_hippocampus_manifest_structure():
    """The manifest of the full MSD set (its files live outside the repo; bench/check_manifests.py checks them)."""
    path = REPO / "data_manifests" / "hippocampus.json"
    doc = json.loads(path.read_text())
    assert doc["data_root"] == "../../shared/data/msd_hippocampus"
    assert structure_problems(doc, str(path)) == []
    assert len(doc["cases"]) == 208 and {int(k): v for k, v in doc["labels"].items()} == LABELS
    folds = [sum(1 for c in doc["cases"] if c["fold"] == f) for f in range(doc["num_folds"])]
    assert doc["num_folds"] == 5 and sorted(folds) == [41, 41, 42, 42, 42]


def test_sample_data_manifest_and_size():
    m = load_manifest(SAMPLE / "manifest.json")
    assert json.loads((SAMPLE / "manifest.json").read_text())["data_root"] == "."
    assert len(m.cases) == 48 and m.num_folds == 5
    assert validate_manifest(m) == []
    full = {c.id: c.sha256 for c in load_manifest(REPO / "data_manifests" / "hippocampus.json").cases}
    assert m.case_ids == sorted(full)[:48]  # the 48 lowest-numbered cases
    assert all(c.sha256 == full[c.id] for c in m.cases)  # unchanged copies
    size = sum(p.stat().st_size for p in (REPO / "sample_data").rglob("*") if p.is_file())
    assert size < 6 * 2**20
    readme = (SAMPLE / "README.md").read_text()
    assert "CC-BY-SA 4.0" in readme and "Task04" in readme and "subset" in readme


def test_sample_dicom_series():
    import pydicom

    folder = REPO / "sample_data" / "mr_dicom_series"
    files = sorted(folder.rglob("*.dcm"))
    assert len(files) == 32
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert {(h.Rows, h.Columns) for h in headers} == {(51, 35)}
    assert "CC BY 3.0" in (folder / "README.md").read_text()
