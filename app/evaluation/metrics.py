"""Per-label Dice and HD95 as one Ignite metric that writes flat scalars into ``engine.state.metrics``.

MONAI's MeanDice handler reduces to one number (or a tensor that trackers can't log); we want
``val_dice_<label>``, ``val_hd95_<label>`` and their means, reduced across DDP ranks.

**Per-case tables** (:func:`case_metrics`, :func:`summarize_rows`; the cross-validation summary of
``app.training.cv`` uses them): one row per case and label, computed with MONAI's metrics on one
case's integer label maps ``(X, Y, Z)`` with its voxel size (mm), so distances are in mm and volumes
in mL whatever the orientation:

* ``dice``: MONAI ``DiceMetric``; NaN when the label is absent from both maps, 0 when only the
  prediction has it.
* ``hd95_mm``: MONAI ``HausdorffDistanceMetric(percentile=95)``; NaN when either map lacks the label.
* ``surface_dice``: MONAI ``SurfaceDiceMetric`` (normalised surface Dice, Nikolov et al. 2021) at
  ``tolerance_mm``: the fraction of both boundaries (voxels of the label with a 6-neighbour outside
  it) within the tolerance of the other boundary; 0 when only one map has the label.
* ``volume_ref_ml``, ``volume_pred_ml``, ``volume_error_ml`` (prediction minus reference).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric
from monai.networks.utils import one_hot
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

    def attach(self, engine: Engine, name: str = "segmentation_metrics", usage=None) -> None:
        super().attach(engine, name)


# -- per-case tables -----------------------------------------------------------------------------------
CASE_COLUMNS = ("dice", "hd95_mm", "surface_dice", "volume_ref_ml", "volume_pred_ml", "volume_error_ml")


def _onehot(labels: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return one_hot(t[None, None], num_classes=num_classes, dim=1)


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
    labels: Mapping[int, str],
    tolerance_mm: float = 1.0,
) -> list[dict]:
    """One row per foreground label of ``labels`` (``{value: name}``, 0 = background, skipped).

    Args:
        pred, ref: integer label maps ``(X, Y, Z)`` on the same voxel grid.
        spacing_mm: voxel size along X, Y, Z (mm).
        labels: label values and names.
        tolerance_mm: the surface Dice tolerance.

    Returns:
        ``[{"label": name, "value": v, "dice", "hd95_mm", "surface_dice", "volume_ref_ml",
        "volume_pred_ml", "volume_error_ml"}, ...]`` (floats; NaN where undefined).
    """
    pred_a, ref_a = np.asarray(pred), np.asarray(ref)
    if pred_a.shape != ref_a.shape or pred_a.ndim != 3:
        raise ValueError(f"prediction {pred_a.shape} and reference {ref_a.shape} must be the same 3D grid")
    values = sorted(int(v) for v in labels if int(v) != 0)
    n = max(values + [int(pred_a.max()), int(ref_a.max())]) + 1
    p, r = _onehot(pred_a, n), _onehot(ref_a, n)
    spacing = [float(s) for s in spacing_mm]
    voxel_ml = math.prod(spacing) / 1000.0
    with warnings.catch_warnings():  # empty labels: MONAI warns, we report NaN
        warnings.simplefilter("ignore")
        dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(p, r)[0]
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(p, r, spacing=spacing)[0]
        nsd = SurfaceDiceMetric([float(tolerance_mm)] * n, include_background=True, reduction="none")(
            p, r, spacing=spacing
        )[0]
    rows = []
    for v in values:
        in_p, in_r = bool(p[0, v].any()), bool(r[0, v].any())
        vol_p, vol_r = float(p[0, v].sum()) * voxel_ml, float(r[0, v].sum()) * voxel_ml
        rows.append(
            {
                "label": str(labels.get(v, labels.get(str(v), v))),  # type: ignore[call-overload]
                "value": v,
                # MONAI's ignore_empty gives NaN whenever the reference lacks the label: a false
                # positive scores 0 here
                "dice": (float(dice[v]) if in_r else 0.0) if (in_p or in_r) else math.nan,
                "hd95_mm": float(hd[v]) if (in_p and in_r) else math.nan,
                "surface_dice": float(nsd[v]) if (in_p and in_r) else (0.0 if (in_p or in_r) else math.nan),
                "volume_ref_ml": vol_r,
                "volume_pred_ml": vol_p,
                "volume_error_ml": vol_p - vol_r,
            }
        )
    return rows


def _stats(values: Iterable[float]) -> dict:
    vals = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if not len(vals):
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    return {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, "n": int(len(vals))}


def summarize_rows(rows: Sequence[Mapping], columns: Sequence[str] = CASE_COLUMNS) -> dict:
    """``{column: {label: {"mean", "sd", "n"}, "mean": <mean over labels of the label means>}}``
    over per-case rows (NaN rows left out; sd with ddof 1)."""
    names = list(dict.fromkeys(str(r["label"]) for r in rows))
    out: dict = {}
    for col in columns:
        per = {name: _stats(float(r[col]) for r in rows if str(r["label"]) == name) for name in names}
        means = [s["mean"] for s in per.values() if math.isfinite(s["mean"])]
        out[col] = {**per, "mean": float(np.mean(means)) if means else math.nan}
    return out
