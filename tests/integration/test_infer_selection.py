"""Choosing what to segment in a DICOM folder: ``--study-uid`` for a folder of two patients' studies,
``--series-uid UID#volN`` / ``--volume N`` for one volume of a 4D series (each volume its own outputs),
and ``segapp list-series`` to see the choices (no patient names or IDs)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from dicom_phantoms import PATIENT_ID, PATIENT_NAME, edit_file, write_phantom_series
from pydicom.uid import generate_uid

from app.cli import main


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    from nets_for_tests import ThresholdNet

    ckpt = tmp_path_factory.mktemp("ckpt") / "threshold.pt"
    torch.save(ThresholdNet().state_dict(), ckpt)
    over = {"network_def": {"_target_": "nets_for_tests.ThresholdNet"}, "patch_size": [32, 32, 32]}
    return ["--checkpoint", str(ckpt), "--device", "cpu", "--override", json.dumps(over), "--format", "nifti"]


def _two_patients(root):
    a = write_phantom_series(root / "a", modality="MR", rescale=(1.0, 0.0), shape=(24, 20, 12))
    b = write_phantom_series(root / "b", modality="MR", rescale=(1.0, 0.0), shape=(28, 20, 12))
    for f in b.files:
        edit_file(f, PatientID="OTHER", PatientName="Other^Patient")
    return a, b


def test_two_studies_refused_then_chosen_by_study_uid(tmp_path, model_args, capsys):
    a, b = _two_patients(tmp_path / "in")
    rc = main(
        ["infer", "hippocampus_unet3d", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), *model_args]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--study-uid" in err and a.study_uid in err and b.study_uid in err
    assert PATIENT_NAME not in err and PATIENT_ID not in err and "Other^Patient" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    rc = main(
        [
            "infer",
            "hippocampus_unet3d",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "o"),
            "--study-uid",
            b.study_uid,
            *model_args,
        ]
    )
    assert rc == 0
    (nii,) = (tmp_path / "o").glob("*_seg.nii.gz")
    assert nib.load(nii).shape == (28, 20, 12)  # patient b's series, not the other one


def test_list_series_names_choices_without_patient_data(tmp_path, capsys):
    a, b = _two_patients(tmp_path / "in")
    assert main(["list-series", str(tmp_path / "in"), "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out)
    assert {r["study_uid"] for r in rows} == {a.study_uid, b.study_uid}
    assert {r["n_slices"] for r in rows} == {12}
    assert PATIENT_NAME not in out and PATIENT_ID not in out and "OTHER" not in out
    assert main(["list-series", str(tmp_path / "nowhere")]) == 2


def test_one_volume_of_a_4d_series_by_key_or_number(tmp_path, model_args, capsys):
    uid, study, frame = generate_uid(), generate_uid(), generate_uid()
    for v in (1, 2):
        info = write_phantom_series(
            tmp_path / "in",
            shape=(24, 20, 10),
            series_uid=uid,
            study_uid=study,
            frame_of_reference_uid=frame,
            file_prefix=f"v{v}_",
            modality="MR",
            rescale=(1.0, 100.0 * v),
        )
        for f in info.files:
            edit_file(f, TemporalPositionIdentifier=v)
    out = tmp_path / "o"
    rc = main(["infer", "hippocampus_unet3d", "--input", str(tmp_path / "in"), "--output", str(out), *model_args])
    assert rc == 2 and f"{uid}#vol1" in capsys.readouterr().err  # the refusal names the selector
    assert (
        main(
            [
                "infer",
                "hippocampus_unet3d",
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(out),
                "--series-uid",
                f"{uid}#vol1",
                *model_args,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "infer",
                "hippocampus_unet3d",
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(out),
                "--series-uid",
                uid,
                "--volume",
                "2",
                *model_args,
            ]
        )
        == 0
    )
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*_summary.json"))]
    assert len(summaries) == 2 and len({s["key"] for s in summaries}) == 2  # each volume its own outputs
    assert all("vol" in s["selection"] or "volume" in s["selection"] for s in summaries), summaries
    segs = [np.asarray(nib.load(p).dataobj) for p in sorted(out.glob("*_seg.nii.gz"))]
    assert all(s.shape == (24, 20, 10) for s in segs)


def test_seg_type_labelmap_and_the_unaligned_binary_warning(tmp_path, model_args, caplog):
    import pydicom

    write_phantom_series(tmp_path / "in", modality="MR", rescale=(1.0, 0.0), shape=(25, 21, 10))  # 525 px: not /8
    args = [a if a != "nifti" else "seg" for a in model_args]
    with caplog.at_level("WARNING", logger="app.io.seg_write"):
        assert (
            main(
                ["infer", "hippocampus_unet3d", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "b"), *args]
            )
            == 0
        )
    assert "not a whole number of bytes" in caplog.text and "--seg-type labelmap" in caplog.text
    assert (
        main(
            [
                "infer",
                "hippocampus_unet3d",
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "l"),
                "--seg-type",
                "labelmap",
                *args,
            ]
        )
        == 0
    )
    (binary,), (labelmap,) = list((tmp_path / "b").glob("*_seg.dcm")), list((tmp_path / "l").glob("*_seg.dcm"))
    assert pydicom.dcmread(binary).SegmentationType == "BINARY"
    seg = pydicom.dcmread(labelmap)
    assert seg.SegmentationType == "LABELMAP" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
