"""Shared fixtures: repository paths, a tiny training setup, a real MLflow tracking server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# test helpers (phantom writers, the Orthanc and dciodvfy wrappers, small networks) import by module name
sys.path.insert(0, str(REPO / "tests" / "helpers"))
# Small real data shipped with the tests (copies of the project's shared data, see tests/data/README.md).
TEST_DATA = REPO / "tests" / "data"
SAMPLE_HIPPOCAMPUS = REPO / "sample_data" / "hippocampus"
SAMPLE_MANIFEST = SAMPLE_HIPPOCAMPUS / "manifest.json"

# A network and data budget small enough for a few seconds per epoch on 2 CPU cores.
TINY = {
    "features": [4, 8],
    "patch_size": [16, 16, 16],
    "batch_size": 2,
    "num_workers": 0,
    "cache_workers": 0,
    "train#dataset#data": "$app.data.manifest.fold_datalist(@manifest, @fold, 'train', max_cases=4)",
    "validate#dataset#data": "$app.data.manifest.fold_datalist(@manifest, @fold, 'val', max_cases=2)",
}


@pytest.fixture(scope="session", autouse=True)
def segapp_home(tmp_path_factory):
    """Trust records and the bundle store of this test session only (subprocesses inherit them)."""
    home = tmp_path_factory.mktemp("segapp_home")
    saved = {k: os.environ.get(k) for k in ("SEGAPP_HOME", "SEGAPP_BUNDLES")}
    os.environ["SEGAPP_HOME"], os.environ["SEGAPP_BUNDLES"] = str(home / "config"), str(home / "bundles")
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def real_data() -> Path:
    return TEST_DATA


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on loopback with a SQLite store and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        (root / "artifacts").as_uri(),
        "--workers",
        "1",
    ]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start within 120 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
