"""UNet3D (Çiçek et al. 2016): the layout the hippocampus_unet3d card states (per-level channels doubled
before each pool, padded 3×3×3 convolutions with instance norm and ReLU, 2×2×2 max-pooling, 2×2×2
stride-2 transposed up-sampling, concatenated skips, a 1×1×1 head), output shape = input shape, the
size check, the deep-supervision heads, and the small bundle's "about 0.3 M parameters each"."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import REPO
from nets_for_tests import assert_scripted_copy_matches

from app.bundle.config import bundle_parser
from app.networks.unet3d import UNet3D

SMALL = [4, 8, 16, 32]  # hippocampus_unet3d_small's features


def _convs(net: nn.Module) -> list[nn.Conv3d]:
    """The 3×3×3 convolutions of the analysis and synthesis paths (not the heads)."""
    return [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.kernel_size != (1, 1, 1)]


def test_default_channel_plan_is_the_papers():
    net = UNet3D(1, 3)
    # analysis path: 32->64 | 64->128 | 128->256 | bottom 256->512 (the second convolution doubles)
    assert [(e[0].conv.in_channels, e[0].conv.out_channels, e[1].conv.out_channels) for e in net.encoders] == [
        (1, 32, 64),
        (64, 64, 128),
        (128, 128, 256),
        (256, 256, 512),
    ]
    # synthesis path: the transposed convolution keeps the channels; concatenation adds the skip's
    assert [(u.in_channels, u.out_channels) for u in net.upsamplers] == [(512, 512), (256, 256), (128, 128)]
    assert [(d[0].conv.in_channels, d[0].conv.out_channels, d[1].conv.out_channels) for d in net.decoders] == [
        (512 + 256, 256, 256),
        (256 + 128, 128, 128),
        (128 + 64, 64, 64),
    ]
    assert net.head.kernel_size == (1, 1, 1) and (net.head.in_channels, net.head.out_channels) == (64, 3)


def test_small_features_per_level_channels():
    net = UNet3D(1, 3, SMALL, norm="instance")
    # the small card: channels 4->8, 8->16, 16->32, bottom 32->64
    assert [(e[0].conv.out_channels, e[1].conv.out_channels) for e in net.encoders] == [
        (4, 8),
        (8, 16),
        (16, 32),
        (32, 64),
    ]
    assert [e[0].conv.in_channels for e in net.encoders] == [1, 8, 16, 32]
    assert net.head.in_channels == 8


def test_padded_3x3x3_convolutions_instance_norm_relu_and_2x2x2_pooling_and_up_sampling():
    net = UNet3D(1, 3, SMALL, norm="instance")
    convs = _convs(net)
    assert len(convs) == 2 * 4 + 2 * 3  # two per level down (4 levels) and up (3 levels)
    assert all(m.kernel_size == (3, 3, 3) and m.padding == (1, 1, 1) and m.stride == (1, 1, 1) for m in convs)
    norms = [m for m in net.modules() if "Norm" in type(m).__name__]
    assert len(norms) == len(convs) and all(isinstance(m, nn.InstanceNorm3d) for m in norms)
    acts = [m for m in net.modules() if isinstance(m, nn.ReLU | nn.PReLU | nn.LeakyReLU | nn.ELU)]
    assert len(acts) == len(convs) and all(type(m) is nn.ReLU for m in acts)
    # each convolution is followed by its norm, then ReLU (MONAI's Convolution with ADN order N-D-A)
    for block in [*net.encoders, *net.decoders]:
        for conv in block:
            assert isinstance(conv.adn.N, nn.InstanceNorm3d) and type(conv.adn.A) is nn.ReLU
            assert list(conv.adn._modules) == ["N", "D", "A"]
    assert net.pool.kernel_size == 2 and net.pool.stride == 2 and isinstance(net.pool, nn.MaxPool3d)
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose3d)]
    assert len(ups) == 3 and all(m.kernel_size == (2, 2, 2) and m.stride == (2, 2, 2) for m in ups)
    heads = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (1, 1, 1)]
    assert heads == [net.head]  # no deep supervision: one 1×1×1 output convolution
    # the bundles' default is the paper's batch norm
    assert all(isinstance(m, nn.BatchNorm3d) for m in UNet3D(1, 3, [4, 8]).modules() if "Norm" in type(m).__name__)


def test_skip_connections_are_concatenated():
    net = UNet3D(1, 3, [4, 8, 16], norm="instance").eval()
    enc_out: list[torch.Tensor] = []
    dec_in: list[torch.Tensor] = []
    up_out: list[torch.Tensor] = []
    for e in net.encoders:
        e.register_forward_hook(lambda m, i, o: enc_out.append(o))
    for u in net.upsamplers:
        u.register_forward_hook(lambda m, i, o: up_out.append(o))
    for d in net.decoders:
        d.register_forward_hook(lambda m, i, o: dec_in.append(i[0]))
    with torch.no_grad():
        net(torch.randn(1, 1, 8, 12, 16))
    # decoder input = [up-sampled, skip from the same level], along the channels
    torch.testing.assert_close(dec_in[0], torch.cat([up_out[0], enc_out[1]], dim=1))
    torch.testing.assert_close(dec_in[1], torch.cat([up_out[1], enc_out[0]], dim=1))
    assert dec_in[0].shape[2:] == enc_out[1].shape[2:] == (4, 6, 8)


@pytest.mark.parametrize(
    "features, size, kw",
    [
        ([4, 8], (6, 10, 4), {}),
        ([4, 8, 16], (8, 12, 20), {"norm": "instance"}),
        (SMALL, (40, 56, 40), {"norm": "instance"}),  # the small bundle's member patch
        (SMALL, (16, 8, 24), {"in_channels": 2, "out_channels": 5, "dropout": 0.1}),
    ],
)
def test_output_shape_equals_input_shape(features, size, kw):
    in_ch, out_ch = kw.pop("in_channels", 1), kw.pop("out_channels", 3)
    net = UNet3D(in_ch, out_ch, features, **kw).eval()
    with torch.no_grad():
        y = net(torch.randn(2, in_ch, *size))
    assert y.shape == (2, out_ch, *size) and torch.isfinite(y).all()


def test_sizes_not_divisible_by_two_to_the_pools_are_refused_with_the_size_and_the_divisor():
    net = UNet3D(1, 3, SMALL, norm="instance").eval()
    with pytest.raises(ValueError, match=r"divisible by 2 \*\* \(len\(features\) - 1\) = 8, got \[40, 52, 40\]"):
        net(torch.randn(1, 1, 40, 52, 40))  # 52 = 4 x 13: fine for two pools, not for three
    with pytest.raises(ValueError, match=r"= 2, got \[6, 5, 4\]"):
        UNet3D(1, 3, [4, 8])(torch.randn(1, 1, 6, 5, 4))
    assert_scripted_copy_matches(net, (1, 1, 16, 8, 24), (1, 1, 16, 8, 20))  # the check survives TorchScript


@pytest.mark.parametrize("features, heads", [([4, 8], 0), ([4, 8, 16], 0), (SMALL, 1), ([4, 8, 16, 32, 64], 2)])
def test_deep_supervision_has_depth_minus_three_extra_heads(features, heads):
    net = UNet3D(1, 3, features, norm="instance", deep_supervision=True).train()
    assert len(net.ds_heads) == heads == max(0, len(features) - 3)
    assert net.supervision_levels == 1 + heads
    size = (2 ** len(features),) * 3  # 2 x 2 x 2 at the bottom (instance norm needs > 1 voxel)
    y = net(torch.randn(1, 1, *size))
    assert y.shape == ((1, 1 + heads, 3, *size) if heads else (1, 3, *size))
    assert net.eval()(torch.randn(1, 1, *size)).shape == (1, 3, *size)


def test_the_small_bundles_members_have_about_0_3_million_parameters_each():
    ensemble = bundle_parser(
        REPO / "bundles" / "hippocampus_unet3d_small", ["inference"], {"device_name": "cpu"}
    ).get_parsed_content("network_def")
    counts = [sum(p.numel() for p in m.parameters()) for m in ensemble.members]
    assert len(counts) == 5 and len(set(counts)) == 1
    assert 0.25e6 < counts[0] < 0.35e6, counts[0]  # the card: "about 0.3 M parameters each"
    member = ensemble.members[0]
    assert isinstance(member, UNet3D) and [e[0].conv.out_channels for e in member.encoders] == SMALL
    assert counts[0] == sum(p.numel() for p in UNet3D(1, 3, SMALL, norm="instance", deep_supervision=True).parameters())
