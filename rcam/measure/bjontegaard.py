"""Bjøntegaard deltas between two rate–metric curves: BD-rate (%) and BD-metric (e.g. BD-PSNR, dB).

Method (default "pchip"): each curve is interpolated with a piecewise cubic Hermite interpolant (PCHIP,
Fritsch–Carlson) through its points, as in the current JVET/AOM practice, and the difference of the two
interpolants is averaged over the interval where both curves exist:

- BD-rate: log10(rate) as a function of the metric; mean difference over the common metric range,
  reported as (10**mean - 1) * 100 %. Negative means the test curve needs fewer bits for the same quality.
- BD-metric: metric as a function of log10(rate); mean difference (test - anchor) over the common
  log-rate range, in the metric's unit. Positive means higher metric at the same rate.

PCHIP does not overshoot between points, so it stays sensible for noisy or few-point curves where the
classic fit oscillates. The classic Bjøntegaard method (VCEG-M33: cubic polynomial least-squares fit, needs
at least 4 points) is available as method="cubic" for comparison with papers that report it.

For a metric where lower is better (CIEDE2000) the same formulas apply; only the sign reading of
BD-metric flips (negative = better).
"""

import math
from collections.abc import Sequence

import numpy as np
from scipy.interpolate import PchipInterpolator

from rcam.errors import RcamError

METHODS = ("pchip", "cubic")


def _clean_curve(
    rates: Sequence[float], metrics: Sequence[float], label: str, method: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one curve and return (log10 rates, metrics) as float64 arrays of equal length."""
    rates_arr = np.asarray(rates, dtype=np.float64).ravel()
    metric_arr = np.asarray(metrics, dtype=np.float64).ravel()
    if rates_arr.shape != metric_arr.shape:
        raise RcamError(f"{label} curve has {rates_arr.size} rates but {metric_arr.size} metric values")
    min_points = 4 if method == "cubic" else 2
    if rates_arr.size < min_points:
        raise RcamError(f"{label} curve has {rates_arr.size} points; the {method} method needs at least {min_points}")
    if not np.all(np.isfinite(rates_arr)) or not np.all(np.isfinite(metric_arr)):
        raise RcamError(
            f"{label} curve has non-finite values (rates {rates_arr.tolist()}, metrics {metric_arr.tolist()})"
        )
    if np.any(rates_arr <= 0):
        raise RcamError(f"{label} curve has non-positive rates {rates_arr.tolist()}")
    return np.log10(rates_arr), metric_arr


def _integral_mean(x: np.ndarray, y: np.ndarray, lo: float, hi: float, method: str, what: str) -> float:
    """Mean over [lo, hi] of the curve y(x) interpolated by `method`; x need not be sorted."""
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    if np.any(np.diff(xs) == 0):
        # Two operating points with the same abscissa make y(x) ill-defined.
        raise RcamError(f"{what} has repeated values {xs.tolist()}; cannot interpolate")
    if method == "pchip":
        antiderivative = PchipInterpolator(xs, ys, extrapolate=False).antiderivative()
        integral = float(antiderivative(hi) - antiderivative(lo))
    else:
        poly = np.polyint(np.polyfit(xs, ys, 3))
        integral = float(np.polyval(poly, hi) - np.polyval(poly, lo))
    return integral / (hi - lo)


def _overlap(a: np.ndarray, b: np.ndarray, what: str) -> tuple[float, float]:
    """Common interval [lo, hi] of two sets of abscissae; RcamError when it is empty or a point."""
    lo = max(a.min(), b.min())
    hi = min(a.max(), b.max())
    if not hi > lo:
        raise RcamError(
            f"the curves do not overlap in {what}: anchor spans [{a.min():.4g}, {a.max():.4g}], "
            f"test spans [{b.min():.4g}, {b.max():.4g}]"
        )
    return float(lo), float(hi)


def _clean_curves(anchor_rates, anchor_metric, test_rates, test_metric, method: str):
    """Validate the method and both curves -> (anchor log-rate, anchor metric, test log-rate, test metric)."""
    if method not in METHODS:
        raise RcamError(f"unknown Bjøntegaard method {method!r}; choose one of {', '.join(METHODS)}")
    return (*_clean_curve(anchor_rates, anchor_metric, "anchor", method), *_clean_curve(test_rates, test_metric, "test", method))


def bd_rate(
    anchor_rates: Sequence[float],
    anchor_metric: Sequence[float],
    test_rates: Sequence[float],
    test_metric: Sequence[float],
    method: str = "pchip",
) -> float:
    """BD-rate in percent of the test curve against the anchor (negative = test saves bits at equal quality)."""
    log_a, met_a, log_t, met_t = _clean_curves(anchor_rates, anchor_metric, test_rates, test_metric, method)
    lo, hi = _overlap(met_a, met_t, "metric")
    mean_a = _integral_mean(met_a, log_a, lo, hi, method, "anchor metric")
    mean_t = _integral_mean(met_t, log_t, lo, hi, method, "test metric")
    return (math.pow(10.0, mean_t - mean_a) - 1.0) * 100.0


def bd_metric(
    anchor_rates: Sequence[float],
    anchor_metric: Sequence[float],
    test_rates: Sequence[float],
    test_metric: Sequence[float],
    method: str = "pchip",
) -> float:
    """BD-metric (test - anchor) in the metric's unit at equal rate, e.g. BD-PSNR in dB."""
    log_a, met_a, log_t, met_t = _clean_curves(anchor_rates, anchor_metric, test_rates, test_metric, method)
    lo, hi = _overlap(log_a, log_t, "log-rate")
    mean_a = _integral_mean(log_a, met_a, lo, hi, method, "anchor rate")
    mean_t = _integral_mean(log_t, met_t, lo, hi, method, "test rate")
    return mean_t - mean_a


def bd_psnr(
    anchor_rates: Sequence[float],
    anchor_psnr: Sequence[float],
    test_rates: Sequence[float],
    test_psnr: Sequence[float],
    method: str = "pchip",
) -> float:
    """BD-PSNR in dB of the test curve against the anchor (positive = test is better at equal rate)."""
    return bd_metric(anchor_rates, anchor_psnr, test_rates, test_psnr, method)
