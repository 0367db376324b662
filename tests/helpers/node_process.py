"""``segapp serve`` as a real subprocess for tests and benches: a node config with a threshold network (no
training, fast on CPU), start, status, SIGKILL, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent


def threshold_checkpoint(path: Path) -> Path:
    from nets_for_tests import ThresholdNet

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ThresholdNet().state_dict(), path)
    return path


def write_node_config(
    path: Path,
    *,
    port: int,
    http_port: int,
    allowed: list[str],
    destinations: list[str],
    checkpoint: Path | None = None,
    run: Path | None = None,
    ae_title: str = "SEGAPP",
    workers: int = 1,
    idle_timeout_s: float = 1.5,
    retries: int = 1,
    formats: tuple[str, ...] = ("seg", "sr"),
    stow: bool = False,
) -> Path:
    """A TOML node config running hippocampus_unet3d's pipeline with :class:`ThresholdNet` weights
    (``checkpoint``), or a training-run folder (``run``, e.g. ``runs.tiny_run``)."""
    q = json.dumps  # TOML basic strings and arrays read like JSON here
    if run is not None:
        model = f"run = {q(str(run))}"
    else:
        assert checkpoint is not None, "a checkpoint of ThresholdNet or a run folder"
        model = f"""bundle = "hippocampus_unet3d"
checkpoint = {q(str(checkpoint))}
overrides = {{ network_def = {{ _target_ = "nets_for_tests.ThresholdNet" }}, patch_size = [32, 32, 32] }}"""
    text = f"""
[node]
ae_title = {q(ae_title)}
host = "127.0.0.1"
port = {port}
allowed_calling_aets = {q(allowed)}
spool = "spool"
state = "state"
idle_timeout_s = {idle_timeout_s}
workers = {workers}
device = "cpu"
retries = {retries}
retry_delay_s = 0.5
send_retries = 2
lease_s = 20
destinations = {q(destinations)}

[http]
host = "127.0.0.1"
port = {http_port}
stow = {str(stow).lower()}

[bundles.hippo]
{model}
formats = {q(list(formats))}
"""
    path.write_text(text)
    return path


class NodeProcess:
    """``python -m app.cli serve --config CONFIG`` with stderr to ``log``; tests/helpers on PYTHONPATH."""

    def __init__(self, config: Path, http_port: int, log: Path):
        self.config, self.http_port, self.log = config, http_port, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> NodeProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HELPERS), env.get("PYTHONPATH", "")])
        env["SEGAPP_NO_PROGRESS"] = "1"
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.config.parent,
            env=env,
        )
        # the status page answers before the workers are listed: wait for every configured one
        expected = int(tomllib.loads(self.config.read_text()).get("node", {}).get("workers", 1))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"segapp serve exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                workers = self.status()["node"]["workers"]
                if len(workers) == expected and all(w["alive"] and w["ready"] for w in workers):
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"segapp serve did not answer within {timeout_s} s: {self.log.read_text()[-3000:]}")

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/status", timeout=10) as r:
            return json.loads(r.read())

    def wait_for(self, predicate, timeout_s: float = 300, period_s: float = 0.2) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(period_s)
        raise TimeoutError(f"node status never matched: {json.dumps(self.status()['counts'])}")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM killer would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=30)
        self._log.close()
        return rc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
