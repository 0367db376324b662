"""Every sparse-annotation loss is available by name in a bundle's loss section: the sparse bundle's
training (sparse labels, ignore value 255) runs an epoch with it and the loss is finite and falls or
changes the weights."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SAMPLE_MANIFEST, TINY

from app.bundle.config import bundle_parser
from app.bundle.store import find_bundle

LOSSES = {  # MONAI-style arguments of each (the focal loss takes use_softmax, as MONAI's FocalLoss)
    "MaskedDiceCELoss": {"softmax": True},
    "MaskedTverskyLoss": {"softmax": True, "alpha": 0.3, "beta": 0.7},
    "HardnessWeightedDiceLoss": {"softmax": True, "lam": 0.6},
    "MaskedFocalLoss": {"use_softmax": True, "gamma": 2.0},
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_by_name_trains_the_sparse_bundle(name):
    loss = {"_target_": f"app.losses.{name}", "to_onehot_y": True, "ignore_value": "@ignore_value", **LOSSES[name]}
    opts = {
        **TINY,
        "device_name": "cpu",
        "manifest": str(SAMPLE_MANIFEST),
        "epochs": 1,
        "loss": loss,
        "train#handlers": [],
        "output_dir": "unused",
    }
    parser = bundle_parser(find_bundle("hippocampus_unet3d_sparse").root, ["train", "demo.json"], opts)
    trainer = parser.get_parsed_content("train#trainer")
    assert type(trainer.loss_function).__name__ == name
    net = parser.get_parsed_content("network")
    before = [p.detach().clone() for p in net.parameters()]
    trainer.run()
    assert math.isfinite(float(trainer.state.output[0]["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
