"""Fold ensembles and mirroring test-time augmentation as networks, so any predictor runs them.

nnU-Net predicts with the average of the five cross-validation models' softmax probabilities, each
also averaged over the 8 mirrorings of the input (Isensee et al., Nature Methods 2021). Here that is
a network module a bundle's ``network_def`` can name:

* :class:`FoldEnsemble` holds ``num_members`` copies of a member network (one per fold; the state dict
  is ``members.<k>.<member keys>``) and returns ``log(mean_k softmax(member_k(x)))``, so a predictor
  that applies softmax to the network output (segapp's, MONAI's ``Activationsd(softmax=True)``) gets
  the mean probability: ``softmax(log p) = p`` when ``p`` sums to 1. The averaging happens on the
  network grid, inside each sliding window, before the predictor's one resampling to the source grid.
* ``mirror_axes`` (on :class:`FoldEnsemble`, or :class:`MirrorTTA` around any network) also averages
  over every combination of flips of those spatial axes (``[0, 1, 2]``: 8 passes), each output
  flipped back before averaging. Every pass costs one forward pass of every member.

``roi_size`` (on :class:`FoldEnsemble`): the members' own patch size. A window larger than it (a
bundle whose sliding window is bigger than the patch the folds were trained on) is predicted by
MONAI's ``sliding_window_inference`` with that size inside it (Gaussian, overlap 0.5), so that the
members, instance-normalised, see inputs the size they learned on.

Log-probabilities are clamped at ``log(1e-8)`` (finite under float16 blending). In training mode
a one-member ensemble passes its member's output through untouched, so the member trains as usual.
"""

import copy
import itertools
from collections.abc import Sequence
from typing import List  # noqa: UP035  (TorchScript reads typing generics)

import torch
import torch.nn as nn

__all__ = ["FoldEnsemble", "MirrorTTA", "describe", "flip_sets", "set_mirroring"]

EPS = 1e-8


def flip_sets(axes: Sequence[int]) -> list[list[int]]:
    """Every subset of the spatial ``axes`` (0, 1, 2), as tensor dims of ``(B, C, X, Y, Z)``; the
    empty set (no flip) first. ``[0, 1, 2]`` gives 8 sets."""
    axes = sorted({int(a) for a in axes})
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror axes must be spatial axes 0, 1, 2; got {list(axes)}")
    out: list[list[int]] = []
    for r in range(len(axes) + 1):
        out.extend([a + 2 for a in combo] for combo in itertools.combinations(axes, r))
    return out


