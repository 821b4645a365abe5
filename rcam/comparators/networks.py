"""Building blocks of the learned-ISP comparators: a configurable U-Net, its global and channel attention
paths, and the bilinear demosaic the CAS-Net paper feeds its ISP-Net with.

Both seed papers use U-Nets: CameraNet two 5-level ones (a global transform at the lowest level; Enhance-Net
with dilated, residual blocks), the compression-aware ISP a 4-level one with channel attention in its
decoder and, for CAS-Net, the same without it. One class covers all of them, so each system's module only
says which options it takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Module):
    """`convs` 3×3 convolutions with LeakyReLU; optionally dilated and with a residual connection around them."""

    def __init__(self, in_channels: int, out_channels: int, convs: int = 2, dilation: int = 1, residual: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(convs):
            layers += [
                nn.Conv2d(in_channels if index == 0 else out_channels, out_channels, 3, padding=dilation, dilation=dilation),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        self.body = nn.Sequential(*layers)
        # Residual blocks (CameraNet's Enhance-Net) add their convolutions' output to the input, matched by a 1×1.
        self.shortcut = None
        if residual:
            self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        y = self.body(x)
        return y + self.shortcut(x) if self.shortcut is not None else y


class ChannelGate(nn.Module):
    """Global average pooling, two fully connected layers and a sigmoid: one scale per channel (B, C, 1, 1).

    CameraNet's global transform block (its Eq. 4) and the ISP-Net's channel attention are both this; the
    sigmoid keeps the scales in (0, 1) from the first step (CameraNet's text does not name the activation).
    """

    def __init__(self, channels: int, out_channels: int | None = None, reduction: int = 4):
        super().__init__()
        out_channels = out_channels or channels
        hidden = max(4, out_channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_channels), nn.Sigmoid())

    def forward(self, pooled_from: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_channels, 1, 1) scales from the features' global average."""
        return self.fc(pooled_from.mean(dim=(2, 3)))[:, :, None, None]


class UNet(nn.Module):
    """A U-Net: `len(widths)` levels, max-pooling down, bilinear up + skip concatenation, options per paper.

    global_transform: the lowest level's output is scaled per channel by a gate computed from its input
    (CameraNet Eq. 4). channel_attention: each decoder block ends with a channel gate (the compression-aware
    ISP-Net). out_scale: a sub-pixel convolution (pixel shuffle) that far up at the end (CameraNet).
    zero_head: the last convolution starts at zero, for nets whose output is added to a fixed estimate (they
    then start as that estimate). Inputs are reflect-padded to a multiple of 2^(levels-1) and the output
    cropped back.
    """

    def __init__(
        self, in_channels: int, out_channels: int, widths: Sequence[int], *, convs: int = 2,
        dilations: Sequence[int] | None = None, residual: bool = False, global_transform: bool = False,
        channel_attention: bool = False, out_scale: int = 1, zero_head: bool = False,
    ):  # fmt: skip
        super().__init__()
        widths = [int(width) for width in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"a U-Net needs at least two levels of positive width, got {widths}")
        dilations = list(dilations or [1] * len(widths))
        if len(dilations) != len(widths):
            raise ValueError(f"{len(dilations)} dilations for {len(widths)} levels")
        self.levels = len(widths)
        self.out_scale = out_scale
        self.down = nn.ModuleList()
        previous = in_channels
        for width, dilation in zip(widths, dilations):
            self.down.append(ConvBlock(previous, width, convs, dilation, residual))
            previous = width
        # Eq. 4: the gate sees the lowest level's input (the level above's width) and scales its output.
        self.global_gate = ChannelGate(widths[-2], widths[-1]) if global_transform else None
        self.up = nn.ModuleList()
        self.attention = nn.ModuleList()
        for level in range(self.levels - 2, -1, -1):
            self.up.append(ConvBlock(previous + widths[level], widths[level], convs, dilations[level], residual))
            self.attention.append(ChannelGate(widths[level]) if channel_attention else nn.Identity())
            previous = widths[level]
        self.head = nn.Conv2d(previous, out_channels * out_scale**2, 3, padding=1)
        if zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (forward pads to it)."""
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H·out_scale, W·out_scale)."""
        height, width = x.shape[-2:]
        pad_bottom, pad_right = -height % self.multiple, -width % self.multiple
        if pad_bottom or pad_right:
            x = _pad_reflect(x, pad_bottom, pad_right)
        skips = []
        for level, block in enumerate(self.down):
            if level:
                x = F.max_pool2d(x, 2)
            features = block(x)
            if level == self.levels - 1 and self.global_gate is not None:
                features = features * self.global_gate(x)
            skips.append(features)
            x = features
        for block, attention, skip in zip(self.up, self.attention, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
            if not isinstance(attention, nn.Identity):
                x = x * attention(x)
        y = self.head(x)
        if self.out_scale > 1:
            y = F.pixel_shuffle(y, self.out_scale)
        return y[..., : height * self.out_scale, : width * self.out_scale]


def _pad_reflect(x: torch.Tensor, bottom: int, right: int) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom and right by reflection, replicating where the image is too small to reflect."""
    reflect_bottom, reflect_right = min(bottom, x.shape[-2] - 1), min(right, x.shape[-1] - 1)
    x = F.pad(x, (0, reflect_right, 0, reflect_bottom), mode="reflect")
    return F.pad(x, (0, right - reflect_right, 0, bottom - reflect_bottom), mode="replicate")


# Bilinear interpolation of a Bayer mosaic: red and blue from their 2, 4 neighbours, green from its 4.
_RED_BLUE_KERNEL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 4
_GREEN_KERNEL = torch.tensor([[0.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 0.0]]) / 4


def bilinear_demosaic(packed: torch.Tensor) -> torch.Tensor:
    """Packed RGGB planes (B, 4, h, w) (R, G1, G2, B) -> bilinearly interpolated RGB (B, 3, 2h, 2w).

    Reflection at the borders keeps each border pixel's CFA colour (as rawio's phase unification does).
    """
    batch, _, height, width = packed.shape
    zeros = torch.zeros_like(packed[:, 0])
    red, green1, green2, blue = packed.unbind(1)
    # One sparse mosaic per colour: the colour's samples where the CFA has it, zero elsewhere.
    sparse = torch.stack([
        F.pixel_shuffle(torch.stack([red, zeros, zeros, zeros], 1), 2),
        F.pixel_shuffle(torch.stack([zeros, green1, green2, zeros], 1), 2),
        F.pixel_shuffle(torch.stack([zeros, zeros, zeros, blue], 1), 2),
    ], 1).squeeze(2)  # fmt: skip
    kernels = torch.stack([_RED_BLUE_KERNEL, _GREEN_KERNEL, _RED_BLUE_KERNEL])[:, None].to(packed)
    # Reflecting the sparse mosaic by one pixel mirrors each colour's samples onto positions of the same colour.
    return F.conv2d(F.pad(sparse, (1, 1, 1, 1), mode="reflect"), kernels, groups=3)


def parameter_count(module: nn.Module) -> int:
    """Number of trainable and frozen parameters of a module."""
    return sum(parameter.numel() for parameter in module.parameters())
