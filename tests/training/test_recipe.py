"""The training recipe every bundle uses: poly LR, Gaussian-blended validation, the checkpoint chosen
on a moving average of the validation Dice, early stopping."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO
from ignite.engine import Engine, Events

from app.bundle.config import bundle_parser
from app.training.checkpoint import RunCheckpointer

BUNDLES = sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/train.json"))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundles_train_with_poly_lr_gaussian_validation_and_ema_selection(bundle):
    parser = bundle_parser(REPO / "bundles" / bundle, ["train"], {"device_name": "cpu", "epochs": 10})
    sched = parser.get("lr_scheduler")
    assert sched["_target_"].endswith("PolynomialLR") and sched["power"] == 0.9
    # poly: lr_e = lr_0 (1 - e / E)^0.9, stepped once per epoch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    torch_sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=10, power=0.9)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        torch_sched.step()
    assert lrs == pytest.approx([0.01 * (1 - e / 10) ** 0.9 for e in range(10)])
    inferer = parser.get_parsed_content("validate#inferer")
    assert type(inferer).__name__ == "SlidingWindowInferer" and str(inferer.mode) == "gaussian"
    ckpt = next(h for h in parser.get("train#handlers") if h["_target_"].endswith("RunCheckpointer"))
    assert ckpt["ema"] == "@val_ema" and parser.get("val_ema") == 0.9
    assert ckpt["patience"] == "@early_stop_patience"


def _run(tmp_path, scores, ema, patience=None):
    """Train a one-weight 'network' whose weight is the epoch number; a fake evaluator reports ``scores``."""
    net = torch.nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)

    def step(engine, batch):
        with torch.no_grad():
            net.weight.fill_(float(engine.state.epoch))
        return {"loss": 0.0}

    trainer = Engine(step)
    evaluator = SimpleNamespace(state=SimpleNamespace(epoch=0, metrics={}, epoch_length=1))

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine):  # attached before the checkpointer, as the bundles' ValidationHandler is
        evaluator.state.epoch = engine.state.epoch
        evaluator.state.metrics = {"val_mean_dice": scores[engine.state.epoch - 1]}

    ck = RunCheckpointer(str(tmp_path), net, opt, evaluator=evaluator, ema=ema, patience=patience)
    ck.attach(trainer)
    trainer.run([0], max_epochs=len(scores))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    weight = float(torch.load(tmp_path / "models" / "model.pt", weights_only=True)["weight"])
    return metrics, weight, trainer.state.epoch


def test_the_shipped_weights_follow_the_smoothed_dice_not_one_lucky_validation(tmp_path):
    scores = [0.2, 0.9, 0.3, 0.6, 0.7, 0.72, 0.74, 0.75]  # epoch 2 is a fluke
    raw, w_raw, _ = _run(tmp_path / "raw", scores, ema=0.0)
    assert raw["best"]["epoch"] == 2 and w_raw == 2.0
    smooth, w_smooth, _ = _run(tmp_path / "ema", scores, ema=0.5)
    ema = []
    for s in scores:
        ema.append(s if not ema else 0.5 * ema[-1] + 0.5 * s)
    best = max(range(len(ema)), key=lambda i: ema[i]) + 1
    assert best > 2 and smooth["best"]["epoch"] == best and w_smooth == float(best)
    assert [h["ema_val_mean_dice"] for h in smooth["history"]] == pytest.approx(ema)
    final = torch.load(tmp_path / "ema" / "models" / "final.pt", weights_only=True)["weight"]
    assert float(final) == len(scores)  # the last epoch's weights are kept beside


def test_early_stopping_after_patience_validations_without_a_better_average(tmp_path):
    scores = [0.5, 0.6, 0.55, 0.5, 0.45, 0.4, 0.9, 0.9]
    metrics, weight, stopped = _run(tmp_path, scores, ema=0.0, patience=3)
    assert stopped == 5 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5]
    assert metrics["best"]["epoch"] == 2 and weight == 2.0
    _, _, full = _run(tmp_path / "none", scores, ema=0.0)
    assert full == len(scores)
