"""Per-label Dice and HD95 as one Ignite metric that writes flat scalars into ``engine.state.metrics``.

MONAI's MeanDice handler reduces to one number (or a tensor that trackers can't log); we want
``val_dice_<label>``, ``val_hd95_<label>`` and their means, reduced across DDP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.utils import evenly_divisible_all_gather

from app.io.geometry import voxel_spacing


def _label_names(labels: Mapping | Sequence[str]) -> list[str]:
    if isinstance(labels, Mapping):
        return [str(labels[k]) for k in sorted(labels, key=lambda x: int(x))]
    return [str(x) for x in labels]


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def voxel_size_mm(y) -> list[list[float]] | None:
    """Voxel size (mm) of each batch item from its affine (a MetaTensor batch or a list of items);
    ``None`` (distances in voxels) when there is no affine."""
    if isinstance(y, (list, tuple)):
        affines = [getattr(t, "affine", None) for t in y]
    else:
        a = getattr(y, "affine", None)
        if a is None:
            return None
        a = torch.as_tensor(a)
        affines = list(a) if a.ndim == 3 else [a] * y.shape[0]
    if any(a is None for a in affines):
        return None
    return [voxel_spacing(torch.as_tensor(a).cpu().numpy()).tolist() for a in affines]


class SegmentationMetrics(Metric):
    """Dice and 95th-percentile Hausdorff distance per foreground label.

    Args:
        labels: label names indexed by value, background first (``{"0": "background", "1": ...}``).
        prefix: metric name prefix, e.g. ``"val_"``.
        hd95: also compute HD95, in mm when the reference carries its affine (a MetaTensor), else in voxels.
        output_transform: maps the engine output to ``(y_pred, y)``, both one-hot ``(B, C, ...)``.

    Cases where a label is absent from both prediction and reference are left out of that label's mean.
    """

    def __init__(
        self,
        labels: Mapping | Sequence[str],
        prefix: str = "val_",
        hd95: bool = True,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ):
        self.names = _label_names(labels)[1:]
        self.prefix = prefix
        self.hd95 = hd95
        self._dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        self._hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._dice.reset()
        self._hd.reset()

    def update(self, output) -> None:
        y_pred, y = output
        items = list(y) if isinstance(y, (list, tuple)) else None
        if isinstance(y_pred, (list, tuple)):  # decollated batch
            y_pred, y = torch.stack(list(y_pred)), torch.stack(list(y))
        self._dice(y_pred=y_pred, y=y)
        if self.hd95:
            self._hd(y_pred=y_pred, y=y, spacing=voxel_size_mm(items if items is not None else y))

    def _per_label(self, metric) -> list[float]:
        buf = metric.get_buffer()
        if buf is None or (isinstance(buf, torch.Tensor) and buf.numel() == 0):
            return [float("nan")] * len(self.names)
        buf = evenly_divisible_all_gather(buf.float(), concat=True)  # (cases, labels) over all ranks
        out = []
        for c in range(buf.shape[1]):
            col = buf[:, c]
            col = col[torch.isfinite(col)]
            out.append(float(col.mean()) if col.numel() else float("nan"))
        return out

    def compute(self) -> dict[str, float]:
        res: dict[str, float] = {}
        dice = self._per_label(self._dice)
        for name, d in zip(self.names, dice):
            res[f"{self.prefix}dice_{name}"] = d
        res[f"{self.prefix}mean_dice"] = _nanmean(dice)
        if self.hd95:
            hd = self._per_label(self._hd)
            for name, h in zip(self.names, hd):
                res[f"{self.prefix}hd95_{name}"] = h
            res[f"{self.prefix}mean_hd95"] = _nanmean(hd)
        return res

    def completed(self, engine: Engine, name: str) -> None:
        # Flat scalars only: trackers and checkpoint selection read them by name.
        engine.state.metrics.update(self.compute())

    def attach(self, engine: Engine, name: str = "segmentation_metrics", usage=None) -> None:  # type: ignore[override]
        super().attach(engine, name)
