"""``segapp infer`` on DICOM series: SEG agrees with the NIfTI output, validator-clean, round trip via a real
Orthanc."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from dicom_phantoms import write_phantom_series
from dicom_validation import assert_dciodvfy_clean
from dicomweb_client.api import DICOMwebClient
from orthanc_server import orthanc  # noqa: F401  (session fixture)

from app.cli import main
from app.io.dicom_series import read_series
from app.io.seg_read import read_seg

BUNDLE = "hippocampus_unet3d"


@pytest.fixture(scope="module")
def threshold_args(tmp_path_factory) -> list[str]:
    from nets_for_tests import ThresholdNet

    ckpt = tmp_path_factory.mktemp("ckpt") / "threshold.pt"
    torch.save(ThresholdNet().state_dict(), ckpt)
    return [
        "--checkpoint",
        str(ckpt),
        "--device",
        "cpu",
        "--override",
        json.dumps({"network_def": {"_target_": "nets_for_tests.ThresholdNet"}, "patch_size": [32, 32, 32]}),
    ]


def _outputs(out: Path) -> dict:
    (summary,) = list(out.glob("*_summary.json"))
    return json.loads(summary.read_text())["outputs"]


@pytest.mark.parametrize("study", ["Study1", "Study2", "Study3"])
def test_real_mr_series_seg_equals_nifti(study, real_data, tmp_path, threshold_args):
    src = real_data / "mr_dicom_series" / study
    out = tmp_path / "out"
    assert (
        main(
            [
                "infer",
                BUNDLE,
                "--input",
                str(src),
                "--output",
                str(out),
                "--format",
                "nifti,seg,rtstruct",
                *threshold_args,
            ]
        )
        == 0
    )
    files = _outputs(out)
    nifti = nib.load(files["nifti"])
    volume = read_series(src)
    assert nifti.shape == volume.shape
    np.testing.assert_allclose(nifti.affine, volume.affine_ras, atol=1e-4)
    labels_nifti = np.asarray(nifti.dataobj)
    assert labels_nifti.any(), "the threshold model should label something"
    labels_seg, affine_lps = read_seg(files["seg"], volume)
    np.testing.assert_array_equal(labels_seg, labels_nifti)
    np.testing.assert_allclose(affine_lps, volume.affine_lps, atol=1e-4)
    assert_dciodvfy_clean(files["seg"])
    assert_dciodvfy_clean(files["rtstruct"])
    seg = pydicom.dcmread(files["seg"])
    assert seg.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == volume.datasets[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != volume.series_instance_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior", "posterior"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "5366008"


def test_ct_series_refused_by_mr_rules_without_output(real_data, tmp_path, threshold_args, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "infer",
            BUNDLE,
            "--input",
            str(real_data / "totalseg_example" / "ct_dicom"),
            "--output",
            str(out),
            *threshold_args,
        ]
    )
    assert rc == 2
    assert "no image series matches modality MR" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_infer_send_to_orthanc_and_find_seg_by_qido(orthanc, tmp_path, threshold_args):  # noqa: F811
    info = write_phantom_series(
        tmp_path / "series", orientation="coronal", modality="MR", shape=(24, 20, 16), reverse_file_order=True
    )
    client = DICOMwebClient(url=orthanc.dicomweb_url)
    client.store_instances([pydicom.dcmread(f) for f in info.files])
    out = tmp_path / "out"
    assert (
        main(
            [
                "infer",
                BUNDLE,
                "--input",
                str(tmp_path / "series"),
                "--output",
                str(out),
                "--format",
                "seg",
                "--send",
                orthanc.dicomweb_destination,
                "--send",
                orthanc.dimse_destination,
                *threshold_args,
            ]
        )
        == 0
    )
    seg_path = _outputs(out)["seg"]
    seg_uid = pydicom.dcmread(seg_path).SOPInstanceUID
    found = client.search_for_series(search_filters={"Modality": "SEG", "StudyInstanceUID": info.study_uid})
    assert len(found) == 1
    series_uid = found[0]["0020000E"]["Value"][0]
    (instance,) = client.search_for_instances(study_instance_uid=info.study_uid, series_instance_uid=series_uid)
    assert instance["00080018"]["Value"][0] == seg_uid
    stored = client.retrieve_instance(info.study_uid, series_uid, seg_uid)
    ref = stored.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == info.series_uid
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == {
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in info.files
    }


def test_seg2nifti_cli_reads_dcmqi_liver_on_its_source_grid(real_data, tmp_path):
    root = real_data / "dicom_seg_refs" / "dcmqi" / "data" / "segmentations"
    out = tmp_path / "liver.nii.gz"
    assert (
        main(["seg2nifti", str(root / "liver.dcm"), "--reference", str(root / "ct-3slice"), "--output", str(out)]) == 0
    )
    img = nib.load(str(out))
    volume = read_series(root / "ct-3slice")
    assert img.shape == volume.shape
    np.testing.assert_allclose(img.affine, volume.affine_ras, atol=1e-4)
    assert int((np.asarray(img.dataobj) > 0).sum()) == 107098  # dcmqi's liver_seg.nrrd voxel count
