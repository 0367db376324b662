"""Masked losses: ignored voxels are truly ignored; dense behaviour equals MONAI / torch."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss, DiceLoss, FocalLoss, TverskyLoss

from app.errors import InputError
from app.losses import (
    HardnessWeightedDiceLoss,
    MaskedCrossEntropyLoss,
    MaskedDiceCELoss,
    MaskedDiceLoss,
    MaskedFocalLoss,
    MaskedTverskyLoss,
    hardness_weights,
)

IGN = 255

# every loss in the multi-class softmax set-up, by name
LOSSES = {
    "dice": lambda: MaskedDiceLoss(to_onehot_y=True, softmax=True, ignore_value=IGN),
    "dice_batch_sq": lambda: MaskedDiceLoss(
        to_onehot_y=True, softmax=True, batch=True, squared_pred=True, ignore_value=IGN
    ),
    "dice_nobg": lambda: MaskedDiceLoss(to_onehot_y=True, softmax=True, include_background=False, ignore_value=IGN),
    "ce": lambda: MaskedCrossEntropyLoss(ignore_value=IGN),
    "ce_cw": lambda: MaskedCrossEntropyLoss(weight=[0.5, 1.0, 2.0], ignore_value=IGN),
    "dicece": lambda: MaskedDiceCELoss(to_onehot_y=True, softmax=True, ignore_value=IGN),
    "focal": lambda: MaskedFocalLoss(to_onehot_y=True, gamma=2.0, alpha=0.25, ignore_value=IGN),
    "tversky": lambda: MaskedTverskyLoss(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7, ignore_value=IGN),
    "hardness": lambda: HardnessWeightedDiceLoss(to_onehot_y=True, softmax=True, lam=0.6, ignore_value=IGN),
}


def _case(seed: int = 0, shape=(2, 3, 5, 6, 4), frac_ignored: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    dense = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    ignored = torch.rand(dense.shape, generator=g) < frac_ignored
    sparse = torch.where(ignored, torch.full_like(dense, IGN), dense)
    return x, dense, sparse, ignored


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_exactly_zero_at_ignored_voxels(name):
    x, _, sparse, ignored = _case(1)
    x.requires_grad_(True)
    loss = LOSSES[name]()(x, sparse)
    loss.backward()
    grad = x.grad
    ign = ignored.expand_as(grad)
    assert torch.isfinite(loss)
    assert torch.all(grad[ign] == 0)  # exactly, not approximately
    assert grad[~ign].abs().max() > 1e-6  # labelled voxels do drive the loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_logits_at_ignored_voxels_do_not_change_the_loss(name):
    x, _, sparse, ignored = _case(2)
    fn = LOSSES[name]()
    x2 = torch.where(ignored.expand_as(x), 50.0 * torch.randn_like(x), x)
    assert fn(x, sparse).item() == pytest.approx(fn(x2, sparse).item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignore_value_and_explicit_mask_agree(name):
    x, dense, sparse, ignored = _case(3)
    fn = LOSSES[name]()
    by_value = fn(x, sparse)
    by_mask = fn(x, dense, mask=~ignored)
    by_both = fn(x, sparse, mask=(~ignored).float())
    assert by_value.item() == pytest.approx(by_mask.item(), abs=1e-12)
    assert by_value.item() == pytest.approx(by_both.item(), abs=1e-12)


def test_mask_and_ignore_value_combine_with_and():
    x, dense, sparse, ignored = _case(4)
    extra = torch.zeros_like(ignored)
    extra[..., :2] = True  # also drop the first two planes along the last axis via the mask
    fn = MaskedDiceCELoss(to_onehot_y=True, softmax=True, ignore_value=IGN)
    combined = fn(x, sparse, mask=~extra)
    only_mask = fn(x, dense, mask=~(ignored | extra))
    assert combined.item() == pytest.approx(only_mask.item(), abs=1e-12)
    assert combined.item() != pytest.approx(fn(x, sparse).item(), abs=1e-6)


# ---- with nothing ignored: equal to the dense MONAI / torch losses ----------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(batch=True),
        dict(squared_pred=True),
        dict(include_background=False),
        dict(jaccard=True),
        dict(smooth_nr=0.0, smooth_dr=1e-6),
        dict(weight=[0.2, 1.0, 3.0]),
    ],
)
def test_dice_equals_monai_when_dense(kw):
    x, dense, _, _ = _case(5)
    ours = MaskedDiceLoss(to_onehot_y=True, softmax=True, ignore_value=IGN, **kw)(x, dense)
    ref = DiceLoss(to_onehot_y=True, softmax=True, **kw)(x, dense)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


def test_dice_sigmoid_and_reduction_none_equal_monai():
    x, dense, _, _ = _case(6)
    onehot = torch.nn.functional.one_hot(dense[:, 0], 3).permute(0, 4, 1, 2, 3).double()
    ours = MaskedDiceLoss(sigmoid=True, reduction="none")(x, onehot)
    ref = DiceLoss(sigmoid=True, reduction="none")(x, onehot)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(lambda_dice=0.3, lambda_ce=1.7),
        dict(include_background=False),
        dict(weight=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)),
        dict(batch=True),
    ],
)
def test_dicece_equals_monai_when_dense(kw):
    x, dense, _, _ = _case(7)
    ours = MaskedDiceCELoss(to_onehot_y=True, softmax=True, ignore_value=IGN, **kw)(x, dense)
    ref = DiceCELoss(to_onehot_y=True, softmax=True, **kw)(x, dense)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


def test_dicece_single_channel_sigmoid_equals_monai():
    x, _, _, _ = _case(8, shape=(2, 1, 4, 5, 3))
    y = (torch.rand(2, 1, 4, 5, 3, generator=torch.Generator().manual_seed(0)) > 0.6).double()
    ours = MaskedDiceCELoss(sigmoid=True, ignore_value=IGN)(x, y)
    ref = DiceCELoss(sigmoid=True)(x, y)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(weight=[0.5, 1.0, 2.0]),
        dict(label_smoothing=0.1),
        dict(weight=[0.5, 1.0, 2.0], label_smoothing=0.1),
    ],
)
def test_ce_equals_torch_when_dense(kw):
    x, dense, _, _ = _case(9)
    ours = MaskedCrossEntropyLoss(ignore_value=IGN, **kw)(x, dense)
    tkw = dict(kw)
    if "weight" in tkw:
        tkw["weight"] = torch.tensor(tkw["weight"], dtype=torch.float64)
    ref = torch.nn.CrossEntropyLoss(**tkw)(x, dense[:, 0])
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


def test_ce_equals_torch_on_labelled_voxels_only():
    x, _, sparse, ignored = _case(10)
    ours = MaskedCrossEntropyLoss(weight=[0.5, 1.0, 2.0], ignore_value=IGN)(x, sparse)
    # torch's own ignore_index does the same for CE (not for Dice): the reference
    ref = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), ignore_index=IGN)
    assert ours.item() == pytest.approx(ref(x, sparse[:, 0]).item(), abs=1e-9)


def test_dice_batch_equals_monai_on_gathered_labelled_voxels():
    x, _, sparse, ignored = _case(11)
    ours = MaskedDiceLoss(to_onehot_y=True, softmax=True, batch=True, ignore_value=IGN)(x, sparse)
    keep = ~ignored[:, 0]
    xs = x.permute(1, 0, 2, 3, 4)[:, keep][None]  # (1, C, n_labelled)
    ys = sparse[:, 0][keep][None, None]
    ref = DiceLoss(to_onehot_y=True, softmax=True, batch=True)(xs, ys)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-9)


@pytest.mark.parametrize(
    "kw", [dict(), dict(alpha=0.25), dict(alpha=[0.2, 0.3, 0.5]), dict(gamma=0.0), dict(weight=[1.0, 2.0, 0.5])]
)
def test_focal_equals_monai_when_dense(kw):
    x, dense, _, _ = _case(12)
    ours = MaskedFocalLoss(to_onehot_y=True, ignore_value=IGN, **kw)(x, dense)
    ref = FocalLoss(to_onehot_y=True, use_softmax=True, **kw)(x, dense)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


def test_focal_sigmoid_equals_monai_when_dense():
    x, dense, _, _ = _case(13)
    onehot = torch.nn.functional.one_hot(dense[:, 0], 3).permute(0, 4, 1, 2, 3).double()
    ours = MaskedFocalLoss(use_softmax=False, gamma=1.5, alpha=0.3)(x, onehot)
    ref = FocalLoss(use_softmax=False, gamma=1.5, alpha=0.3)(x, onehot)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(alpha=0.3, beta=0.7), dict(batch=True), dict(include_background=False)])
def test_tversky_equals_monai_when_dense(kw):
    x, dense, _, _ = _case(14)
    ours = MaskedTverskyLoss(to_onehot_y=True, softmax=True, ignore_value=IGN, **kw)(x, dense)
    ref = TverskyLoss(to_onehot_y=True, softmax=True, **kw)(x, dense)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


def test_hardness_with_lambda_zero_is_dice_and_weights_follow_formula():
    x, _, sparse, _ = _case(15)
    dice = MaskedDiceLoss(to_onehot_y=True, softmax=True, ignore_value=IGN)(x, sparse)
    hard0 = HardnessWeightedDiceLoss(to_onehot_y=True, softmax=True, lam=0.0, ignore_value=IGN)(x, sparse)
    assert hard0.item() == pytest.approx(dice.item(), abs=1e-12)
    p = torch.tensor([0.9, 0.2, 0.5, 0.0], requires_grad=True)
    g = torch.tensor([1.0, 1.0, 0.0, 0.0])
    w = hardness_weights(p, g, lam=0.6)
    # 0.6 * |p - g| + 0.4: 0.6*0.1+0.4, 0.6*0.8+0.4, 0.6*0.5+0.4, 0.4
    assert torch.allclose(w, torch.tensor([0.46, 0.88, 0.70, 0.40]))
    assert not w.requires_grad  # weights are constants


# ---- hand-computed cases: 1 item, 2 classes, 4 voxels along one axis -------------------------
# logits chosen so that softmax p(class 1) = 3/4, 1/2, 1/4, 1/4 at voxels v0..v3.
# labels: v0 = 1, v1 = 0, v2 = ignored, v3 = 0.
def _hand():
    l3 = math.log(3.0)
    x = torch.tensor([[[0.0, 0.0, l3, l3], [l3, 0.0, 0.0, 0.0]]], dtype=torch.float64)  # (1, 2, 4)
    y = torch.tensor([[[1, 0, IGN, 0]]])
    return x, y


def test_hand_dice():
    x, y = _hand()
    # class 1 over v0, v1, v3: p = .75, .5, .25; g = 1, 0, 0 -> tp .75, |p| 1.5, |g| 1 -> Dice 1.5/2.5 = .6
    # class 0: p = .25, .5, .75; g = 0, 1, 1 -> tp 1.25, |p| 1.5, |g| 2 -> Dice 2.5/3.5 = 5/7
    # loss = mean(1 - .6, 1 - 5/7) = (0.4 + 2/7) / 2 = 12/35 = 0.342857
    fn = MaskedDiceLoss(to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=0.0, ignore_value=IGN)
    assert fn(x, y).item() == pytest.approx(12 / 35, abs=1e-12)


def test_hand_ce_and_dicece():
    x, y = _hand()
    # CE = -(ln .75 + ln .5 + ln .75) / 3 = 0.422837
    ce = -(2 * math.log(0.75) + math.log(0.5)) / 3
    assert MaskedCrossEntropyLoss(ignore_value=IGN)(x, y).item() == pytest.approx(ce, abs=1e-12)
    fn = MaskedDiceCELoss(
        to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=0.0, ignore_value=IGN, lambda_dice=2.0, lambda_ce=0.5
    )
    assert fn(x, y).item() == pytest.approx(2.0 * 12 / 35 + 0.5 * ce, abs=1e-12)


def test_hand_weighted_ce():
    x, y = _hand()
    vw = torch.tensor([[[2.0, 1.0, 99.0, 3.0]]], dtype=torch.float64)  # 99 sits on the ignored voxel
    # class weights c = (1, 2): numerator 2*2*ln(4/3) + 1*1*ln 2 + 3*1*ln(4/3); denominator c_t = 2 + 1 + 1
    expected = (7 * math.log(4 / 3) + math.log(2)) / 4  # 0.676730
    fn = MaskedCrossEntropyLoss(weight=[1.0, 2.0], ignore_value=IGN)
    assert fn(x, y, weight=vw).item() == pytest.approx(expected, abs=1e-12)


def test_hand_focal():
    x, y = _hand()
    # only the true class's term is nonzero: (1 - p_t)^2 * -ln p_t
    # v0: .25^2 ln(4/3); v1: .5^2 ln 2; v3: .25^2 ln(4/3); mean over 3 voxels x 2 classes
    expected = (2 * 0.0625 * math.log(4 / 3) + 0.25 * math.log(2)) / 6  # 0.034875
    assert MaskedFocalLoss(to_onehot_y=True, gamma=2.0, ignore_value=IGN)(x, y).item() == pytest.approx(
        expected, abs=1e-12
    )


def test_hand_tversky():
    x, y = _hand()
    # alpha .3 (fp), beta .7 (fn)
    # class 1: tp .75, fp .5 + .25 = .75, fn .25 -> 1 - .75 / (.75 + .225 + .175) = 1 - .75/1.15
    # class 0: tp 1.25, fp .25, fn .5 + .25 = .75 -> 1 - 1.25 / (1.25 + .075 + .525) = 1 - 1.25/1.85
    expected = ((1 - 0.75 / 1.15) + (1 - 1.25 / 1.85)) / 2  # 0.336075
    fn = MaskedTverskyLoss(
        to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7, smooth_nr=0.0, smooth_dr=0.0, ignore_value=IGN
    )
    assert fn(x, y).item() == pytest.approx(expected, abs=1e-12)


def test_hand_hardness_dice():
    x, y = _hand()
    # w = .6 |p - g| + .4; |p - g| is .25, .5, .25 at v0, v1, v3 for both classes -> w = .55, .7, .55
    # class 1: 2 * .55 * .75 / (.55 * 1.75 + .7 * .5 + .55 * .25) = .825 / 1.45
    # class 0: 2 * (.7 * .5 + .55 * .75) / (.55 * .25 + .7 * 1.5 + .55 * 1.75) = 1.525 / 2.15
    expected = ((1 - 0.825 / 1.45) + (1 - 1.525 / 2.15)) / 2  # 0.360866
    fn = HardnessWeightedDiceLoss(
        to_onehot_y=True, softmax=True, lam=0.6, smooth_nr=0.0, smooth_dr=0.0, ignore_value=IGN
    )
    assert fn(x, y).item() == pytest.approx(expected, abs=1e-12)


# ---- nothing labelled --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_ignored_batch_gives_zero_loss_and_zero_gradient(name):
    x, _, _, _ = _case(16)
    x.requires_grad_(True)
    y = torch.full((2, 1, 5, 6, 4), IGN)
    loss = LOSSES[name]()(x, y)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("name", ["dice", "dice_nobg", "hardness", "tversky", "dicece", "ce", "focal"])
def test_unlabelled_item_is_left_out(name):
    x, _, sparse, _ = _case(17)
    x.requires_grad_(True)
    y = sparse.clone()
    y[1] = IGN  # the second item has no label at all
    fn = LOSSES[name]()
    loss = fn(x, y)
    loss.backward()
    assert torch.all(x.grad[1] == 0)
    assert loss.item() == pytest.approx(fn(x[:1].detach(), y[:1]).item(), abs=1e-12)


def test_zero_smoothing_and_empty_item_stays_finite():
    x, _, _, _ = _case(18)
    x.requires_grad_(True)
    y = torch.full((2, 1, 5, 6, 4), IGN)
    y[0, 0, 0, 0, 0] = 1
    fn = MaskedDiceLoss(to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=0.0, ignore_value=IGN)
    loss = fn(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# ---- integration -------------------------------------------------------------------------------
def test_metatensor_inputs_and_bundle_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {"loss": {"_target_": "app.losses.MaskedDiceCELoss", "to_onehot_y": True, "softmax": True, "ignore_value": 255}}
    )
    fn = parser.get_parsed_content("loss")
    x, dense, sparse, _ = _case(19)
    loss = fn(MetaTensor(x), MetaTensor(sparse.float()))  # labels usually arrive as float MetaTensors
    assert type(loss) is torch.Tensor
    assert loss.item() == pytest.approx(fn(x, sparse).item(), abs=1e-12)


def test_label_out_of_range_raises():
    x, dense, _, _ = _case(20)
    bad = dense.clone()
    bad[0, 0, 0, 0, 0] = 7
    with pytest.raises(InputError, match="outside"):
        MaskedDiceCELoss(to_onehot_y=True, softmax=True, ignore_value=IGN)(x, bad)


def test_supervised_trainer_learns_from_sparse_labels():
    """MONAI's SupervisedTrainer calls loss_function(y_pred, y): only ignore_value applies."""
    from monai.engines import SupervisedTrainer

    torch.manual_seed(0)
    img = torch.randn(4, 1, 8, 8, 8)
    dense = (img > 0.3).long()
    sparse = dense.clone()
    sparse[:, :, :, :, 2:] = IGN  # only two planes per volume are labelled
    data = [{"image": img[i], "label": sparse[i].float()} for i in range(4)]
    net = torch.nn.Conv3d(1, 2, 1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=5,
        train_data_loader=torch.utils.data.DataLoader(data, batch_size=2),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 0.1),
        loss_function=MaskedDiceCELoss(to_onehot_y=True, softmax=True, ignore_value=IGN),
    )
    trainer.run()
    pred = net(img).argmax(1, keepdim=True)
    accuracy = (pred == dense).float().mean().item()  # on all voxels, labelled or not
    assert math.isfinite(float(trainer.state.output[0]["loss"]))
    assert accuracy > 0.95
