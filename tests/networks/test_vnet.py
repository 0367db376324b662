"""V-Net: layout (paper's channel plan, 5×5×5 kernels, strided down/transposed up, PReLU, residual
stages, concatenated skips), shapes, TorchScript export and a training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from nets_for_tests import assert_scripted_copy_matches

from app.networks.vnet import ResidualStage, VNet


def _small(**kw) -> VNet:
    kw.setdefault("features", 4)
    kw.setdefault("depth", 2)
    return VNet(**kw)


@pytest.mark.parametrize(
    "kw, size",
    [
        (dict(features=4, depth=2), (8, 12, 4)),
        (dict(features=4, depth=3), (16, 8, 24)),
        (dict(features=2, depth=4, out_channels=3), (16, 16, 32)),
        (dict(features=4, depth=2, in_channels=2, out_channels=5, norm="instance"), (12, 8, 8)),
        (dict(features=4, depth=2, norm=None, dropout=0.2), (8, 8, 8)),
    ],
)
def test_output_shape_and_channels(kw, size):
    net = VNet(**kw).eval()
    x = torch.randn(2, kw.get("in_channels", 1), *size)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, kw.get("out_channels", 2), *size)
    assert torch.isfinite(y).all()


def test_two_dimensional():
    net = VNet(spatial_dims=2, in_channels=3, features=6, depth=2).eval()
    assert net(torch.randn(1, 3, 16, 8)).shape == (1, 2, 16, 8)
    assert all(
        m.kernel_size == (5, 5)
        for m in net.modules()
        if isinstance(m, nn.Conv2d) and m.stride == (1, 1) and m.kernel_size != (1, 1)
    )


def test_default_channel_plan_matches_paper():
    net = VNet()
    assert net.input_stage.convs[0].conv.out_channels == 16
    assert [s.down.conv.out_channels for s in net.down_stages] == [32, 64, 128, 256]
    # Up: transposed conv to the skip's width, concatenated -> stage widths 256, 128, 64, 32.
    assert [s.up.conv.out_channels for s in net.up_stages] == [128, 64, 32, 16]
    assert [s.stage.convs[0].conv.in_channels for s in net.up_stages] == [256, 128, 64, 32]
    # 1, 2, 3, 3 convolutions down, 3 at the bottom, 3, 3, 2, 1 up.
    assert len(net.input_stage.convs) == 1
    assert [len(s.stage.convs) for s in net.down_stages] == [2, 3, 3, 3]
    assert [len(s.stage.convs) for s in net.up_stages] == [3, 3, 2, 1]
    assert net.head.kernel_size == (1, 1, 1) and net.head.in_channels == 32 and net.head.out_channels == 2
    n_params = sum(p.numel() for p in net.parameters())
    assert 60e6 < n_params < 70e6


def test_kernels_strides_and_activations():
    net = VNet(features=4, depth=3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    stage_convs = [m for m in convs if m.stride == (1, 1, 1) and m.kernel_size != (1, 1, 1)]
    down_convs = [m for m in convs if m.stride == (2, 2, 2)]
    up_convs = [m for m in net.modules() if isinstance(m, nn.ConvTranspose3d)]
    # 1+2+3 down, 3 bottom, 3+2+1 up
    assert len(stage_convs) == 15
    assert all(m.kernel_size == (5, 5, 5) and m.padding == (2, 2, 2) for m in stage_convs)
    assert len(down_convs) == 3 and all(
        m.kernel_size == (2, 2, 2) and m.out_channels == 2 * m.in_channels for m in down_convs
    )
    assert len(up_convs) == 3 and all(m.kernel_size == (2, 2, 2) and m.stride == (2, 2, 2) for m in up_convs)
    assert not any(isinstance(m, nn.MaxPool3d) for m in net.modules())
    acts = [m for m in net.modules() if isinstance(m, (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.PReLU))]
    assert acts and all(isinstance(m, nn.PReLU) for m in acts)
    # per-channel slopes
    assert net.input_stage.act.num_parameters == 4
    assert net.down_stages[-1].stage.act.num_parameters == 32


def test_residual_connection_adds_stage_input():
    torch.manual_seed(0)
    stage = ResidualStage(3, 8, 8, num_convs=2, kernel_size=5, act="prelu", norm=None, dropout=0.0).eval()
    x = torch.randn(1, 8, 6, 6, 6)
    seen = {}
    stage.convs.register_forward_hook(lambda m, i, o: seen.update(convs=o))
    y = stage(x)
    torch.testing.assert_close(y, stage.act(seen["convs"] + x))
    # With zeroed convolutions only the shortcut is left: y = PReLU(x).
    for p in stage.convs.parameters():
        nn.init.zeros_(p)
    torch.testing.assert_close(stage(x), stage.act(x))


def test_first_stage_broadcasts_or_projects_input():
    x = torch.randn(1, 1, 4, 4, 4)
    net = VNet(in_channels=1, features=4, depth=1, norm=None).eval()
    for p in net.input_stage.convs.parameters():
        nn.init.zeros_(p)
    # Paper: the single-channel input is replicated to every first-stage channel.
    torch.testing.assert_close(net.input_stage(x), net.input_stage.act(x.repeat(1, 4, 1, 1, 1)))
    projected = VNet(in_channels=3, features=4, depth=1)
    assert isinstance(projected.input_stage.shortcut, nn.Conv3d)
    assert projected.input_stage.shortcut.kernel_size == (1, 1, 1)


def test_skip_connections_are_concatenated():
    net = _small(features=4, depth=2).eval()
    captured = []
    for up in net.up_stages:
        up.stage.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    skips = []
    net.input_stage.register_forward_hook(lambda m, i, o: skips.append(o))
    net.down_stages[0].register_forward_hook(lambda m, i, o: skips.append(o))
    with torch.no_grad():
        net(torch.randn(1, 1, 8, 8, 8))
    # The second half of each up stage's input is the compression stage's output at that level.
    torch.testing.assert_close(captured[0][:, 8:], skips[1])
    torch.testing.assert_close(captured[1][:, 4:], skips[0])


def test_rejects_sizes_not_divisible_and_bad_arguments():
    net = _small(depth=2)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 1, 8, 10, 8))
    with pytest.raises(ValueError, match="convs_per_stage"):
        VNet(depth=3, convs_per_stage=(1, 2))
    with pytest.raises(ValueError, match="odd"):
        VNet(kernel_size=4)
    with pytest.raises(ValueError, match="spatial_dims"):
        VNet(spatial_dims=1)


def test_torchscript_export_matches_eager():
    torch.manual_seed(0)
    net = VNet(features=4, depth=3).eval()
    assert_scripted_copy_matches(net, (1, 1, 16, 8, 16), (1, 1, 16, 8, 12))


def test_default_network_is_scriptable():
    scripted = torch.jit.script(VNet().eval())
    with torch.no_grad():
        assert scripted(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_buildable_from_bundle_config():
    parser = ConfigParser(
        {
            "network_def": {
                "_target_": "app.networks.vnet.VNet",
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 3,
                "features": 4,
                "depth": 2,
                "norm": "instance",
            }
        }
    )
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, VNet) and net.head.out_channels == 3


def test_one_optimisation_step_reduces_loss():
    torch.manual_seed(0)
    net = VNet(features=4, depth=2)
    x = torch.randn(2, 1, 16, 16, 16)
    y = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    y[:, 4:12, 4:12, 4:12] = 1
    x = x + 2.0 * y[:, None]  # a bright cube to find
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    before = loss_fn(net(x), y)
    opt.zero_grad()
    before.backward()
    assert all(p.grad is not None for p in net.parameters())
    opt.step()
    with torch.no_grad():
        after = loss_fn(net(x), y)
    assert after.item() < before.item()
