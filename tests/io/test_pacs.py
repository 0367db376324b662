"""Sending to a real Orthanc (DICOMweb STOW-RS and DIMSE C-STORE), finding the SEG again with
QIDO-RS, retrieving it with WADO-RS and reading it back; failed sends."""

from __future__ import annotations

import logging
import time

import numpy as np
import pydicom
import pytest
from dicom_phantoms import PATIENT_ID, PATIENT_NAME, write_phantom_series
from dicom_validation import assert_dciodvfy_clean
from dicomweb_client.api import DICOMwebClient
from orthanc_server import free_port, orthanc  # noqa: F401  (session fixture)

from app.errors import ConfigError
from app.io.dicom_series import read_series
from app.io.pacs import SendError, parse_destination, send
from app.io.seg_read import read_seg
from app.io.seg_write import write_seg
from app.io.segments import SegmentSpec

SPECS = [SegmentSpec(1, "box"), SegmentSpec(2, "sphere"), SegmentSpec(3, "bar")]


def test_parse_destination():
    d = parse_destination("dicomweb://pacs.local:8042/dicom-web/")
    assert (d.scheme, d.host, d.port, d.url) == ("dicomweb", "pacs.local", 8042, "http://pacs.local:8042/dicom-web")
    d = parse_destination("dimse://ORTHANC@10.0.0.5:4242")
    assert (d.scheme, d.aet, d.host, d.port) == ("dimse", "ORTHANC", "10.0.0.5", 4242)
    assert parse_destination("dicomwebs://h:443/x").url == "https://h:443/x"
    for bad in ("ftp://h:1/x", "dimse://h:104", "dicomweb://h/x", "dimse://WAYTOOLONGAETITLE17@h:1"):
        with pytest.raises(ConfigError):
            parse_destination(bad)


@pytest.mark.slow
def test_send_both_ways_then_query_and_retrieve(tmp_path, orthanc, caplog):  # noqa: F811
    info = write_phantom_series(tmp_path / "ct", orientation="oblique", reverse_file_order=True)
    with caplog.at_level(logging.INFO, logger="app.io.pacs"):
        source = send(info.files, orthanc.dimse_destination)
    assert source.attempts == 1 and len(source.sent) == len(info.files)
    assert set(source.sop_instance_uids) == set(info.sop_instance_uids)
    vol = read_series(tmp_path / "ct")
    seg_web = write_seg(
        vol, info.mask_ijk, SPECS, ("bundle", "1"), tmp_path / "seg_web.dcm", series_description="via dicomweb"
    )
    seg_dimse = write_seg(
        vol, info.mask_ijk, SPECS, ("bundle", "1"), tmp_path / "seg_dimse.dcm", series_description="via dimse"
    )
    assert_dciodvfy_clean(seg_web)
    with caplog.at_level(logging.INFO, logger="app.io.pacs"):
        r1 = send([seg_web], orthanc.dicomweb_destination)
        r2 = send([seg_dimse], orthanc.dimse_destination)
    assert r1.sent == [seg_web] and r2.sent == [seg_dimse]
    assert "127.0.0.1" in caplog.text
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text  # no patient data in logs

    client = DICOMwebClient(url=orthanc.dicomweb_url)
    found = client.search_for_series(info.study_uid, search_filters={"Modality": "SEG"})
    by_uid = {pydicom.Dataset.from_json(s).SeriesInstanceUID: s for s in found}
    wanted = {pydicom.dcmread(p).SeriesInstanceUID: p for p in (seg_web, seg_dimse)}
    assert set(by_uid) == set(wanted)
    for series_uid, local in wanted.items():
        instances = client.search_for_instances(info.study_uid, series_uid)
        assert len(instances) == 1
        sop_uid = pydicom.Dataset.from_json(instances[0]).SOPInstanceUID
        seg = client.retrieve_instance(info.study_uid, series_uid, sop_uid)  # WADO-RS
        ref = seg.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == info.series_uid
        assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == set(info.sop_instance_uids)
        fetched = tmp_path / f"fetched_{local.stem}.dcm"
        seg.save_as(fetched, enforce_file_format=True)
        labels, _ = read_seg(fetched, vol)
        np.testing.assert_array_equal(labels, info.mask_ijk)


@pytest.mark.parametrize("scheme", ["dicomweb", "dimse"])
def test_failed_send_retries_and_keeps_files(tmp_path, scheme, caplog):
    info = write_phantom_series(tmp_path / "ct", shape=(8, 6, 4))
    port = free_port()  # nothing listens there
    dest = f"dicomweb://127.0.0.1:{port}/dicom-web" if scheme == "dicomweb" else f"dimse://NOBODY@127.0.0.1:{port}"
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="app.io.pacs"), pytest.raises(SendError) as err:
        send(info.files[:2], dest, retries=2, backoff_s=0.05, timeout_s=2)
    elapsed = time.perf_counter() - t0
    msg = str(err.value)
    assert "after 3 attempt(s)" in msg and "kept on disk" in msg
    assert str(info.files[0].resolve()) in msg and str(info.files[1].resolve()) in msg
    assert all(f.exists() for f in info.files[:2])
    # our own retry log (dicomweb-client's `retrying` dependency logs its own attempts too)
    ours = [r for r in caplog.records if r.name == "app.io.pacs" and "retrying" in r.getMessage()]
    assert len(ours) == 2, [r.getMessage() for r in caplog.records]
    assert elapsed >= 0.05 + 0.1  # backoff 0.05 then 0.1 s


def test_missing_file_refused(tmp_path):
    with pytest.raises(SendError, match="missing"):
        send([tmp_path / "nope.dcm"], "dimse://X@127.0.0.1:1")
