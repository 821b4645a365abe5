"""Tests for rcam.measure.metrics: PSNR, MS-SSIM dB, CIEDE2000 and bpp."""

import math

import numpy as np
import pytest

from rcam.errors import RcamError
from rcam.measure.metrics import bits_per_pixel, ciede2000, ciede2000_lab, dark_offset, ms_ssim_db, ms_ssim_value, psnr, srgb_to_lab

# Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula: implementation notes,
# supplementary test data, and mathematical observations", Table 1: L1 a1 b1 L2 a2 b2 ΔE00.
SHARMA_PAIRS = """
50.0000 2.6772 -79.7751 50.0000 0.0000 -82.7485 2.0425
50.0000 3.1571 -77.2803 50.0000 0.0000 -82.7485 2.8615
50.0000 2.8361 -74.0200 50.0000 0.0000 -82.7485 3.4412
50.0000 -1.3802 -84.2814 50.0000 0.0000 -82.7485 1.0000
50.0000 -1.1848 -84.8006 50.0000 0.0000 -82.7485 1.0000
50.0000 -0.9009 -85.5211 50.0000 0.0000 -82.7485 1.0000
50.0000 0.0000 0.0000 50.0000 -1.0000 2.0000 2.3669
50.0000 -1.0000 2.0000 50.0000 0.0000 0.0000 2.3669
50.0000 2.4900 -0.0010 50.0000 -2.4900 0.0009 7.1792
50.0000 2.4900 -0.0010 50.0000 -2.4900 0.0010 7.1792
50.0000 2.4900 -0.0010 50.0000 -2.4900 0.0011 7.2195
50.0000 2.4900 -0.0010 50.0000 -2.4900 0.0012 7.2195
50.0000 -0.0010 2.4900 50.0000 0.0009 -2.4900 4.8045
50.0000 -0.0010 2.4900 50.0000 0.0010 -2.4900 4.8045
50.0000 -0.0010 2.4900 50.0000 0.0011 -2.4900 4.7461
50.0000 2.5000 0.0000 50.0000 0.0000 -2.5000 4.3065
50.0000 2.5000 0.0000 73.0000 25.0000 -18.0000 27.1492
50.0000 2.5000 0.0000 61.0000 -5.0000 29.0000 22.8977
50.0000 2.5000 0.0000 56.0000 -27.0000 -3.0000 31.9030
50.0000 2.5000 0.0000 58.0000 24.0000 15.0000 19.4535
50.0000 2.5000 0.0000 50.0000 3.1736 0.5854 1.0000
50.0000 2.5000 0.0000 50.0000 3.2972 0.0000 1.0000
50.0000 2.5000 0.0000 50.0000 1.8634 0.5757 1.0000
50.0000 2.5000 0.0000 50.0000 3.2592 0.3350 1.0000
60.2574 -34.0099 36.2677 60.4626 -34.1751 39.4387 1.2644
63.0109 -31.0961 -5.8663 62.8187 -29.7946 -4.0864 1.2630
61.2901 3.7196 -5.3901 61.4292 2.2480 -4.9620 1.8731
35.0831 -44.1164 3.7933 35.0232 -40.0716 1.5901 1.8645
22.7233 20.0904 -46.6940 23.0331 14.9730 -42.5619 2.0373
36.4612 47.8580 18.3852 36.2715 50.5065 21.2231 1.4146
90.8027 -2.0831 1.4410 91.1528 -1.6435 0.0447 1.4441
90.9257 -0.5406 -0.9208 88.6381 -0.8985 -0.7239 1.5381
6.7747 -0.2908 -2.4247 5.8714 -0.0985 -2.2286 0.6377
2.0776 0.0795 -1.1350 0.9033 -0.0636 -0.5514 0.9082
"""


