"""The tone field's code in the .rcb header (format version 6): knots on a dyadic grid, each predicted from its
coded neighbours, the prediction residuals Golomb-Rice coded.

Version 5 stored the 6 K² knot values (rcam.codec.tone) as float16: 1200 bytes for a 10 x 10 field, 7-11% of a
low-rate file of the 2 MP Blackmagic DNG. The field is smooth, so a knot is close to what its left, upper and
upper-left neighbours predict (LOCO-I's median predictor), and the grid can be coarser than float16 where the
file is small: the encoder picks the grid by training's cost (rcam.codec.tone.cheapest_field). A plain integer
code (no adaptive model, no floating point) keeps the field easy to decode exactly anywhere; with the Rice
parameter chosen per plane it came within 1% of an ideal Laplace code's bytes on the Blackmagic field.

Layout (docs/FORMAT.md): one byte s (gains on a grid of 2^-s around 1, offsets on 2^-(s+1) around 0), then a
bit string, most significant bit first, zero-padded to a byte: for each plane (gains R, G, B, then offsets R,
G, B) four bits k, then each knot in row-major order as the Rice code of its zigzagged residual (q ones and a
zero for the quotient, then k bits of the remainder).
"""

from __future__ import annotations

import math

import numpy as np

from rcam.errors import RcamError

GRID_CHOICES = (7, 8, 9, 10)  # s the encoder tries: gain steps 1/128 .. 1/1024 (float16's near 1 is 1/1024)
FINEST_GRID = max(GRID_CHOICES)
MAX_GRID = 12  # the finest a reader accepts
RICE_BITS = 4  # per plane: the Rice parameter k, 0..15
PLANES = 6  # gains R, G, B, offsets R, G, B
GAIN_RANGE, OFFSET_RANGE = (0.5, 2.0), (-0.5, 0.5)  # what a field may hold (rcam.codec.tone checks them)


def _steps(grid: int) -> np.ndarray:
    """(6,) the knot step of each plane on grid s: 2^-s for gains, 2^-(s+1) for offsets."""
    return np.array([2.0**-grid] * 3 + [2.0 ** -(grid + 1)] * 3)


def _centres() -> np.ndarray:
    return np.array([1.0] * 3 + [0.0] * 3)


def _integers(tone: tuple[float, ...], knots: int, grid: int) -> np.ndarray | None:
    """(6, K, K) int64 knot indices of `tone` on grid s, or None where a value is not on it."""
    values = np.asarray(tone, dtype=np.float64).reshape(PLANES, knots, knots)
    scaled = (values - _centres()[:, None, None]) / _steps(grid)[:, None, None]
    integers = np.round(scaled)
    return integers.astype(np.int64) if np.array_equal(integers, scaled) else None


