"""How to honour a bundle's ``postprocessing`` when the output goes onto the source grid.

A model-zoo inference config ends with e.g. ``Activationsd(softmax) -> Invertd -> AsDiscreted(argmax)
-> KeepLargestConnectedComponentd -> SaveImaged``. segapp writes its own outputs and puts the result
on the exact source grid itself, so it reads that list as:

* writers (``Save*``) are dropped;
* ``Activationsd(softmax=True)``, ``Invertd(nearest_interp=False)`` (the way back to the source
  grid) and ``AsDiscreted(argmax=True)`` are what the fused fast path does anyway (blend logits,
  softmax, trilinear resampling to the source grid with the bundle's padding mode, argmax); without
  a softmax before ``Invertd`` the logits are resampled, as ``Invertd`` does;
* transforms after the argmax that work on a label map (largest component, hole filling, small
  object removal, label filters, ...) are run, in order, on the label map on the source grid, as
  MONAI's runner runs them after ``Invertd``.

Anything else (a step between the network and the argmax, label operations before ``Invertd``,
``Invertd`` of discrete labels or with nearest interpolation) is left to MONAI: the plain path runs
the bundle's own postprocessing. Sigmoid (multi-label) outputs are refused, since a label map cannot
hold overlapping labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd

from app.errors import ConfigError

NO_OPS = (
    "EnsureTyped",
    "EnsureType",
    "ToTensord",
    "ToNumpyd",
    "CastToTyped",
    "DeleteItemsd",
    "CopyItemsd",
    "Identityd",
    "SqueezeDimd",
)


@dataclass
class PostPlan:
    """The outcome of :func:`plan_postprocessing`.

    Attributes:
        fast: the fused path reproduces the bundle's postprocessing.
        reason: why not, when ``fast`` is False (logged).
        label_steps: transforms run on the ``{"pred": labels[None]}`` map on the source grid (fast path).
        plain: the bundle's postprocessing without its writers (plain path); None when it has none.
        inverts: the plain postprocessing brings the prediction back to the source grid itself.
        probabilities: the way back interpolates softmax probabilities (``Activationsd(softmax)``
            before ``Invertd``, or no ``Invertd``); False: the logits, as ``Invertd`` does when the
            bundle applies no softmax before it (the argmax of interpolated logits differs at boundaries).
    """

    fast: bool = True
    reason: str = ""
    label_steps: list = field(default_factory=list)
    plain: Compose | None = None
    inverts: bool = False
    probabilities: bool = True


def _flatten(post: Any) -> list:
    if post is None:
        return []
    if isinstance(post, Compose):
        return list(post.flatten().transforms)
    if isinstance(post, (list, tuple)):
        return [t for p in post for t in _flatten(p)]
    return [post]


def _is_writer(t: Any) -> bool:
    return type(t).__name__.startswith("Save")


def plan_postprocessing(post: Any, where: str = "postprocessing") -> PostPlan:
    """Classify a bundle's postprocessing (see the module docstring)."""
    steps = [t for t in _flatten(post) if not _is_writer(t)]
    plan = PostPlan(
        plain=Compose(steps, map_items=False) if steps else None, inverts=any(isinstance(t, Invertd) for t in steps)
    )
    argmax_seen = inverted = softmax_seen = False
    for t in steps:
        name = type(t).__name__
        if isinstance(t, Activationsd):
            if any(t.sigmoid) or any(o is not None for o in t.other):
                raise ConfigError(
                    "the bundle's output is sigmoid or a custom activation (multi-label): a label map "
                    "cannot hold overlapping labels; segapp runs softmax (one label per voxel) bundles",
                    where,
                )
            softmax_seen = softmax_seen or any(t.softmax)
            if argmax_seen:
                plan.fast, plan.reason = False, f"{name} after the argmax"
            continue
        if isinstance(t, Invertd):
            if not inverted:
                plan.probabilities = softmax_seen
            if not argmax_seen and any(t.nearest_interp):  # Invertd's default: scores resampled by nearest
                plan.fast, plan.reason = False, "Invertd with nearest_interp of the network output"
            if argmax_seen:
                plan.fast = False
                plan.reason = (
                    "label operations on the network grid before Invertd"
                    if plan.label_steps
                    else "Invertd of discrete labels"
                )
            inverted = True
            continue
        if isinstance(t, AsDiscreted):
            plain_argmax = (
                any(t.argmax) and not any(t.to_onehot) and all(x is None for x in t.threshold) and not any(t.rounding)
            )
            if plain_argmax and not argmax_seen:
                argmax_seen = True
            else:
                plan.fast, plan.reason = False, f"{name} other than one plain argmax"
            continue
        if name in NO_OPS:
            continue
        if not argmax_seen:
            plan.fast, plan.reason = False, f"{name} between the network and the argmax"
            continue
        plan.label_steps.append(t)
    if plan.label_steps and not inverted:
        plan.fast, plan.reason = False, "label operations on the network grid (no Invertd)"
    return plan
