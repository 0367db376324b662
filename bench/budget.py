"""Shared by the accuracy benchmarks: run a parsed bundle's training under an optional wall-time budget."""

from __future__ import annotations

import time
from pathlib import Path

from ignite.engine import Events

from app.bundle.config import run_sections, write_config


def train_with_budget(parser, out: Path, minutes: float | None = None) -> tuple[int, float, Path]:
    """Train (``parser``'s run sections) into ``out``; stop after the epoch that passes ``minutes``.

    Returns (epochs run, training seconds, weights to evaluate: ``models/model.pt``, or the last
    epoch's checkpoint when the budget stopped training early).
    """
    out.mkdir(parents=True, exist_ok=True)
    write_config(parser.get(), out / "executed_config.json")
    trainer = parser.get_parsed_content("train#trainer")
    t0 = time.perf_counter()
    if minutes:

        @trainer.on(Events.EPOCH_COMPLETED)
        def _budget(engine):
            if time.perf_counter() - t0 > minutes * 60:
                engine.terminate()

    run_sections(parser)
    seconds = time.perf_counter() - t0
    model = out / "models" / "model.pt"
    return trainer.state.epoch, seconds, model if model.is_file() else out / "checkpoints" / "last.pt"
