"""The node: receiver, router, worker processes and status endpoint around one queue (``segapp serve``).

``Node(cfg).start()`` takes an exclusive lock on the state folder (one node per queue; several
machines run several nodes, each with its own state folder, behind the PACS's own routing), opens
the queue and gives back the leases of a previous run (a killed node's running jobs become pending
again, their attempt not counted), starts the C-STORE SCP, the HTTP endpoint, the worker processes
and two threads: the router (series idle for ``idle_timeout_s`` -> routed -> a job) and the
supervisor (a dead worker is replaced and its job released; expired leases are released).
``stop()`` stops receiving, lets the workers finish their job (or ends them after a timeout: their
jobs resume on the next start) and releases the lock.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing as mp
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from app.errors import ConfigError
from app.node.config import NodeConfig
from app.node.queue import JobQueue
from app.node.receiver import Spool, StoreSCP
from app.node.routing import bundle_series_rules, route_series
from app.node.status import StatusServer, snapshot
from app.node.worker import worker_main

log = logging.getLogger(__name__)


def worker_devices(cfg: NodeConfig) -> list[tuple[str, int]]:
    """``(device, torch threads)`` per worker: CUDA devices round robin when asked for and present, else CPU
    sharing the cores."""
    import torch

    cores = os.cpu_count() or 1
    n = cfg.workers
    if cfg.device.startswith("cuda:"):
        return [(cfg.device, max(1, cores // n))] * n
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        return [(f"cuda:{i % gpus}", max(1, cores // n)) for i in range(n)]
    if cfg.device == "cuda":
        raise ConfigError("device = 'cuda' but no CUDA device is visible", str(cfg.source))
    return [("cpu", max(1, cores // n))] * n


@dataclass
class _Worker:
    index: int
    device: str
    threads: int
    owner: str = ""
    process: Any = None
    ready: Any = None  # a shared byte the worker sets to 1 once its first model is loaded


class Node:
    """One DICOM node (see the module docstring)."""

    def __init__(self, cfg: NodeConfig, log_level: int = logging.INFO):
        self.cfg = cfg
        self.log_level = log_level
        self.instance = secrets.token_hex(4)
        self.started_at = 0.0
        self._stop = threading.Event()
        self._mp = mp.get_context("spawn")  # no forked torch/OpenMP state in the workers
        # flags in shared memory without locks: a worker killed while holding an Event's lock would
        # block the node's set() forever
        self._worker_stop = self._mp.RawValue("b", 0)
        self._workers: list[_Worker] = []
        self._threads: list[threading.Thread] = []
        self._lock_file: Any = None
        self.queue: JobQueue | None = None
        self.scp: StoreSCP | None = None
        self.http: StatusServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        cfg.state.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(cfg.state / "node.lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock_file.close()
            raise ConfigError("another segapp node is using this state folder", str(cfg.state)) from exc
        self.bundle_rules = bundle_series_rules(cfg)
        self.queue = JobQueue(cfg.state / "queue.db")
        resumed = self.queue.release(None, refund=True)
        if resumed:
            log.info("resuming %d job(s) that were running when the node stopped", resumed)
        spool = Spool(cfg.spool, self.queue)
        self.scp = StoreSCP(spool, cfg.ae_title, cfg.host, cfg.port, cfg.allowed_calling_aets)
        try:
            self.scp.start()
        except OSError as exc:
            self._release_lock()
            raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}", str(cfg.source)) from exc
        if cfg.http_port or cfg.stow:
            try:
                self.http = StatusServer(cfg.http_host, cfg.http_port, self.status, spool if cfg.stow else None)
            except OSError as exc:
                self.scp.stop()
                self._release_lock()
                msg = f"cannot listen on {cfg.http_host}:{cfg.http_port} (HTTP): {exc.strerror}"
                raise ConfigError(msg, str(cfg.source)) from exc
            self.http.start()
        self.started_at = time.time()
        for i, (device, threads) in enumerate(worker_devices(cfg)):
            w = _Worker(i, device, threads)
            self._spawn(w)
            self._workers.append(w)
        for target, name in ((self._route_loop, "router"), (self._supervise_loop, "supervisor")):
            t = threading.Thread(target=target, name=f"segapp-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "node %s listening on %s:%d (DICOM)%s, %d worker(s), state in %s",
            cfg.ae_title,
            cfg.host,
            self.scp.port,
            f", http://{cfg.http_host}:{self.http.port}/status" if self.http else "",
            cfg.workers,
            cfg.state,
        )

    def _spawn(self, w: _Worker) -> None:
        w.owner = f"{self.instance}-w{w.index}-{secrets.token_hex(2)}"
        w.ready = self._mp.RawValue("b", 0)
        args = (
            self.cfg,
            w.index,
            w.owner,
            w.device,
            w.threads,
            self._worker_stop,
            self.log_level,
            os.getpid(),
            w.ready,
        )
        w.process = self._mp.Process(
            target=worker_main,
            args=args,
            name=f"segapp-worker-{w.index}",
            daemon=False,
        )
        w.process.start()

    def request_stop(self) -> None:
        """Ask :meth:`wait` to return (e.g. from a signal handler)."""
        self._stop.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until :meth:`request_stop`; True when asked to stop."""
        return self._stop.wait(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop receiving, let the workers end their current job (at most ``timeout_s``), release the lock."""
        self._stop.set()
        if self.scp is not None:
            self.scp.stop()
        self._worker_stop.value = 1
        deadline = time.monotonic() + timeout_s
        for w in self._workers:
            w.process.join(max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():
                log.warning(
                    "worker %d still busy after %.0f s: ending it (its job resumes on restart)", w.index, timeout_s
                )
                w.process.terminate()
                w.process.join(10)
        for t in self._threads:
            t.join(timeout=5)
        if self.queue is not None:
            self.queue.release(None, refund=True)
        if self.http is not None:
            self.http.stop()
        if self.queue is not None:
            self.queue.close()
        self._release_lock()
        log.info("node %s stopped", self.cfg.ae_title)

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- threads ---------------------------------------------------------------------------------------------
    def _route_loop(self) -> None:
        assert self.queue is not None
        period = min(1.0, self.cfg.idle_timeout_s / 4)
        while not self._stop.wait(period):
            try:
                self.route_idle_series()
            except Exception:  # noqa: BLE001 - keep routing; the next round retries
                log.exception("routing failed")

    def route_idle_series(self) -> int:
        """Turn every series idle for ``idle_timeout_s`` into a job; returns how many."""
        assert self.queue is not None
        n = 0
        busy = self.scp.busy_series() if self.scp is not None else set()
        for s in self.queue.idle_series(self.cfg.idle_timeout_s):
            if s["series_uid"] in busy:  # its sender still holds the association open
                continue
            d = route_series(s["folder"], s["series_uid"], self.cfg, self.bundle_rules)
            self.queue.enqueue(
                s["series_uid"],
                bundle=d.bundle,
                route=d.route,
                max_attempts=self.cfg.retries + 1,
                state=d.state,
                error=d.error,
            )
            n += 1
            what = f"queued for {d.bundle} by {d.route}" if d.state == "pending" else f"{d.state}: {d.error}"
            (log.info if d.state != "failed" else log.warning)(
                "%s complete (%d instance(s) from %s): %s", s["key"], s["instances"], s["calling_aet"], what
            )
        return n

    def _supervise_loop(self) -> None:
        assert self.queue is not None
        while not self._stop.wait(1.0):
            for w in self._workers:
                if not w.process.is_alive() and not self._worker_stop.value:
                    log.warning("worker %d exited (code %s): starting another", w.index, w.process.exitcode)
                    self.queue.release(w.owner)
                    self._spawn(w)
            expired = self.queue.release_expired()
            if expired:
                log.warning("%d job lease(s) expired: back in the queue", expired)

    # -- status ----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        assert self.queue is not None
        return snapshot(
            self.queue,
            {
                "ae_title": self.cfg.ae_title,
                "dicom_port": self.scp.port if self.scp else self.cfg.port,
                "workers": [
                    {
                        "index": w.index,
                        "device": w.device,
                        "pid": w.process.pid if w.process else None,
                        "alive": bool(w.process and w.process.is_alive()),
                        "ready": bool(w.ready is not None and w.ready.value),
                    }
                    for w in self._workers
                ],
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
                "uptime_s": round(time.time() - self.started_at, 1),
                "idle_timeout_s": self.cfg.idle_timeout_s,
                "bundles": sorted(self.cfg.bundles),
            },
        )
