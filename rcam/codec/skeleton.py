"""The classical skeleton of the decoder (SPEC §4): packed planes in the encoder's input space -> sRGB image.

The encoder's input (rawio.normalise_planes) is the white-balanced camera mosaic, taken to linear sRGB per
2x2 cell with the file's colour matrix, scaled by the auto-brightness level and sRGB-encoded; the two greens
keep their difference. The skeleton undoes that per cell, puts the white-balanced camera values back into
an RGGB mosaic, demosaics it at full resolution (Malvar, He and Cutler 2004: LibRaw's own order is white
balance, demosaic, colour matrix, brightness, gamma) and applies the colour and tone again per pixel. Every
step is a fixed, differentiable torch operation: the network reconstructs the planes and predicts only what
this path gets wrong (LibRaw's AHD look, detail, noise and, for the clean look, the defects).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """sRGB-encoded values -> linear light (same shape), odd-extended to negative values (rawio.normalise_planes)."""
    magnitude = x.abs()
    linear = torch.where(magnitude <= 0.04045, magnitude / 12.92, ((magnitude.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4)
    return torch.sign(x) * linear


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    """Linear light -> sRGB-encoded values (same shape), odd-extended to negative values."""
    magnitude = x.abs()
    encoded = torch.where(magnitude <= 0.0031308, 12.92 * magnitude, 1.055 * magnitude.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)
    return torch.sign(x) * encoded


# Malvar-He-Cutler 5x5 kernels (×1/8): green at a red/blue site; red/blue at a green site whose row holds
# that colour; the same along columns; red at a blue site and blue at a red site.
_GREEN_AT_RED_BLUE = [[0, 0, -1, 0, 0], [0, 0, 2, 0, 0], [-1, 2, 4, 2, -1], [0, 0, 2, 0, 0], [0, 0, -1, 0, 0]]
_ALONG_ROW = [[0, 0, 0.5, 0, 0], [0, -1, 0, -1, 0], [-1, 4, 5, 4, -1], [0, -1, 0, -1, 0], [0, 0, 0.5, 0, 0]]
_ALONG_COLUMN = [list(column) for column in zip(*_ALONG_ROW)]
_DIAGONAL = [[0, 0, -1.5, 0, 0], [0, 2, 0, 2, 0], [-1.5, 0, 6, 0, -1.5], [0, 2, 0, 2, 0], [0, 0, -1.5, 0, 0]]
MALVAR_KERNELS = torch.tensor([_GREEN_AT_RED_BLUE, _ALONG_ROW, _ALONG_COLUMN, _DIAGONAL], dtype=torch.float32)[:, None] / 8


def packed_pad(packed: torch.Tensor, mode: str) -> torch.Tensor:
    """Packed planes (B, 4·C, h, w) (each group of 4: R, G1, G2, B, the pixel-shuffle order) -> (B, 4·C, h + 2, w + 2):
    the planes of the full-resolution mosaic padded by 2 pixels with F.pad's `mode` ("reflect" or "replicate").

    Equal to pixel_unshuffle(F.pad(pixel_shuffle(packed, 2), (2, 2, 2, 2), mode), 2) without making the
    full-resolution image: the padding's pixels are gathered from the planes (replicate takes a neighbouring
    CFA position's plane, reflect the same one).
    """
    batch, channels, height, width = packed.shape
    grid = packed.reshape(batch, channels // 4, 2, 2, height, width)  # (B, C, row parity, column parity, h, w)

    def sources(length: int) -> torch.Tensor:
        """(length + 2, 2): the full-resolution line each padded packed line takes, per parity."""
        line = torch.arange(-2, 2 * length + 2)
        if mode == "reflect":
            line = line.abs()
            line = torch.where(line >= 2 * length, 2 * (2 * length - 1) - line, line)
        else:
            line = line.clamp(0, 2 * length - 1)
        return line.view(length + 2, 2)

    # Only the first and last padded lines come from elsewhere (the rest are the planes themselves): gather
    # those and concatenate, rows then columns, so the corners follow both rules as F.pad's do.
    rows, cols = sources(height).tolist(), sources(width).tolist()
    edge = lambda line: torch.stack([grid[:, :, source % 2, :, source // 2] for source in line], 2)  # noqa: E731
    grid = torch.cat([edge(rows[0]).unsqueeze(4), grid, edge(rows[-1]).unsqueeze(4)], 4)
    edge = lambda line: torch.stack([grid[:, :, :, source % 2, :, source // 2] for source in line], 3)  # noqa: E731
    grid = torch.cat([edge(cols[0]).unsqueeze(5), grid, edge(cols[-1]).unsqueeze(5)], 5)
    return grid.reshape(batch, channels, height + 2, width + 2)


def _packed_taps(kernel: torch.Tensor, position: int) -> torch.Tensor:
    """A full-resolution kernel (k, k), k <= 5, applied at CFA position `position` (0 = R, 1 = G1, 2 = G2, 3 = B)
    -> the same sum as a 3x3 convolution of the 4 packed planes padded by one (packed_pad): (4, 3, 3)."""
    taps = torch.zeros(4, 3, 3, dtype=torch.float64)
    row_parity, col_parity = divmod(position, 2)
    reach = kernel.shape[0] // 2
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            source_row, source_col = row_parity + dy, col_parity + dx  # full-resolution offsets in the cell
            taps[2 * (source_row % 2) + source_col % 2, 1 + source_row // 2, 1 + source_col // 2] += float(kernel[dy + reach, dx + reach])
    return taps


# Malvar's kernels laid out as one 3x3 convolution of the padded packed planes: output 4·c + p is colour c
# (R, G, B) at CFA position p (R, G1, G2, B), the pixel-shuffle order; the known samples pass through.
def _demosaic_weights() -> torch.Tensor:
    kernel_at = {  # (colour, position) -> Malvar kernel index, or None: the position's own sample
        (0, 0): None, (0, 1): 1, (0, 2): 2, (0, 3): 3,
        (1, 0): 0, (1, 1): None, (1, 2): None, (1, 3): 0,
        (2, 0): 3, (2, 1): 2, (2, 2): 1, (2, 3): None,
    }  # fmt: skip
    weights = torch.zeros(12, 4, 3, 3, dtype=torch.float64)
    for (colour, position), kernel in kernel_at.items():
        if kernel is None:
            weights[4 * colour + position, position, 1, 1] = 1.0
        else:
            weights[4 * colour + position] = _packed_taps(MALVAR_KERNELS[kernel, 0], position)
    return weights.float()


DEMOSAIC_WEIGHTS = _demosaic_weights()


def demosaic_packed(packed: torch.Tensor) -> torch.Tensor:
    """Malvar-He-Cutler demosaic of packed RGGB planes (B, 4, h, w) (R, G1, G2, B) -> (B, 12, h, w): colour c at
    CFA position p in channel 4·c + p, so pixel_shuffle(·, 2) is the RGB image (B, 3, 2h, 2w)."""
    weights = DEMOSAIC_WEIGHTS.to(device=packed.device, dtype=packed.dtype)
    # Reflection keeps each border pixel's CFA colour, as rawio's phase unification does.
    return F.conv2d(packed_pad(packed, "reflect"), weights)


def demosaic(packed: torch.Tensor) -> torch.Tensor:
    """Malvar-He-Cutler demosaic of packed RGGB planes (B, 4, h, w) (R, G1, G2, B) -> RGB (B, 3, 2h, 2w)."""
    return F.pixel_shuffle(demosaic_packed(packed), 2)


# Binomial [1, 2, 1]/4 in each direction: zero response at the 2-pixel period. The network's correction is
# band-limited by it: the finest detail comes from the demosaiced planes, and a correction drawn by pixel
# shuffle cannot lay a fixed 2x2 pattern over flat areas (trained without it, rcam-small stage 8 put one there:
# 13x the reference render's energy at that period on a flat grey frame, 2.1x with it; PSNR within 0.07 dB).
_BINOMIAL = torch.tensor([1.0, 2.0, 1.0])
CORRECTION_KERNEL = (_BINOMIAL[:, None] * _BINOMIAL[None, :] / 16)[None, None]


def band_limit(correction: torch.Tensor) -> torch.Tensor:
    """A full-resolution correction (B, C, H, W) smoothed by CORRECTION_KERNEL (edges replicated), same shape."""
    channels = correction.shape[1]
    kernel = CORRECTION_KERNEL.to(device=correction.device, dtype=correction.dtype).expand(channels, 1, 3, 3)
    return F.conv2d(F.pad(correction, (1, 1, 1, 1), mode="replicate"), kernel, groups=channels)


def _band_limit_weights() -> torch.Tensor:
    """CORRECTION_KERNEL as a 3x3 convolution of one colour's 4 padded packed planes: (4, 4, 3, 3)."""
    return torch.stack([_packed_taps(CORRECTION_KERNEL[0, 0], position) for position in range(4)]).float()