class FoldEnsemble(nn.Module):
    """Mean softmax probability of several networks (and of input mirrorings), returned as its log.

    Args:
        member: the member network (one fold's ``network_def``); deep-copied ``num_members`` times.
            Its output holds class logits ``(B, C, X, Y, Z)``.
        num_members: networks in the ensemble (folds).
        mirror_axes: spatial axes to mirror for test-time augmentation (``[]``: none; ``[0, 1, 2]``:
            all 8 flips).
        roi_size: the members' patch size (voxels); larger inputs are predicted with an inner
            sliding window of that size (None: the members see the whole input).
        roi_overlap: overlap of the inner windows.
    """

    __jit_unused_properties__ = ["mirror_axes", "passes"]
    flips: List[List[int]]  # noqa: UP006  (TorchScript reads typing generics)
    roi_size: List[int]  # noqa: UP006

    def __init__(
        self,
        member: nn.Module,
        num_members: int = 5,
        mirror_axes: Sequence[int] = (),
        roi_size: Sequence[int] | None = None,
        roi_overlap: float = 0.5,
    ):
        super().__init__()
        if int(num_members) < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}")
        self.members = nn.ModuleList([copy.deepcopy(member) for _ in range(int(num_members))])
        self.flips = flip_sets(mirror_axes)
        self.roi_size = [int(r) for r in roi_size] if roi_size else []
        self.roi_overlap = float(roi_overlap)

    @property
    def mirror_axes(self) -> list[int]:
        return sorted({d - 2 for f in self.flips for d in f})

    @property
    def passes(self) -> int:
        """Forward passes per input: members x mirrorings."""
        return len(self.members) * len(self.flips)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and len(self.members) == 1:
            return self.members[0](x)
        total = torch.zeros(1, device=x.device, dtype=torch.float32)
        n = 0
        windowed = len(self.roi_size) == 3 and any(int(x.shape[2 + i]) > self.roi_size[i] for i in range(3))
        for k, member in enumerate(self.members):
            for dims in self.flips:
                xi = x if len(dims) == 0 else torch.flip(x, dims)
                yi = self._windowed(k, xi) if windowed else member(xi)
                p = torch.softmax(yi.float(), dim=1)
                total = total + (p if len(dims) == 0 else torch.flip(p, dims))
                n += 1
        return torch.log((total / n).clamp_min(1e-8))  # EPS

    @torch.jit.unused
    def _windowed(self, k: int, x: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        member = self.members[k]
        out = sliding_window_inference(
            x, self.roi_size, 8, member, overlap=self.roi_overlap, mode="gaussian", padding_mode="constant"
        )
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


class MirrorTTA(nn.Module):
    """Mirroring test-time augmentation around any network whose output is class logits (or
    log-probabilities): ``log(mean_flips softmax(net(flip(x))) flipped back)``.

    Args:
        network: the wrapped network.
        mirror_axes: spatial axes to mirror (``[0, 1, 2]``: 8 passes).
    """

    __jit_unused_properties__ = ["passes"]
    flips: List[List[int]]  # noqa: UP006  (TorchScript reads typing generics)

    def __init__(self, network: nn.Module, mirror_axes: Sequence[int] = (0, 1, 2)):
        super().__init__()
        self.network = network
        self.flips = flip_sets(mirror_axes)

    @property
    def passes(self) -> int:
        return len(self.flips)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(1, device=x.device, dtype=torch.float32)
        for dims in self.flips:
            if len(dims) == 0:
                total = total + torch.softmax(self.network(x).float(), dim=1)
            else:
                total = total + torch.flip(torch.softmax(self.network(torch.flip(x, dims)).float(), dim=1), dims)
        return torch.log((total / len(self.flips)).clamp_min(1e-8))  # EPS


def set_mirroring(network: nn.Module, mode: str, axes: Sequence[int] = (0, 1, 2)) -> tuple[nn.Module, int]:
    """Apply ``segapp infer --tta``: ``"auto"`` keeps what the bundle's network does, ``"mirror"``
    mirrors over ``axes`` (a :class:`FoldEnsemble` switches its own mirroring on, any other network
    is wrapped in :class:`MirrorTTA`), ``"none"`` switches mirroring off.

    Returns ``(network, passes)``: the network to run and its forward passes per window.
    """
    if mode not in ("auto", "mirror", "none"):
        raise ValueError(f"tta must be auto, mirror or none; got {mode!r}")
    inner = network.module if hasattr(network, "module") else network
    if isinstance(inner, MirrorTTA) and mode == "none":
        network, inner = inner.network, inner.network
    if isinstance(inner, (FoldEnsemble, MirrorTTA)):
        if mode != "auto":
            inner.flips = flip_sets(axes if mode == "mirror" else ())
        return network, inner.passes
    if mode == "mirror":
        wrapped = MirrorTTA(network, axes).eval()
        return wrapped, wrapped.passes
    return network, 1


def describe(network: nn.Module) -> str:
    """One line on what a prediction runs: members, mirrorings, forward passes per window."""
    inner = network.module if hasattr(network, "module") else network
    members, flips = 1, 1
    while isinstance(inner, MirrorTTA):
        flips *= len(inner.flips)
        inner = inner.network
    if isinstance(inner, FoldEnsemble):
        members, flips = len(inner.members), flips * len(inner.flips)
    what = f"{members}-fold ensemble" if members > 1 else "one network"
    mirror = f", mirroring TTA ({flips} flips)" if flips > 1 else ", no mirroring"
    return f"{what}{mirror}: {members * flips} forward pass(es) per window"
