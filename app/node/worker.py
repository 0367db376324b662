"""A worker process: claims jobs from the queue, runs the per-series pipeline with one loaded model, sends
the results, and records the outcome.

One model per worker (built on its first job with ``app.bundle.model.load_model`` and kept while the
jobs ask for the same bundle); the device is given by the node (GPUs round robin, else CPU with
``cores / workers`` threads). While a job runs, a heartbeat thread renews its lease. The outputs go
to ``STATE/results/<series key>/``; once written they are recorded in the queue, so a resumed job
only sends them again (same UIDs) rather than computing new ones. DICOM outputs (SEG, RTSTRUCT, SR)
go to each destination with ``app.io.pacs.send`` and its retries; the node-wide table
``STATE/results/statistics.csv`` gets the series' row when ``stats`` is among the formats.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from app.errors import SegappError
from app.node.config import NodeConfig
from app.node.queue import Job, JobQueue

log = logging.getLogger(__name__)

POLL_S = 0.25
DICOM_OUTPUTS = ("seg", "rtstruct", "sr")
NOISY = ("monai", "mlflow", "urllib3", "pynetdicom", "highdicom", "pydicom", "ignite", "py.warnings")


def results_dir(cfg: NodeConfig) -> Path:
    return cfg.state / "results"


def one_line(exc: BaseException) -> str:
    """An exception as one line without a traceback (a SegappError's own words; else its type and message)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, SegappError) else f"{type(exc).__name__}: {text}"[:500]


class _Heartbeat:
    """Renews a job's lease every quarter lease while the job runs."""

    def __init__(self, queue: JobQueue, job: Job, owner: str, lease_s: float):
        self.queue, self.job, self.owner, self.lease_s = queue, job, owner, lease_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="lease", daemon=True)

    def _beat(self) -> None:
        while not self.done.wait(self.lease_s / 4):
            if not self.queue.renew(self.job.id, self.owner, self.lease_s):
                log.warning("lost the lease of %s", self.job.key)
                return

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join(timeout=5)


class Runner:
    """Runs jobs in this process: a cache of one :class:`~app.inference.pipeline.Segmenter`."""

    def __init__(self, cfg: NodeConfig, device: str):
        self.cfg = cfg
        self.device = device
        self._name: str | None = None
        self._segmenter: Any = None

    def segmenter(self, name: str):
        from app.bundle.model import load_model
        from app.inference.pipeline import Segmenter

        if self._name != name:
            self._segmenter = self._name = None  # free the previous model first
            b = self.cfg.bundles[name]
            model = load_model(
                b.bundle,
                b.checkpoint,
                run=b.run,
                overrides=b.overrides or None,
                device=b.device or self.device,
                configs=b.configs,
                trust=b.trust,
            )
            self._segmenter, self._name = Segmenter(model), name
            log.info("worker %d loaded bundle %s on %s", os.getpid(), name, model.device)
        return self._segmenter

    def compute(self, job: Job) -> dict[str, str]:
        """Run the pipeline on the job's series; return its outputs (format -> file)."""
        b = self.cfg.bundles[job.bundle]
        out = results_dir(self.cfg) / job.key
        shutil.rmtree(out, ignore_errors=True)  # what an interrupted attempt left
        result = self.segmenter(job.bundle).dicom(job.folder, out, list(b.formats), series_uid=job.series_uid)
        if "stats" in result.outputs:
            from app.reporting.statistics import csv_row, update_statistics_csv

            stats = json.loads(Path(result.outputs["stats"]).read_text())
            update_statistics_csv(results_dir(self.cfg) / "statistics.csv", csv_row(stats))
        return dict(result.outputs)

    def send(self, job: Job, outputs: dict[str, str]) -> list[dict]:
        from app.io.pacs import send

        files = [outputs[k] for k in DICOM_OUTPUTS if k in outputs]
        sent = []
        for dest in self.cfg.destinations_for(job.bundle) if files else ():
            res = send(files, dest, retries=self.cfg.send_retries, calling_aet=self.cfg.ae_title)
            sent.append({"destination": res.destination, "files": len(files), "attempts": res.attempts})
        return sent

    def run(self, job: Job, queue: JobQueue, owner: str) -> list[dict]:
        """Compute (unless a previous attempt recorded its outputs) and send; return the sends."""
        outputs = job.outputs
        if outputs and all(Path(outputs[k]).is_file() for k in DICOM_OUTPUTS if k in outputs):
            log.info("%s: outputs of an earlier attempt found: sending them again", job.key)
        else:
            outputs = self.compute(job)
            if not queue.set_outputs(job.id, owner, outputs):
                raise RuntimeError("lost the job's lease while computing")
        return self.send(job, outputs)


def setup_worker_logging(level: int) -> None:
    """Logs of a worker process: stderr, segapp at ``level``, libraries at warning (pynetdicom quiet)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("app").setLevel(level)
    logging.captureWarnings(True)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING if level <= logging.DEBUG else logging.ERROR)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level <= logging.DEBUG else logging.CRITICAL)


def _die_with(parent_pid: int) -> None:
    """End this process when the node process ends, even by SIGKILL: an orphaned worker would go on taking
    jobs that the restarted node gives to its new workers (Linux: PR_SET_PDEATHSIG; elsewhere a watcher)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent_pid:  # the node died before the line above took effect
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(
    cfg: NodeConfig,
    index: int,
    owner: str,
    device: str,
    threads: int,
    stop,
    level: int,
    parent_pid: int,
    ready=None,
) -> None:
    """The worker process' loop (a ``multiprocessing`` target): until ``stop.value`` (a shared byte) is set."""
    _die_with(parent_pid)
    setup_worker_logging(level)
    os.environ.setdefault("SEGAPP_NO_PROGRESS", "1")
    import torch

    torch.set_num_threads(max(1, threads))
    queue = JobQueue(cfg.state / "queue.db")
    runner = Runner(cfg, device)
    first = next(iter(cfg.bundles))
    try:  # load the first bundle and the writers now: the first series should not wait for them
        runner.segmenter(first)
        import highdicom  # noqa: F401  (seconds of imports on a busy CPU, once)

        import app.io.dicom_sr  # noqa: F401
        import app.io.seg_write  # noqa: F401
        import app.reporting.report  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - report it; each of its jobs will fail with the message
        log.error("bundle %s cannot be loaded: %s (its jobs will fail with this message)", first, one_line(exc))
    log.info("worker %d (pid %d) ready on %s, %d thread(s)", index, os.getpid(), device, threads)
    if ready is not None:
        ready.value = 1
    while not stop.value:
        job = queue.claim(owner, cfg.lease_s)
        if job is None:
            time.sleep(POLL_S)
            continue
        t0 = time.perf_counter()
        log.info("%s: running %s (attempt %d of %d)", job.key, job.bundle, job.attempts, job.max_attempts)
        try:
            with _Heartbeat(queue, job, owner, cfg.lease_s):
                sent = runner.run(job, queue, owner)
        except Exception as exc:  # noqa: BLE001 - one series' failure must not stop the worker
            state = queue.fail(job.id, owner, one_line(exc), cfg.retry_delay_s)
            log.warning(
                "%s: attempt %d failed (%s); %s",
                job.key,
                job.attempts,
                one_line(exc),
                "will retry" if state == "pending" else "reported as failed",
            )
            continue
        if queue.finish(job.id, owner, sent):
            log.info("%s: done in %.1f s, sent to %d destination(s)", job.key, time.perf_counter() - t0, len(sent))
            if not cfg.keep_spool:
                shutil.rmtree(job.folder, ignore_errors=True)
    queue.close()