BAND_LIMIT_WEIGHTS = _band_limit_weights()


def band_limit_packed(correction: torch.Tensor) -> torch.Tensor:
    """band_limit of pixel_shuffle(correction, 2), kept packed: (B, 4·C, h, w) -> the same shape."""
    colours = correction.shape[1] // 4
    weights = BAND_LIMIT_WEIGHTS.to(device=correction.device, dtype=correction.dtype).repeat(colours, 1, 1, 1)
    # Replicating 2 pixels is replicating 1 for a 3x3 kernel: the outer one has no weight.
    return F.conv2d(packed_pad(correction, "replicate"), weights, groups=colours)


@dataclass(frozen=True)
class Development:
    """The colour and tone the encoder applied, which the skeleton applies again: per frame, from the header."""

    cam_to_srgb: tuple[float, ...]  # 9 values, row-major (3, 3): white-balanced camera RGB -> linear sRGB
    white: float  # auto-brightness level: linear sRGB value that becomes 1

    def tensors(self, batch: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(matrix (B, 3, 3), white (B,)) float32 for `batch` tiles."""
        matrix = torch.tensor(self.cam_to_srgb, dtype=torch.float32, device=device).view(1, 3, 3).expand(batch, 3, 3)
        return matrix, torch.full((batch,), float(self.white), dtype=torch.float32, device=device)


def camera_planes(planes: torch.Tensor, cam_to_srgb: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    """Encoder-space planes (B, 4, h, w) -> the white-balanced camera planes R, G1, G2, B they came from (same
    shape; 1 = the sensor's white level after white balance): rawio.normalise_planes undone."""
    linear = srgb_to_linear(planes) * white[:, None, None, None]
    red, green1, green2, blue = linear.unbind(1)
    green = 0.5 * (green1 + green2)
    camera = torch.einsum("bij,bjhw->bihw", torch.linalg.inv(cam_to_srgb), torch.stack([red, green, blue], 1))
    # The encoder shifted both greens by (sRGB green - camera green) of their cell: shift them back.
    shift = green - camera[:, 1]
    return torch.stack([camera[:, 0], green1 - shift, green2 - shift, camera[:, 2]], 1)


def develop_packed(planes: torch.Tensor, cam_to_srgb: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    """Encoder-space planes (B, 4, h, w) -> sRGB in [0, 1] kept packed (B, 12, h, w), as demosaic_packed lays it
    out; cam_to_srgb (B, 3, 3), white (B,)."""
    batch, _, height, width = planes.shape
    camera_rgb = demosaic_packed(camera_planes(planes, cam_to_srgb, white)).clamp(0.0, 1.0)  # LibRaw clips at white after white balance
    srgb = torch.einsum("bij,bjphw->biphw", cam_to_srgb, camera_rgb.view(batch, 3, 4, height, width)).clamp(0.0, 1.0)
    linear = (srgb / white[:, None, None, None, None]).clamp(0.0, 1.0).view(batch, 12, height, width)
    threshold = 0.0031308
    if torch.is_grad_enabled():
        return linear_to_srgb(linear)
    # At inference in place, in half the passes: the power branch at max(x, t), plus the linear branch's slope
    # below t (the two meet at t to 2e-6).
    below = linear.clamp(max=threshold).sub_(threshold).mul_(12.92)
    return linear.clamp_(min=threshold).log_().mul_(1 / 2.4).exp_().mul_(1.055).sub_(0.055).add_(below)


def develop(planes: torch.Tensor, cam_to_srgb: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    """Encoder-space planes (B, 4, h, w) -> sRGB (B, 3, 2h, 2w) in [0, 1]; cam_to_srgb (B, 3, 3), white (B,)."""
    return F.pixel_shuffle(develop_packed(planes, cam_to_srgb, white), 2)
