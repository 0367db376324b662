"""Fold ensembles and mirroring TTA as networks; the U-Net's deep-supervision output and loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss

from app.networks.ensemble import FoldEnsemble, MirrorTTA, flip_sets, set_mirroring
from app.networks.unet3d import UNet3D, deep_supervision_weights
from app.training.deep_supervision import StackedDeepSupervisionLoss


def _unet(seed: int, **kw) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(1, 3, [4, 8, 16], norm="instance", **kw).eval()


def test_ensemble_of_two_checkpoints_is_the_mean_of_their_probabilities():
    a, b = _unet(1), _unet(2)
    ens = FoldEnsemble(_unet(0), num_members=2).eval()
    state = {**{f"members.0.{k}": v for k, v in a.state_dict().items()}}
    state.update({f"members.1.{k}": v for k, v in b.state_dict().items()})
    ens.load_state_dict(state)  # the layout app.training.cv.ensemble_state_dict writes
    x = torch.randn(1, 1, 16, 24, 16)
    with torch.no_grad():
        mean = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
        got = torch.softmax(ens(x), 1)  # what a predictor does with the output
        # also through a sliding window with Gaussian blending, as segapp and MONAI predict
        sw = SlidingWindowInferer(roi_size=(16, 16, 16), overlap=0.5, mode="gaussian")
        blended = torch.softmax(sw(x, ens), 1)
    assert torch.allclose(got, mean, atol=1e-6)
    assert not torch.allclose(mean, torch.softmax(a(x), 1), atol=1e-3)  # the members differ
    assert blended.shape == mean.shape and torch.isfinite(blended).all()


class _Symmetric(nn.Module):
    """Logits that commute with every flip: a symmetric 3x3x3 kernel (mirror-symmetric network)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)
        with torch.no_grad():
            w = torch.randn(3, 1, 3, 3, 3)
            for d in (2, 3, 4):
                w = w + torch.flip(w, [d])
            self.conv.weight.copy_(w)

    def forward(self, x):
        return self.conv(x)


def test_mirroring_a_mirror_symmetric_network_changes_nothing_and_an_asymmetric_one_does():
    torch.manual_seed(0)
    net = _Symmetric().eval()
    x = torch.randn(1, 1, 9, 10, 11)
    with torch.no_grad():
        plain = torch.softmax(net(x), 1)
        assert torch.allclose(torch.softmax(MirrorTTA(net, [0, 1, 2])(x), 1), plain, atol=1e-5)
        assert torch.allclose(torch.softmax(FoldEnsemble(net, 1, [0, 1, 2]).eval()(x), 1), plain, atol=1e-5)
        asym = _unet(3)
        y = torch.randn(1, 1, 16, 16, 16)
        assert not torch.allclose(torch.softmax(MirrorTTA(asym, [0, 1, 2])(y), 1), torch.softmax(asym(y), 1), atol=1e-3)


def test_mirror_tta_averages_the_eight_flips_flipped_back():
    net = _unet(4)
    x = torch.randn(1, 1, 16, 16, 16)
    flips = flip_sets([0, 1, 2])
    assert len(flips) == 8 and flips[0] == [] and [2, 3, 4] in flips
    with torch.no_grad():
        expect = sum(torch.flip(torch.softmax(net(torch.flip(x, f)), 1), f) for f in flips) / 8
        assert torch.allclose(torch.softmax(MirrorTTA(net)(x), 1), expect, atol=1e-6)


def test_set_mirroring_switches_a_bundle_ensemble_and_wraps_a_plain_network():
    ens = FoldEnsemble(_unet(0), 2, [0]).eval()
    assert set_mirroring(ens, "auto")[1] == 4
    net, passes = set_mirroring(ens, "mirror")
    assert net is ens and passes == 16 and ens.mirror_axes == [0, 1, 2]
    assert set_mirroring(ens, "none")[1] == 2
    plain = _unet(1)
    wrapped, passes = set_mirroring(plain, "mirror")
    assert isinstance(wrapped, MirrorTTA) and passes == 8
    assert set_mirroring(wrapped, "none") == (plain, 1)
    with pytest.raises(ValueError, match="tta"):
        set_mirroring(plain, "sideways")


def test_ensemble_is_torchscript_able():
    ens = FoldEnsemble(_unet(0, deep_supervision=True), 2, [0, 1]).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(ens)(x), ens(x), atol=1e-5)


def test_deep_supervision_levels_loss_weights_and_eval_output():
    net = UNet3D(1, 3, [4, 8, 16, 32], norm="instance", deep_supervision=True)
    x = torch.randn(2, 1, 16, 24, 16)
    out = net.train()(x)
    # depth 4: the full-resolution output plus the heads of the two finer synthesis levels but the coarsest
    assert out.shape == (2, 2, 3, 16, 24, 16) and net.supervision_levels == 2
    assert net.eval()(x).shape == (2, 3, 16, 24, 16)
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    target = torch.randint(0, 3, (2, 1, 16, 24, 16)).float()
    base = DiceCELoss(to_onehot_y=True, softmax=True)
    loss = StackedDeepSupervisionLoss(base)(out, target)
    expect = (2 / 3) * base(out[:, 0], target) + (1 / 3) * base(out[:, 1], target)
    assert torch.allclose(loss, expect, atol=1e-6)
    assert torch.allclose(StackedDeepSupervisionLoss(base)(out[:, 0], target), base(out[:, 0], target))
    loss.backward()
    assert all(h.weight.grad is not None for h in net.ds_heads)  # the extra heads are trained
    plain = UNet3D(1, 3, [4, 8, 16, 32], norm="instance")
    assert len(plain.ds_heads) == 0 and plain.train()(x).shape == (2, 3, 16, 24, 16)


def test_members_see_windows_of_their_own_patch_size_inside_a_larger_window():
    from monai.inferers import sliding_window_inference

    member = _unet(5)
    ens = FoldEnsemble(member, 1, roi_size=[16, 16, 16]).eval()
    big, small = torch.randn(1, 1, 24, 32, 24), torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        inner = sliding_window_inference(big, (16, 16, 16), 8, ens.members[0], overlap=0.5, mode="gaussian")
        assert torch.allclose(torch.softmax(ens(big), 1), torch.softmax(inner, 1), atol=1e-5)
        assert not torch.allclose(torch.softmax(ens(big), 1), torch.softmax(member(big), 1), atol=1e-3)
        assert torch.allclose(torch.softmax(ens(small), 1), torch.softmax(member(small), 1), atol=1e-5)
        torch.jit.script(ens)  # still scriptable (the windowed path runs in Python only)
