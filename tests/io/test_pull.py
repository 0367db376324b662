"""Pulling a study or series from a real Orthanc: DICOMweb (QIDO-RS + WADO-RS), DIMSE C-GET and C-MOVE; the
SEG of a pulled series equals the SEG of the same series read from a folder; failures end in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from dicom_phantoms import PATIENT_ID, PATIENT_NAME, write_phantom_series
from orthanc_rest import put_modality, upload
from orthanc_server import free_port, orthanc  # noqa: F401  (session fixture)

from app.cli import main
from app.errors import ConfigError
from app.io.pull import PullError, is_remote, parse_source, pull, pulled

PULL_AET = "SEGPULL"  # our AE title when pulling; Orthanc knows it (C-FIND/C-GET) at the C-MOVE port


@pytest.fixture(scope="module")
def pacs(orthanc, tmp_path_factory):  # noqa: F811
    """Orthanc holding one study of two MR series (sagittal, oblique), knowing our AE title."""
    root = tmp_path_factory.mktemp("pull_src")
    a = write_phantom_series(root / "a", modality="MR", orientation="sagittal", reverse_file_order=True)
    b = write_phantom_series(
        root / "b", modality="MR", orientation="oblique", study_uid=a.study_uid, series_number=2, shape=(20, 18, 12)
    )
    upload(orthanc, [*a.files, *b.files])
    move_port = free_port()
    put_modality(orthanc, "segpull", PULL_AET, move_port)
    return {"a": a, "b": b, "move_port": move_port, "orthanc": orthanc}


def _sources(pacs) -> dict[str, str]:
    o, a = pacs["orthanc"], pacs["a"]
    dimse = f"dimse://{o.aet}@127.0.0.1:{o.dicom_port}?StudyInstanceUID={a.study_uid}&calling_aet={PULL_AET}"
    return {
        "dicomweb": f"{o.dicomweb_destination}/studies/{a.study_uid}/series/{a.series_uid}",
        "c-get": f"{dimse}&SeriesInstanceUID={a.series_uid}",
        "c-move": f"{dimse}&SeriesInstanceUID={a.series_uid}&method=move&move_port={pacs['move_port']}",
    }


def test_parse_source():
    s = parse_source("dicomweb://pacs:8042/dicom-web/studies/1.2.3/series/4.5")
    assert (s.url, s.study_uid, s.series_uid) == ("http://pacs:8042/dicom-web", "1.2.3", "4.5")
    assert parse_source("dicomwebs://pacs:443/studies/1.2").url == "https://pacs:443"
    s = parse_source("dimse://PACS@10.0.0.1:104?StudyInstanceUID=1.2&method=move&move_port=11113")
    assert (s.aet, s.host, s.port, s.study_uid, s.series_uid, s.method, s.move_port) == (
        "PACS",
        "10.0.0.1",
        104,
        "1.2",
        "",
        "move",
        11113,
    )
    assert is_remote("dimse://A@h:1?StudyInstanceUID=1") and not is_remote("/data/dicom")
    for bad in (
        "dicomweb://pacs:8042/dicom-web",  # no study
        "dicomweb://pacs:8042/studies/1.2/instances/3",
        "dicomweb://pacs/studies/1.2",  # no port
        "dimse://pacs:104?StudyInstanceUID=1.2",  # no AE title
        "dimse://PACS@pacs:104",  # no study
        "dimse://PACS@pacs:104?StudyInstanceUID=1.2&method=move",  # no move port
        "dimse://PACS@pacs:104?StudyInstanceUID=1.2&colour=red",
        "dimse://PACS@pacs:104?StudyInstanceUID=Doe^Jane",
    ):
        with pytest.raises(ConfigError):
            parse_source(bad)


@pytest.mark.parametrize("method", ["dicomweb", "c-get", "c-move"])
def test_pull_gets_the_same_instances(pacs, tmp_path, method):
    a = pacs["a"]
    got = pull(_sources(pacs)[method], tmp_path / "got")
    assert got.instances == len(a.files) and got.series_uids == [a.series_uid]
    files = sorted(tmp_path.joinpath("got").iterdir())
    assert all(PATIENT_NAME not in f.name and PATIENT_ID not in f.name for f in files)
    pulled_ds = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(f) for f in files)}
    assert set(pulled_ds) == set(a.sop_instance_uids)
    for f in a.files:
        mine = pydicom.dcmread(f)
        assert pulled_ds[str(mine.SOPInstanceUID)].PixelData == mine.PixelData


def test_pull_whole_study_skips_nothing_and_cleans_up(pacs):
    o, a, b = pacs["orthanc"], pacs["a"], pacs["b"]
    with pulled(f"{o.dicomweb_destination}/studies/{a.study_uid}") as got:
        folder = got.folder
        assert sorted(got.series_uids) == sorted([a.series_uid, b.series_uid])
        assert got.instances == len(a.files) + len(b.files) == len(list(folder.iterdir()))
    assert not folder.exists()  # the temporary folder is gone


def test_pull_failures_are_one_line(pacs, capsys):
    o, a = pacs["orthanc"], pacs["a"]
    unknown = "1.2.826.0.1.3680043.8.498.1"
    down = free_port()
    cases = {
        f"{o.dicomweb_destination}/studies/{unknown}": "no such study",
        f"dimse://{o.aet}@127.0.0.1:{o.dicom_port}?StudyInstanceUID={unknown}&calling_aet={PULL_AET}": "no such study",
        f"dicomweb://127.0.0.1:{down}/dicom-web/studies/{a.study_uid}": "cannot reach the server",
        f"dimse://{o.aet}@127.0.0.1:{down}?StudyInstanceUID={a.study_uid}": "no association",
        # an AE title Orthanc does not know: it aborts the query
        f"dimse://{o.aet}@127.0.0.1:{o.dicom_port}?StudyInstanceUID={a.study_uid}&calling_aet=STRANGER": "STRANGER",
    }
    for source, words in cases.items():
        with pytest.raises(PullError, match=words):
            pull(source, Path("/nonexistent/never/written"))
        rc = main(["infer", "hippocampus_unet3d", "--input", source, "--output", "/nonexistent/out"])
        err = capsys.readouterr().err.strip()
        assert rc == 3 and err.count("\n") == 0 and words in err, err


@pytest.fixture(scope="module")
def threshold_args(tmp_path_factory) -> list[str]:
    from nets_for_tests import ThresholdNet

    ckpt = tmp_path_factory.mktemp("ckpt") / "threshold.pt"
    torch.save(ThresholdNet().state_dict(), ckpt)
    override = {"network_def": {"_target_": "nets_for_tests.ThresholdNet"}, "patch_size": [32, 32, 32]}
    return ["--checkpoint", str(ckpt), "--device", "cpu", "--override", json.dumps(override)]


def _seg(out: Path) -> pydicom.Dataset:
    (path,) = out.glob("*_seg.dcm")
    return pydicom.dcmread(path)


def _frame_refs(seg: pydicom.Dataset) -> list[tuple[str, int]]:
    refs = []
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = frame.DerivationImageSequence[0].SourceImageSequence[0]
        refs.append(
            (str(src.ReferencedSOPInstanceUID), int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber))
        )
        assert i < seg.NumberOfFrames
    return refs


@pytest.mark.slow
def test_seg_of_a_pulled_series_equals_seg_from_the_folder(pacs, tmp_path, threshold_args):
    a = pacs["a"]
    base = ["infer", "hippocampus_unet3d", "--format", "seg", *threshold_args]
    assert main([*base, "--input", str(a.folder), "--output", str(tmp_path / "folder")]) == 0
    ref = _seg(tmp_path / "folder")
    assert ref.NumberOfFrames > 0
    for method, source in _sources(pacs).items():
        out = tmp_path / method
        assert main([*base, "--input", source, "--output", str(out)]) == 0, method
        seg = _seg(out)
        assert seg.PixelData == ref.PixelData, method
        assert _frame_refs(seg) == _frame_refs(ref), method
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == a.series_uid
        assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(
            a.sop_instance_uids
        )
        assert seg.SOPInstanceUID != ref.SOPInstanceUID  # new UIDs aside, the same object
        np.testing.assert_array_equal(seg.pixel_array, ref.pixel_array)
