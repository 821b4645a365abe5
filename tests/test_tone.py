"""Encoder-fitted tone correction: the fit over the whole frame, the tiles the encoder synthesises for it, and the decoder applying it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rcam import codec, container
from rcam.metrics import psnr
from rcam.output import quantize
from rcam.errors import RcamError
from rcam.rawio import apply_flip, reference_render
from rcam.tone import GAIN_RANGE, IDENTITY, apply_tone, fit_tone


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) float in [0.1, 0.8]: gradients and blobs, so every channel spans a range of levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(6 * x * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(5 * y * rng.uniform(0.5, 2)) for _ in range(3)]
    return (0.45 + 0.35 * np.stack(channels, -1)).astype(np.float32)


def render_of(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def test_fit_recovers_a_known_gain_and_offset():
    decoded = smooth_image(120, 160)
    gains, offsets = np.array([1.15, 0.9, 1.05]), np.array([-0.03, 0.04, 0.0])
    tone = fit_tone(decoded, render_of(decoded * gains + offsets))
    np.testing.assert_allclose(tone[:3], gains, atol=0.01)
    np.testing.assert_allclose(tone[3:], offsets, atol=0.005)


def test_fit_uses_the_whole_frame_alike():
    # The reference is clipped white over the frame's centre: the gain comes from the rest of the frame.
    decoded = smooth_image(120, 160, seed=1)
    reference = render_of(decoded * 1.1).copy()
    reference[30:90, 40:120] = 255
    np.testing.assert_allclose(fit_tone(decoded, reference)[:3], 1.1, atol=0.01)
    # Every pixel weighs the same: the corners alone give the same fit as the whole frame.
    corners = np.zeros((120, 160), bool)
    corners[:30, :40] = corners[:30, -40:] = corners[-30:, :40] = corners[-30:, -40:] = True
    np.testing.assert_allclose(fit_tone(decoded, render_of(decoded * 1.1), usable=corners)[:3], 1.1, atol=0.01)
    with pytest.raises(RcamError, match="usable mask"):
        fit_tone(decoded, reference, usable=np.ones((120, 159), bool))


def test_fit_leaves_clipped_and_unusable_pixels_out_and_stays_in_range():
    decoded = smooth_image(64, 64, seed=2)
    assert fit_tone(decoded, np.full((64, 64, 3), 255, np.uint8)) == IDENTITY  # all clipped: nothing to fit
    assert fit_tone(decoded, render_of(decoded), usable=np.zeros((64, 64), bool)) == IDENTITY
    wild = fit_tone(decoded, render_of(decoded * 3.0 - 0.9))
    assert all(GAIN_RANGE[0] <= g <= GAIN_RANGE[1] for g in wild[:3])


def test_tone_fit_tiles_cover_the_whole_frame_in_a_checkerboard(tiny_codec, make_dng):
    header = codec.encode_file(tiny_codec, make_dng("grid.dng", 200, 232), 0.01, tile=64, overlap=32, tone_fit=False).header
    assert (header.tile_rows, header.tile_cols) == (3, 3)
    assert codec.tone_fit_tiles(header) == [True, False, True, False, True, False, True, False, True]
    # Neighbours alternate along a row and down a column.
    assert codec.tone_fit_tiles(dataclasses.replace(header, tile_rows=2, tile_cols=4)) == [True, False, True, False, False, True, False, True]
    small = dataclasses.replace(header, tile_rows=2, tile_cols=2)
    assert codec.tone_fit_tiles(small) == [True] * 4


def test_encoder_fits_on_exactly_what_the_decoder_reconstructs(tiny_codec, make_dng):
    path = make_dng("tone.dng", 200, 232, orientation=6)
    plain = codec.encode_file(tiny_codec, path, 0.01, tile=64, overlap=32, tone_fit=False)
    fitted = codec.encode_file(tiny_codec, path, 0.01, tile=64, overlap=32)
    assert plain.header.tone == IDENTITY and fitted.header.tone != IDENTITY
    assert [t.y_hat.tolist() for t in fitted.latents] == [t.y_hat.tolist() for t in plain.latents]
    # The fit from the encoder's partial synthesis equals a fit on the decoded frame's pixels those tiles
    # complete (the interiors of every other tile; tiles overlapping one left out are not).
    reference = reference_render(path)
    _, complete = codec.synthesize(tiny_codec, plain.header, plain.latents, codec.tone_fit_tiles(plain.header))
    usable = apply_flip(complete.numpy()[..., None], plain.header.flip)[..., 0]
    assert 0.1 < usable.mean() < 0.5  # tile 64 with overlap 32: the interiors are small
    decoded = codec.decode_bytes(tiny_codec, plain.data)
    assert fitted.header.tone == fit_tone(decoded, reference, usable)
    # A caller that already has the render (one per file for a λ sweep) passes it: the same file results.
    assert codec.encode_file(tiny_codec, path, 0.01, tile=64, overlap=32, reference=reference).data == fitted.data
    # The untrained model's tone is far off: correcting it brings the frame closer to the reference.
    before = psnr(quantize(decoded, 8), reference)
    after = psnr(quantize(codec.decode_bytes(tiny_codec, fitted.data), 8), reference)
    assert after > before + 0.5


def test_decoder_applies_the_header_tone(tiny_codec, make_dng):
    path = make_dng("apply.dng", 64, 96)
    encoded = codec.encode_file(tiny_codec, path, 0.01, tone_fit=False)
    tone = (1.25, 1.0, 0.75, 0.0, -0.125, 0.0625)
    header, streams = container.read(encoded.data)
    toned = container.write(dataclasses.replace(header, tone=tone, stream_lengths=(), stream_crcs=()), streams)
    plain, corrected = codec.decode_bytes(tiny_codec, encoded.data), codec.decode_bytes(tiny_codec, toned)
    expected = np.clip(plain * np.float32(tone[:3]) + np.float32(tone[3:]), 0, 1)
    np.testing.assert_allclose(corrected, expected, atol=1e-6)


def test_apply_tone_identity_is_a_no_op():
    image = torch.rand(3, 8, 8)
    assert apply_tone(image, IDENTITY) is image
    assert torch.equal(apply_tone(image, (2.0, 2.0, 2.0, 0.0, 0.0, 0.0)), (image * 2).clamp(0, 1))


@pytest.mark.parametrize("lam", [0.0025, 0.1])
def test_rate_grows_by_no_more_than_the_tone_bytes(tiny_codec, make_dng, lam):
    path = make_dng("rate.dng", 96, 96)
    plain = codec.encode_file(tiny_codec, path, lam, tone_fit=False)
    fitted = codec.encode_file(tiny_codec, path, lam)
    assert len(fitted.data) == len(plain.data)  # version 2 always carries the 24 tone bytes
