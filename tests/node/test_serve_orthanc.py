"""``segapp serve`` in a real DICOM network: Orthanc, which knows segapp's node as a modality, pushes 20 studies
(several store jobs at once) plus a corrupt one; the node is killed with SIGKILL midway and restarted; in the end
every study has exactly one SEG (and one SR) in Orthanc, each referencing its source series, the corrupt study is
reported as failed without blocking the others, and the node's logs hold no patient name or ID."""

from __future__ import annotations

import csv
import io
import os
import signal
import time

import pydicom
import pytest
from dicom_phantoms import PATIENT_ID, PATIENT_NAME, write_phantom_series
from node_process import NodeProcess, pid_alive, threshold_checkpoint, write_node_config
from orthanc_rest import call, derived_by_study, put_modality, store_all, upload
from orthanc_server import free_port, orthanc  # noqa: F401  (session fixture)

from app.inference.jobs import series_key

N_STUDIES = 20
ORIENTATIONS = ("sagittal", "oblique", "axial", "coronal")


def _first_instance(orthanc, series_id: str) -> pydicom.Dataset:  # noqa: F811
    (instance,) = call(orthanc, "GET", f"/series/{series_id}")["Instances"]
    req = f"/instances/{instance}/file"
    import urllib.request

    with urllib.request.urlopen(orthanc.http_url + req, timeout=30) as r:
        return pydicom.dcmread(io.BytesIO(r.read()))


@pytest.mark.slow
def test_serve_twenty_studies_survives_sigkill(orthanc, tmp_path):  # noqa: F811
    good = [
        write_phantom_series(
            tmp_path / "src" / f"s{n:02d}",
            modality="MR",
            orientation=ORIENTATIONS[n % 4],
            shape=(20, 18, 10) if n % 2 else (18, 20, 9),  # small: 20 studies of 9-10 slices
            reverse_file_order=bool(n % 3),
        )
        for n in range(N_STUDIES)
    ]
    corrupt = write_phantom_series(tmp_path / "src" / "corrupt", modality="MR", shape=(20, 18, 10))
    corrupt.files[len(corrupt.files) // 2].unlink()  # a missing slice: the reader refuses the series
    studies = {}
    for info in [*good, corrupt]:
        (studies[info.study_uid],) = upload(orthanc, [f for f in info.files if f.exists()])

    # both ends know each other: Orthanc has the node as a modality, the node lets Orthanc in and sends back
    port, http_port = free_port(), free_port()
    put_modality(orthanc, "segapp-node", "SEGAPP", port)
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    config = write_node_config(
        node_dir / "node.toml",
        port=port,
        http_port=http_port,
        allowed=[orthanc.aet],
        destinations=[orthanc.dimse_destination],
        checkpoint=threshold_checkpoint(node_dir / "threshold.pt"),
        workers=2,
        formats=("seg", "stats", "sr"),
    )
    node = NodeProcess(config, http_port, node_dir / "serve.log").start()
    pushed = store_all(orthanc, "segapp-node", list(studies.values()), at_once=4)  # several at once
    assert sum(int(p["InstancesCount"]) for p in pushed) == sum(len(i.files) for i in good) + len(corrupt.files) - 1
    assert all(int(p["FailedInstancesCount"]) == 0 for p in pushed)

    # kill the node while it is working through the queue
    status = node.wait_for(lambda s: s["counts"]["done"] >= 3, period_s=0.1)
    workers = [w["pid"] for w in status["node"]["workers"]]
    node.kill()
    killed_at = status["counts"]
    assert killed_at["done"] < N_STUDIES, f"the node finished before the kill: {killed_at}"
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in workers), "workers outlived the killed node"

    node = NodeProcess(config, http_port, node_dir / "serve.log").start()
    try:
        # a worker that dies (here: killed) is replaced, and its job runs again
        victim = node.status()["node"]["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        node.wait_for(lambda s: s["node"]["workers"][0]["pid"] != victim and s["node"]["workers"][0]["ready"], 120)
        final = node.wait_for(lambda s: s["counts"]["done"] + s["counts"]["failed"] >= N_STUDIES + 1, timeout_s=240)
    finally:
        assert node.stop() == 0
    assert final["counts"]["done"] == N_STUDIES and final["counts"]["failed"] == 1, final["counts"]
    assert final["counts"]["pending"] == final["counts"]["running"] == final["counts"]["receiving"] == 0
    done_keys = [j["series"] for j in final["done"]]
    assert sorted(done_keys) == sorted(series_key(i.series_uid) for i in good)  # each series once
    (failed,) = final["failed"]
    assert failed["series"] == series_key(corrupt.series_uid)
    assert failed["attempts"] == 2 and "missing" in failed["error"].lower(), failed
    assert all(j["latency_s"] > 0 and j["sent"] for j in final["done"])

    segs, srs = derived_by_study(orthanc, "SEG"), derived_by_study(orthanc, "SR")
    for info in good:
        assert len(segs.get(info.study_uid, [])) == 1, f"{len(segs.get(info.study_uid, []))} SEGs for one study"
        assert len(srs.get(info.study_uid, [])) == 1
        (seg_series,) = segs[info.study_uid]
        assert len(seg_series["instances"]) == 1
        seg = _first_instance(orthanc, seg_series["orthanc_id"])
        (seg_id,) = call(orthanc, "GET", f"/series/{seg_series['orthanc_id']}")["Instances"]
        assert call(orthanc, "GET", f"/instances/{seg_id}/metadata?expand")["RemoteAET"] == "SEGAPP"
        ref = seg.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == info.series_uid
        assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == set(info.sop_instance_uids)
    assert corrupt.study_uid not in segs

    with open(node_dir / "state" / "results" / "statistics.csv", newline="") as fh:  # the node's table
        rows = list(csv.DictReader(fh))
    assert sorted(r["key"] for r in rows) == sorted(done_keys)
    assert all(float(r["anterior.volume_ml"]) >= 0 for r in rows)
    logs = (node_dir / "serve.log").read_text()
    assert "queued for hippo" in logs and "exited (code -9): starting another" in logs
    assert PATIENT_NAME not in logs and PATIENT_ID not in logs and "Doe" not in logs
    spool = node_dir / "spool"
    leftover = [p for p in spool.rglob("*.dcm")]
    assert len(leftover) == len(corrupt.files) - 1  # finished series are removed; the failed one is kept