def on_grid(tone: tuple[float, ...], grid: int) -> tuple[float, ...]:
    """A field's 6 K² values rounded to grid s (gains to 1 + n·2^-s, offsets to n·2^-(s+1)), kept in range."""
    knots = math.isqrt(len(tone) // PLANES)
    values = np.asarray(tone, dtype=np.float64).reshape(PLANES, knots * knots)
    steps, centres = _steps(grid)[:, None], _centres()[:, None]
    rounded = centres + np.round((values - centres) / steps) * steps
    # Limits are on every grid, so clipping after rounding stays on it.
    rounded[:3] = np.clip(rounded[:3], *GAIN_RANGE)
    rounded[3:] = np.clip(rounded[3:], *OFFSET_RANGE)
    return tuple(float(value) for value in rounded.ravel())


def grid_of(tone: tuple[float, ...]) -> int:
    """The coarsest grid s (1..MAX_GRID) holding every value of a field; ValueError if none does."""
    knots = math.isqrt(len(tone) // PLANES)
    for grid in range(1, MAX_GRID + 1):
        if _integers(tone, knots, grid) is not None:
            return grid
    raise ValueError(f"tone values are not on a grid of 2^-{MAX_GRID} (rcam.codec.tone_coding.on_grid rounds them)")


def _predict(plane: np.ndarray, row: int, col: int) -> int:
    """LOCO-I's median prediction of knot (row, col) from its left, upper and upper-left neighbours (the first row
    from the left, the first column from above, the first knot 0): it reads only knots coded before it."""
    if row == 0:
        return int(plane[row][col - 1]) if col else 0
    if col == 0:
        return int(plane[row - 1][col])
    left, up, corner = int(plane[row][col - 1]), int(plane[row - 1][col]), int(plane[row - 1][col - 1])
    if corner >= max(left, up):
        return min(left, up)
    if corner <= min(left, up):
        return max(left, up)
    return left + up - corner


def _residuals(plane: np.ndarray) -> np.ndarray:
    """(K, K) each knot less its prediction."""
    knots = plane.shape[0]
    return np.array([[plane[r, c] - _predict(plane, r, c) for c in range(knots)] for r in range(knots)], dtype=np.int64)


def _zigzag(residuals: np.ndarray) -> np.ndarray:
    return np.where(residuals >= 0, 2 * residuals, -2 * residuals - 1)


def _rice_parameter(symbols: np.ndarray) -> int:
    """The k (0..15) with the fewest Rice-coded bits for these zigzagged residuals."""
    lengths = [int(np.sum((symbols >> k) + 1 + k)) for k in range(2**RICE_BITS)]
    return int(np.argmin(lengths))


def encode_field(tone: tuple[float, ...]) -> bytes:
    """A field's 6 K² values (on a grid: on_grid) -> its code: the grid byte, then the Rice-coded residuals."""
    knots = math.isqrt(len(tone) // PLANES)
    grid = grid_of(tone)
    integers = _integers(tone, knots, grid)
    bits: list[int] = []
    for plane in integers:
        symbols = _zigzag(_residuals(plane)).ravel()
        k = _rice_parameter(symbols)
        bits += [(k >> place) & 1 for place in reversed(range(RICE_BITS))]
        for symbol in symbols.tolist():
            bits += [1] * (symbol >> k) + [0]
            bits += [(symbol >> place) & 1 for place in reversed(range(k))]
    return bytes([grid]) + np.packbits(np.array(bits, dtype=np.uint8)).tobytes()


def max_field_bytes(knots: int) -> int:
    """The most bytes encode_field writes for a K x K field on a GRID_CHOICES grid: a residual spans at most the
    offsets' 2^(s+1) steps, so its zigzag is at most 2^(s+2), k = s + 3 codes each knot in s + 4 bits, and the
    chosen k codes the plane in no more."""
    return 1 + math.ceil(PLANES * (RICE_BITS + (FINEST_GRID + 4) * knots * knots) / 8)


class _Bits:
    """Reads a bit string most significant bit first; RcamError instead of reading past its end. The bits are held
    as a str of '0' and '1' so that runs and numbers are found at C speed (str.find, int(·, 2))."""

    def __init__(self, data: bytes):
        self.bits, self.position = "".join(f"{byte:08b}" for byte in data), 0

    def number(self, count: int) -> int:
        if self.position + count > len(self.bits):
            raise RcamError("bad header: the tone field's code ends early")
        value = int(self.bits[self.position : self.position + count], 2) if count else 0
        self.position += count
        return value

    def unary(self) -> int:
        end = self.bits.find("0", self.position)
        if end < 0:
            raise RcamError("bad header: the tone field's code ends early")
        ones, self.position = end - self.position, end + 1
        return ones

    def rest_is_padding(self) -> bool:
        """Whether what is left is fewer than 8 bits, all zero."""
        rest = self.bits[self.position :]
        return len(rest) < 8 and "1" not in rest


def decode_field(data: bytes, knots: int) -> tuple[float, ...]:
    """encode_field's bytes -> the 6 K² values; RcamError for a code no encoder writes."""
    if not data or not 1 <= data[0] <= MAX_GRID:
        raise RcamError(f"bad header: tone field grid {data[0] if data else None}, expected 1 to {MAX_GRID}")
    grid, reader = data[0], _Bits(data[1:])
    planes = []
    for _ in range(PLANES):
        k = reader.number(RICE_BITS)
        plane = [[0] * knots for _ in range(knots)]  # Python ints: the knots are decoded one by one
        for row in range(knots):
            for col in range(knots):
                symbol = (reader.unary() << k) | reader.number(k)
                residual = symbol // 2 if symbol % 2 == 0 else -(symbol + 1) // 2
                plane[row][col] = _predict(plane, row, col) + residual
        planes.append(plane)
    if not reader.rest_is_padding():
        raise RcamError("bad header: unexpected bits after the tone field's code")
    planes = np.array(planes, dtype=np.float64)
    values = _centres()[:, None, None] + planes * _steps(grid)[:, None, None]
    return tuple(float(value) for value in values.ravel())


def tone_code_summary(tone: tuple[float, ...]) -> str:
    """For `rcam info`: the field's code size and grid, e.g. 'coded in 437 bytes, gain step 1/256'."""
    return f"coded in {len(encode_field(tone))} bytes, gain step 1/{2 ** grid_of(tone)}"
