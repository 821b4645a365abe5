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


def demosaic(packed: torch.Tensor) -> torch.Tensor:
    """Malvar-He-Cutler demosaic of packed RGGB planes (B, 4, h, w) (R, G1, G2, B) -> RGB (B, 3, 2h, 2w)."""
    mosaic = F.pixel_shuffle(packed, 2)
    kernels = MALVAR_KERNELS.to(device=packed.device, dtype=packed.dtype)
    # Reflection keeps each border pixel's CFA colour, as rawio's phase unification does.
    filtered = F.pixel_unshuffle(F.conv2d(F.pad(mosaic, (2, 2, 2, 2), mode="reflect"), kernels), 2)
    # filtered[:, 4k + p]: kernel k evaluated at CFA position p (0 = R, 1 = G1, 2 = G2, 3 = B).
    red, green1, green2, blue = packed.unbind(1)
    at = lambda kernel, position: filtered[:, 4 * kernel + position]  # noqa: E731
    planes_r = torch.stack([red, at(1, 1), at(2, 2), at(3, 3)], 1)
    planes_g = torch.stack([at(0, 0), green1, green2, at(0, 3)], 1)
    planes_b = torch.stack([at(3, 0), at(2, 1), at(1, 2), blue], 1)
    return torch.cat([F.pixel_shuffle(planes, 2) for planes in (planes_r, planes_g, planes_b)], 1)


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


def develop(planes: torch.Tensor, cam_to_srgb: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    """Encoder-space planes (B, 4, h, w) -> sRGB (B, 3, 2h, 2w) in [0, 1]; cam_to_srgb (B, 3, 3), white (B,)."""
    camera_rgb = demosaic(camera_planes(planes, cam_to_srgb, white)).clamp(0.0, 1.0)  # LibRaw clips at white after white balance
    srgb = torch.einsum("bij,bjhw->bihw", cam_to_srgb, camera_rgb).clamp(0.0, 1.0)
    return linear_to_srgb((srgb / white[:, None, None, None]).clamp(0.0, 1.0))
