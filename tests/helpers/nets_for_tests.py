"""Deterministic stand-in networks for geometry tests (no training needed), and a TorchScript check."""

import io

import pytest
import torch


def assert_scripted_copy_matches(net: torch.nn.Module, shape: tuple, refused_shape: tuple) -> None:
    """``net`` compiled by TorchScript, saved and loaded again (as ``segapp export`` ships it) gives the
    eager outputs on an input of ``shape`` and still refuses an input of ``refused_shape`` ("divisible")."""
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    with pytest.raises(Exception, match="divisible"):
        loaded(torch.randn(refused_shape))


class ThresholdNet(torch.nn.Module):
    """Logits for 3 classes: label 1 where the (normalised) input is above ``threshold``, else 0."""

    def __init__(self, threshold: float = 0.0, **_):
        super().__init__()
        self.threshold = threshold
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # so weights can be saved and loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = 50.0 * (x - self.threshold)
        return torch.cat([torch.zeros_like(x), d, torch.full_like(x, -1000.0) + 0 * self.dummy], dim=1)
