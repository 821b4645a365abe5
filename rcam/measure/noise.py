"""Sensor noise of one RAW frame, estimated from the frame itself, and the noise floor it sets on protocol R.

Protocol R scores against LibRaw's render of the very file, noise included, while rcam removes the noise
(SPEC §3). How close any denoising pipeline can come to that reference is set by the noise: if the file is
clean + n, a render of the file with a second, independent draw n' added differs from the file's render about
as much as the render of the clean frame does (to first order both differences are the render's response to
one draw of the same noise). noise_floor measures that, with the noise model estimated from the raw values;
it comes out about 1 dB below the clean frame's score on synthetic frames (the noisier render is also
exposed a little darker by LibRaw's auto-brightness), so it errs on the low side.

The estimate: in each CFA plane, the noise of 8x8 blocks from the median absolute Laplacian (white noise of
std σ gives a Laplacian of std 6σ), grouped by signal level; a low percentile per group keeps the flattest
blocks (texture only adds), divided by the same percentile of pure noise so that flat blocks come out
unbiased; then variance = shot · signal + read by least squares on relative errors. Texture can only inflate
the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.ndimage import convolve

from rcam.codec.rawio import raw_values, reference_render
from rcam.errors import RcamError
from rcam.measure.metrics import psnr

LAPLACIAN = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)  # white noise σ -> std 6σ
BLOCK = 8  # pixels of one CFA plane per side
LEVELS = 16  # signal-level groups the noise is fitted over
PERCENTILE = 10.0  # of the block variances within a group: the flattest blocks
MIN_BLOCKS = 8  # per group


@dataclass(frozen=True)
class NoiseModel:
    """Raw noise variance (DN²) = shot · (value − black) + read, per 2x2 CFA position (row-major)."""

    shot: tuple[float, float, float, float]  # DN² per DN of signal
    read: tuple[float, float, float, float]  # DN²


@lru_cache(maxsize=4)
def _pure_noise_percentile(block: int, percentile: float) -> float:
    """The `percentile` of the block variance estimate for unit white noise (the estimator's low-side bias)."""
    noise = np.random.default_rng(0).standard_normal((4000, block + 2, block + 2))
    laplacian = np.abs(np.stack([convolve(n, LAPLACIAN, mode="reflect")[1:-1, 1:-1] for n in noise]))
    variances = (np.median(laplacian.reshape(len(noise), -1), axis=1) / 0.6745 / 6.0) ** 2
    return float(np.percentile(variances, percentile))


def _blocks(plane: np.ndarray) -> np.ndarray:
    """(h, w) -> (blocks, BLOCK²): the plane's whole BLOCK x BLOCK blocks, flattened."""
    height, width = plane.shape[0] // BLOCK * BLOCK, plane.shape[1] // BLOCK * BLOCK
    blocks = plane[:height, :width].reshape(height // BLOCK, BLOCK, width // BLOCK, BLOCK).transpose(0, 2, 1, 3)
    return blocks.reshape(-1, BLOCK * BLOCK)


def estimate_noise(path: Path) -> NoiseModel:
    """The frame's raw noise model (see the module docstring); RcamError when a CFA plane is too small or flat."""
    return _estimate(*raw_values(path), path)


def _estimate(visible: np.ndarray, black: np.ndarray, white: int, path: Path) -> NoiseModel:
    """estimate_noise on the file's raw_values."""
    bias = _pure_noise_percentile(BLOCK, PERCENTILE)
    shots, reads = [], []
    for row in (0, 1):
        for col in (0, 1):
            plane = visible[row::2, col::2]
            laplacian = np.abs(convolve(plane, LAPLACIAN, mode="reflect"))
            values, responses = _blocks(plane), _blocks(laplacian)
            unclipped = values.max(axis=1) < 0.95 * white  # clipped highlights have no noise
            signal = values[unclipped].mean(axis=1) - black[row, col]
            variance = (np.median(responses[unclipped], axis=1) / 0.6745 / 6.0) ** 2
            levels, floors = [], []
            edges = np.quantile(signal, np.linspace(0.0, 1.0, LEVELS + 1)) if signal.size else []
            for low, high in zip(edges[:-1], edges[1:]):
                group = (signal >= low) & (signal <= high)
                if group.sum() >= MIN_BLOCKS:
                    levels.append(max(float(np.median(signal[group])), 0.0))
                    floors.append(float(np.percentile(variance[group], PERCENTILE)) / bias)
            if len(levels) < 2 or np.ptp(levels) == 0:
                raise RcamError(f"{path}: too few unclipped {BLOCK}x{BLOCK} blocks at distinct levels to estimate its noise")
            # Relative errors: a group's estimate is off by a similar fraction at any level, and an absolute
            # fit would let the bright groups decide the read noise.
            floors = np.maximum(np.asarray(floors), 1e-6)
            design = np.stack([np.asarray(levels), np.ones(len(levels))], axis=1) / floors[:, None]
            (shot, read), *_ = np.linalg.lstsq(design, np.ones(len(levels)), rcond=None)
            shots.append(max(float(shot), 0.0))
            reads.append(max(float(read), 0.0))
    return NoiseModel(shot=tuple(shots), read=tuple(reads))


def noise_draw(path: Path, model: NoiseModel, seed: int = 0) -> np.ndarray:
    """(H, W) float64 raw DN: one draw of `model`'s noise at the file's own visible raw values."""
    visible, black, _ = raw_values(path)
    return _draw(visible, black, model, seed)


def _draw(visible: np.ndarray, black: np.ndarray, model: NoiseModel, seed: int) -> np.ndarray:
    """noise_draw on the file's raw values and black levels."""
    variance = np.empty_like(visible)
    for index, (row, col) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        signal = np.maximum(visible[row::2, col::2] - black[row::2, col::2], 0.0)
        variance[row::2, col::2] = model.shot[index] * signal + model.read[index]
    return np.sqrt(variance) * np.random.default_rng(seed).standard_normal(visible.shape)


def noise_floor(path: Path, model: NoiseModel | None = None, seed: int = 0) -> float:
    """PSNR (dB) between the file's reference render and its render with a second draw of its noise: about
    the best any pipeline that removes the noise can score against that reference (protocol R)."""
    visible, black, white = raw_values(path)
    model = _estimate(visible, black, white, path) if model is None else model
    return psnr(reference_render(path, raw_noise=_draw(visible, black, model, seed)), reference_render(path))
