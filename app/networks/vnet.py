"""V-Net of Milletari, Navab and Ahmadi (3DV 2016), configurable, built from MONAI blocks.

Layout with the defaults (``features=16``, ``depth=4``, ``convs_per_stage=(1, 2, 3, 3)``,
``bottom_convs=3``), channels per stage as in the paper's Figure 1::

    compression                                   decompression
    16 ch, 1 conv  ───────────── skip ───────────► 32 ch (16 up + 16 skip), 1 conv ─► 1×1×1 ─► classes
      │ 2×2×2 stride-2 conv                          ▲ 2×2×2 transposed conv 64→16
    32 ch, 2 convs ───────────── skip ───────────► 64 ch (32 + 32), 2 convs
      │                                              ▲ 128→32
    64 ch, 3 convs ───────────── skip ───────────► 128 ch (64 + 64), 3 convs
      │                                              ▲ 256→64
    128 ch, 3 convs ──────────── skip ───────────► 256 ch (128 + 128), 3 convs
      │                                              ▲ 256→128
    256 ch, 3 convs (bottom) ────────────────────────┘

Every stage is residual: its input is added to the output of its 5×5×5 convolutions (padding 2, so
sizes are kept) before the last PReLU. The first stage's input has ``in_channels`` channels: it is
repeated to ``features`` channels when ``features`` is a multiple of ``in_channels`` (the paper
replicates the single-channel input 16 times), otherwise projected by a 1×1×1 convolution.
Down-sampling is a 2×2×2 stride-2 convolution that doubles the channels; up-sampling a 2×2×2
stride-2 transposed convolution whose output is concatenated with the compression stage of the same
resolution (the "fine-grained features"), so the decompression stage widths halve level by level
(256, 128, 64, 32). A 1×1×1 convolution gives the class logits (no softmax).

Why not ``monai.networks.nets.VNet``: it hard-codes 16 features, depth 4, batch norm, 2 convolutions
at the bottom (the paper has 3) and 2/2/1/1 on the way up (the paper has 3/3/2/1), adds a 5×5×5
convolution in the output transition, and requires ``16 % in_channels == 0``. Here every one of
those is a parameter, with the paper's values as defaults; the building blocks are MONAI's
``Convolution`` and layer factories.

With the defaults the network has about 65 M parameters (most in the two 256-channel stages); for
CPU training use ``features=8`` (about 16 M), ``depth=3`` (about 15 M) or both (about 4 M).
Spatial input sizes must be divisible by ``2 ** depth``; the output has the input's spatial size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Conv, split_args


def _act(act: str | tuple | None, channels: int) -> str | tuple | None:
    """PReLU gets one learnable slope per channel (as in the paper); other activations pass through."""
    if act is None:
        return None
    name, args = split_args(act)
    if str(name).lower() == "prelu":
        return ("prelu", {"num_parameters": channels, **args})
    return act


class _ChannelRepeat(nn.Module):
    """Repeats the channels of ``x`` (N, C, ...) ``times`` times: the paper's input broadcast."""

    def __init__(self, times: int, spatial_dims: int):
        super().__init__()
        self.repeats: list[int] = [1, times] + [1] * spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.repeats)


