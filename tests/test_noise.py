"""Raw noise estimation and the protocol-R noise floor, on DNGs with a known noise model."""

from __future__ import annotations

import numpy as np
import pytest

from rcam.codec.rawio import reference_render
from rcam.errors import RcamError
from rcam.measure.metrics import psnr
from rcam.measure.noise import NoiseModel, estimate_noise, noise_draw, noise_floor
from rcam.training.dng import write_bayer_dng

BLACK, WHITE = 512, 16383
SHOT, READ = 2.0, 150.0  # DN² per DN, DN²


def smooth_signal(height: int = 256, width: int = 384) -> np.ndarray:
    """(H, W) DN above black: smooth gradients and a slow wave, no texture, from near black to near white."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    return 30.0 + 11000.0 * x**2 * (0.6 + 0.4 * np.cos(3.0 * y))


def write(path, signal: np.ndarray, noise: np.ndarray | None = None):
    values = BLACK + signal + (0.0 if noise is None else noise)
    return write_bayer_dng(path, np.clip(np.rint(values), 0, WHITE).astype(np.uint16), black_level=BLACK, white_level=WHITE)


def known_noise(signal: np.ndarray, seed: int = 1) -> np.ndarray:
    return np.sqrt(SHOT * signal + READ) * np.random.default_rng(seed).standard_normal(signal.shape)


def test_estimate_recovers_a_known_shot_and_read_noise(tmp_path):
    signal = smooth_signal()
    model = estimate_noise(write(tmp_path / "noisy.dng", signal, known_noise(signal)))
    np.testing.assert_allclose(model.shot, SHOT, rtol=0.2)
    np.testing.assert_allclose(model.read, READ, rtol=0.5)
    # Without noise only the rounding to integers is left: far below the noisy frame's.
    clean = estimate_noise(write(tmp_path / "clean.dng", signal))
    assert max(clean.shot) < 0.1 * SHOT and max(clean.read) < 0.1 * READ


def test_noise_draw_follows_the_model_at_the_files_own_values(tmp_path):
    signal = smooth_signal()
    path = write(tmp_path / "clean.dng", signal)
    model = NoiseModel(shot=(SHOT,) * 4, read=(READ,) * 4)
    draw = noise_draw(path, model, seed=3)
    assert draw.shape == signal.shape
    dark, bright = signal < 2000, signal > 8000
    np.testing.assert_allclose(draw[dark].var(), np.mean(SHOT * signal[dark] + READ), rtol=0.1)
    np.testing.assert_allclose(draw[bright].var(), np.mean(SHOT * signal[bright] + READ), rtol=0.1)
    assert np.array_equal(draw, noise_draw(path, model, seed=3)) and not np.array_equal(draw, noise_draw(path, model, seed=4))


def test_noise_floor_is_what_the_clean_frame_scores_against_the_noisy_render(tmp_path):
    signal = smooth_signal()
    noisy = write(tmp_path / "noisy.dng", signal, known_noise(signal))
    clean = write(tmp_path / "clean.dng", signal)
    truth = psnr(reference_render(clean), reference_render(noisy))
    # Slightly pessimistic (the render of the noisier file is also exposed a little darker), never optimistic.
    assert truth - 1.5 < noise_floor(noisy) < truth
    # A quieter file has a higher floor.
    quiet = write(tmp_path / "quiet.dng", signal, 0.25 * known_noise(signal))
    assert noise_floor(quiet) > truth + 6.0


def test_a_frame_without_distinct_levels_is_refused(tmp_path):
    with pytest.raises(RcamError, match="distinct levels"):
        estimate_noise(write(tmp_path / "flat.dng", np.full((64, 96), 3000.0)))


def test_reference_render_adds_raw_noise_before_rendering(tmp_path):
    signal = smooth_signal(64, 96)
    path = write(tmp_path / "clean.dng", signal)
    assert np.array_equal(reference_render(path, raw_noise=np.zeros((64, 96))), reference_render(path))
    lifted = reference_render(path, raw_noise=np.full((64, 96), 400.0)).astype(float)
    assert lifted.mean() > reference_render(path).astype(float).mean()
    with pytest.raises(RcamError, match="raw noise map must be 96x64"):
        reference_render(path, raw_noise=np.zeros((64, 95)))
