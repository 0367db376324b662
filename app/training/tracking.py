"""MLflow tracking for a training run: one run per training, resumed runs continue the same run.

Logged: params (bundle name/version, hyperparameters, manifest hash, fold), per-epoch metrics
(train loss, validation Dice/HD95), the executed config, and at the end the weights as artifacts and
the run folder's bundle as two MLflow models, ``model`` (final weights) and ``best_model`` (best
validation score), each a ``python_function`` model with an input example and a signature
(``app.bundle.mlflow_source``): ``runs:/RUN_ID/model`` is a bundle ``segapp infer`` can fetch, and
``segapp train --register NAME`` registers it. Only rank 0 talks to MLflow. The default store is a
local folder inside the run's output folder; a server is used with ``tracking_uri=http://...``. No
patient data is logged: params come from the config and metrics from the engines, never from image
headers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from app.data.checks import file_sha256  # noqa: F401  (bundle configs log the manifest's hash with it)
from app.io.atomic import atomic_write_text

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"


def local_tracking_uri(output_dir: str | Path) -> str:
    """A SQLite store inside the output folder (no server needed; MLflow 3 retired the file store)."""
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


def local_artifact_location(output_dir: str | Path) -> str:
    return (Path(output_dir).resolve() / "mlartifacts").as_uri()


def _flat(params: Mapping, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class MLflowTracker:
    """Ignite handler that records a training run in MLflow.

    Args:
        output_dir: the run folder; holds ``mlflow_run.json`` (the run id, so ``--resume`` continues it).
        tracking_uri: MLflow URI; ``None``/empty means the local store ``<output_dir>/mlflow.db``
            (artifacts in ``<output_dir>/mlartifacts``).
        experiment_name: MLflow experiment (created if missing).
        run_name: readable run name; a timestamp is appended so consecutive runs never collide.
        params: hyperparameters and provenance to log once, nested dicts flattened with dots.
        evaluator: validation engine whose metrics are logged each epoch.
        artifacts: files or folders logged at the start (e.g. the executed config).
        resume: continue the run recorded in ``mlflow_run.json`` when present.
        enabled: False on non-zero DDP ranks.
    """

    def __init__(
        self,
        output_dir: str,
        tracking_uri: str | None = None,
        experiment_name: str = "segapp",
        run_name: str = "run",
        params: Mapping | None = None,
        evaluator: Engine | None = None,
        artifacts: list[str] | None = None,
        resume: bool = False,
        enabled: bool = True,
        parent_run_id: str | None = None,  # a cross-validation run's parent (app.training.cv): tagged as its child
    ):
        self.parent_run_id = parent_run_id or None
        self.output_dir = Path(output_dir)
        self.tracking_uri = tracking_uri or local_tracking_uri(output_dir)
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.params = _flat(params or {})
        self.evaluator = evaluator
        self.artifacts = [a for a in (artifacts or []) if a]
        self.resume = resume
        self.enabled = enabled
        self.client: Any = None  # an MlflowClient from start()
        self.run_id: str | None = None
        self._loss_sum = 0.0
        self._loss_n = 0
        self._epoch_t0 = 0.0
        self._samples = 0

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.log_epoch)
        engine.add_event_handler(Events.COMPLETED, self.complete)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    # -- run lifecycle -------------------------------------------------------------------------------
    def start(self, engine: Engine) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        run_file = self.output_dir / RUN_FILE
        if self.resume and run_file.is_file():
            info = json.loads(run_file.read_text())
            if info.get("tracking_uri") == self.tracking_uri:
                self.run_id = info["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                log.info("MLflow: continuing run %s", self.run_id)
                self._backfill(engine.state.epoch)
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is not None:
                exp_id = exp.experiment_id
            else:  # keep a local store's artifacts beside its database, not in the working directory
                location = local_artifact_location(self.output_dir) if self.tracking_uri.startswith("sqlite:") else None
                exp_id = self.client.create_experiment(self.experiment_name, artifact_location=location)
            name = f"{self.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
            tags = {"segapp.output_dir": str(self.output_dir.resolve())}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            run = self.client.create_run(exp_id, run_name=name, tags=tags)
            self.run_id = run.info.run_id
            for key, value in self.params.items():
                self.client.log_param(self.run_id, key, value[:6000])
            for path in self.artifacts:
                p = Path(path)
                if p.is_dir():
                    self.client.log_artifacts(self.run_id, str(p), artifact_path=p.name)
                elif p.is_file():
                    self.client.log_artifact(self.run_id, str(p))
            atomic_write_text(
                run_file,
                json.dumps(
                    {
                        "run_id": self.run_id,
                        "tracking_uri": self.tracking_uri,
                        "experiment": self.experiment_name,
                        "run_name": name,
                    }
                ),
            )
            log.info("MLflow: run %s (%s) in %s", name, self.run_id, self.tracking_uri)

    def _backfill(self, done_epochs: int) -> None:
        """Log the epochs a killed run checkpointed but did not get to log (the checkpoint is written
        first), from the checkpointer's ``metrics.json`` history."""
        path = self.output_dir / "metrics.json"
        if not path.is_file():
            return
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}
        for entry in json.loads(path.read_text()).get("history", []):
            step = int(entry["epoch"])
            if step <= done_epochs and step not in logged:
                for k, v in entry.items():
                    if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(float(v)):
                        self.client.log_metric(self.run_id, k, float(v), step=step)
                log.info("MLflow: logged epoch %d from the checkpoint history", step)

    def _epoch_started(self, engine: Engine) -> None:
        self._loss_sum, self._loss_n, self._samples = 0.0, 0, 0
        self._epoch_t0 = time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        out = engine.state.output
        items = out if isinstance(out, list) else [out]
        loss = items[0].get("loss") if items and isinstance(items[0], dict) else None
        if loss is not None:
            self._loss_sum += float(loss)
            self._loss_n += 1
            # in the engine's metrics, so the checkpoint's history keeps it for a back-fill after a kill
            engine.state.metrics["train_loss"] = self._loss_sum / self._loss_n
        self._samples += len(items)

    def log_epoch(self, engine: Engine) -> None:
        step = engine.state.epoch
        metrics: dict[str, float] = {}
        dt = time.perf_counter() - self._epoch_t0
        if dt > 0 and self._samples:
            metrics["train_samples_per_s"] = self._samples / dt
        for src in (engine.state.metrics, self.evaluator.state.metrics if self.evaluator is not None else {}):
            for k, v in src.items():
                if isinstance(v, (int, float)) and not math.isnan(float(v)):
                    metrics[k] = float(v)
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, k, v, step=step)

    def complete(self, engine: Engine) -> None:
        for rel in ("models/model.pt", "models/best.pt", "metrics.json"):
            p = self.output_dir / rel
            if p.is_file():
                self.client.log_artifact(
                    self.run_id, str(p), artifact_path=str(Path(rel).parent) if "/" in rel else None
                )
        self.log_models()
        self.client.set_terminated(self.run_id, status="FINISHED")

    def log_models(self) -> None:
        """The run folder's bundle as MLflow models ``model`` and ``best_model`` (skipped without its configs).

        A failure is a warning: the weights are saved and logged already, and the run still finishes.
        """
        from app.bundle.mlflow_source import BEST_MODEL, FINAL_MODEL, log_bundle_model

        if not (self.output_dir / "configs" / "metadata.json").is_file():
            log.warning(
                "MLflow: %s is not a bundle (no configs/metadata.json): no MLflow model logged", self.output_dir
            )
            return
        for name, rel in ((FINAL_MODEL, "models/model.pt"), (BEST_MODEL, "models/best.pt")):
            weights = self.output_dir / rel
            if not weights.is_file():
                continue
            try:
                info = log_bundle_model(self.tracking_uri, str(self.run_id), self.output_dir, weights, name)
                log.info("MLflow: logged model runs:/%s/%s (%s)", self.run_id, name, info.model_uri)
            except Exception as exc:  # MLflow, I/O or the bundle's own code
                log.warning("MLflow: could not log model %s: %s: %s", name, type(exc).__name__, exc)

    def failed(self, engine: Engine, exc: BaseException) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED")
        raise exc


def bundle_version(bundle_root: str | Path) -> str:
    """The ``version`` field of a bundle's ``configs/metadata.json``."""
    meta = json.loads((Path(bundle_root) / "configs" / "metadata.json").read_text())
    return str(meta.get("version", "unknown"))
