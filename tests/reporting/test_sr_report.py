"""The DICOM SR (TID 1500) of segment volumes: dciodvfy-clean, highdicom reads back each segment's volume, which
equals voxel count x voxel volume and references that segment of the SEG; ``segapp infer --format seg,sr,stats``
writes it with statistics.json and the CSV row and sends it with the SEG."""

from __future__ import annotations

import csv
import json

import numpy as np
import pydicom
import pytest
import torch
from dicom_phantoms import PATIENT_ID, write_phantom_series
from dicom_validation import assert_dciodvfy_clean
from orthanc_rest import derived_by_study
from orthanc_server import orthanc  # noqa: F401  (session fixture)

from app.cli import main
from app.errors import ConfigError, DicomError
from app.inference.jobs import parse_formats
from app.io.dicom_series import read_series
from app.io.dicom_sr import read_volume_sr, write_volume_sr
from app.io.seg_write import write_seg
from app.io.segments import SegmentSpec
from app.reporting.report import csv_row, series_statistics, write_statistics_json, write_volume_report

SEGMENTS = [
    {"label_value": 1, "label_name": "box", "category_code": ["91723000", "SCT", "Anatomical Structure"],
     "type_code": ["10200004", "SCT", "Liver"]},
    {"label_value": 2, "label_name": "sphere"},
    {"label_value": 3, "label_name": "bar"},
    {"label_value": 5, "label_name": "absent"},
]  # fmt: skip


@pytest.mark.parametrize("orientation", ["oblique", "coronal"])
def test_sr_volumes_reference_the_seg_segments(tmp_path, orientation):
    info = write_phantom_series(tmp_path / "ct", orientation=orientation, reverse_file_order=True)
    vol = read_series(tmp_path / "ct")
    seg_path = write_seg(
        vol, info.mask_ijk, [SegmentSpec.from_dict(s) for s in SEGMENTS], ("net", "1"), tmp_path / "s.dcm"
    )
    stats_ = series_statistics(vol, info.mask_ijk, SEGMENTS, "series_x")
    out = {
        "stats": write_statistics_json(stats_, tmp_path / "series_x_statistics.json"),
        "sr": write_volume_report(vol, stats_, seg_path, ("net", "1"), tmp_path / "series_x_sr.dcm"),
    }
    assert csv_row(stats_)["key"] == "series_x"
    assert_dciodvfy_clean(out["sr"])
    seg = pydicom.dcmread(seg_path)
    sr = pydicom.dcmread(out["sr"])
    assert sr.StudyInstanceUID == info.study_uid and sr.PatientID == PATIENT_ID  # the SR joins the study
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {
        i.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence and set(info.sop_instance_uids) <= evidence
    volumes = read_volume_sr(out["sr"])  # highdicom's reading
    voxel_ml = abs(np.linalg.det(info.affine_lps[:3, :3])) / 1000
    numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    assert set(volumes) == {(seg.SOPInstanceUID, n) for n in numbers.values()}
    for s in SEGMENTS:
        expected = int((info.mask_ijk == s["label_value"]).sum()) * voxel_ml
        assert volumes[(seg.SOPInstanceUID, numbers[s["label_name"]])] == pytest.approx(expected, rel=1e-6)
    stats = json.loads(open(out["stats"]).read())
    assert [round(s["volume_ml"], 9) for s in stats["segments"]] == [
        round(volumes[(seg.SOPInstanceUID, numbers[s["label_name"]])], 9) for s in stats["segments"]
    ]


def test_sr_needs_the_seg(tmp_path):
    info = write_phantom_series(tmp_path / "ct", shape=(8, 8, 6))
    vol = read_series(tmp_path / "ct")
    with pytest.raises(ConfigError, match="seg"):
        parse_formats("nifti,sr", dicom=True)
    assert parse_formats("nifti,overlay", dicom=False) == ["nifti", "overlay"]
    for derived in ("seg", "rtstruct", "stats", "sr"):  # a NIfTI input gets NIfTI (and the overlay) only
        with pytest.raises(ConfigError, match="need a DICOM series as input"):
            parse_formats(f"nifti,{derived}", dicom=False)
    assert parse_formats(None, dicom=False) == ["nifti"] and parse_formats(None, dicom=True) == ["nifti", "seg"]
    with pytest.raises(DicomError, match="not a DICOM SEG"):
        write_volume_sr(info.files[0], vol.datasets, {1: 1.0}, ("n", "1"), tmp_path / "sr.dcm")
    seg = write_seg(vol, info.mask_ijk, [SegmentSpec.from_dict(s) for s in SEGMENTS], ("n", "1"), tmp_path / "s.dcm")
    with pytest.raises(DicomError, match="not in the SEG"):
        write_volume_sr(seg, vol.datasets, {9: 1.0}, ("n", "1"), tmp_path / "sr.dcm")
    assert not (tmp_path / "sr.dcm").exists()


@pytest.mark.slow
def test_infer_writes_reports_and_sends_sr_with_seg(orthanc, tmp_path):  # noqa: F811
    from nets_for_tests import ThresholdNet

    info = write_phantom_series(tmp_path / "mr", modality="MR", orientation="sagittal", reverse_file_order=True)
    ckpt = tmp_path / "t.pt"
    torch.save(ThresholdNet().state_dict(), ckpt)
    override = {"network_def": {"_target_": "nets_for_tests.ThresholdNet"}, "patch_size": [32, 32, 32]}
    out = tmp_path / "out"
    args = ["infer", "hippocampus_unet3d", "--input", str(info.folder), "--output", str(out), "--device", "cpu"]
    args += ["--checkpoint", str(ckpt), "--override", json.dumps(override), "--format", "seg,stats,sr"]
    assert main([*args, "--send", orthanc.dimse_destination]) == 0
    (summary,) = out.glob("*_summary.json")
    outputs = json.loads(summary.read_text())["outputs"]
    assert {"seg", "stats", "csv", "sr"} <= set(outputs) and "nifti" not in outputs
    with open(outputs["csv"], newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    stats = json.loads(open(outputs["stats"]).read())
    assert row["key"] == summary.name.removesuffix("_summary.json") == stats["key"]
    assert [float(row[f"{s['label_name']}.volume_ml"]) for s in stats["segments"]] == pytest.approx(
        [s["voxel_count"] * stats["voxel_volume_mm3"] / 1000 for s in stats["segments"]], rel=1e-5
    )
    assert any(s["voxel_count"] for s in stats["segments"])
    arrived = {m: derived_by_study(orthanc, m).get(info.study_uid, []) for m in ("SEG", "SR")}
    assert len(arrived["SEG"]) == 1 and len(arrived["SR"]) == 1
    assert arrived["SR"][0]["series_uid"] == pydicom.dcmread(outputs["sr"]).SeriesInstanceUID
    assert main([*args[:-1], "sr"]) == 2  # the SR without the SEG it references: refused
