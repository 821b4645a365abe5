"""Encoder-fitted tone correction: a per-channel gain and offset carried in the .rcb header.

The encoder has the RAW, so it can render the reference (SPEC §3) and compare it with what the decoder will
produce; like a video codec's encoder-side loop-filter parameters, the six numbers it fits cost 24 bytes and
pull the decoded tone onto the reference's. The render it fits to has the estimated lens falloff divided out
(rcam.codec.tone_reference), so the whole frame can take part with equal weight: on the val pairs and the
real DNGs a uniform whole-frame fit beats one weighted towards the centre (23.49 against 23.33 dB and 32.57
against 32.01 dB at λ 0.01), which the encoder used while it fitted to the plain render.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rcam.errors import RcamError

IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0)  # gains R, G, B, then offsets R, G, B (output units, 1 = white)
GAIN_RANGE = (0.5, 2.0)
OFFSET_RANGE = (-0.5, 0.5)
MIN_FIT_PIXELS = 64  # fewer usable pixels per channel than this: that channel stays as decoded


def fit_tone(decoded: np.ndarray, reference: np.ndarray, usable: np.ndarray | None = None) -> tuple[float, ...]:
    """Least-squares gain and offset per channel taking `decoded` to `reference`, every usable pixel alike.

    decoded: (H, W, 3) float in [0, 1], the decoder's output before correction; reference: (H, W, 3) uint8
    render of the same frame; usable: (H, W) bool, pixels the encoder could reconstruct exactly (all by
    default). Clipped pixels on either side say nothing about the tone and are left out. Returns six float32
    values (gains, then offsets), clamped to GAIN_RANGE / OFFSET_RANGE; a channel with fewer than
    MIN_FIT_PIXELS usable pixels stays as decoded.
    """
    height, width = decoded.shape[:2]
    if reference.shape[:2] != (height, width):
        raise RcamError(f"reference render is {reference.shape[1]}x{reference.shape[0]}, decoded image {width}x{height}")
    if usable is not None and usable.shape != (height, width):
        raise RcamError(f"tone fit: usable mask {usable.shape} is not the frame's {(height, width)}")
    gains, offsets = [], []
    for channel in range(3):
        x = decoded[..., channel].astype(np.float64)
        y = reference[..., channel].astype(np.float64) / 255.0
        valid = (x > 0.001) & (x < 0.999) & (y > 0.5 / 255) & (y < 254.5 / 255)
        if usable is not None:
            valid &= usable
        x, y = x[valid], y[valid]
        gain, offset = 1.0, 0.0
        if x.size >= MIN_FIT_PIXELS:
            mean_x, mean_y = x.mean(), y.mean()
            var_x = np.mean((x - mean_x) ** 2)
            if var_x > 1e-6:
                gain = np.mean((x - mean_x) * (y - mean_y)) / var_x
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
