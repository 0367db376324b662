"""The node's receiving side without workers: the C-STORE SCP (allowed and refused AE titles, spool names
without patient data, busy series while an association is open, late instances), STOW-RS, routing decisions,
the status JSON, and the lock that keeps one node per state folder."""

from __future__ import annotations

import fcntl
import json
import shutil
import urllib.request

import pydicom
import pytest
import requests
from dicom_phantoms import PATIENT_ID, PATIENT_NAME, write_phantom_series
from dicomweb_client.api import DICOMwebClient
from orthanc_server import free_port
from pynetdicom import AE

from app.errors import ConfigError
from app.inference.jobs import series_key
from app.io.pacs import send
from app.node.config import load_config
from app.node.queue import JobQueue
from app.node.receiver import Spool, StoreSCP, study_key
from app.node.routing import bundle_series_rules, route_series
from app.node.server import Node
from app.node.status import StatusServer, snapshot

CONFIG = """
[node]
ae_title = "SEGNODE"
allowed_calling_aets = ["SEGAPP", "MODALITY", "SEGNODE"]  # SEGNODE: the node sends results as itself
[bundles.hippo]
bundle = "hippocampus_unet3d"
[bundles.other]
bundle = "hippocampus_vnet"
use_series_rules = false
[[routes]]
bundle = "other"
modality = "CT"
description_regex = "^liver"
"""


@pytest.fixture
def receiver(tmp_path):
    (tmp_path / "node.toml").write_text(CONFIG)
    cfg = load_config(tmp_path / "node.toml")
    queue = JobQueue(cfg.state / "queue.db")
    spool = Spool(cfg.spool, queue)
    scp = StoreSCP(spool, cfg.ae_title, "127.0.0.1", free_port(), cfg.allowed_calling_aets)
    scp.start()
    http = StatusServer("127.0.0.1", 0, lambda: snapshot(queue, {"ae_title": cfg.ae_title}), spool)
    http.start()
    yield cfg, queue, spool, scp, http
    http.stop()
    scp.stop()
    queue.close()


def test_c_store_into_the_spool(receiver, tmp_path):
    cfg, queue, spool, scp, http = receiver
    info = write_phantom_series(tmp_path / "mr", modality="MR", orientation="oblique")
    res = send(info.files, f"dimse://SEGNODE@127.0.0.1:{scp.port}")  # calling AE SEGAPP: allowed
    assert len(res.sent) == len(info.files)
    folder = spool.folder_of(info.study_uid, info.series_uid)
    assert folder == cfg.spool / study_key(info.study_uid) / series_key(info.series_uid)
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == len(info.files) and all(PATIENT_NAME not in n and PATIENT_ID not in n for n in names)
    received = {pydicom.dcmread(p).SOPInstanceUID: p for p in folder.iterdir()}
    for f in info.files:  # stored as received, byte for byte in the data set
        mine = pydicom.dcmread(f)
        assert received[mine.SOPInstanceUID].read_bytes().endswith(mine.PixelData)
    (series,) = queue.receiving()
    assert series["instances"] == len(info.files) and series["calling_aet"] == "SEGAPP"
    assert scp.busy_series() == set()  # send() released its association


def test_refused_ae_and_busy_series(receiver, tmp_path):
    cfg, queue, spool, scp, http = receiver
    info = write_phantom_series(tmp_path / "mr", modality="MR", shape=(8, 8, 6))
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(pydicom.dcmread(info.files[0]).SOPClassUID)
    assoc = stranger.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    assert not assoc.is_established and assoc.is_rejected
    modality = AE(ae_title="MODALITY")
    modality.add_requested_context(pydicom.dcmread(info.files[0]).SOPClassUID)
    assoc = modality.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    assert assoc.is_established
    assert assoc.send_c_store(info.files[0]).Status == 0
    assert scp.busy_series() == {info.series_uid}  # the sender may not be done: not complete yet
    assoc.release()
    for _ in range(50):
        if not scp.busy_series():
            break
        import time

        time.sleep(0.05)
    assert scp.busy_series() == set()


def test_late_instances_are_acknowledged_not_used(receiver, tmp_path):
    cfg, queue, spool, scp, http = receiver
    info = write_phantom_series(tmp_path / "mr", modality="MR", shape=(8, 8, 6))
    send(info.files[:-1], f"dimse://SEGNODE@127.0.0.1:{scp.port}")
    (s,) = queue.idle_series(0.0)
    queue.enqueue(s["series_uid"], bundle="hippo", route="test", max_attempts=1)
    res = send(info.files[-1:], f"dimse://SEGNODE@127.0.0.1:{scp.port}")  # after the series was queued
    assert len(res.sent) == 1
    folder = spool.folder_of(info.study_uid, info.series_uid)
    assert len(list(folder.iterdir())) == len(info.files) - 1


def test_stow_rs(receiver, tmp_path):
    cfg, queue, spool, scp, http = receiver
    info = write_phantom_series(tmp_path / "ct", shape=(8, 8, 6))
    client = DICOMwebClient(url=f"http://127.0.0.1:{http.port}/dicom-web")
    answer = client.store_instances([pydicom.dcmread(f) for f in info.files])
    assert {i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence} == set(info.sop_instance_uids)
    assert len(list(spool.folder_of(info.study_uid, info.series_uid).iterdir())) == len(info.files)
    (series,) = queue.receiving()
    assert series["calling_aet"].startswith("STOW-RS")
    boundary = "b0undary"
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n--{boundary}--\r\n".encode()
    r = requests.post(
        f"http://127.0.0.1:{http.port}/dicom-web/studies",
        data=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        timeout=10,
    )
    assert r.status_code == 409 and "00081198" in r.json()  # Failed SOP Sequence
    assert requests.post(f"http://127.0.0.1:{http.port}/dicom-web/studies", data=b"x", timeout=10).status_code == 415


