"""The tone field's code (rcam.codec.tone_coding, format version 6): exact round trips, its size bound, and what
it saves against version 5's float16 field."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rcam.codec.tone import GAIN_RANGE, OFFSET_RANGE, identity
from rcam.codec.tone_coding import GRID_CHOICES, MAX_GRID, decode_field, encode_field, grid_of, max_field_bytes, on_grid
from rcam.errors import RcamError


def smooth_field(knots: int, seed: int = 0) -> tuple[float, ...]:
    """A K x K field like the encoder fits: a slow tilt and bump per channel, gains near 1, offsets near 0."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.linspace(-1, 1, knots), np.linspace(-1, 1, knots), indexing="ij")
    planes = []
    for centre, size in ((1.0, 0.2),) * 3 + ((0.0, 0.03),) * 3:
        a, b, c = rng.normal(size=3)
        planes.append(centre + size * (a * rows + b * cols + c * (rows**2 + cols**2)) / 3)
    return tuple(np.concatenate(planes).ravel())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.sampled_from(GRID_CHOICES), st.integers(0, 2**32 - 1))
def test_any_field_on_a_grid_round_trips_within_the_bound(knots, grid, seed):
    rng = np.random.default_rng(seed)
    raw = np.concatenate([rng.uniform(0.3, 2.2, 3 * knots * knots), rng.uniform(-0.7, 0.7, 3 * knots * knots)])
    tone = on_grid(tuple(raw), grid)
    values = np.asarray(tone).reshape(2, -1)
    assert values[0].min() >= GAIN_RANGE[0] and values[0].max() <= GAIN_RANGE[1]
    assert values[1].min() >= OFFSET_RANGE[0] and values[1].max() <= OFFSET_RANGE[1]
    assert grid_of(tone) <= grid and on_grid(tone, grid) == tone  # rounding again changes nothing
    code = encode_field(tone)
    assert decode_field(code, knots) == tone and len(code) <= max_field_bytes(knots)


def test_the_bound_holds_for_the_worst_field():
    """Knots alternating between the range's ends on the finest grid: every residual as large as it can be."""
    knots = 16
    checker = (np.add.outer(np.arange(knots), np.arange(knots)) % 2).ravel()
    gains, offsets = np.where(checker, 2.0, 0.5), np.where(checker, 0.5, -0.5)
    values = np.concatenate([np.tile(gains, 3), np.tile(offsets, 3)])
    values[1] += 2.0**-max(GRID_CHOICES)  # so that the finest grid is the coarsest holding the field
    tone = tuple(values)
    assert grid_of(tone) == max(GRID_CHOICES)
    code = encode_field(tone)
    assert decode_field(code, knots) == tone and max_field_bytes(knots) * 0.9 < len(code) <= max_field_bytes(knots)


@pytest.mark.parametrize("knots", [6, 10])
def test_a_smooth_field_codes_in_far_fewer_bytes_than_float16(knots):
    tone = smooth_field(knots)
    fine, coarse = encode_field(on_grid(tone, 10)), encode_field(on_grid(tone, 7))
    assert len(fine) < 0.6 * 12 * knots * knots  # version 5 stored 12 K² bytes
    assert len(coarse) < len(fine)
    # The coarsest grid moves a knot by at most half its step.
    assert np.abs(np.subtract(on_grid(tone, 7), tone)).max() <= 2.0**-8


def test_the_identity_codes_in_a_few_bytes():
    for knots in (1, 6, 10):
        code = encode_field(identity(knots))
        assert decode_field(code, knots) == identity(knots) and len(code) <= 1 + (6 * (4 + knots * knots) + 7) // 8


def test_values_off_every_grid_are_refused_by_the_writer():
    with pytest.raises(ValueError, match="grid"):
        encode_field((1.0 + 2.0 ** -(MAX_GRID + 2), 1.0, 1.0, 0.0, 0.0, 0.0))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80), st.integers(1, 16))
def test_random_codes_decode_or_are_refused(code, knots):
    try:
        tone = decode_field(code, knots)
    except RcamError as error:
        assert str(error).startswith("bad header")
        return
    assert len(tone) == 6 * knots * knots and all(np.isfinite(tone))
