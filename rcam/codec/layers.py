"""RealCamNet building blocks: CADR, colour priors (CPE), LFT/GFT, channel-spatial attention (CSA).

Every block is tile-consistent: nothing pools over a whole tile, so a tile of any size (training patch or a
large inference tile) sees the same statistics, and neighbouring tiles agree in their overlap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rcam.codec.skeleton import linear_to_srgb, srgb_to_linear


def conv(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Conv2d:
    """A 'same'-padded convolution (downsamples by `stride`)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)


def deconv(in_channels: int, out_channels: int, kernel_size: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    """A transposed convolution that upsamples by exactly `stride`."""
    return nn.ConvTranspose2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, output_padding=stride - 1
    )


class CoordinateEmbedding(nn.Module):
    """Fourier features of a coordinate map: (B, 2, H, W) in [0, 1] -> (B, 4·frequencies, H, W)."""

    def __init__(self, frequencies: int = 4):
        super().__init__()
        self.register_buffer("scales", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32), persistent=False)

    @property
    def out_channels(self) -> int:
        return 4 * self.scales.numel()

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        phases = coords[:, :, None] * self.scales[None, None, :, None, None]  # (B, 2, F, H, W)
        phases = phases.flatten(1, 2)
        return torch.cat([torch.sin(phases), torch.cos(phases)], dim=1)


