"""Encoder-fitted tone correction: a smooth per-channel gain and offset field carried in the .rcb header.

The encoder has the RAW, so it can render the reference (SPEC §3) and compare it with what the decoder will
produce; like a video codec's encoder-side loop-filter parameters, a few numbers it fits pull the decoded
tone onto the reference's. The correction is out = gain(y, x) · decoded + offset(y, x) per channel, gain and
offset bilinear between K x K knots spread evenly over the sensor frame, corners included (K = 1: one gain
and offset per channel). The render it fits to has the estimated lens falloff divided out
(rcam.codec.engine.tone_reference), so every pixel of the frame takes part alike. Against one gain and offset per
channel, a 6 x 6 field gained 0.17 dB BD-PSNR on protocol S with its 432 header bytes counted (about 2% of the
rate of a 0.25 MP val image) and 0.76 dB on protocol R; the encoder now fits K = 6, 8 and 10 and keeps the one
training's cost prefers for the file (cheapest_field), which took protocol R's BD-rate against JPEG from +2.8%
to −0.4% at stop 26.
"""

from __future__ import annotations

import math

import numpy as np

from rcam.codec.tone_coding import FINEST_GRID, GAIN_RANGE, GRID_CHOICES, OFFSET_RANGE, encode_field, max_field_bytes, on_grid
from rcam.errors import RcamError

IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0)  # K = 1: gains R, G, B, then offsets R, G, B (1 = white)
FIELD_KNOTS = 6  # K of fit_tone's field
# The K the encoder chooses among per file, by the cost training weighs (cheapest_field): more knots follow the
# error's smooth part closer for more header bytes (rcam.codec.tone_coding codes the knots). Up to K = 10 while the
# field was float16; coded (format 6), the real DNGs take K = 24-32 at every λ (stop 28: protocol R's BD-rate
# against JPEG −2.8% -> −12.8%).
FIELD_KNOT_CHOICES = (6, 8, 10, 12, 16, 20, 24, 32)
# Where the finest field's extra header bits per pixel are below this, a coarser one saves too little to be worth
# fitting: at λ 0.0025 it is an MSE of 0.2 (8-bit levels²).
NEGLIGIBLE_HEADER_BPP = 0.0005
MAX_KNOTS = 32  # the most a header may carry
# Knots closer than this (pixels) are not fitted: the field is a smooth correction, and a small frame's fine fields
# cost the fit more time than they could save (a 130 x 198 test frame took K = 32 and 6 s to encode). The
# real DNGs and protocol S's 0.25 MP frames keep every choice up to 32.
MIN_KNOT_SPACING = 16
MIN_FIT_PIXELS = 64  # fewer usable pixels per channel than this: that channel stays as decoded
RIDGE = 0.05  # pull of each knot towards the channel's single gain and offset, relative to the mean data weight
FIT_STRIDE = 2  # the fit reads every other row and column: 72 unknowns need far fewer pixels
APPLY_BAND_ROWS = 256  # rows apply_tone corrects at a time (memory, not results)
ADD_ROWS = 128  # rows ToneStatistics.add gathers at a time (memory; the sums change only in their last bits)


def identity(knots: int = 1) -> tuple[float, ...]:
    """The correction that changes nothing, as a K x K field."""
    return (1.0,) * (3 * knots * knots) + (0.0,) * (3 * knots * knots)


