"""``segapp evaluate``: a bundle's own ``configs/evaluate.json`` on a manifest fold.

The network comes from :func:`app.bundle.model.load_model` (trust check, weights), then the bundle's
evaluate config runs with it: its validation data, sliding-window inferer, postprocessing and metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.bundle.config import bundle_parser
from app.bundle.model import load_model
from app.data.manifest import check_manifest_fold


def evaluate(
    bundle: str | None,
    manifest: str,
    checkpoint: str | None = None,
    fold: int = 0,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
    extra_configs: Sequence[str] = (),
    run: str | None = None,
    trust: bool = False,
) -> dict[str, float]:
    """Per-label Dice and HD95 (and their means) of a model on a manifest fold's validation cases."""
    check_manifest_fold(manifest, fold)
    model = load_model(
        bundle,
        checkpoint,
        run=run,
        overrides=overrides,
        device=device,
        configs=extra_configs,
        trust=trust,
        only_known_overrides=True,
    )
    opts = {
        "manifest": str(Path(manifest).resolve()),
        "fold": int(fold),
        "checkpoint": str(model.checkpoint),
        **(overrides or {}),
    }
    parser = bundle_parser(model.ref.root, ["evaluate", *extra_configs], opts)
    parser["device"] = model.device
    parser["network"] = model.network
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.run()
    return {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}
