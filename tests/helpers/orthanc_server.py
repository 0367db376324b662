"""A real Orthanc PACS on loopback for tests (Debian's ``orthanc`` + ``orthanc-dicomweb``).

Use the session-scoped fixture by importing it into a test module::

    from orthanc_server import orthanc  # noqa: F401  (pytest fixture)

    def test_x(orthanc):
        send(files, orthanc.dicomweb_destination)

or start one by hand with ``with OrthancServer(tmp_dir) as server: ...``. The server has its own
temporary storage, free HTTP and DICOM ports, no authentication, HTTP refused from other hosts
(``RemoteAccessAllowed`` false; Orthanc 1.10 has no bind-address option), accepts any calling AE
title and unknown SOP classes, and serves DICOMweb under ``/dicom-web/``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ORTHANC_BIN = "/usr/sbin/Orthanc"
_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
AET = "ORTHANC"


def free_port() -> int:
    """A TCP port nothing listens on right now (loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dicomweb_plugin() -> str:
    for p in _PLUGIN_CANDIDATES:
        if os.path.exists(p):
            return p
    found = sorted(Path("/usr").rglob("libOrthancDicomWeb.so*"))
    if not found:
        raise RuntimeError("Orthanc DICOMweb plugin not found (install orthanc-dicomweb)")
    return str(found[0])


@dataclass
class OrthancHandle:
    http_url: str  # http://127.0.0.1:PORT (REST API)
    dicomweb_url: str  # http://127.0.0.1:PORT/dicom-web
    dicom_port: int
    aet: str
    storage: Path

    @property
    def dicomweb_destination(self) -> str:
        return "dicomweb://" + self.dicomweb_url.split("://", 1)[1]

    @property
    def dimse_destination(self) -> str:
        return f"dimse://{self.aet}@127.0.0.1:{self.dicom_port}"

    def get_json(self, path: str):
        with urllib.request.urlopen(self.http_url + path, timeout=10) as r:
            return json.loads(r.read())


class OrthancServer:
    """Start Orthanc with a temporary config in ``workdir``; stop it on exit."""

    def __init__(self, workdir: str | Path, start_timeout_s: float = 30.0):
        self.workdir = Path(workdir)
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.handle: OrthancHandle | None = None

    def __enter__(self) -> OrthancHandle:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        http_port, dicom_port = free_port(), free_port()
        while dicom_port == http_port:
            dicom_port = free_port()
        config = {
            "Name": "segapp-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "SaveJobs": False,
            "StableAge": 1,
            "DicomAssociationCloseDelay": 0,
            "HttpThreadsCount": 8,
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=1))
        self._log = open(self.workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen(
            [ORTHANC_BIN, str(cfg)], stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        http_url = f"http://127.0.0.1:{http_port}"
        self.handle = OrthancHandle(
            http_url=http_url, dicomweb_url=f"{http_url}/dicom-web", dicom_port=dicom_port, aet=AET, storage=storage
        )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                self._stop()
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; log: {self._tail()}")
            try:
                self.handle.get_json("/system")
                with socket.create_connection(("127.0.0.1", dicom_port), timeout=1):
                    pass
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    self._stop()
                    raise RuntimeError(
                        f"Orthanc did not answer within {self.start_timeout_s} s; log: {self._tail()}"
                    ) from exc
                time.sleep(0.1)
        return self.handle

    def _tail(self) -> str:
        try:
            return (self.workdir / "orthanc.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def __exit__(self, *exc) -> None:
        self._stop()


@pytest.fixture(scope="session")
def orthanc():
    """A running Orthanc for the whole test session (an ``OrthancHandle``)."""
    workdir = Path(tempfile.mkdtemp(prefix="segapp-orthanc-"))
    try:
        with OrthancServer(workdir) as handle:
            yield handle
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