def knots_of(tone: tuple[float, ...]) -> int:
    """K of a tone field of 6 K² values; RcamError when the length is not one."""
    knots = math.isqrt(len(tone) // 6)
    if len(tone) != 6 * knots * knots or not 1 <= knots <= MAX_KNOTS:
        raise RcamError(f"bad header: tone correction has {len(tone)} values, not 6 K² for a K of 1 to {MAX_KNOTS}")
    return knots


def knot_basis(length: int, knots: int) -> np.ndarray:
    """(length, K) float64 bilinear weights of K evenly spread knots at each of `length` pixel positions.

    The first and last pixel sit on the first and last knot; each row of weights sums to 1.
    """
    if knots == 1:
        return np.ones((length, 1))
    position = np.arange(length) * ((knots - 1) / max(length - 1, 1))
    return np.clip(1.0 - np.abs(position[:, None] - np.arange(knots)[None, :]), 0.0, None)


def _neighbour_pairs(knots: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) knot indices of the pairs a bilinear basis can make nonzero together: |first − second| ≤ 1."""
    first, second = np.meshgrid(np.arange(knots), np.arange(knots), indexing="ij")
    near = np.abs(first - second) <= 1
    return first[near], second[near]


def _pair_gram(weights: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Σ_pixels w · φ φᵀ for the separable basis φ(y, x) = rows[y] ⊗ cols[x], from an (h, w) weight map, over the
    pairs of knots that can meet: (P, P), P = 3K − 2 pairs (a, c) of rows by pairs (b, d) of columns (_full_gram).

    A pixel's bilinear weights touch two neighbouring knots per axis, so only knots at most one apart meet: two
    matrix products over those pairs instead of all K² (K = 32 at about the cost K = 10 had with all pairs)."""
    first, second = _neighbour_pairs(rows.shape[1])
    per_row = weights @ (cols[:, first] * cols[:, second])  # (h, P): Σ_x w φ_b φ_d for the column pairs (b, d)
    return (rows[:, first] * rows[:, second]).T @ per_row


def _full_gram(pair_gram: np.ndarray, knots: int) -> np.ndarray:
    """A _pair_gram (P, P) -> the (K², K²) Gram matrix of knots a·K + b by c·K + d (zero where knots never meet)."""
    first, second = _neighbour_pairs(knots)
    gram = np.zeros((knots * knots, knots * knots))
    gram[first[:, None] * knots + first[None, :], second[:, None] * knots + second[None, :]] = pair_gram
    return gram


class ToneStatistics:
    """The sums fit_tone solves from, gathered piece by piece: bands or windows of a frame in any order.

    So the encoder can fit its tone while it blends a few tile rows at a time, or from windows of the tiles,
    never holding the whole decoded frame (288 MB at 24 MP). The frame's basis is fixed by its full size; a
    piece only adds its pixels' share of every sum.
    """

    def __init__(self, height: int, width: int, knots: int = FIELD_KNOTS):
        if not 1 <= knots <= MAX_KNOTS:
            raise RcamError(f"tone fit: {knots} knots per side, expected 1 to {MAX_KNOTS}")
        self.height, self.width, self.knots = height, width, knots
        self.rows = knot_basis(height, knots)
        self.cols = knot_basis(width, knots)
        count = knots * knots
        pairs = 3 * knots - 2
        self.pair_grams = np.zeros((3, 3, pairs, pairs))  # per channel, as _pair_gram: Σ w x x φφᵀ, Σ w x φφᵀ, Σ w φφᵀ
        self.rhs = np.zeros((3, 2, count))  # per channel: Σ w x y φ, Σ w y φ
        self.moments = np.zeros((3, 5))  # per channel, over valid pixels: n, Σx, Σy, Σxx, Σxy
        self.sum_yy = np.zeros(3)  # per channel, over valid pixels: Σyy (for residual)

    def add(self, top: int, decoded: np.ndarray, reference: np.ndarray, usable: np.ndarray | None = None, left: int = 0) -> None:
        """The window of rows top .. top + h and columns left .. left + w of the frame: decoded (h, w, 3) float in
        [0, 1], reference (h, w, 3) uint8 and usable (h, w) bool as fit_tone takes them whole. The fit reads the
        frame's every other row and column wherever the window starts, so windows tiling the frame add up to the
        sums of the whole frame."""
        height, width = decoded.shape[:2]
        if reference.shape[:2] != (height, width):
            raise RcamError(f"reference render is {reference.shape[1]}x{reference.shape[0]}, decoded image {width}x{height}")
        if usable is not None and usable.shape != (height, width):
            raise RcamError(f"tone fit: usable mask {usable.shape} is not the frame's {(height, width)}")
        if not (0 <= top <= self.height - height and 0 <= left <= self.width - width):
            raise RcamError(f"tone fit: a window of {width}x{height} at ({left}, {top}) is not inside the {self.width}x{self.height} frame")
        # A few rows at a time: the float64 copies of a whole tile row's band were 65 MB at 24 MP.
        for start in range(0, height, ADD_ROWS):
            rows = slice(start, start + ADD_ROWS)
            self._add_rows(top + start, left, decoded[rows], reference[rows], None if usable is None else usable[rows])

    def _add_rows(self, top: int, left: int, decoded: np.ndarray, reference: np.ndarray, usable: np.ndarray | None) -> None:
        height, width = decoded.shape[:2]
        first, first_col = (-top) % FIT_STRIDE, (-left) % FIT_STRIDE  # the frame's every other row and column
        rows = self.rows[top + first : top + height : FIT_STRIDE]
        cols = self.cols[left + first_col : left + width : FIT_STRIDE]
        picked = (slice(first, None, FIT_STRIDE), slice(first_col, None, FIT_STRIDE))
        for channel in range(3):
            x = decoded[picked + (channel,)].astype(np.float64)
            y = reference[picked + (channel,)].astype(np.float64) / 255.0
            valid = (x > 0.001) & (x < 0.999) & (y < 254.5 / 255)
            if usable is not None:
                valid &= usable[picked]
            weight = valid.astype(np.float64)
            x, y = x * weight, y * weight  # zero outside the valid pixels
            self.moments[channel] += (weight.sum(), x.sum(), y.sum(), (x * x).sum(), (x * y).sum())
            self.sum_yy[channel] += (y * y).sum()
            for index, w in enumerate((x * x, x, weight)):
                self.pair_grams[channel, index] += _pair_gram(w, rows, cols)
            self.rhs[channel, 0] += (rows.T @ (x * y) @ cols).ravel()
            self.rhs[channel, 1] += (rows.T @ y @ cols).ravel()

    def solve(self) -> tuple[float, ...]:
        """The fitted field, as fit_tone returns it."""
        count = self.knots * self.knots
        gains, offsets = np.ones((3, count)), np.zeros((3, count))
        for channel in range(3):
            pixels, sum_x, sum_y, sum_xx, sum_xy = self.moments[channel]
            if pixels < MIN_FIT_PIXELS:
                continue
            global_gain, global_offset = _single_fit(pixels, sum_x, sum_y, sum_xx, sum_xy)
            gram_xx, gram_x1, gram_11 = (_full_gram(pair_gram, self.knots) for pair_gram in self.pair_grams[channel])
            normal = np.block([[gram_xx, gram_x1], [gram_x1, gram_11]])
            rhs = np.concatenate(self.rhs[channel])
            ridge = RIDGE * np.concatenate([np.full(count, np.diag(gram_xx).mean()), np.full(count, np.diag(gram_11).mean())])
            prior = np.concatenate([np.full(count, global_gain), np.full(count, global_offset)])
            solution = np.linalg.solve(normal + np.diag(ridge), rhs + ridge * prior)
            gains[channel] = np.clip(solution[:count], *GAIN_RANGE)
            offsets[channel] = np.clip(solution[count:], *OFFSET_RANGE)
        # On the finest grid the header stores, so encoder and decoder apply the very same numbers.
        return on_grid(tuple(np.concatenate([gains.ravel(), offsets.ravel()])), FINEST_GRID)

    def residual(self, tone: tuple[float, ...]) -> tuple[float, float]:
        """(Σ of squared errors (units of 1), number of values) over the gathered pixels once `tone` (this K's
        field) is applied, without the clamp to [0, 1]: what the fit minimised, for comparing fields."""
        count = self.knots * self.knots
        fields = np.asarray(tone, dtype=np.float64).reshape(2, 3, count)
        squared, values = 0.0, 0.0
        first, second = _neighbour_pairs(self.knots)

        def quadratic(pair_gram: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
            # uᵀ G v over the pairs that meet, without building G: G[(a, b), (c, d)] = pair_gram[(a, c), (b, d)].
            u, v = u.reshape(self.knots, self.knots), v.reshape(self.knots, self.knots)
            return float(np.sum(pair_gram * u[np.ix_(first, first)] * v[np.ix_(second, second)]))

        for channel in range(3):
            gain, offset = fields[0, channel], fields[1, channel]
            gram_xx, gram_x1, gram_11 = self.pair_grams[channel]
            spread = quadratic(gram_xx, gain, gain) + 2 * quadratic(gram_x1, gain, offset) + quadratic(gram_11, offset, offset)
            theta = np.concatenate([gain, offset])
            squared += self.sum_yy[channel] - 2 * theta @ np.concatenate(self.rhs[channel]) + spread
            values += self.moments[channel, 0]
        return max(squared, 0.0), values


def knots_worth_fitting(choices: tuple[int, ...], pixels: int, shortest_side: int | None = None) -> tuple[int, ...]:
    """The K of `choices` the encoder fits for a frame of `pixels` output pixels whose shorter side is
    `shortest_side`: those whose knots are at least MIN_KNOT_SPACING pixels apart (the coarsest always), and of
    those only the finest where the most header bytes it can add over the coarsest are negligible per pixel
    (NEGLIGIBLE_HEADER_BPP)."""
    if shortest_side is not None:
        finest_allowed = 1 + (shortest_side - 1) // MIN_KNOT_SPACING
        choices = tuple(k for k in choices if k <= finest_allowed) or (min(choices),)
    finest, coarsest = max(choices), min(choices)
    if 8 * (max_field_bytes(finest) - max_field_bytes(coarsest)) / pixels < NEGLIGIBLE_HEADER_BPP:
        return (finest,)
    return tuple(choices)


def cheapest_field(candidates: list[ToneStatistics], lam: float, pixels: int) -> tuple[float, ...]:
    """The field of the candidate statistics (one per K, of the same pixels), on the grid (tone_coding.GRID_CHOICES),
    whose coded header bytes per output pixel (`pixels` of them) plus λ·255²·(the fit's mean squared error) is
    least: the trade training's loss makes (rcam.training.train.rd_loss), so a small or low-rate file keeps a
    coarse field on a coarse grid and a large one a fine one."""
    best, best_cost = None, math.inf
    for statistics in candidates:
        fitted = statistics.solve()
        for grid in GRID_CHOICES:
            tone = on_grid(fitted, grid)
            squared, values = statistics.residual(tone)
            cost = 8 * len(encode_field(tone)) / pixels + lam * 255.0**2 * squared / max(values, 1.0)
            if cost < best_cost:
                best, best_cost = tone, cost
    return best


def fit_tone(
    decoded: np.ndarray, reference: np.ndarray, usable: np.ndarray | None = None, knots: int = FIELD_KNOTS
) -> tuple[float, ...]:  # fmt: skip
    """Least-squares gain and offset fields per channel taking `decoded` to `reference`, all usable pixels alike.

    decoded: (H, W, 3) float in [0, 1], the decoder's output before correction (sensor orientation);
    reference: (H, W, 3) uint8 render of the same frame in the same orientation; usable: (H, W) bool, pixels
    the encoder could reconstruct exactly (all by default). Pixels clipped at white on either side, or at
    black in the decoded image, say nothing about the tone and are left out; knots with little data lean on
    the channel's single gain and offset (RIDGE). Reference pixels at black stay in: in noisy shadows the
    render clips the negative half of the noise there, and a fit without them saw only the brighter half and
    lifted the shadows (Canon DNG, faithful, λ 0.01: darkest areas +1.95 levels, +0.69 with them kept).
    Returns 6 K² values, gains (3, K, K) then offsets (3, K, K), rounded to the finest grid the header stores
    (rcam.codec.tone_coding) and clamped to GAIN_RANGE / OFFSET_RANGE; a channel with fewer than MIN_FIT_PIXELS usable pixels stays as
    decoded. ToneStatistics gathers the same sums band by band.
    """
    statistics = ToneStatistics(*decoded.shape[:2], knots=knots)
    statistics.add(0, decoded, reference, usable)
    return statistics.solve()


def _single_fit(pixels: float, sum_x: float, sum_y: float, sum_xx: float, sum_xy: float) -> tuple[float, float]:
    """Least-squares gain and offset of y ≈ gain · x + offset from the sums over the pixels, clamped to the ranges."""
    mean_x, mean_y = sum_x / pixels, sum_y / pixels
    var_x = sum_xx / pixels - mean_x * mean_x
    gain = (sum_xy / pixels - mean_x * mean_y) / var_x if var_x > 1e-6 else 1.0
    gain = min(max(float(gain), GAIN_RANGE[0]), GAIN_RANGE[1])
    return gain, min(max(float(mean_y - gain * mean_x), OFFSET_RANGE[0]), OFFSET_RANGE[1])


def check_tone(tone: tuple[float, ...]) -> None:
    """Refuse tone parameters that no encoder writes (a corrupt or hand-made header)."""
    knots = knots_of(tone)
    if not all(math.isfinite(value) for value in tone):
        raise RcamError("bad header: tone correction values are not all finite")
    gains, offsets = tone[: 3 * knots * knots], tone[3 * knots * knots :]
    if not all(GAIN_RANGE[0] <= gain <= GAIN_RANGE[1] for gain in gains):
        raise RcamError(f"bad header: tone gains from {min(gains)} to {max(gains)}, outside {GAIN_RANGE}")
    if not all(OFFSET_RANGE[0] <= offset <= OFFSET_RANGE[1] for offset in offsets):
        raise RcamError(f"bad header: tone offsets from {min(offsets)} to {max(offsets)}, outside {OFFSET_RANGE}")


def apply_tone(image: np.ndarray, tone: tuple[float, ...], top: int = 0, frame_height: int | None = None) -> np.ndarray:
    """(H, W, 3) float32 image in [0, 1], sensor orientation -> gain · image + offset fields, clamped to [0, 1].

    `image` may be a band of rows of a taller frame: rows top .. top + H of a frame `frame_height` rows high
    (default: the image is the frame). Works in place on `image` (and returns it); an identity correction leaves
    it untouched.
    """
    knots = knots_of(tone)
    if tuple(tone) == identity(knots):
        return image
    height, width = image.shape[:2]
    rows = knot_basis(frame_height or height, knots)[top : top + height].astype(np.float32)
    cols = knot_basis(width, knots).astype(np.float32)
    fields = np.asarray(tone, dtype=np.float32).reshape(2, 3, knots, knots)
    # In bands of rows: full-frame gain and offset planes were 2 x 96 MB of float32 at 24 MP.
    for first in range(0, height, APPLY_BAND_ROWS):
        band = slice(first, first + APPLY_BAND_ROWS)
        for channel in range(3):
            plane = image[band, :, channel]
            np.multiply(plane, rows[band] @ fields[0, channel] @ cols.T, out=plane)
            np.add(plane, rows[band] @ fields[1, channel] @ cols.T, out=plane)
            np.clip(plane, 0.0, 1.0, out=plane)
    return image


def describe_tone(tone: tuple[float, ...]) -> str:
    """One line for `rcam info`: 'none', or each channel's gain and offset (their ranges over a K x K field)."""
    knots = knots_of(tone)
    if tuple(tone) == identity(knots):
        return "none"
    fields = np.asarray(tone).reshape(2, 3, knots * knots)
    if knots == 1:
        return "gain R %.4f G %.4f B %.4f, offset R %+.4f G %+.4f B %+.4f" % tuple(fields.ravel())
    gains = " ".join(f"{name} {fields[0, c].min():.3f}..{fields[0, c].max():.3f}" for c, name in enumerate("RGB"))
    offsets = " ".join(f"{name} {fields[1, c].min():+.3f}..{fields[1, c].max():+.3f}" for c, name in enumerate("RGB"))
    return f"{knots}x{knots} field: gain {gains}, offset {offsets}"
