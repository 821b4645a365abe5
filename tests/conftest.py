"""Shared fixtures: a tiny random RealCamNet saved as a checkpoint, and small synthetic Bayer DNGs.

Everything here is sized for a loaded 2-core CPU: the tiny model has a few tens of thousands of parameters
and the DNGs are a few thousand pixels.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from rcam.dng import write_bayer_dng
from rcam.models import CONFIGS, RealCamNet
from rcam.zoo import load_codec, save_checkpoint

TINY_CONFIG = dataclasses.replace(
    CONFIGS["small"], name="tiny", channels=16, latent_channels=16, hyper_channels=16, prior_channels=8, thumbnail=32
)
BLACK_LEVEL = 64
WHITE_LEVEL = 4095
# At initialisation the latents are so small that they all quantise to 0; a larger gain gives the tiny
# model real symbols to code (and a rate that depends on λ).
GAIN_BOOST = 30.0

# The machine these tests run on is small and busy: one intra-op thread avoids oversubscription, which
# otherwise slows torch down by two orders of magnitude. Tests that need other thread counts set them.
torch.set_num_threads(1)


def _tiny_checkpoint(path, seed: int):
    torch.manual_seed(seed)
    model = RealCamNet(TINY_CONFIG).eval()
    with torch.no_grad():
        model.gains.log_gain += math.log(GAIN_BOOST)
        model.gains.log_inverse_gain -= math.log(GAIN_BOOST)
    return save_checkpoint(model, path)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny random model's .safetensors file (model A)."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="session")
def other_model_path(tmp_path_factory):
    """Model B: same config and file name as model A (so the same model name), different weights."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("models_b") / "tiny.safetensors", seed=1)


@pytest.fixture(scope="session")
def tiny_codec(tiny_model_path):
    return load_codec(tiny_model_path)


def smooth_mosaic(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random-ish uint16 mosaic between the black and white levels (gradients, waves, a little noise)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, 3)
    signal = (
        0.35
        + 0.2 * np.sin(rows / rng.uniform(4, 9) + phase[0])
        + 0.15 * np.cos(cols / rng.uniform(3, 8) + phase[1])
        + 0.1 * np.sin((rows + cols) / 11.0 + phase[2])
        + 0.2 * rows / height
    )
    signal += rng.normal(0, 0.01, signal.shape)
    values = BLACK_LEVEL + np.clip(signal, 0, 1) * (WHITE_LEVEL - BLACK_LEVEL)
    return np.round(values).astype(np.uint16)


@pytest.fixture
def make_dng(tmp_path):
    """Factory: make_dng(name, height, width, cfa=..., orientation=..., seed=...) -> path of a Bayer DNG."""

    def make(name="image.dng", height=64, width=96, *, cfa="RGGB", orientation=1, seed=0, folder=None):
        folder = tmp_path if folder is None else folder
        return write_bayer_dng(
            folder / name,
            smooth_mosaic(height, width, seed),
            cfa=cfa,
            black_level=BLACK_LEVEL,
            white_level=WHITE_LEVEL,
            as_shot_neutral=(0.5, 1.0, 0.7),
            orientation=orientation,
        )

    return make
