"""A checkpoint is replaced atomically: a save that fails half way leaves the previous one loadable."""

from __future__ import annotations

import pytest
import torch

from app.training.checkpoint import _save


class _FailsWhilePickled:
    def __reduce__(self):
        raise RuntimeError("disk went away half way through the save")


def test_a_failed_checkpoint_save_keeps_the_previous_checkpoint(tmp_path):
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir()
    _save({"epoch": 1, "weights": torch.arange(4.0)}, last)
    with pytest.raises(RuntimeError, match="half way"):
        _save({"epoch": 2, "weights": torch.zeros(10_000), "extra": _FailsWhilePickled()}, last)
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(4.0))
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # no temporary file left behind
