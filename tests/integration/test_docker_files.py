"""docker/: the compose file parses and wires segapp to Orthanc and MLflow, the Dockerfile is a non-root
CUDA runtime image with ``segapp`` as entry point, and the image's commands work outside Docker."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from urllib.parse import urlparse

import pytest
import yaml
from conftest import REPO

from app.bundle.store import find_bundle
from app.cli.main import build_parser
from app.io.pacs import parse_destination

DOCKER = REPO / "docker"
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with the defaults (the environment of a plain ``compose up``)."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _instructions() -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        key, _, args = current.partition(" ")
        lines.append((key.upper(), args.strip()))
        current = ""
    return lines


def _command(service: dict) -> list[str]:
    cmd = service["command"]
    return [_interpolate(str(c)) for c in (cmd if isinstance(cmd, list) else cmd.split())]


def test_compose_services_ports_volumes(compose):
    services = compose["services"]
    assert {"segapp", "segapp-infer", "orthanc", "mlflow"} <= set(services)
    assert "8042:8042" in services["orthanc"]["ports"] and "5000:5000" in services["mlflow"]["ports"]
    named = set(compose["volumes"])
    for name, svc in services.items():
        assert "image" in svc, name
        for vol in svc.get("volumes", []):
            source = _interpolate(vol).split(":")[0]
            assert source in named or source.startswith(("../", "./", "/")), (name, vol)
            if not source.startswith(("../", "./", "/")):
                continue
            assert (DOCKER / source).resolve().exists(), (name, vol)  # bind mounts relative to docker/
    for name in ("segapp", "segapp-infer"):
        svc = services[name]
        assert (
            svc["build"]["dockerfile"] == "docker/Dockerfile" and (DOCKER / svc["build"]["context"]).resolve() == REPO
        )
        gpu = svc["deploy"]["resources"]["reservations"]["devices"][0]
        assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    env = services["orthanc"]["environment"]
    assert env["DICOM_WEB_PLUGIN_ENABLED"] == "true" and env["ORTHANC__DICOM_WEB__ROOT"] == "/dicom-web/"


def test_compose_commands_parse_with_segapp_and_are_wired(compose):
    services = compose["services"]
    parser = build_parser()
    train = parser.parse_args(_command(services["segapp"]))
    assert train.command == "train" and train.nproc == 1
    assert find_bundle(train.bundle).root.is_dir()
    assert train.tracking_uri == "http://mlflow:5000"
    assert services["segapp"]["depends_on"]["mlflow"]["condition"] == "service_healthy"

    infer = parser.parse_args(_command(services["segapp-infer"]))
    assert infer.command == "infer-batch" and infer.send == ["dicomweb://orthanc:8042/dicom-web"]
    dest = parse_destination(infer.send[0])
    assert "orthanc" in str(dest) and "8042" in str(dest)
    assert infer.run == train.out  # infers with the run folder (configs + model) the training service writes
    # The volume that holds the runs is shared by both services.
    assert set(services["segapp"]["volumes"]) == set(services["segapp-infer"]["volumes"])

    mlflow = _command(services["mlflow"])
    assert mlflow[:2] == ["mlflow", "server"]
    assert mlflow[mlflow.index("--host") + 1] == "0.0.0.0"
    assert mlflow[mlflow.index("--backend-store-uri") + 1].startswith("sqlite:///")
    host = urlparse(train.tracking_uri).netloc
    assert host in mlflow[mlflow.index("--allowed-hosts") + 1].split(",")  # MLflow >= 3.5 checks Host


def test_dockerfile_non_root_cuda_runtime_entrypoint():
    ins = _instructions()
    keys = [k for k, _ in ins]
    args = dict(reversed(ins))  # first occurrence of each keyword
    base = next(a for k, a in ins if k == "ARG" and a.startswith("BASE_IMAGE=")).split("=", 1)[1]
    assert "cuda" in base and "runtime" in base and args["FROM"] == "${BASE_IMAGE}"
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert keys.index("USER") > max(i for i, k in enumerate(keys) if k == "RUN")  # nothing runs as root afterwards
    entry = [a for k, a in ins if k == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["segapp"]
    assert json.loads([a for k, a in ins if k == "CMD"][-1]) == ["--help"]
    copied = " ".join(a for k, a in ins if k == "COPY")
    for src in ("app/", "bundles/", "sample_data/", "setup.cfg"):
        assert src in copied, src
    run = " ".join(a for k, a in ins if k == "RUN")
    assert "--constraint" in run and "torch==" in run  # keep the base image's CUDA torch
    # The build context filter keeps everything the Dockerfile copies.
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in ignore
    for src in ("app/", "bundles/", "sample_data/", "setup.cfg", "pyproject.toml", "README.md"):
        assert f"!{src}" in ignore, src


def test_image_entry_commands_work_outside_docker(compose, tmp_path):
    exe = shutil.which("segapp")
    cmd = [exe] if exe else [sys.executable, "-m", "app.cli"]
    env = {**os.environ, "SEGAPP_NO_PROGRESS": "1"}
    res = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and "infer-batch" in res.stdout and "train" in res.stdout
    for name in ("segapp", "segapp-infer"):
        sub = _command(compose["services"][name])[0]
        res = subprocess.run(cmd + [sub, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert res.returncode == 0 and "--nproc" in res.stdout, (name, res.stderr[-2000:])
