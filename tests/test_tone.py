"""Encoder-fitted tone correction: the gain and offset fields, the tiles the encoder synthesises for the fit,
and the decoder applying them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rcam.codec import container
from rcam.codec import engine as codec
from rcam.codec.output import quantize
from rcam.codec.rawio import apply_flip, reference_render, undo_flip
from rcam.codec.tone import (
    FIELD_KNOT_CHOICES,
    FIELD_KNOTS,
    GAIN_RANGE,
    IDENTITY,
    ToneStatistics,
    apply_tone,
    cheapest_field,
    check_tone,
    knots_worth_fitting,
    describe_tone,
    fit_tone,
    identity,
    knot_basis,
    knots_of,
)  # fmt: skip
from rcam.codec.tone_coding import FINEST_GRID, GRID_CHOICES, encode_field, on_grid
from rcam.errors import RcamError
from rcam.measure.metrics import psnr


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) float in [0.1, 0.8]: gradients and blobs, so every channel spans a range of levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(6 * x * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(5 * y * rng.uniform(0.5, 2)) for _ in range(3)]
    return (0.45 + 0.35 * np.stack(channels, -1)).astype(np.float32)


def render_of(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def fields(tone, knots):
    """(gains (3, K, K), offsets (3, K, K)) of a tone tuple."""
    values = np.asarray(tone).reshape(2, 3, knots, knots)
    return values[0], values[1]


def test_knot_basis_interpolates_between_evenly_spread_knots():
    basis = knot_basis(11, 3)
    np.testing.assert_allclose(basis.sum(axis=1), 1.0)
    np.testing.assert_allclose(basis[0], [1, 0, 0])  # the first pixel sits on the first knot,
    np.testing.assert_allclose(basis[5], [0, 1, 0])  # the middle one on the middle knot,
    np.testing.assert_allclose(basis[10], [0, 0, 1])  # the last one on the last
    np.testing.assert_allclose(basis[2], [0.6, 0.4, 0])
    assert np.array_equal(knot_basis(7, 1), np.ones((7, 1)))


def test_fit_recovers_a_known_gain_and_offset():
    decoded = smooth_image(120, 160)
    gains, offsets = np.array([1.15, 0.9, 1.05]), np.array([-0.03, 0.04, 0.0])
    reference = render_of(decoded * gains + offsets)
    single = fit_tone(decoded, reference, knots=1)
    np.testing.assert_allclose(single[:3], gains, atol=0.01)
    np.testing.assert_allclose(single[3:], offsets, atol=0.005)
    # A field fitted to a uniform correction is uniform too.
    gain_field, offset_field = fields(fit_tone(decoded, reference), FIELD_KNOTS)
    np.testing.assert_allclose(gain_field, gains[:, None, None] * np.ones((3, FIELD_KNOTS, FIELD_KNOTS)), atol=0.02)
    np.testing.assert_allclose(offset_field, offsets[:, None, None] * np.ones((3, FIELD_KNOTS, FIELD_KNOTS)), atol=0.01)


def test_fit_follows_a_smooth_change_of_tone_across_the_frame():
    # The reference is brighter to the right and warmer at the bottom: a field follows, one gain cannot.
    decoded = smooth_image(120, 160, seed=3)
    y, x = np.mgrid[0:120, 0:160] / np.array([119.0, 159.0])[:, None, None]
    shading = np.stack([0.8 + 0.4 * x + 0.1 * y, 0.8 + 0.4 * x, 0.8 + 0.4 * x - 0.1 * y], axis=-1)
    reference = render_of(decoded * shading)
    field = apply_tone(decoded.copy(), fit_tone(decoded, reference))
    single = apply_tone(decoded.copy(), fit_tone(decoded, reference, knots=1))
    assert psnr(quantize(field, 8), reference) > 45.0
    assert psnr(quantize(field, 8), reference) > psnr(quantize(single, 8), reference) + 10.0


def test_fit_uses_the_whole_frame_alike():
    # The reference is clipped white over the frame's centre: the gain comes from the rest of the frame.
    decoded = smooth_image(120, 160, seed=1)
    reference = render_of(decoded * 1.1).copy()
    reference[30:90, 40:120] = 255
    np.testing.assert_allclose(fit_tone(decoded, reference, knots=1)[:3], 1.1, atol=0.01)
    # Knots over the clipped centre have no data of their own: they lean on the channel's single gain.
    np.testing.assert_allclose(fields(fit_tone(decoded, reference), FIELD_KNOTS)[0], 1.1, atol=0.02)
    corners = np.zeros((120, 160), bool)
    corners[:30, :40] = corners[:30, -40:] = corners[-30:, :40] = corners[-30:, -40:] = True
    np.testing.assert_allclose(fit_tone(decoded, render_of(decoded * 1.1), usable=corners, knots=1)[:3], 1.1, atol=0.01)
    with pytest.raises(RcamError, match="usable mask"):
        fit_tone(decoded, reference, usable=np.ones((120, 159), bool))


def test_fit_keeps_noisy_shadows_at_their_level():
    # A render clips the negative half of its shadows' noise at black; a smooth decode of those shadows must
    # come out at the render's mean level there, not at the mean of the pixels the clipping left above black.
    rng = np.random.default_rng(4)
    decoded = smooth_image(128, 128, seed=4)
    decoded[:, :64] = np.linspace(0.0, 0.06, 64, dtype=np.float32)[None, :, None] + 0.002  # dark left half
    reference = render_of(decoded + rng.normal(0.0, 0.03, decoded.shape))
    corrected = quantize(apply_tone(decoded.copy(), fit_tone(decoded, reference)), 8).astype(np.float64)
    shadows = (slice(None), slice(0, 64))
    assert abs(corrected[shadows].mean() - reference[shadows].astype(np.float64).mean()) < 1.0


def test_fit_leaves_clipped_and_unusable_pixels_out_and_stays_in_range():
    decoded = smooth_image(64, 64, seed=2)
    assert fit_tone(decoded, np.full((64, 64, 3), 255, np.uint8)) == identity(FIELD_KNOTS)  # all clipped
    assert fit_tone(decoded, render_of(decoded), usable=np.zeros((64, 64), bool)) == identity(FIELD_KNOTS)
    wild = fit_tone(decoded, render_of(decoded * 3.0 - 0.9))
    check_tone(wild)  # every gain and offset within the ranges a header may hold
    assert max(fields(wild, FIELD_KNOTS)[0].ravel()) <= GAIN_RANGE[1]
    # Values are on the header's finest grid: what the header stores is what the encoder fitted.
    assert on_grid(wild, FINEST_GRID) == wild and encode_field(wild)


def test_tone_values_are_checked_like_a_header():
    assert knots_of(IDENTITY) == 1 and knots_of(identity(6)) == 6
    for bad, words in [((1.0,) * 7, "not 6 K²"), ((float("nan"),) + IDENTITY[1:], "finite"),
                       ((1, 1, 9.0, 0, 0, 0), "gains"), ((1, 1, 1, 0, -0.75, 0), "offsets")]:  # fmt: skip
        with pytest.raises(RcamError, match=words):
            check_tone(bad)


def test_apply_tone_interpolates_the_field_and_clamps():
    image = np.full((5, 9, 3), 0.5, np.float32)
    assert apply_tone(image, IDENTITY) is image and apply_tone(image, identity(4)) is image
    # K = 2: the four corners carry the knots; gains 0.8 .. 1.2 across the width, offset 0.6 at the bottom.
    gains = np.array([[0.8, 1.2], [0.8, 1.2]])
    offsets = np.array([[0.0, 0.0], [0.6, 0.6]])
    tone = tuple(np.concatenate([np.stack([gains] * 3).ravel(), np.stack([offsets] * 3).ravel()]))
    out = apply_tone(image.copy(), tone)
    np.testing.assert_allclose(out[0, 0], 0.4)
    np.testing.assert_allclose(out[0, -1], 0.6)
    np.testing.assert_allclose(out[0, 4], 0.5)
    np.testing.assert_allclose(out[-1, -1], 1.0)  # 0.6 + 0.6, clamped
    np.testing.assert_allclose(out[2, 0], 0.4 + 0.3)


def test_describe_tone():
    assert describe_tone(identity(6)) == "none"
    assert describe_tone((1.25, 1.0, 0.75, 0.0, -0.125, 0.0625)).startswith("gain R 1.2500 G 1.0000 B 0.7500")
    field = fields(identity(2), 2)
    tone = tuple(np.concatenate([(field[0] * np.array([0.9, 1.0, 1.1])[:, None, None]).ravel(), field[1].ravel()]))
    assert describe_tone(tone).startswith("2x2 field: gain R 0.900..0.900")


def test_tone_fit_tiles_cover_the_whole_frame_in_a_checkerboard(tiny_codec, make_dng):
    header = codec.encode_file(tiny_codec, make_dng("grid.dng", 200, 232), 0.01, tile=64, overlap=32, tone_fit=False).header
    assert (header.tile_rows, header.tile_cols) == (3, 3)
    assert codec.tone_fit_tiles(header) == [True, False, True, False, True, False, True, False, True]
    # Neighbours alternate along a row and down a column.
    assert codec.tone_fit_tiles(dataclasses.replace(header, tile_rows=2, tile_cols=4)) == [True, False, True, False, False, True, False, True]
    small = dataclasses.replace(header, tile_rows=2, tile_cols=2)
    assert codec.tone_fit_tiles(small) == [True] * 4


def test_tone_statistics_band_by_band_fit_as_the_whole_frame():
    rng = np.random.default_rng(0)
    height, width = 301, 417
    decoded = rng.random((height, width, 3)).astype(np.float32)
    reference = np.clip(np.rint((0.9 * decoded + 0.05 + 0.02 * rng.standard_normal(decoded.shape)) * 255), 0, 255).astype(np.uint8)
    usable = rng.random((height, width)) > 0.2
    statistics = ToneStatistics(height, width)
    for top in range(0, height, 37):  # odd band heights: the fit's every other row must stay the frame's
        statistics.add(top, decoded[top : top + 37], reference[top : top + 37], usable[top : top + 37])
    assert statistics.solve() == fit_tone(decoded, reference, usable)
    with pytest.raises(RcamError, match="not inside"):
        statistics.add(300, decoded[:2], reference[:2])


def test_tone_statistics_window_by_window_fit_as_the_whole_frame():
    rng = np.random.default_rng(2)
    height, width = 301, 417
    decoded = rng.random((height, width, 3)).astype(np.float32)
    reference = np.clip(np.rint((1.1 * decoded - 0.03 + 0.02 * rng.standard_normal(decoded.shape)) * 255), 0, 255).astype(np.uint8)
    statistics = ToneStatistics(height, width)
    for top in range(0, height, 37):  # odd offsets both ways: the fit's every other column must stay the frame's
        for left in range(0, width, 53):
            area = (slice(top, top + 37), slice(left, left + 53))
            statistics.add(top, decoded[area], reference[area], left=left)
    # The same sums in another order: equal up to the grid the header stores.
    np.testing.assert_allclose(statistics.solve(), fit_tone(decoded, reference), atol=2e-3)
    with pytest.raises(RcamError, match="not inside"):
        statistics.add(0, decoded[:2, :20], reference[:2, :20], left=400)


def test_tone_fit_windows_sit_in_the_middle_of_every_tile(tiny_codec, make_dng):
    header = codec.encode_file(tiny_codec, make_dng("grid.dng", 200, 232), 0.01, tile=64, overlap=32, tone_fit=False).header
    assert codec.tone_fit_windows(header) is None  # tiles of 8 latent pixels hold no window: the checkerboard
    # 3 x 3 tiles of 44 x 48 latent pixels over a frame whose last row and column of tiles reach into the padding.
    grid = dataclasses.replace(header, tile_rows=3, tile_cols=3, tile_height=352, tile_width=384, overlap=32,
                               sensor_height=1700, sensor_width=2100, pad_top=1, pad_left=0)  # fmt: skip
    assert codec.tone_fit_windows(dataclasses.replace(grid, tile_rows=2, tile_cols=2)) is None  # small frames: whole tiles
    windows = codec.tone_fit_windows(grid, size=32, margin=2)
    assert [w.tile for w in windows] == list(range(9))
    for window, tile in zip(windows, codec.header_tiles(grid)):
        assert (window.latent_rows, window.latent_cols) == (slice(4, 36), slice(8, 40))  # centred on the 32-pixel grid
        height, width = window.rows.stop - window.rows.start, window.cols.stop - window.cols.start
        # The fitted pixels: the window less its margins, in the visible frame, clear of the tile's overlaps.
        assert window.rows.start == 32 and window.cols.start == 32 and width == 16 * 28 and 0 < height <= 16 * 28
        canvas_top, canvas_left = window.top + grid.pad_top, window.left + grid.pad_left
        assert canvas_top == 2 * tile.top + 16 * 4 + window.rows.start and canvas_left == 2 * tile.left + 16 * 8 + 32
        assert 2 * (tile.top + grid.overlap) <= canvas_top and canvas_top + height <= 2 * (tile.top + tile.height - grid.overlap)
        assert 0 <= window.top and window.top + height <= grid.sensor_height and window.left + width <= grid.sensor_width
    # The first row's windows start inside the frame; the last row's are cut off at its bottom.
    assert windows[0].top == 2 * 0 + 16 * (4 + 2) - 1 and windows[-1].top + windows[-1].rows.stop - windows[-1].rows.start == 1700


def test_tone_fit_windows_see_the_decoded_pixels(tiny_codec, make_dng):
    # 2 x 3 tiles of 40 x 44 latent pixels: the encoder fits from windows of the tiles' latents.
    path = make_dng("windows.dng", 1200, 1800, orientation=6)
    plain = codec.encode_file(tiny_codec, path, 0.01, tile=352, overlap=32, tone_fit=False)
    header = plain.header
    windows = codec.tone_fit_windows(header)
    assert (header.tile_rows, header.tile_cols) == (2, 3) and len(windows) == 6
    decoded = undo_flip(codec.decode_bytes(tiny_codec, plain.data), header.flip)
    crops = [dataclasses.replace(plain.latents[w.tile], y_hat=plain.latents[w.tile].y_hat[:, :, w.latent_rows, w.latent_cols]) for w in windows]
    usable = np.zeros(decoded.shape[:2], bool)
    for window, image in zip(windows, codec.synthesise_tiles(tiny_codec, header, crops)):
        fitted = image[:, window.rows, window.cols].permute(1, 2, 0).clamp(0, 1).numpy()
        area = (slice(window.top, window.top + fitted.shape[0]), slice(window.left, window.left + fitted.shape[1]))
        # Cut-off latents change the window's edges, not the pixels inside its margins.
        assert np.sqrt(np.mean((fitted - np.clip(decoded[area], 0, 1)) ** 2)) * 255 < 0.5
        usable[area] = True
    fitted = codec.encode_file(tiny_codec, path, 0.01, tile=352, overlap=32)
    reference = undo_flip(reference_render(path), header.flip)
    # Windows' pixels differ from the decoder's by a fraction of a level: the fields nearly agree (the untrained
    # model's knots with little data move most) and correct the frame alike.
    on_decoded = fit_tone(decoded, reference, usable)
    np.testing.assert_allclose(fitted.header.tone, on_decoded, atol=0.03)
    before = psnr(quantize(decoded, 8), reference)
    after = psnr(quantize(undo_flip(codec.decode_bytes(tiny_codec, fitted.data), header.flip), 8), reference)
    assert after > before + 0.5
    assert abs(after - psnr(quantize(apply_tone(decoded.copy(), on_decoded), 8), reference)) < 0.02


@pytest.mark.parametrize("cfa", ["RGGB", "GBRG"])
def test_blended_rows_are_the_blended_frame_band_by_band(tiny_codec, make_dng, cfa):
    header = codec.encode_file(tiny_codec, make_dng("grid.dng", 201, 232, cfa=cfa), 0.01, tile=64, overlap=32, tone_fit=False).header
    generator = np.random.default_rng(1)
    tiles = codec.header_tiles(header)
    images = [torch.from_numpy(generator.random((3, 2 * t.height, 2 * t.width)).astype(np.float32)) for t in tiles]
    for wanted in ([True] * len(tiles), codec.tone_fit_tiles(header)):
        whole, complete = codec.blend_tiles(header, [image for image, run in zip(images, wanted) if run], wanted)
        bands = list(codec.blended_rows(header, [image for image, run in zip(images, wanted) if run], wanted))
        assert [top for top, _, _ in bands] == list(np.cumsum([0] + [len(rows) for _, rows, _ in bands[:-1]]))
        assert torch.equal(torch.cat([rows for _, rows, _ in bands]), whole)
        assert torch.equal(torch.cat([done for _, _, done in bands]), complete.expand(whole.shape[:2]))


def test_encoder_fits_on_exactly_what_the_decoder_reconstructs(tiny_codec, make_dng):
    path = make_dng("tone.dng", 200, 232, orientation=6)
    plain = codec.encode_file(tiny_codec, path, 0.01, tile=64, overlap=32, tone_fit=False)
    fitted = codec.encode_file(tiny_codec, path, 0.01, tile=64, overlap=32)
    knots = knots_of(fitted.header.tone)  # the encoder's choice among FIELD_KNOT_CHOICES (cheapest_field)
    assert plain.header.tone == IDENTITY and knots in FIELD_KNOT_CHOICES
    assert fitted.header.tone != identity(knots)
    assert [t.y_hat.tolist() for t in fitted.latents] == [t.y_hat.tolist() for t in plain.latents]
    # The fit from the encoder's partial synthesis equals a fit on the decoded frame's pixels those tiles
    # complete (the interiors of every other tile; tiles overlapping one left out are not).
    reference = reference_render(path)
    # The field lives on the sensor frame (the file is rotated: orientation 6).
    _, complete = codec.synthesize(tiny_codec, plain.header, plain.latents, codec.tone_fit_tiles(plain.header))
    usable = complete.numpy()
    assert 0.1 < usable.mean() < 0.5  # tile 64 with overlap 32: the interiors are small
    decoded = codec.decode_bytes(tiny_codec, plain.data)
    flip = plain.header.flip
    # On the grid the encoder chose for it (cheapest_field): the same fit rounded there.
    fit = fit_tone(undo_flip(decoded, flip), undo_flip(reference, flip), usable, knots)
    assert fitted.header.tone in [on_grid(fit, grid) for grid in GRID_CHOICES]
    # A caller that already has the render (one per file for a λ sweep) passes it: the same file results.
    assert codec.encode_file(tiny_codec, path, 0.01, tile=64, overlap=32, reference=reference).data == fitted.data
    # The untrained model's tone is far off: correcting it brings the frame closer to the reference.
    before = psnr(quantize(decoded, 8), reference)
    after = psnr(quantize(codec.decode_bytes(tiny_codec, fitted.data), 8), reference)
    assert after > before + 0.5


def test_decoder_applies_the_header_tone_on_the_oriented_frame(tiny_codec, make_dng):
    path = make_dng("apply.dng", 64, 96, orientation=6)
    encoded = codec.encode_file(tiny_codec, path, 0.01, tone_fit=False)
    header, streams = container.read(encoded.data)
    plain = codec.decode_bytes(tiny_codec, encoded.data)
    ramp = on_grid(tuple(np.concatenate([np.linspace(0.75, 1.25, 12), np.linspace(-0.25, 0.25, 12)])), FINEST_GRID)
    for tone in [(1.25, 1.0, 0.75, 0.0, -0.125, 0.0625), ramp]:  # K = 1 and K = 2
        toned = container.write(dataclasses.replace(header, tone=tone, stream_lengths=(), stream_crcs=()), streams)
        corrected = codec.decode_bytes(tiny_codec, toned)
        expected = apply_flip(apply_tone(undo_flip(plain, header.flip).copy(), tone), header.flip)  # apply_tone works in place
        np.testing.assert_allclose(corrected, expected, atol=1e-6)
        assert not np.allclose(corrected, plain)


@pytest.mark.parametrize("lam", [0.0025, 0.1])
def test_rate_grows_by_the_tone_field_bytes_alone(tiny_codec, make_dng, lam):
    path = make_dng("rate.dng", 96, 96)
    plain = codec.encode_file(tiny_codec, path, lam, tone_fit=False)
    fitted = codec.encode_file(tiny_codec, path, lam)
    # Without a fit the header carries one gain and offset per channel (K = 1), with it a K x K field.
    knots = knots_of(fitted.header.tone)
    extra = len(encode_field(fitted.header.tone)) - len(encode_field(plain.header.tone))
    assert knots in FIELD_KNOT_CHOICES and len(fitted.data) - len(plain.data) == extra > 0


def test_residual_is_the_fit_s_squared_error_on_its_pixels():
    decoded = smooth_image(64, 80, seed=5)
    y, x = np.mgrid[0:64, 0:80] / np.array([63.0, 79.0])[:, None, None]
    reference = render_of(decoded * (0.9 + 0.2 * np.sin(3 * x + 2 * y))[..., None])
    statistics = ToneStatistics(64, 80, knots=4)
    statistics.add(0, decoded, reference)
    tone = statistics.solve()
    squared, values = statistics.residual(tone)
    picked = (slice(0, None, 2), slice(0, None, 2))  # the fit's every other row and column
    rows, cols = knot_basis(64, 4)[picked[0]], knot_basis(80, 4)[picked[1]]
    gains, offsets = np.asarray(tone).reshape(2, 3, 4, 4)
    expected = 0.0
    for channel in range(3):
        gain, offset = rows @ gains[channel] @ cols.T, rows @ offsets[channel] @ cols.T
        error = reference[picked + (channel,)] / 255.0 - (gain * decoded[picked + (channel,)] + offset)
        expected += (error**2).sum()
    assert values == 3 * 32 * 40 and abs(squared - expected) <= 1e-9 * max(expected, 1.0)


def test_the_encoder_pays_for_a_finer_field_only_where_it_is_worth_its_bytes():
    """cheapest_field weighs 12·K² header bytes against λ·255²·MSE: a finer field wins on a large frame whose
    error has fine smooth structure, the coarser one on a tiny frame at a low λ."""
    decoded = smooth_image(96, 128, seed=6)
    y, x = np.mgrid[0:96, 0:128] / np.array([95.0, 127.0])[:, None, None]
    reference = render_of(decoded * (0.9 + 0.1 * np.sin(9 * x) * np.cos(7 * y))[..., None])
    candidates = []
    for knots in (3, 8):
        statistics = ToneStatistics(96, 128, knots=knots)
        statistics.add(0, decoded, reference)
        candidates.append(statistics)
    coarse_error, fine_error = (s.residual(s.solve())[0] for s in candidates)
    assert fine_error < coarse_error
    assert knots_of(cheapest_field(candidates, 0.1, 24_000_000)) == 8  # 24 MP: the bytes are nothing
    assert knots_of(cheapest_field(candidates, 0.0025, 96 * 128)) == 3  # the frame itself: 660 bytes more is 0.4 bpp


def test_large_frames_fit_only_the_finest_field():
    """12·(10² − 6²) bytes are 0.0003 bpp of a 24 MP frame: only K = 10 is fitted there; a 2 MP frame weighs all."""
    assert knots_worth_fitting((6, 8, 10), 24_000_000) == (10,)
    assert knots_worth_fitting((6, 8, 10), 2_000_000) == (6, 8, 10)
    assert knots_worth_fitting((6,), 24_000_000) == (6,)
    # Knots at least MIN_KNOT_SPACING pixels apart: a small frame fits coarse fields only, the coarsest always.
    assert knots_worth_fitting(FIELD_KNOT_CHOICES, 2_000_000, 1112) == FIELD_KNOT_CHOICES
    assert knots_worth_fitting((6, 8, 10, 12, 16, 20, 24, 32), 250_000, 500) == (6, 8, 10, 12, 16, 20, 24, 32)
    assert knots_worth_fitting((6, 8, 10, 12, 16, 20, 24, 32), 25_740, 130) == (6, 8)
    assert knots_worth_fitting((6, 8, 10), 4_096, 64) == (6,)


@pytest.mark.parametrize("knots", [1, 2, 5, 32])
def test_pair_gram_is_the_whole_weighted_gram(knots):
    """The fit's sums over neighbouring knot pairs (tone._pair_gram) equal Σ w φ φᵀ over every pair of knots."""
    from rcam.codec.tone import _full_gram, _pair_gram

    rng = np.random.default_rng(knots)
    rows, cols = knot_basis(70, knots)[1::2], knot_basis(90, knots)[::2]
    weights = rng.random((len(rows), len(cols)))
    basis = np.einsum("ya,xb->yxab", rows, cols).reshape(len(rows), len(cols), knots * knots)
    expected = np.einsum("yx,yxp,yxq->pq", weights, basis, basis)
    np.testing.assert_allclose(_full_gram(_pair_gram(weights, rows, cols), knots), expected, rtol=1e-10, atol=1e-12)
