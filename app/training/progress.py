"""A progress bar with the loss and the speed (samples/s), for bundle configs (``attach(engine)``)."""

from __future__ import annotations

import os
import sys
import time

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar


class TrainProgressBar:
    """tqdm bar per epoch showing loss and samples/s; silent on non-zero DDP ranks.

    Set ``SEGAPP_NO_PROGRESS=1`` (or run without a terminal in CI) for one summary line per epoch.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and os.environ.get("SEGAPP_NO_PROGRESS", "0") != "1"
        self._t0 = 0.0
        self._n = 0

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        if sys.stderr.isatty():
            ProgressBar(persist=False).attach(engine, output_transform=self._postfix)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._summary)

    def _start(self, engine: Engine) -> None:
        self._t0, self._n = time.perf_counter(), 0

    def _count(self, engine: Engine) -> None:
        out = engine.state.output
        self._n += len(out) if isinstance(out, list) else 1

    def _speed(self) -> float:
        dt = time.perf_counter() - self._t0
        return self._n / dt if dt > 0 else 0.0

    def _postfix(self, output) -> dict:
        item = output[0] if isinstance(output, list) else output
        return {"loss": float(item["loss"]), "samples/s": round(self._speed(), 1)}

    def _summary(self, engine: Engine) -> None:
        out = engine.state.output
        item = out[0] if isinstance(out, list) else out
        loss = float(item["loss"]) if isinstance(item, dict) and "loss" in item else float("nan")
        print(
            f"epoch {engine.state.epoch}/{engine.state.max_epochs}  loss {loss:.4f}  {self._speed():.1f} samples/s",
            file=sys.stderr,
            flush=True,
        )


class ValidationSummary:
    """Print the validation metrics after each validation run (one line, rank 0 only)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        m = engine.state.metrics
        parts = [f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and ("dice" in k or "hd95" in k)]
        print("  validation: " + "  ".join(parts), file=sys.stderr, flush=True)
