"""DICOM segment codes: from the bundle when it has them, else SNOMED CT codes of common structures, else a
private code carrying the label name; ``--segments FILE`` overrides per label (checked in the written SEG).

The table is checked against pydicom's copy of DICOM PS3.16 (the context groups CID 7150 Segmentation
Property Category and CID 7151 Segmentation Property Type, with their code meanings).
"""

from __future__ import annotations

import json

import pydicom
import pydicom.sr._cid_dict as cid_dict
import pydicom.sr._concepts_dict as concepts_dict
import pytest
import torch
from dicom_phantoms import write_phantom_series

from app.bundle.metadata import ABNORMAL, ANATOMY, COMMON_STRUCTURES, LATERALITY, TISSUE, segment_descriptions
from app.cli import main

SCT = concepts_dict.concepts["SCT"]


def _in_cid(code: tuple[str, str, str], cid: int) -> bool:
    """``code`` (value, scheme, meaning) is a member of ``cid`` in PS3.16, with that meaning."""
    value, scheme, meaning = code
    assert scheme == "SCT"
    names = cid_dict.cid_concepts[cid].get("SCT", [])
    return any(SCT[n].get(value, ("", ()))[0] == meaning for n in names)


@pytest.mark.parametrize("name", sorted(COMMON_STRUCTURES))
def test_common_structure_codes_are_dicom_segmentation_property_types(name):
    category, type_code = COMMON_STRUCTURES[name]
    assert _in_cid(category, 7150), f"{name}: category {category} is not in CID 7150"
    assert _in_cid(type_code, 7151), f"{name}: type {type_code} is not in CID 7151 with that meaning"


def test_categories_and_laterality():
    assert cid_dict.name_for_cid[7150] == "SegmentationPropertyCategory"
    for category in (ANATOMY, TISSUE, ABNORMAL):
        assert _in_cid(category, 7150)
    for side, code in LATERALITY.items():
        assert _in_cid(code, 244) and code[2].lower() == side


def test_descriptions_from_the_bundle_the_table_or_a_private_code():
    own = {
        "label_value": 2,
        "label_name": "tumour core",
        "category_code": list(ABNORMAL),
        "type_code": ["108369006", "SCT", "Neoplasm"],
    }
    labels = {0: "background", 1: "Spleen", 2: "anything", 3: "kidney_left", 4: "my structure"}
    out = {d["label_value"]: d for d in segment_descriptions({"segments": [own]}, labels)}
    assert sorted(out) == [1, 2, 3, 4]  # background gets none
    assert out[1]["type_code"] == ["78961009", "SCT", "Spleen"] and out[1]["label_name"] == "Spleen"
    assert out[2] is own  # the bundle's own description wins over the table
    assert out[3]["type_code"] == ["64033007", "SCT", "Kidney"]
    assert out[3]["type_modifier_code"] == ["7771000", "SCT", "Left"]
    assert out[4]["type_code"] == ["L4", "99SEGAPP", "my structure"]
    assert "type_modifier_code" not in out[1]


@pytest.fixture()
def threshold_args(tmp_path) -> list[str]:
    from nets_for_tests import ThresholdNet

    ckpt = tmp_path / "threshold.pt"
    torch.save(ThresholdNet().state_dict(), ckpt)
    override = {"network_def": {"_target_": "nets_for_tests.ThresholdNet"}, "patch_size": [32, 32, 32]}
    return ["--checkpoint", str(ckpt), "--device", "cpu", "--override", json.dumps(override)]


def _segments(seg_file: str) -> dict[int, tuple]:
    ds = pydicom.dcmread(seg_file)
    return {
        int(s.SegmentNumber): (
            s.SegmentLabel,
            tuple(s.SegmentedPropertyCategoryCodeSequence[0][t].value for t in ("CodeValue", "CodingSchemeDesignator")),
            tuple(
                s.SegmentedPropertyTypeCodeSequence[0][t].value
                for t in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
            ),
        )
        for s in ds.SegmentSequence
    }


def test_segments_file_overrides_per_label_in_the_written_seg(tmp_path, threshold_args):
    write_phantom_series(tmp_path / "s", modality="MR", shape=(40, 36, 20))
    override = [
        {
            "label_value": 1,
            "label_name": "hippocampal head",
            "category_code": ["91723000", "SCT", "Anatomical Structure"],
            "type_code": ["5366008", "SCT", "Hippocampus"],
            "color_rgb": [255, 0, 0],
        }
    ]
    (tmp_path / "segments.json").write_text(json.dumps(override))
    args = ["infer", "hippocampus_unet3d", "--input", str(tmp_path / "s"), "--output", str(tmp_path / "out")]
    assert main([*args, "--segments", str(tmp_path / "segments.json"), *threshold_args]) == 0
    (seg,) = (tmp_path / "out").glob("*_seg.dcm")
    segments = _segments(str(seg))
    assert segments[1] == ("hippocampal head", ("91723000", "SCT"), ("5366008", "SCT", "Hippocampus"))
    # label 2 keeps the bundle's own description (its metadata's "segments")
    assert segments[2] == ("posterior", ("91723000", "SCT"), ("5366008", "SCT", "Hippocampus"))


@pytest.mark.parametrize(
    "content,why",
    [
        ([{"label_value": 7, "label_name": "x"}], "label value 7 is not one of the bundle's labels (1, 2)"),
        (
            [{"label_value": 1, "label_name": "x", "type_code": ["1", "SCT"]}],
            "type_code must be [value, scheme, meaning]",
        ),
        ({"label_value": 1}, "expected a JSON list"),
    ],
)
def test_a_bad_segments_file_is_one_line_naming_it(tmp_path, threshold_args, capsys, content, why):
    write_phantom_series(tmp_path / "s", modality="MR")
    bad = tmp_path / "segments.json"
    bad.write_text(json.dumps(content))
    out = tmp_path / "out"
    args = ["infer", "hippocampus_unet3d", "--input", str(tmp_path / "s"), "--output", str(out)]
    assert main([*args, "--segments", str(bad), *threshold_args]) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("segapp: error:")]
    assert str(bad) in line and why in line
    assert not out.exists() or not any(out.iterdir())  # checked before the run: nothing written
