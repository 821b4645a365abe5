"""Tests for rcam.measure.bjontegaard: BD-rate and BD-PSNR."""

import math

import pytest

from rcam.errors import RcamError
from rcam.measure.bjontegaard import bd_metric, bd_psnr, bd_rate

RATES = [0.12, 0.3, 0.7, 1.5, 3.0]
PSNR = [28.1, 31.0, 34.2, 37.5, 40.3]


@pytest.mark.parametrize("method", ["pchip", "cubic"])
@pytest.mark.parametrize("factor", [0.8, 0.5, 1.25])
def test_bd_rate_of_scaled_rates_is_the_factor(method, factor):
    test_rates = [rate * factor for rate in RATES]
    assert bd_rate(RATES, PSNR, test_rates, PSNR, method) == pytest.approx((factor - 1) * 100, abs=1e-9)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
@pytest.mark.parametrize("shift", [0.5, -1.25])
def test_bd_psnr_of_shifted_curve_is_the_shift(method, shift):
    assert bd_psnr(RATES, PSNR, RATES, [p + shift for p in PSNR], method) == pytest.approx(shift, abs=1e-9)


def test_identical_curves_give_zero_and_order_does_not_matter():
    assert bd_rate(RATES, PSNR, RATES[::-1], PSNR[::-1]) == pytest.approx(0, abs=1e-9)
    assert bd_metric(RATES, PSNR, RATES[::-1], PSNR[::-1]) == pytest.approx(0, abs=1e-9)


def test_partial_overlap_uses_only_the_common_range():
    # PSNR linear in log-rate, which PCHIP reproduces exactly, so a sub-curve interpolates like the whole.
    # The test curve covers only the upper part of the anchor's range and is the anchor at 0.8× rate there.
    linear_psnr = [30 + 10 * math.log10(rate) for rate in RATES]
    test_rates = [rate * 0.8 for rate in RATES[2:]]
    assert bd_rate(RATES, linear_psnr, test_rates, linear_psnr[2:]) == pytest.approx(-20.0, abs=1e-9)
    # Shifted by 0.5 dB on a sub-range of rates: BD-PSNR sees only the shift.
    assert bd_psnr(RATES, linear_psnr, RATES[1:4], [p + 0.5 for p in linear_psnr[1:4]]) == pytest.approx(0.5, abs=1e-9)


def test_better_curve_has_negative_bd_rate_and_positive_bd_psnr():
    better = [p + 1.0 for p in PSNR]
    assert bd_rate(RATES, PSNR, RATES, better) < 0
    assert bd_psnr(RATES, PSNR, RATES, better) > 0


def test_lower_is_better_metric():
    # ΔE falls with rate; a curve with the same ΔE at 0.8× the rate saves 20 %.
    delta_e = [6.0, 4.5, 3.1, 2.2, 1.6]
    assert bd_rate(RATES, delta_e, [r * 0.8 for r in RATES], delta_e) == pytest.approx(-20.0, abs=1e-9)


def test_errors():
    with pytest.raises(RcamError, match="overlap"):
        bd_rate(RATES, PSNR, RATES, [p + 50 for p in PSNR])
    with pytest.raises(RcamError, match="overlap"):
        bd_psnr(RATES, PSNR, [r * 100 for r in RATES], PSNR)
    with pytest.raises(RcamError, match="at least 2"):
        bd_rate([1.0], [30.0], RATES, PSNR)
    with pytest.raises(RcamError, match="at least 4"):
        bd_rate(RATES[:3], PSNR[:3], RATES, PSNR, method="cubic")
    with pytest.raises(RcamError, match="non-positive"):
        bd_rate([0.0, 1.0], [30.0, 35.0], RATES, PSNR)
    with pytest.raises(RcamError, match="non-finite"):
        bd_rate(RATES, PSNR[:-1] + [float("inf")], RATES, PSNR)
    with pytest.raises(RcamError, match="repeated"):
        bd_rate(RATES, [30.0, 30.0, 34.0, 37.0, 40.0], RATES, PSNR)
    with pytest.raises(RcamError, match="method"):
        bd_rate(RATES, PSNR, RATES, PSNR, method="linear")