def test_status_json_names_no_patient(receiver, tmp_path):
    cfg, queue, spool, scp, http = receiver
    info = write_phantom_series(tmp_path / "mr", modality="MR", shape=(8, 8, 6))
    send(info.files, f"dimse://SEGNODE@127.0.0.1:{scp.port}")
    with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/status", timeout=10) as r:
        text = r.read().decode()
    status = json.loads(text)
    assert status["counts"]["receiving"] == 1
    (row,) = status["receiving"]
    assert row["series"] == series_key(info.series_uid) and row["instances"] == len(info.files)
    assert row["last_instance_at"].endswith("Z")
    assert PATIENT_NAME not in text and PATIENT_ID not in text and info.series_uid not in text
    assert set(status) == {"node", "counts", "receiving", "queue", "running", "done", "failed", "skipped"}


def test_routing(receiver, tmp_path):
    cfg, queue, spool, scp, http = receiver
    rules = bundle_series_rules(cfg)
    assert rules == {"hippo": {"modality": ["MR"], "min_slices": 8}, "other": None}
    mr = write_phantom_series(tmp_path / "mr", modality="MR")
    d = route_series(str(mr.folder), mr.series_uid, cfg, rules)
    assert (d.state, d.bundle) == ("pending", "hippo") and "series_rules of hippo" in d.route
    few = write_phantom_series(tmp_path / "few", modality="MR", shape=(8, 8, 5))
    d = route_series(str(few.folder), few.series_uid, cfg, rules)
    assert d.state == "skipped" and "5 slice(s)" in d.error
    ct = write_phantom_series(tmp_path / "ct", series_description="Liver portal venous")
    d = route_series(str(ct.folder), ct.series_uid, cfg, rules)
    assert (d.state, d.bundle, d.route) == ("pending", "other", "route #1 (description_regex=^liver, modality=CT)")
    head = write_phantom_series(tmp_path / "head", series_description="head")
    assert route_series(str(head.folder), head.series_uid, cfg, rules).state == "skipped"
    from app.io.dicom_series import read_series
    from app.io.seg_write import write_seg
    from app.io.segments import SegmentSpec

    seg_dir = tmp_path / "seg"
    seg_dir.mkdir()
    seg = write_seg(read_series(mr.folder), mr.mask_ijk, [SegmentSpec(v, f"l{v}") for v in (1, 2, 3)], ("a", "1"),
                    seg_dir / "s.dcm")  # fmt: skip
    d = route_series(str(seg_dir), pydicom.dcmread(seg).SeriesInstanceUID, cfg, rules)
    assert d.state == "skipped" and "not an image" in d.route
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.dcm").write_bytes(b"garbage")
    assert route_series(str(junk), "1.2.3", cfg, rules).state == "failed"
    shutil.rmtree(junk)
    assert route_series(str(junk), "1.2.3", cfg, rules).state == "failed"


def test_one_node_per_state_folder(tmp_path):
    (tmp_path / "node.toml").write_text(CONFIG)
    cfg = load_config(tmp_path / "node.toml")
    cfg.state.mkdir(parents=True)
    with open(cfg.state / "node.lock", "w") as held:  # another node holds this state folder
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another segapp node is using this state folder"):
            Node(cfg).start()


def test_a_resumed_job_sends_its_recorded_outputs_without_computing(receiver, tmp_path):
    import dataclasses

    from app.io.dicom_series import read_series
    from app.io.seg_write import write_seg
    from app.io.segments import SegmentSpec
    from app.node.queue import Job
    from app.node.worker import Runner

    cfg, queue, spool, scp, http = receiver
    mr = write_phantom_series(tmp_path / "mr", modality="MR", shape=(8, 8, 6))
    seg = write_seg(read_series(mr.folder), mr.mask_ijk, [SegmentSpec(v, f"l{v}") for v in (1, 2, 3)], ("a", "1"),
                    tmp_path / "out" / "s_seg.dcm")  # fmt: skip
    cfg = dataclasses.replace(cfg, destinations=(f"dimse://SEGNODE@127.0.0.1:{scp.port}",))
    job = Job(7, mr.series_uid, "series_x", "study_x", "hippo", str(mr.folder), 2, 2, {"seg": str(seg)})
    runner = Runner(cfg, "cpu")
    (sent,) = runner.run(job, queue, "w")
    assert sent["files"] == 1 and runner._segmenter is None  # no model was built: nothing computed
    seg_uid = pydicom.dcmread(seg).SOPInstanceUID
    (arrived,) = spool.folder_of(mr.study_uid, pydicom.dcmread(seg).SeriesInstanceUID).iterdir()
    assert pydicom.dcmread(arrived).SOPInstanceUID == seg_uid  # the same object, the same UIDs


def test_worker_devices(receiver, monkeypatch):
    import dataclasses

    import torch

    from app.node.server import worker_devices

    cfg = receiver[0]
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert worker_devices(dataclasses.replace(cfg, workers=4, device="cpu")) == [("cpu", 4)] * 4
    # no GPU on the test machines: CUDA's answers are stand-ins here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    devices = worker_devices(dataclasses.replace(cfg, workers=3, device="auto"))
    assert [d for d, _ in devices] == ["cuda:0", "cuda:1", "cuda:0"]  # round robin, one model per worker
    assert worker_devices(dataclasses.replace(cfg, workers=2, device="cuda:1")) == [("cuda:1", 8)] * 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        worker_devices(dataclasses.replace(cfg, device="cuda"))
