"""The shipped model on real sensor data: a quality floor against the reference render, rate and quality that
rise with λ (SPEC §5), exact and deterministic decoding, and the tone fit against tone_reference.

Written against whatever rcam.codec.zoo.load_codec() loads by default, not against one set of weights' figures.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RAW_DIR, real_dng_crop

from rcam.codec import engine as codec
from rcam.codec.output import quantize
from rcam.codec.rawio import reference_render
from rcam.measure.metrics import psnr

REAL_FILE = RAW_DIR / "blackmagic_pocket_2013.dng"
LAMBDAS = (0.0025, 0.01, 0.1)  # both ends of the supported range and the default
# PSNR at λ 0.01 on the crop against its own reference render. rcam-small (stage 7) reaches 29.8 dB there
# (36.1 dB on the whole frame); a flat image of the crop's mean colour gets about 15 dB and a random network
# under 11. 26 dB leaves a retrained or smaller model 4 dB of room while anything broken (wrong colours,
# orientation, CFA phase, weights) lands far below it.
QUALITY_FLOOR_DB = 26.0


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """384 x 512 from the middle of the Blackmagic DNG: a real sensor's noise, colours and optics, coded in seconds."""
    if not REAL_FILE.is_file():
        pytest.skip(f"no real DNG at {REAL_FILE}")
    return real_dng_crop(REAL_FILE, tmp_path_factory.mktemp("real") / "crop.dng", 384, 512)


@pytest.fixture(scope="module")
def sweep(shipped_codec, crop):
    """λ -> (Encoded, decoded 8-bit image) on the crop, all fitted to one tone reference as rcam eval does."""
    reference = codec.tone_reference(shipped_codec, crop)
    results = {}
    for lam in LAMBDAS:
        encoded = codec.encode_file(shipped_codec, crop, lam, reference=reference)
        results[lam] = (encoded, quantize(codec.decode_bytes(shipped_codec, encoded.data), 8))
    return results


def test_shipped_model_meets_the_quality_floor_on_real_data(crop, sweep):
    render = reference_render(crop)
    _, decoded = sweep[0.01]
    assert decoded.shape == render.shape
    flat = np.broadcast_to(np.round(render.reshape(-1, 3).mean(axis=0)).astype(np.uint8), render.shape)
    quality = psnr(decoded, render)
    assert quality >= QUALITY_FLOOR_DB, quality
    assert quality >= psnr(flat, render) + 8.0  # and well above the picture's mean colour


def test_rate_and_quality_rise_with_lambda(crop, sweep):
    """SPEC §5: a larger λ buys more bits and more quality, never fewer."""
    render = reference_render(crop)
    sizes = [len(sweep[lam][0].data) for lam in LAMBDAS]
    qualities = [psnr(sweep[lam][1], render) for lam in LAMBDAS]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1], sizes
    assert qualities == sorted(qualities) and qualities[0] < qualities[-1], qualities


def test_shipped_model_decodes_deterministically_and_exactly(shipped_codec, sweep):
    encoded, decoded = sweep[0.01]
    again = quantize(codec.decode_bytes(shipped_codec, encoded.data), 8)
    np.testing.assert_array_equal(again, decoded)
    header, streams = codec.container.read(encoded.data)
    for sent, received in zip(encoded.latents, codec.decode_latents(shipped_codec, header, streams)):
        np.testing.assert_array_equal(sent.y_symbols, received.y_symbols)
        assert np.array_equal(sent.y_hat.numpy(), received.y_hat.numpy())


def test_encoder_fits_the_tone_to_tone_reference(shipped_codec, crop, sweep):
    """encode_file's own tone fit (no reference given) is the fit to tone_reference, the shipped estimator's
    falloff divided out, not to the plain render."""
    fitted = codec.encode_file(shipped_codec, crop, 0.01)
    assert fitted.data == sweep[0.01][0].data
    if shipped_codec.model.vignetting is not None:
        falloff = codec.estimated_falloff(shipped_codec, codec.read_raw(crop)).rows(slice(None))
        assert falloff.shape == (384, 512) and np.all((falloff > 0) & (falloff <= 1))
        np.testing.assert_array_equal(codec.tone_reference(shipped_codec, crop), reference_render(crop, falloff=falloff))
