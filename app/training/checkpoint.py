"""Atomic per-epoch checkpoints and exact resume.

Layout under ``output_dir``::

    checkpoints/last.pt   network, optimizer, scheduler, trainer epoch/iteration, metric history, RNG snapshot
    models/best.pt        network weights at the best (smoothed) validation score
    models/final.pt       network weights at the end of training
    models/model.pt       the weights the run ships (MONAI bundle convention): ``best.pt`` by default
                          (``model_weights="best"``, nnU-Net's choice), else ``final.pt``
    metrics.json          per-epoch metric history and the final metrics

The best checkpoint is chosen on an exponential moving average of the key metric (nnU-Net:
``ema = 0.9 * ema + 0.1 * dice`` after each validation), so that one lucky validation does not pick
it; ``patience`` stops training when that average has not improved for so many validations.
Every file is written to a temp file and renamed, so a killed run never leaves a torn checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from app.bundle.weights import load_checkpoint
from app.errors import InputError
from app.io.atomic import atomic_path, atomic_write_text
from app.training.seeding import rng_state

log = logging.getLogger(__name__)


def _save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class RunCheckpointer:
    """Ignite handler: save after every epoch (after validation), resume at start.

    Attach it *after* the validation handler so that an epoch's checkpoint includes its metrics.

    Args:
        output_dir: the run folder.
        network, optimizer, lr_scheduler: the objects to save and restore.
        evaluator: the validation engine whose ``state.metrics`` are recorded (optional).
        key_metric: metric that selects ``models/best.pt`` (higher is better).
        resume: load ``checkpoints/last.pt`` when training starts, if present.
        enabled: False on non-zero DDP ranks (they load but never write).
        ema: smoothing of the key metric for the choice of ``best.pt`` (0 = the raw metric; nnU-Net 0.9).
        patience: stop after this many validations without a new best smoothed score (None: never).
        model_weights: ``"best"`` or ``"final"``: what ``models/model.pt`` holds at the end.
    """

    def __init__(
        self,
        output_dir: str,
        network,
        optimizer,
        lr_scheduler=None,
        evaluator: Engine | None = None,
        key_metric: str = "val_mean_dice",
        resume: bool = False,
        enabled: bool = True,
        ema: float = 0.0,
        patience: int | None = None,
        model_weights: str = "best",
    ):
        if not 0.0 <= float(ema) < 1.0:
            raise InputError(f"ema must be in [0, 1), got {ema}", "RunCheckpointer")
        if model_weights not in ("best", "final"):
            raise InputError(f"model_weights must be 'best' or 'final', got {model_weights!r}", "RunCheckpointer")
        self.ema = float(ema)
        self.patience = int(patience) if patience else None
        self.model_weights = model_weights
        self.smoothed: float | None = None
        self.output_dir = Path(output_dir)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.evaluator = evaluator
        self.key_metric = key_metric
        self.resume = bool(resume)
        self.enabled = bool(enabled)
        self.history: list[dict] = []
        self.best = {"metric": -math.inf, "epoch": 0}

    @property
    def last_path(self) -> Path:
        return self.output_dir / "checkpoints" / "last.pt"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def _net(self):
        return self.network.module if hasattr(self.network, "module") else self.network

    def load(self, engine: Engine) -> None:
        if not self.resume:
            return
        if not self.last_path.is_file():
            log.warning("--resume: no checkpoint at %s, starting from scratch", self.last_path)
            return
        ckpt = load_checkpoint(self.last_path)
        if not isinstance(ckpt, dict) or "network" not in ckpt:
            raise InputError("not a segapp training checkpoint (no 'network' entry)", str(self.last_path))
        self._net().load_state_dict(ckpt["network"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.lr_scheduler is not None and ckpt.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        engine.state.epoch = int(ckpt["epoch"])
        engine.state.iteration = int(ckpt["iteration"])
        self.history = list(ckpt.get("history", []))
        self.best = dict(ckpt.get("best", self.best))
        self.smoothed = ckpt.get("smoothed", None)
        log.info("resumed from %s at epoch %d", self.last_path, engine.state.epoch)

    def save(self, engine: Engine) -> None:
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        if self.evaluator is not None and self.evaluator.state.epoch_length:  # validated this epoch?
            metrics.update(
                {k: float(v) for k, v in self.evaluator.state.metrics.items() if isinstance(v, (int, float))}
            )
        entry = {"epoch": engine.state.epoch, **metrics}
        validated = self.evaluator is None or getattr(self.evaluator.state, "epoch", None) == engine.state.epoch
        score: float | None = metrics.get(self.key_metric) if validated else None
        if score is not None and math.isfinite(score):
            self.smoothed = score if self.smoothed is None else self.ema * self.smoothed + (1 - self.ema) * score
            score = self.smoothed
            entry[f"ema_{self.key_metric}"] = score
        self.history = [h for h in self.history if h["epoch"] < engine.state.epoch] + [entry]
        improved = score is not None and math.isfinite(score) and score > self.best["metric"]
        if improved and score is not None:
            self.best = {"metric": float(score), "epoch": engine.state.epoch}
        if self.patience and validated and engine.state.epoch - int(self.best["epoch"]) >= self.patience:
            log.info(
                "early stop at epoch %d: no better %s since epoch %d",
                engine.state.epoch,
                self.key_metric,
                self.best["epoch"],
            )
            engine.terminate()
        if not self.enabled:
            return
        if improved:
            _save(self._net().state_dict(), self.output_dir / "models" / "best.pt")
        _save(
            {
                "network": self._net().state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                "epoch": engine.state.epoch,
                "iteration": engine.state.iteration,
                "history": self.history,
                "best": self.best,
                "smoothed": self.smoothed,
                "rng": rng_state(),  # for the record; resume reseeds from (seed, epoch), see seeding.py
            },
            self.last_path,
        )
        self._write_metrics(final=False)

    def finish(self, engine: Engine) -> None:
        if not self.enabled:
            return
        final = self.output_dir / "models" / "final.pt"
        _save(self._net().state_dict(), final)
        best = self.output_dir / "models" / "best.pt"
        src = best if self.model_weights == "best" and best.is_file() and self.best["epoch"] else final
        with atomic_path(self.output_dir / "models" / "model.pt") as tmp:
            shutil.copyfile(src, tmp)
        self._write_metrics(final=True)

    def _write_metrics(self, final: bool) -> None:
        last = self.history[-1] if self.history else {}
        doc = {
            "final": last if final else None,
            "last": last,
            "best": self.best,
            "model_weights": self.model_weights if final else None,
            "history": self.history,
        }
        atomic_write_text(self.output_dir / "metrics.json", json.dumps(doc, indent=2))