class CADR(nn.Module):
    """Coordinate-Aware Distortion Restoration (paper Eq. 5): first features x_h modulated by coordinates.

    x_o = x_h · s(c, g) + t(c, g), with s, t from an embedding of the absolute coordinates c: the
    multiplicative part undoes vignetting, the additive part dark shading. The paper's camera has one fixed
    lens; ours must serve any camera, so the modulation also sees the global prior g of the whole frame
    (when `prior_channels` is set) and can tell a vignetted frame from a clean one. s starts at 1 and t at 0,
    and the prior's weights at 0, so CADR starts as a plain conv and older weights load unchanged.
    """

    MODULATION_STRIDE = 4  # pixels per side of the blocks the inference path evaluates the modulation on

    def __init__(self, in_channels: int, channels: int, hidden: int = 32, prior_channels: int | None = None):
        super().__init__()
        self.features = conv(in_channels, channels)
        self.embedding = CoordinateEmbedding()
        self.modulation = nn.Sequential(
            nn.Conv2d(self.embedding.out_channels + 2, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2 * channels, 1),
        )
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)
        self.prior_modulation = nn.Linear(prior_channels, hidden) if prior_channels else None
        if self.prior_modulation is not None:
            nn.init.zeros_(self.prior_modulation.weight)
            nn.init.zeros_(self.prior_modulation.bias)

    def forward(self, x: torch.Tensor, coords: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), coords (B, 2, H, W) in [0, 1], prior (B, D) or None -> features (B, channels, H, W)."""
        scale, shift = self._modulation(coords, prior)
        features = self.features(x)
        # x_h · (1 + s) + t as x_h + x_h · s + t, in place: full-resolution passes are what CADR costs at inference.
        return features.addcmul_(features, scale).add_(shift) if not torch.is_grad_enabled() else features * (1.0 + scale) + shift

    def _modulation(self, coords: torch.Tensor, prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (B, channels, H, W), from coords (B, 2, H, W) and the prior.

        At inference on a tile whose sides are multiples of MODULATION_STRIDE the network runs on the centre of
        every stride x stride block and the fields are interpolated bilinearly: they vary over a quarter of the
        frame at the fastest (CoordinateEmbedding), and the network was 38% of the analysis' time.
        """
        stride = self.MODULATION_STRIDE
        height, width = coords.shape[-2:]
        if torch.is_grad_enabled() or height % stride or width % stride:
            return self._modulation_at(coords, prior).chunk(2, dim=1)
        # Coordinates are affine in the pixel index: a block's mean is the coordinate of its centre, which is
        # where bilinear upsampling (align_corners=False) puts the coarse sample.
        coarse = self._modulation_at(F.avg_pool2d(coords, stride), prior).contiguous(memory_format=torch.channels_last)
        return F.interpolate(coarse, scale_factor=stride, mode="bilinear", align_corners=False).chunk(2, dim=1)

    def _modulation_at(self, coords: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """The modulation network at every pixel of coords: (B, 2·channels, H, W), scale then shift."""
        first = self.modulation[0]
        inputs = torch.cat([coords, self.embedding(coords)], dim=1)
        if self.prior_modulation is not None and prior is not None:
            if prior.shape[0] == 1:  # one frame (inference): the prior is a bias, added inside the conv, not per pixel after it
                hidden = F.conv2d(inputs, first.weight, first.bias + self.prior_modulation(prior)[0])
            else:
                hidden = first(inputs) + self.prior_modulation(prior)[:, :, None, None]
        else:
            hidden = first(inputs)
        return self.modulation[1:](hidden)


def brightness_layout(thumbnail: torch.Tensor, cells: int = 4) -> torch.Tensor:
    """Log mean brightness of a cells×cells grid over the frame, minus the frame's: (B, 4, S, S) -> (B, cells²).

    Pooling forgets where things are; this keeps the coarse layout (dark corners, a bright centre), which is
    what tells a vignetted frame from an evenly lit one.
    """
    luminance = thumbnail.clamp(min=0.0).mean(dim=1, keepdim=True)
    log_cells = torch.log(F.adaptive_avg_pool2d(luminance, cells).flatten(1) + 1e-3)
    return log_cells - log_cells.mean(dim=1, keepdim=True)


class GlobalPrior(nn.Module):
    """CPE global branch F_g: whole-image thumbnail (B, 4, S, S) -> colour prior vector (B, D)."""

    LAYOUT_CELLS = 4

    def __init__(self, prior_channels: int, layout: bool = False):
        super().__init__()
        self.net = nn.Sequential(
            conv(4, prior_channels, 3, 2),
            nn.ReLU(inplace=True),
            conv(prior_channels, prior_channels, 3, 2),
            nn.ReLU(inplace=True),
            conv(prior_channels, prior_channels, 3, 2),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(2 * prior_channels, prior_channels)
        # The brightness layout (optional, zero-initialised so a model fine-tuned from weights without it
        # starts out as they were).
        self.layout_head = nn.Linear(self.LAYOUT_CELLS**2, prior_channels) if layout else None
        if self.layout_head is not None:
            nn.init.zeros_(self.layout_head.weight)
            nn.init.zeros_(self.layout_head.bias)

    def forward(self, thumbnail: torch.Tensor) -> torch.Tensor:
        """Thumbnail (B, 4, S, S) -> prior (B, D)."""
        features = self.net(thumbnail)
        # Mean and max: the max keeps track of highlights, which drive LibRaw's auto-brightness.
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        prior = self.head(pooled)
        if self.layout_head is not None:
            prior = prior + self.layout_head(brightness_layout(thumbnail, self.LAYOUT_CELLS))
        return F.relu(prior)


class LocalPrior(nn.Module):
    """CPE local branch F_l: tile input (B, 4, H, W) -> local colour prior maps at H/2 and H/4."""

    def __init__(self, prior_channels: int):
        super().__init__()
        self.down1 = nn.Sequential(conv(4, prior_channels, 3, 2), nn.ReLU(inplace=True), conv(prior_channels, prior_channels))
        self.down2 = nn.Sequential(nn.ReLU(inplace=True), conv(prior_channels, prior_channels, 3, 2), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.down1(x)
        quarter = self.down2(half)
        return F.relu(half), quarter


class LFT(nn.Module):
    """Local Feature Transform: y = x·(1 + α) + β with α, β predicted per position from the local prior map."""

    def __init__(self, channels: int, prior_channels: int):
        super().__init__()
        self.affine = nn.Conv2d(prior_channels, 2 * channels, 1)
        nn.init.zeros_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor, prior_map: torch.Tensor) -> torch.Tensor:
        if prior_map.shape[-2:] != x.shape[-2:]:
            prior_map = F.interpolate(prior_map, size=x.shape[-2:], mode="bilinear", align_corners=False)
        alpha, beta = self.affine(prior_map).chunk(2, dim=1)
        return x * (1.0 + alpha) + beta


class GFT(nn.Module):
    """Global Feature Transform: y = x·(1 + α) + β with per-channel α, β from the global prior vector."""

    def __init__(self, channels: int, prior_channels: int):
        super().__init__()
        self.affine = nn.Linear(prior_channels, 2 * channels)
        nn.init.zeros_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.affine(prior)[:, :, None, None].chunk(2, dim=1)
        return x * (1.0 + alpha) + beta


class ChannelResidualAttention(nn.Module):
    """CWRA: residual conv block gated by channel attention computed on cells of `cell`×`cell` positions.

    RCAN-style channel attention pools the whole input; pooling fixed cells instead keeps the gate
    independent of tile size (tiles start on multiples of the cell, so neighbours share cell boundaries).
    """

    def __init__(self, channels: int, reduction: int = 4, cell: int = 8):
        super().__init__()
        self.cell = cell
        self.body = nn.Sequential(conv(channels, channels), nn.ReLU(inplace=True), conv(channels, channels))
        self.gate = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = self.body(x)
        pooled = F.avg_pool2d(body, self.cell, ceil_mode=True)
        gate = F.interpolate(self.gate(pooled), size=body.shape[-2:], mode="bilinear", align_corners=False)
        return x + body * gate


class WindowAttention(nn.Module):
    """SWA: Swin-style self-attention inside non-overlapping windows (no shift, so tiles never wrap around)."""

    def __init__(self, channels: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.window = window
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))
        # Learned bias per head and relative offset inside the window, as in Swin.
        self.position_bias = nn.Parameter(torch.zeros(heads, (2 * window - 1) ** 2))
        offsets = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = offsets[:, :, None] - offsets[:, None, :] + window - 1
        self.register_buffer("bias_index", relative[0] * (2 * window - 1) + relative[1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        w = self.window
        pad_h, pad_w = (-height) % w, (-width) % w
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        rows, cols = x.shape[2] // w, x.shape[3] // w
        # (B, C, rows·w, cols·w) -> (B·rows·cols, w·w, C)
        # reshape, not view: under channels-last memory (fast inference) x is not contiguous in this order.
        tokens = x.reshape(batch, channels, rows, w, cols, w).permute(0, 2, 4, 3, 5, 1).reshape(-1, w * w, channels)
        qkv = self.qkv(self.norm1(tokens)).view(tokens.shape[0], w * w, 3, self.heads, channels // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        bias = self.position_bias[:, self.bias_index]  # (heads, w·w, w·w)
        # Written out rather than F.scaled_dot_product_attention: the same floats in float32, but with a float
        # mask torch takes its reference path for it, whose checks for fully masked rows cost as much as the
        # attention itself on these 64-token windows (4x slower in bfloat16 on one core).
        scores = torch.matmul(query, key.transpose(-2, -1)) * (query.shape[-1] ** -0.5) + bias.to(query.dtype)
        attended = torch.matmul(scores.softmax(dim=-1), value)
        tokens = tokens + self.proj(attended.transpose(1, 2).reshape(tokens.shape))
        tokens = tokens + self.mlp(self.norm2(tokens))
        out = tokens.view(batch, rows, cols, w, w, channels).permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, rows * w, cols * w)
        return out[:, :, :height, :width]


class CSA(nn.Module):
    """Channel-Spatial Attention (paper Eqs. 8-12): conv, split, CWRA ‖ SWA, concat, conv; optional LFT on the CWRA half."""

    def __init__(self, channels: int, heads: int, window: int, prior_channels: int | None = None):
        super().__init__()
        half = channels // 2
        self.split_sizes = [half, channels - half]
        self.inp = nn.Conv2d(channels, channels, 1)
        self.channel_attention = ChannelResidualAttention(half)
        self.spatial_attention = WindowAttention(channels - half, heads, window)
        self.lft = LFT(half, prior_channels) if prior_channels else None
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, local_prior: torch.Tensor | None = None) -> torch.Tensor:
        first, second = self.inp(x).split(self.split_sizes, dim=1)
        first = self.channel_attention(first)
        if self.lft is not None:
            first = self.lft(first, local_prior)
        return x + self.out(torch.cat([first, self.spatial_attention(second)], dim=1))


class VignettingEstimator(nn.Module):
    """Lens falloff of the whole frame from its thumbnail: (B, 4, S, S) -> log gain (B, 1, G, G), G = GRID, ≤ 0.

    Grid cell (k, l) is the frame position ((k + ½)/G, (l + ½)/G), the same normalised frame coordinates as
    CADR's. Trained on its own with a supervised loss on the synthetic frames' known vignetting (train.py):
    learned only through the codec's loss, the falloff of a frame is barely identifiable from its content.
    """

    GRID = 8
    SIDE = 64  # thumbnails of other sizes are area-resized to this

    def __init__(self, channels: int = 48):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(6, channels, 3, 2, 1), nn.ReLU(inplace=True), conv(channels, channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 2, 1), nn.ReLU(inplace=True), conv(channels, channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 2, 1), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, 2, 1), nn.ReLU(inplace=True),
        )  # fmt: skip
        cells = (self.SIDE // 16) ** 2
        self.head = nn.Sequential(nn.Linear(channels * cells + GlobalPrior.LAYOUT_CELLS**2, 128), nn.ReLU(inplace=True), nn.Linear(128, self.GRID**2))

    def forward(self, thumbnail: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        """`dropout`: drop rate of the head's inputs and hidden units, for training steps only (0 = the estimate).

        An explicit argument, not the module's train/eval mode: the codec runs the estimator inside its own
        training forward pass, where the estimate must stay the deterministic one.
        """
        batch = thumbnail.shape[0]
        if thumbnail.shape[-1] != self.SIDE or thumbnail.shape[-2] != self.SIDE:
            thumbnail = F.adaptive_avg_pool2d(thumbnail, self.SIDE)
        # Coordinate channels: where a dark region sits (a corner or the middle) is the whole question.
        ramp = torch.linspace(-1.0, 1.0, self.SIDE, device=thumbnail.device, dtype=thumbnail.dtype)
        rows, cols = torch.meshgrid(ramp, ramp, indexing="ij")
        positions = torch.stack([rows, cols]).expand(batch, 2, self.SIDE, self.SIDE)
        features = self.net(torch.cat([thumbnail, positions], dim=1)).flatten(1)
        layout = brightness_layout(thumbnail, GlobalPrior.LAYOUT_CELLS)
        # Dropout on the head: without it the estimator learns the training scenes' layouts and does worse
        # than a constant falloff on frames it has not seen.
        features = F.dropout(torch.cat([features, layout], dim=1), dropout, training=dropout > 0)
        hidden = F.dropout(self.head[1](self.head[0](features)), dropout, training=dropout > 0)
        return self.head[2](hidden).view(batch, 1, self.GRID, self.GRID).clamp(max=0.0)


def log_gain_at(log_gain: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Grid (B, 1, G, G) of log gains -> bilinear values (B, 1, h, w) at frame coordinates (B, 2, h, w) in [0, 1]."""
    # grid_sample wants (x, y) = (column, row) in [-1, 1]; align_corners=False puts cell centres at (k + ½)/G.
    grid = torch.stack([coords[:, 1], coords[:, 0]], dim=-1) * 2.0 - 1.0
    return F.grid_sample(log_gain, grid, mode="bilinear", padding_mode="border", align_corners=False)


def devignette(x: torch.Tensor, log_gain: torch.Tensor, limit: float = 1.5) -> torch.Tensor:
    """sRGB-encoded planes x (B, C, h, w) divided by the falloff exp(log_gain) (B, 1, h, w) in linear light.

    Values are capped at `limit` in linear light, as rawio.normalise_planes caps its input.
    """
    return linear_to_srgb((srgb_to_linear(x) * torch.exp(-log_gain)).clamp(-limit, limit))
