"""Orthanc's REST API for tests: declare a DICOM modality, upload files, push a study to a modality,
wait for jobs, and list the SEG/SR series that arrived per study (with their source references)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from orthanc_server import OrthancHandle


def call(orthanc: OrthancHandle, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 60):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(orthanc.http_url + path, data=data, method=method)
    if raw is not None:
        req.add_header("Content-Type", "application/dicom")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read()
    return json.loads(text) if text else None


def put_modality(orthanc: OrthancHandle, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
    """Make ``aet`` at ``host:port`` known to Orthanc: it may then C-STORE to it and answer its C-FIND/C-GET/C-MOVE."""
    call(orthanc, "PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})


def upload(orthanc: OrthancHandle, files) -> list[str]:
    """POST each file to /instances; return the Orthanc study IDs."""
    studies = set()
    for f in files:
        studies.add(call(orthanc, "POST", "/instances", raw=Path(f).read_bytes())["ParentStudy"])
    return sorted(studies)


def store_async(orthanc: OrthancHandle, modality: str, resource_id: str) -> str:
    """Start an Orthanc job that C-STOREs a study (or series) to ``modality``; return the job ID."""
    return call(orthanc, "POST", f"/modalities/{modality}/store", {"Resources": [resource_id], "Asynchronous": True})[
        "ID"
    ]


def store_all(orthanc: OrthancHandle, modality: str, resource_ids, at_once: int = 4) -> list[dict]:
    """C-STORE each study (or series) to ``modality``, ``at_once`` Orthanc store calls at a time (each one
    synchronous: it returns when Orthanc's C-STOREs are done, and raises when they failed)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(resource_id: str) -> dict:
        body = {"Resources": [resource_id], "Synchronous": True}
        return call(orthanc, "POST", f"/modalities/{modality}/store", body, timeout=600)

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        return list(pool.map(one, resource_ids))


def wait_jobs(orthanc: OrthancHandle, job_ids, timeout_s: float = 300) -> dict[str, str]:
    """Wait until every job has ended; return ``{job: state}`` (Success / Failure)."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        for j in job_ids:
            if states.get(j) not in ("Success", "Failure"):
                states[j] = call(orthanc, "GET", f"/jobs/{j}")["State"]
        if all(s in ("Success", "Failure") for s in states.values()) and len(states) == len(job_ids):
            return states
        time.sleep(0.3)
    raise TimeoutError(f"Orthanc jobs still running: {states}")


def derived_by_study(orthanc: OrthancHandle, modality: str = "SEG") -> dict[str, list[dict]]:
    """``{StudyInstanceUID: [{"series_uid", "orthanc_id", "instances"}...]}`` of every ``modality`` series."""
    found = call(orthanc, "POST", "/tools/find", {"Level": "Series", "Query": {"Modality": modality}, "Expand": True})
    out: dict[str, list[dict]] = defaultdict(list)
    study_uids: dict[str, str] = {}
    for s in found:
        parent = s["ParentStudy"]
        if parent not in study_uids:
            study_uids[parent] = call(orthanc, "GET", f"/studies/{parent}")["MainDicomTags"]["StudyInstanceUID"]
        out[study_uids[parent]].append(
            {"series_uid": s["MainDicomTags"]["SeriesInstanceUID"], "orthanc_id": s["ID"], "instances": s["Instances"]}
        )
    return dict(out)


def instance_tags(orthanc: OrthancHandle, instance_id: str) -> dict:
    return call(orthanc, "GET", f"/instances/{instance_id}/simplified-tags")
