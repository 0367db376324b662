"""The 3D U-Net of Çiçek et al. (MICCAI 2016), with padded convolutions.

Per resolution level of the analysis path: two 3×3×3 convolutions, each followed by normalisation
and ReLU, where the second doubles the channels of the first ("doubled before each max-pool", to
avoid bottlenecks), then 2×2×2 max-pooling. The synthesis path up-samples with 2×2×2 transposed
convolutions (keeping the channel count), concatenates the skip connection from the same level and
applies two 3×3×3 convolutions. A 1×1×1 convolution maps to the class logits.

With ``features=(32, 64, 128, 256)`` the channel plan is the paper's: 32→64 | 64→128 | 128→256 |
bottom 256→512; up: 512 + 256 → 256, 256; 256 + 128 → 128, 128; 128 + 64 → 64, 64; 1×1×1 → classes.
Padded convolutions keep the output the size of the input, which must be divisible by
``2 ** (len(features) - 1)`` in every spatial dimension (``forward`` raises a ``ValueError`` naming the
size and the divisor otherwise).

**Deep supervision** (nnU-Net, Isensee et al. 2021; optional): 1×1×1 heads on the synthesis path's
coarser levels give extra logits that the loss also scores. In training mode the network then returns
``(B, L, C, X, Y, Z)``: level 0 is the full-resolution output, level ``l`` the head ``l`` levels
coarser, upsampled trilinearly to the input size (as MONAI's ``DynUNet`` does, so the output is one
tensor and TorchScript-able). The synthesis path has ``depth - 1`` levels: the finest gives the main
output, and nnU-Net gives the coarsest weight 0, so it gets no head here: ``depth - 3`` extra heads (one for
``features`` of length 4, none for length 3 or less). In eval mode the output is always ``(B, C, X, Y, Z)``.
:func:`deep_supervision_weights` gives nnU-Net's loss weights (halving per level, normalised).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's deep-supervision loss weights for ``levels`` outputs: ``1, 1/2, 1/4, ...``, summing to 1."""
    raw = [0.5**i for i in range(max(1, int(levels)))]
    return [w / sum(raw) for w in raw]


def _double_conv(in_ch: int, mid_ch: int, out_ch: int, norm: str | tuple, dropout: float) -> nn.Sequential:
    """Two 3×3×3 padded convolutions, each with normalisation and ReLU (MONAI order N-D-A)."""

    def conv(cin: int, cout: int) -> Convolution:
        return Convolution(3, cin, cout, kernel_size=3, act="RELU", norm=norm, dropout=dropout, adn_ordering="NDA")

    return nn.Sequential(conv(in_ch, mid_ch), conv(mid_ch, out_ch))


class UNet3D(nn.Module):
    """Çiçek et al.'s 3D U-Net.

    Args:
        in_channels: image channels.
        out_channels: classes (background included); the output holds logits.
        features: output channels of the *first* convolution at each level, top to bottom; the last
            entry is the bottom level. Its length sets the depth (number of max-pools + 1). Each
            level's second convolution doubles the channels.
        norm: MONAI norm name: "batch" (the paper), "instance", or a tuple with arguments.
        dropout: dropout probability after each convolution (0 disables).
        spatial_dims: kept for MONAI bundle compatibility; only 3 is supported.
        deep_supervision: add heads on the coarser synthesis levels (see the module docstring);
            in training mode the output gains a level axis: ``(B, L, C, X, Y, Z)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256),
        norm: str | tuple = "batch",
        dropout: float = 0.0,
        spatial_dims: int = 3,
        deep_supervision: bool = False,
    ):
        super().__init__()
        if spatial_dims != 3:
            raise ValueError("UNet3D is three-dimensional: spatial_dims must be 3")
        if len(features) < 2:
            raise ValueError("features needs at least two levels (one max-pool)")
        self.depth = len(features)
        self.size_factor: int = 2 ** (self.depth - 1)
        self.encoders = nn.ModuleList()
        ch = in_channels
        skip_channels = []
        for f in features:
            self.encoders.append(_double_conv(ch, f, 2 * f, norm, dropout))
            ch = 2 * f
            skip_channels.append(ch)
        self.pool = nn.MaxPool3d(kernel_size=2, stride=2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for skip_ch in reversed(skip_channels[:-1]):
            self.upsamplers.append(nn.ConvTranspose3d(ch, ch, kernel_size=2, stride=2))
            self.decoders.append(_double_conv(ch + skip_ch, skip_ch, skip_ch, norm, dropout))
            ch = skip_ch
        self.head = nn.Conv3d(ch, out_channels, kernel_size=1)
        self.deep_supervision = bool(deep_supervision)
        # heads on decoders 1 .. depth-2 (decoder 0 is the coarsest, nnU-Net's weight-0 level)
        self.ds_heads = nn.ModuleList(
            [nn.Conv3d(skip_ch, out_channels, kernel_size=1) for skip_ch in list(reversed(skip_channels[:-1]))[1:-1]]
            if self.deep_supervision
            else []
        )

    @property
    def supervision_levels(self) -> int:
        """Outputs the loss sees in training mode (1 without deep supervision)."""
        return 1 + len(self.ds_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        factor = self.size_factor
        for s in size:
            if s % factor != 0:
                raise ValueError(
                    "UNet3D: spatial input sizes must be divisible by 2 ** (len(features) - 1) = "
                    + str(factor)
                    + ", got "
                    + str(list(size))
                )
        skips: list[torch.Tensor] = []
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        skips.pop()  # the bottom level feeds the first up-sampler directly
        coarse: list[torch.Tensor] = []
        n_dec = len(self.decoders)
        for i, (upsampler, decoder) in enumerate(zip(self.upsamplers, self.decoders)):
            x = upsampler(x)
            x = decoder(torch.cat([x, skips.pop()], dim=1))
            if self.training and self.deep_supervision and 1 <= i < n_dec - 1:
                coarse.append(x)
        out = self.head(x)
        if not (self.training and self.deep_supervision) or len(coarse) == 0:
            return out
        levels = [out]
        # coarse[j] comes from decoder j + 1 (coarse to fine); inserting each after the main output
        # leaves the levels ordered fine to coarse
        for j, head in enumerate(self.ds_heads):
            levels.insert(1, F.interpolate(head(coarse[j]), size=size, mode="trilinear", align_corners=False))
        return torch.stack(levels, dim=1)
