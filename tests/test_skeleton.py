"""The classical skeleton of the decoder (rcam.skeleton): Malvar demosaic and the development the encoder applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcam.metrics import psnr
from rcam.rawio import apply_flip, auto_bright_white, network_input, normalise_planes, read_raw, reference_render
from rcam.skeleton import demosaic, develop, linear_to_srgb, srgb_to_linear

from test_codec import REAL_DNGS


def test_srgb_curves_invert_each_other():
    values = torch.linspace(0.0, 1.0, 1001)
    assert torch.allclose(srgb_to_linear(linear_to_srgb(values)), values, atol=1e-6)
    assert float(srgb_to_linear(torch.tensor(0.5))) == pytest.approx(0.21404, abs=1e-5)  # the sRGB standard's value


def test_demosaic_reproduces_affine_colour_planes_exactly():
    # Malvar-He-Cutler interpolates bilinearly plus a Laplacian term that vanishes on affine signals: away from
    # the border every channel of an affine image comes back exactly.
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(48.0), indexing="ij")
    image = torch.stack([0.1 + 0.01 * rows + 0.005 * cols, 0.3 - 0.002 * rows + 0.004 * cols, 0.2 + 0.003 * rows])[None]
    packed = torch.stack([image[:, 0, 0::2, 0::2], image[:, 1, 0::2, 1::2], image[:, 1, 1::2, 0::2], image[:, 2, 1::2, 1::2]], 1)
    restored = demosaic(packed)
    assert restored.shape == image.shape
    assert torch.allclose(restored[..., 2:-2, 2:-2], image[..., 2:-2, 2:-2], atol=1e-5)
    # Each site keeps its own sample.
    assert torch.equal(restored[:, 0, 0::2, 0::2], packed[:, 0]) and torch.equal(restored[:, 2, 1::2, 1::2], packed[:, 3])


def test_develop_undoes_the_encoder_normalisation_on_a_flat_frame():
    # A grey raw frame under a non-trivial matrix: develop must give back what the encoder's normalisation gave
    # each cell, since demosaicing a flat mosaic changes nothing.
    matrix = np.array([[1.6, -0.4, -0.2], [-0.2, 1.4, -0.2], [0.0, -0.5, 1.5]], dtype=np.float32)
    wb = np.array([2.0, 1.0, 1.5], dtype=np.float32)
    raw = np.stack([np.full((8, 8), 0.2 / wb[0]), np.full((8, 8), 0.2), np.full((8, 8), 0.2), np.full((8, 8), 0.2 / wb[2])]).astype(np.float32)
    raw[0] *= 1.3  # a colour cast, so that the matrix matters
    white = auto_bright_white(raw, wb, matrix)
    planes = torch.from_numpy(normalise_planes(raw, wb, matrix, white))[None]
    out = develop(planes, torch.from_numpy(matrix)[None], torch.tensor([white]))
    expected = planes[0, [0, 1, 3]].mean(dim=(1, 2))
    assert torch.allclose(out[0].mean(dim=(1, 2)), expected, atol=1e-4)
    assert float(out.std(dim=(2, 3)).max()) < 1e-5


def test_develop_passes_gradients_to_the_planes():
    planes = torch.full((1, 4, 8, 8), 0.5, requires_grad=True)
    develop(planes, torch.eye(3)[None], torch.tensor([1.0])).sum().backward()
    assert planes.grad is not None and float(planes.grad.abs().min()) > 0


@pytest.mark.parametrize("path", REAL_DNGS or [None], ids=[p.name for p in REAL_DNGS] or ["none"])
def test_the_skeleton_alone_comes_close_to_libraw_on_real_dngs(path):
    """The encoder's own input, developed by the skeleton with no network, against LibRaw's AHD render.

    This is the ceiling the network starts from: 36.2 dB (Canon, noisy) and 39.8 dB (Blackmagic) when written;
    LibRaw's own PPG demosaic scores 37.0-44.8 dB on such files and its half-size render scaled up 30.7-39.8 dB.
    """
    if path is None:
        pytest.skip("../shared/data/raw is not here")
    image = read_raw(path)
    white = auto_bright_white(image.planes, image.wb_gains, image.cam_to_srgb)
    planes = torch.from_numpy(network_input(image, white))[None]
    out = develop(planes, torch.from_numpy(image.cam_to_srgb)[None], torch.tensor([white]))[0]
    out = out[:, image.pad_top : image.pad_top + image.height, image.pad_left : image.pad_left + image.width]
    decoded = np.round(apply_flip(out.permute(1, 2, 0).numpy(), image.flip) * 255).astype(np.uint8)
    reference = reference_render(path)
    assert decoded.shape == reference.shape
    assert psnr(decoded, reference) > 35.5
    # No lifted blacks: the darkest 5% of the reference come back within the ±2 levels the product promises
    # (1.6 on the noisy Canon file when written: the noise clipped at black differs between AHD and Malvar).
    luma = reference.mean(axis=2)
    dark = luma <= np.percentile(luma, 5)
    assert abs(float(decoded[dark].astype(float).mean() - reference[dark].astype(float).mean())) < 2.0