def _random_image(shape=(40, 56, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_psnr_constant_error_of_one():
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a + 1
    assert psnr(a, b) == pytest.approx(20 * math.log10(255), abs=1e-9)
    assert psnr(a, b) == pytest.approx(48.1308, abs=1e-4)


def test_psnr_identical_is_inf_and_symmetric():
    a = _random_image()
    b = _random_image(seed=1)
    assert psnr(a, a) == math.inf
    assert psnr(a, b) == pytest.approx(psnr(b, a))


def test_metrics_reject_bad_inputs():
    a = _random_image()
    with pytest.raises(RcamError):
        psnr(a, a[:-1])
    with pytest.raises(RcamError):
        psnr(a.astype(np.float32), a)
    with pytest.raises(RcamError):
        ms_ssim_db(a[:, :, :2], a[:, :, :2])
    with pytest.raises(RcamError):
        ciede2000(a, a[:, :-2])


def test_ms_ssim_db_orders_distortions_and_handles_tiny_images():
    a = _random_image((30, 20, 3))  # far below the 161 px the 5 scales need: mirror-padded
    rng = np.random.default_rng(2)
    small_noise = np.clip(a.astype(int) + rng.integers(-2, 3, a.shape), 0, 255).astype(np.uint8)
    big_noise = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    assert ms_ssim_db(a, a) == math.inf
    assert ms_ssim_db(a, small_noise) > ms_ssim_db(a, big_noise) > 0
    assert 0 < ms_ssim_value(a, big_noise) < ms_ssim_value(a, small_noise) < 1


def test_ms_ssim_value_matches_definition_in_db():
    a = _random_image((170, 180, 3))
    b = np.clip(a.astype(int) + 5, 0, 255).astype(np.uint8)
    assert ms_ssim_db(a, b) == pytest.approx(-10 * math.log10(1 - ms_ssim_value(a, b)))


@pytest.mark.parametrize("row", [line for line in SHARMA_PAIRS.strip().splitlines()])
def test_ciede2000_sharma_pairs(row):
    values = [float(v) for v in row.split()]
    lab1, lab2, expected = np.array(values[:3]), np.array(values[3:6]), values[6]
    assert float(ciede2000_lab(lab1, lab2)) == pytest.approx(expected, abs=5e-5)
    assert float(ciede2000_lab(lab2, lab1)) == pytest.approx(expected, abs=5e-5)


def test_ciede2000_lab_vectorised():
    rows = np.array([[float(v) for v in line.split()] for line in SHARMA_PAIRS.strip().splitlines()])
    np.testing.assert_allclose(ciede2000_lab(rows[:, :3], rows[:, 3:6]), rows[:, 6], atol=5e-5)


def test_srgb_to_lab_known_colours():
    colours = np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], np.uint8)
    lab = srgb_to_lab(colours)
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=1e-3)
    np.testing.assert_allclose(lab[1], [0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.02)  # sRGB red, D65


def test_ciede2000_image_mean():
    a = np.zeros((4, 6, 3), np.uint8)
    b = a.copy()
    b[:2] = 255  # half black vs white (ΔE00 = 100), half identical
    assert ciede2000(a, a) == 0.0
    assert ciede2000(a, b) == pytest.approx(50.0, abs=1e-3)


def test_bits_per_pixel():
    assert bits_per_pixel(1000, 8000) == 1.0
    assert bits_per_pixel(0, 10) == 0.0
    with pytest.raises(RcamError):
        bits_per_pixel(10, 0)


def test_dark_offset_measures_lifted_areas_not_the_noise_of_single_pixels():
    rng = np.random.default_rng(0)
    # A dark flat area (a fifth of the frame) beside a ramp, with grey sensor noise.
    scene = np.tile(np.concatenate([np.full(52, 20.0), np.linspace(60, 200, 204)])[None, :, None], (128, 1, 3))
    noisy = np.clip(np.rint(scene + rng.normal(0, 6, scene.shape[:2])[..., None]), 0, 255).astype(np.uint8)
    smooth = np.clip(np.rint(scene), 0, 255).astype(np.uint8)
    # A denoised image of the same scene is not "lifted"; chosen pixel by pixel, its darkest pixels would be
    # far brighter than the darkest noisy ones (they are the ones whose noise was most negative).
    luma = noisy.astype(float).mean(axis=2)
    darkest = luma <= np.percentile(luma, 5)
    pixelwise = smooth[darkest].mean() - noisy[darkest].mean()
    assert pixelwise > 3 * abs(dark_offset(noisy, smooth)) and pixelwise > 6
    # A real lift of the shadows is measured as it is.
    lifted = np.clip(smooth.astype(int) + 4, 0, 255).astype(np.uint8)
    assert dark_offset(noisy, lifted) - dark_offset(noisy, smooth) == pytest.approx(4.0, abs=0.01)
