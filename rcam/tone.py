"""Encoder-fitted tone correction: a per-channel gain and offset carried in the .rcb header.

The encoder has the RAW, so it can render the reference (SPEC §3) and compare it with what the decoder will
produce; like a video codec's encoder-side loop-filter parameters, the six numbers it fits cost 24 bytes and
pull the decoded tone onto the reference's. The fit uses only the frame's centre, weighted towards the middle:
towards the edges the reference render keeps the lens vignetting and dark shading that rcam removes on
purpose, and fitting there would put them back into the overall level.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rcam.errors import RcamError

IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0)  # gains R, G, B, then offsets R, G, B (output units, 1 = white)
FIT_BOX = 0.5  # the fit looks at the central half of each side (a quarter of the frame)
FIT_SIGMA = 0.3  # Gaussian fall-off of the weights with radius (1 = a corner of the frame)
GAIN_RANGE = (0.5, 2.0)
OFFSET_RANGE = (-0.5, 0.5)
MIN_FIT_PIXELS = 64  # fewer usable pixels per channel than this: that channel stays as decoded


def central_box(height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of the fit region: the central FIT_BOX of each side (symmetric, so any orientation)."""
    top, left = math.floor(height * (1 - FIT_BOX) / 2), math.floor(width * (1 - FIT_BOX) / 2)
    return slice(top, height - top), slice(left, width - left)


def centre_weights(height: int, width: int) -> np.ndarray:
    """(h, w) float64 fit weights over central_box: exp(-r²/σ²), r the radius normalised to the half-diagonal."""
    rows, cols = central_box(height, width)
    y = (np.arange(rows.start, rows.stop) + 0.5 - height / 2) / (height / 2)
    x = (np.arange(cols.start, cols.stop) + 0.5 - width / 2) / (width / 2)
    radius2 = (y[:, None] ** 2 + x[None, :] ** 2) / 2
    return np.exp(-radius2 / FIT_SIGMA**2)


def fit_tone(decoded: np.ndarray, reference: np.ndarray, usable: np.ndarray | None = None) -> tuple[float, ...]:
    """Weighted least-squares gain and offset per channel taking `decoded` to `reference` on the frame's centre.

    decoded: (H, W, 3) float in [0, 1], the decoder's output before correction; reference: (H, W, 3) uint8
    render of the same frame; usable: (H, W) bool, pixels the encoder could reconstruct exactly (all by
    default). Returns six float32 values (gains, offsets), see fit_tone_on_box.
    """
    height, width = decoded.shape[:2]
    if reference.shape[:2] != (height, width):
        raise RcamError(f"reference render is {reference.shape[1]}x{reference.shape[0]}, decoded image {width}x{height}")
    box = central_box(height, width)
    return fit_tone_on_box(decoded[box], reference[box], (height, width), None if usable is None else usable[box])


def fit_tone_on_box(
    decoded_box: np.ndarray, reference_box: np.ndarray, frame: tuple[int, int], usable_box: np.ndarray | None = None
) -> tuple[float, ...]:  # fmt: skip
    """fit_tone given only the central_box crops of a (H, W) = `frame` image (what the encoder synthesises).

    Clipped pixels on either side say nothing about the tone and are left out. Gains and offsets are clamped
    to GAIN_RANGE / OFFSET_RANGE; a channel with fewer than MIN_FIT_PIXELS usable pixels stays as decoded.
    """
    weights = centre_weights(*frame)
    if decoded_box.shape[:2] != weights.shape or reference_box.shape[:2] != weights.shape:
        raise RcamError(f"tone fit: crops {decoded_box.shape[:2]} / {reference_box.shape[:2]} are not the central box {weights.shape}")
    if usable_box is not None:
        weights = weights * usable_box
    gains, offsets = [], []
    for channel in range(3):
        x = decoded_box[..., channel].astype(np.float64)
        y = reference_box[..., channel].astype(np.float64) / 255.0
        valid = (weights > 0) & (x > 0.001) & (x < 0.999) & (y > 0.5 / 255) & (y < 254.5 / 255)
        w, x, y = weights[valid], x[valid], y[valid]
        gain, offset = 1.0, 0.0
        if w.size >= MIN_FIT_PIXELS:
            total = w.sum()
            mean_x, mean_y = (w * x).sum() / total, (w * y).sum() / total
            var_x = (w * (x - mean_x) ** 2).sum() / total
            if var_x > 1e-6:
                gain = (w * (x - mean_x) * (y - mean_y)).sum() / total / var_x
            gain = min(max(gain, GAIN_RANGE[0]), GAIN_RANGE[1])
            offset = min(max(mean_y - gain * mean_x, OFFSET_RANGE[0]), OFFSET_RANGE[1])
        gains.append(gain)
        offsets.append(offset)
    # float32: what the header stores, so encoder and decoder apply the very same numbers.
    return tuple(float(np.float32(value)) for value in (*gains, *offsets))


def check_tone(tone: tuple[float, ...]) -> None:
    """Refuse tone parameters that no encoder writes (a corrupt or hand-made header)."""
    if len(tone) != 6 or not all(math.isfinite(value) for value in tone):
        raise RcamError("bad header: tone correction is not six finite numbers")
    if not all(GAIN_RANGE[0] <= gain <= GAIN_RANGE[1] for gain in tone[:3]):
        raise RcamError(f"bad header: tone gains {tone[:3]} outside {GAIN_RANGE}")
    if not all(OFFSET_RANGE[0] <= offset <= OFFSET_RANGE[1] for offset in tone[3:]):
        raise RcamError(f"bad header: tone offsets {tone[3:]} outside {OFFSET_RANGE}")


def apply_tone(image: torch.Tensor, tone: tuple[float, ...]) -> torch.Tensor:
    """(3, H, W) image in [0, 1] -> gain · image + offset per channel, clamped to [0, 1]."""
    if tuple(tone) == IDENTITY:
        return image
    gains = torch.tensor(tone[:3], dtype=image.dtype).view(3, 1, 1)
    offsets = torch.tensor(tone[3:], dtype=image.dtype).view(3, 1, 1)
    return (image * gains + offsets).clamp(0.0, 1.0)