class ResidualStage(nn.Module):
    """``n`` padded convolutions at constant width with the stage input added before the last act.

    conv-norm-dropout-act for the first ``n - 1`` convolutions, conv-norm-dropout for the last,
    then ``act(convs(x) + shortcut(x))``. ``shortcut`` is the identity unless ``in_channels`` differs
    from ``channels`` (first stage only, see the module docstring).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: int,
        num_convs: int,
        kernel_size: int,
        act: str | tuple | None,
        norm: str | tuple | None,
        dropout: float,
    ):
        super().__init__()
        if num_convs < 1:
            raise ValueError("every V-Net stage needs at least one convolution")
        layers = []
        ch = in_channels
        for i in range(num_convs):
            last = i == num_convs - 1
            layers.append(
                Convolution(
                    spatial_dims,
                    ch,
                    channels,
                    kernel_size=kernel_size,
                    act=None if last else _act(act, channels),
                    norm=norm,
                    dropout=dropout if dropout > 0 else None,
                    adn_ordering="NDA",
                )
            )
            ch = channels
        self.convs = nn.Sequential(*layers)
        if in_channels == channels:
            self.shortcut: nn.Module = nn.Identity()
        elif channels % in_channels == 0:
            self.shortcut = _ChannelRepeat(channels // in_channels, spatial_dims)
        else:
            self.shortcut = Conv[Conv.CONV, spatial_dims](in_channels, channels, kernel_size=1)
        act_out = _act(act, channels)
        if act_out is None:
            self.act: nn.Module = nn.Identity()
        else:
            name, args = split_args(act_out)
            self.act = Act[name](**args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.convs(x) + self.shortcut(x))


class _DownStage(nn.Module):
    """2×2×2 stride-2 convolution (doubling channels, norm, act) followed by a residual stage."""

    def __init__(
        self, spatial_dims: int, in_channels: int, num_convs: int, kernel_size: int, act, norm, dropout: float
    ):
        super().__init__()
        out_channels = 2 * in_channels
        self.down = Convolution(
            spatial_dims,
            in_channels,
            out_channels,
            strides=2,
            kernel_size=2,
            padding=0,
            act=_act(act, out_channels),
            norm=norm,
            adn_ordering="NDA",
        )
        self.stage = ResidualStage(spatial_dims, out_channels, out_channels, num_convs, kernel_size, act, norm, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.down(x))


class _UpStage(nn.Module):
    """2×2×2 stride-2 transposed convolution to ``skip_channels``, concatenation with the skip,
    then a residual stage of width ``2 * skip_channels``."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        num_convs: int,
        kernel_size: int,
        act,
        norm,
        dropout: float,
    ):
        super().__init__()
        self.up = Convolution(
            spatial_dims,
            in_channels,
            skip_channels,
            strides=2,
            kernel_size=2,
            padding=0,
            output_padding=0,
            act=_act(act, skip_channels),
            norm=norm,
            is_transposed=True,
            adn_ordering="NDA",
        )
        width = 2 * skip_channels
        self.stage = ResidualStage(spatial_dims, width, width, num_convs, kernel_size, act, norm, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.stage(torch.cat([self.up(x), skip], dim=1))


class VNet(nn.Module):
    """Milletari et al.'s V-Net (see the module docstring for the layout).

    Args:
        spatial_dims: 3 (volumes); 2 also works (5×5 kernels, 2×2 strides).
        in_channels: image channels.
        out_channels: classes, background included; the output holds logits.
        features: channels of the first (full-resolution) stage; each down-sampling doubles them.
        depth: number of down-sampling steps; the bottom stage has ``features * 2**depth`` channels.
            Input sizes must be divisible by ``2**depth`` voxels along every spatial axis.
        convs_per_stage: 5×5×5 convolutions in each compression stage, top to bottom (``depth``
            entries); the decompression stage at the same resolution uses the same number.
            Default: the paper's ``(1, 2, 3, 3)``, i.e. ``min(level + 1, 3)`` for any depth.
        bottom_convs: convolutions in the bottom stage.
        kernel_size: convolution kernel size in voxels (odd; padding keeps the size).
        act: activation (MONAI name or ``(name, kwargs)``); "prelu" gets per-channel slopes.
        norm: "batch", "instance", ``None`` (the paper, which predates batch norm) or a MONAI
            ``(name, kwargs)`` tuple.
        dropout: dropout probability after each stage convolution (0 disables).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: int = 16,
        depth: int = 4,
        convs_per_stage: Sequence[int] | None = None,
        bottom_convs: int = 3,
        kernel_size: int = 5,
        act: str | tuple | None = "prelu",
        norm: str | tuple | None = "batch",
        dropout: float = 0.0,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if convs_per_stage is None:  # the paper's 1, 2, 3, 3 (continued with 3s for deeper nets)
            convs_per_stage = [min(level + 1, 3) for level in range(depth)]
        convs_per_stage = tuple(int(c) for c in convs_per_stage)
        if len(convs_per_stage) != depth:
            raise ValueError(f"convs_per_stage needs one entry per compression stage ({depth}), got {convs_per_stage}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so that padding keeps the size, got {kernel_size}")
        self.depth = depth
        self.size_factor: int = 2**depth
        self.input_stage = ResidualStage(
            spatial_dims, in_channels, features, convs_per_stage[0], kernel_size, act, norm, dropout
        )
        widths = [features * 2**level for level in range(depth + 1)]
        self.down_stages = nn.ModuleList(
            _DownStage(
                spatial_dims,
                widths[level - 1],
                convs_per_stage[level] if level < depth else bottom_convs,
                kernel_size,
                act,
                norm,
                dropout,
            )
            for level in range(1, depth + 1)
        )
        self.up_stages = nn.ModuleList()
        ch = widths[depth]
        for level in reversed(range(depth)):
            self.up_stages.append(
                _UpStage(spatial_dims, ch, widths[level], convs_per_stage[level], kernel_size, act, norm, dropout)
            )
            ch = 2 * widths[level]
        self.head = Conv[Conv.CONV, spatial_dims](ch, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.size_factor
        for size in x.shape[2:]:
            if size % factor != 0:
                raise ValueError(
                    "VNet: spatial input sizes must be divisible by " + str(factor) + ", got " + str(list(x.shape[2:]))
                )
        x = self.input_stage(x)
        skips: list[torch.Tensor] = [x]
        for down in self.down_stages:
            x = down(x)
            skips.append(x)
        skips.pop()  # the bottom stage feeds the first up-sampling directly
        for up in self.up_stages:
            x = up(x, skips.pop())
        return self.head(x)
