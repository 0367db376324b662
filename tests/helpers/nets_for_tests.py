"""Deterministic stand-in networks for geometry tests (no training needed)."""

import torch


class ThresholdNet(torch.nn.Module):
    """Logits for 3 classes: label 1 where the (normalised) input is above ``threshold``, else 0."""

    def __init__(self, threshold: float = 0.0, **_):
        super().__init__()
        self.threshold = threshold
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # so weights can be saved and loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = 50.0 * (x - self.threshold)
        return torch.cat([torch.zeros_like(x), d, torch.full_like(x, -1000.0) + 0 * self.dummy], dim=1)
