"""End-to-end codec tests: geometry round trips with a quality check, exact latents, determinism, CADR.

Round trips run the shipped model (fast on these small images), so that the decoded picture can be checked
against the reference render: a wrong orientation, CFA phase or crop gives an image of the right shape that
looks like something else. Exactness and invariants use a tiny random model (~16 channels).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BLACK_LEVEL, RAW_DIR, WHITE_LEVEL, smooth_mosaic

from rcam.codec import container
from rcam.codec import engine as codec
from rcam.codec.layers import brightness_layout
from rcam.codec.models import CONFIGS, build_model, parameter_count
from rcam.codec.output import quantize
from rcam.codec.rawio import apply_flip, read_raw, reference_render, undo_flip
from rcam.codec.tiling import Tile, blend_weights, coordinate_map, plan_tiles
from rcam.codec.zoo import load_codec
from rcam.measure.metrics import psnr
from rcam.training.dng import write_bayer_dng

REAL_DNGS = sorted(RAW_DIR.glob("*.dng")) if RAW_DIR.is_dir() else []

# What EXIF orientation n asks a viewer to do to the stored (sensor) image (EXIF 2.3, tag 0x0112): the
# contract. LIBRAW_FLIP, LibRaw's flip code for each, is derived from it below rather than copied from a run.
EXIF_ORIENTATION = {
    1: lambda a: a,
    3: lambda a: a[::-1, ::-1],  # rotate 180°
    6: lambda a: np.rot90(a, -1),  # rotate 90° clockwise
    8: lambda a: np.rot90(a, 1),  # rotate 90° counter-clockwise
}
_PROBE = np.arange(2 * 3).reshape(2, 3, 1)  # non-square: all eight flip codes give different arrays
LIBRAW_FLIP = {
    n: next(code for code in range(8) if np.array_equal(apply_flip(_PROBE, code), transform(_PROBE)))
    for n, transform in EXIF_ORIENTATION.items()
}


def round_trip(codec_, path, **options):
    """Encode then decode a file; returns (decoded float image, reference render, Encoded)."""
    encoded = codec.encode_file(codec_, path, 0.01, **options)
    decoded = codec.decode_bytes(codec_, encoded.data)
    return decoded, reference_render(path), encoded


def check_image(decoded, reference):
    """The decoded image is the reference render's picture: its size, and far closer to it than its mean colour."""
    assert decoded.shape == reference.shape
    assert decoded.dtype == np.float32
    image = quantize(decoded, 8)
    flat = np.broadcast_to(np.round(reference.reshape(-1, 3).mean(axis=0)).astype(np.uint8), reference.shape)
    # A correct decode beats the flat image by 10 dB and more on these files; mirrored, transposed or
    # phase-shifted outputs score below the flat image (measured 10-13 dB against 14-17 dB).
    assert psnr(image, reference) >= psnr(flat, reference) + 6.0, (psnr(image, reference), psnr(flat, reference))


# ---------------------------------------------------------------------------------------------------------
# 1. Round trips on synthetic DNGs


@pytest.mark.parametrize("cfa", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_round_trip_every_cfa_phase(shipped_codec, make_dng, cfa):
    path = make_dng(f"{cfa}.dng", 64, 96, cfa=cfa)
    decoded, reference, encoded = round_trip(shipped_codec, path)
    check_image(decoded, reference)
    assert encoded.header.sensor_height == 64 and encoded.header.sensor_width == 96
    # Bayer unification pads one row at the top for a mosaic whose first row holds no red, one column
    # at the left when red sits in the second column.
    expected_pad = {"RGGB": (0, 0), "BGGR": (1, 1), "GRBG": (0, 1), "GBRG": (1, 0)}[cfa]
    assert (encoded.header.pad_top, encoded.header.pad_left) == expected_pad


@pytest.mark.parametrize("cfa", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_reader_unifies_cfa_phase_on_odd_sizes(tmp_path, cfa):
    """R, G1, G2, B planes come out in canonical order whatever the phase, padding included."""
    height, width = 45, 67
    values = {"R": 1064, "G": 2064, "B": 3064}
    cell = np.array([[values[cfa[0]], values[cfa[1]]], [values[cfa[2]], values[cfa[3]]]], dtype=np.uint16)
    mosaic = np.tile(cell, (height // 2 + 1, width // 2 + 1))[:height, :width]
    path = write_bayer_dng(tmp_path / "flat.dng", mosaic, cfa=cfa, black_level=BLACK_LEVEL, white_level=WHITE_LEVEL)
    image = read_raw(path)
    assert (image.height, image.width) == (height, width)
    assert image.cfa == cfa
    scale = WHITE_LEVEL - BLACK_LEVEL
    expected = np.array([1000, 2000, 2000, 3000]) / scale
    assert image.planes.shape[0] == 4
    assert image.planes.shape[1] * 2 == height + image.pad_top + (height + image.pad_top) % 2
    assert image.planes.shape[2] * 2 == width + image.pad_left + (width + image.pad_left) % 2
    for plane, value in zip(image.planes, expected):
        np.testing.assert_allclose(plane, value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_round_trip_orientations(shipped_codec, make_dng, orientation):
    path = make_dng(f"o{orientation}.dng", 64, 96, cfa="GRBG", orientation=orientation)
    decoded, reference, encoded = round_trip(shipped_codec, path)
    check_image(decoded, reference)
    assert encoded.header.flip == LIBRAW_FLIP[orientation]
    expected_size = (96, 64) if orientation in (6, 8) else (64, 96)
    assert decoded.shape[:2] == expected_size


def test_orientation_is_the_same_transform_as_libraw(tiny_codec, make_dng, tmp_path):
    """The sensor data does not depend on the tag, so oriented outputs are flips of the unoriented ones."""
    upright = make_dng("o1.dng", 64, 96, cfa="BGGR", orientation=1)
    upright_decoded = codec.decode_bytes(tiny_codec, codec.encode_file(tiny_codec, upright, 0.01).data)
    upright_reference = reference_render(upright)
    for orientation in (3, 6, 8):
        path = make_dng(f"o{orientation}.dng", 64, 96, cfa="BGGR", orientation=orientation)
        flip = LIBRAW_FLIP[orientation]
        np.testing.assert_array_equal(reference_render(path), apply_flip(upright_reference, flip))
        decoded = codec.decode_bytes(tiny_codec, codec.encode_file(tiny_codec, path, 0.01).data)
        np.testing.assert_array_equal(decoded, apply_flip(upright_decoded, flip))


@pytest.mark.parametrize("size", [(22, 22), (24, 30), (64, 96)])
def test_round_trip_image_smaller_than_one_tile(shipped_codec, make_dng, size):
    path = make_dng("small.dng", *size, cfa="GBRG")
    decoded, reference, encoded = round_trip(shipped_codec, path, tile=64, overlap=32)
    check_image(decoded, reference)
    assert encoded.header.tile_rows == encoded.header.tile_cols == 1


@pytest.mark.parametrize("cfa", ["RGGB", "BGGR", "GRBG", "GBRG"])
@pytest.mark.parametrize("size", [(45, 67), (67, 45)])
def test_round_trip_odd_sizes(shipped_codec, make_dng, cfa, size):
    path = make_dng("odd.dng", *size, cfa=cfa, orientation=6)
    decoded, reference, _ = round_trip(shipped_codec, path, tile=32, overlap=0)  # several tiles as well
    check_image(decoded, reference)
    assert decoded.shape[:2] == (size[1], size[0])


def test_round_trip_multi_tile_with_overlap(shipped_codec, make_dng):
    path = make_dng("multi.dng", 130, 198, cfa="BGGR", orientation=3)
    decoded, reference, encoded = round_trip(shipped_codec, path, tile=64, overlap=32)
    check_image(decoded, reference)
    assert encoded.header.tile_rows * encoded.header.tile_cols > 1


# ---------------------------------------------------------------------------------------------------------
# 2. Real DNGs


@pytest.mark.parametrize("path", REAL_DNGS or [None], ids=[p.name for p in REAL_DNGS] or ["none"])
def test_real_dng_round_trip(shipped_codec, path):
    if path is None:
        pytest.skip(f"no real DNGs in {RAW_DIR}")
    encoded = codec.encode_file(shipped_codec, path, 0.01, tile=256, tile_batch=4)
    decoded = codec.decode_bytes(shipped_codec, encoded.data)
    check_image(decoded, reference_render(path))


# ---------------------------------------------------------------------------------------------------------
# 3. Entropy decoding reproduces the encoder's latents exactly


def test_decoded_latents_are_bit_exact(tiny_codec, make_dng):
    path = make_dng("grid.dng", 200, 260, cfa="GBRG", seed=3)
    encoded = codec.encode_file(tiny_codec, path, 0.01, tile=64, overlap=32)
    header, streams = container.read(encoded.data)
    assert header.tile_rows > 1 and header.tile_cols > 1
    assert len(streams) == len(encoded.latents) == header.tile_rows * header.tile_cols
    decoded = codec.decode_latents(tiny_codec, header, streams)
    assert len(decoded) == len(encoded.latents)
    nonzero = 0
    for sent, received in zip(encoded.latents, decoded):
        assert sent.y_hat.dtype == received.y_hat.dtype == torch.float32
        assert sent.y_hat.shape == received.y_hat.shape
        assert torch.equal(sent.y_hat, received.y_hat)
        np.testing.assert_array_equal(sent.y_symbols, received.y_symbols)
        np.testing.assert_array_equal(sent.z_symbols, received.z_symbols)
        nonzero += int(np.count_nonzero(sent.y_symbols)) + int(np.count_nonzero(sent.z_symbols))
    assert nonzero > 0  # the comparison is about real symbols, not all-zero latents


def test_version_4_files_with_y_in_position_order_still_decode(shipped_codec, make_dng, monkeypatch):
    """Format 5 codes z with per-tile table variants, y with per-tile scale corrections and each step's y symbols
    grouped by scale index; the version 4 file of the same latents (z with the tables themselves, y's scales as
    predicted and in position order, each symbol with its Gaussian) is more bytes, and decodes to the same pixels."""
    path = make_dng("v4.dng", 200, 260, cfa="RGGB", seed=4)
    encoded = codec.encode_file(shipped_codec, path, 0.01, tile=64, overlap=32)
    header, streams = container.read(encoded.data)
    z_shape = (shipped_codec.model.config.hyper_channels, header.tile_height // 32, header.tile_width // 32)
    ordered_streams = []
    for sent in encoded.latents:  # ŷ re-coded: round(ŷ − μ) gives the same symbols back
        z = torch.from_numpy(sent.z_symbols.astype(np.float32)).view(1, *z_shape)
        stream, resent = shipped_codec.coder.encode(sent.y_hat, z, legacy=True)
        np.testing.assert_array_equal(resent.y_symbols, sent.y_symbols)
        ordered_streams.append(stream)
    assert ordered_streams != streams and all(len(new) <= len(old) + 16 for old, new in zip(ordered_streams, streams))
    assert sum(map(len, streams)) < sum(map(len, ordered_streams))  # the variants and corrections pay for their indices
    monkeypatch.setattr(container, "FORMAT_VERSION", 4)
    version_4 = container.write(dataclasses.replace(header, stream_lengths=(), stream_crcs=()), ordered_streams)
    monkeypatch.undo()
    assert container.read(version_4)[0].format_version == 4 and header.format_version == container.FORMAT_VERSION
    np.testing.assert_array_equal(codec.decode_bytes(shipped_codec, version_4), codec.decode_bytes(shipped_codec, encoded.data))


# ---------------------------------------------------------------------------------------------------------
# 4. The encoder's tile batch (thread counts and frames of default-size tiles: test_determinism.py)


def test_encoder_tile_batch_latents_decode_to_themselves_and_leave_the_file_unchanged(tiny_codec, make_dng):
    path = make_dng("batch.dng", 200, 260, cfa="RGGB", seed=5)
    single = codec.encode_file(tiny_codec, path, 0.01, tile=64, overlap=32, tile_batch=1)
    batched = codec.encode_file(tiny_codec, path, 0.01, tile=64, overlap=32, tile_batch=3)
    header, streams = container.read(batched.data)
    received = codec.decode_latents(tiny_codec, header, streams)
    assert len(received) == len(batched.latents) == header.tile_rows * header.tile_cols > 3
    for sent, decoded in zip(batched.latents, received):
        assert torch.equal(sent.y_hat, decoded.y_hat)
        np.testing.assert_array_equal(sent.y_symbols, decoded.y_symbols)
        np.testing.assert_array_equal(sent.z_symbols, decoded.z_symbols)
    assert any(np.count_nonzero(t.y_symbols) for t in batched.latents)  # real symbols, not all zeros
    # On the CPU every tile runs through the network alone, so the batch size cannot change a latent.
    assert batched.data == single.data


# ---------------------------------------------------------------------------------------------------------
# 5. Absolute coordinates (paper Eq. 4)


@pytest.mark.parametrize("top, left", [(0, 0), (32, 64), (96, 160)])
def test_coordinate_map_is_absolute(top, left):
    frame_height, frame_width = 200, 260
    tile = Tile(top, left, 64, 96)
    coords = coordinate_map(tile, frame_height, frame_width, absolute=True)
    assert coords.shape == (2, 64, 96) and coords.dtype == torch.float32
    i = torch.arange(64, dtype=torch.float32)[:, None].expand(64, 96)
    j = torch.arange(96, dtype=torch.float32)[None, :].expand(64, 96)
    torch.testing.assert_close(coords[0], (i + top) / frame_height, rtol=0, atol=1e-7)
    torch.testing.assert_close(coords[1], (j + left) / frame_width, rtol=0, atol=1e-7)
    relative = coordinate_map(tile, frame_height, frame_width, absolute=False)
    torch.testing.assert_close(relative[0], i / 64, rtol=0, atol=1e-7)
    torch.testing.assert_close(relative[1], j / 96, rtol=0, atol=1e-7)


def test_tile_plan_covers_the_frame():
    tiles = plan_tiles(100, 130, tile=64, overlap=32)
    covered = np.zeros((100, 130), dtype=bool)
    for t in tiles:
        assert t.top % 32 == 0 and t.left % 32 == 0
        covered[t.top : t.top + t.height, t.left : t.left + t.width] = True
    assert covered.all()


@pytest.mark.parametrize(("height", "width", "tile", "overlap"), [(100, 130, 64, 32), (992, 992, 512, 32), (700, 1500, 512, 64), (40, 40, 64, 32)])
def test_blend_weights_sum_to_one_over_a_tile_plan(height, width, tile, overlap):
    """The decoder's blend is the weighted sum of its tiles, with no division (engine.blend_tiles)."""
    tiles = plan_tiles(height, width, tile=tile, overlap=overlap)
    extent = (tiles[-1].top + tiles[-1].height, tiles[-1].left + tiles[-1].width)
    total = torch.zeros(2 * extent[0], 2 * extent[1], dtype=torch.float64)
    for t in tiles:
        total[2 * t.top : 2 * (t.top + t.height), 2 * t.left : 2 * (t.left + t.width)] += blend_weights(t, extent, overlap, scale=2)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    assert len(tiles) == 1 or bool((blend_weights(tiles[0], extent, overlap, scale=2) < 1).any())  # ramps are there


# ---------------------------------------------------------------------------------------------------------
# 6. CADR sees where a tile sits


def test_cadr_depends_on_absolute_position(tiny_codec):
    cadr = copy.deepcopy(tiny_codec.model.cadr)  # leave the session's model alone
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 4, 32, 32, generator=generator)
    frame = (128, 160)
    first = coordinate_map(Tile(0, 0, 32, 32), *frame)[None]
    second = coordinate_map(Tile(64, 96, 32, 32), *frame)[None]
    with torch.no_grad():
        # Zero-initialised modulation: CADR starts as a plain convolution, blind to position.
        assert torch.equal(cadr(x, first), cadr(x, second))
        last = cadr.modulation[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.5)
        last.bias.copy_(torch.randn(last.bias.shape, generator=generator) * 0.1)
        out_first, out_second, out_first_again = cadr(x, first), cadr(x, second), cadr(x, first)
    assert torch.equal(out_first, out_first_again)
    assert (out_first - out_second).abs().max() > 1e-3
    # Relative coordinates would give both tiles the same map, and so the same features.
    relative_first = coordinate_map(Tile(0, 0, 32, 32), *frame, absolute=False)[None]
    relative_second = coordinate_map(Tile(64, 96, 32, 32), *frame, absolute=False)[None]
    with torch.no_grad():
        assert torch.equal(cadr(x, relative_first), cadr(x, relative_second))


def test_cadr_modulation_follows_the_global_prior(tiny_codec):
    cadr = copy.deepcopy(tiny_codec.model.cadr)
    assert cadr.prior_modulation is not None  # the shipped configs give CADR the global prior
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(1, 4, 32, 32, generator=generator)
    coords = coordinate_map(Tile(32, 0, 32, 32), 96, 96)[None]
    vignetted_prior = torch.rand(1, cadr.prior_modulation.in_features, generator=generator)
    clean_prior = torch.zeros_like(vignetted_prior)
    with torch.no_grad():
        last = cadr.modulation[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.5)
        # Zero-initialised prior input: the prior changes nothing until training gives it weight.
        assert torch.equal(cadr(x, coords, vignetted_prior), cadr(x, coords, clean_prior))
        cadr.prior_modulation.weight.copy_(torch.randn(cadr.prior_modulation.weight.shape, generator=generator))
        difference = (cadr(x, coords, vignetted_prior) - cadr(x, coords, clean_prior)).abs().max()
    # The same position is corrected differently for frames whose priors differ.
    assert difference > 1e-3


def test_cadr_modulation_from_blocks_is_the_per_pixel_one():
    # At inference CADR evaluates its modulation on 4x4 blocks and interpolates (CADR._modulation); with the
    # shipped weights the fields stay within a few thousandths of the per-pixel ones (their range is about 0.3).
    cadr = load_codec(None, precision="float32").model.cadr
    generator = torch.Generator().manual_seed(2)
    prior = torch.randn(1, cadr.prior_modulation.in_features, generator=generator)
    for frame, tile in [((2000, 3000), Tile(416, 896, 448, 480)), ((560, 976), Tile(0, 0, 320, 512))]:
        coords = coordinate_map(tile, *frame)[None]
        with torch.enable_grad():
            exact = torch.cat(cadr._modulation(coords, prior), 1).detach()
        with torch.inference_mode():
            blocks = torch.cat(cadr._modulation(coords, prior), 1)
        assert float(exact.abs().max()) > 0.05  # a real modulation, not the zero-initialised one
        assert float((blocks - exact).abs().max()) < 0.01 and float((blocks - exact).pow(2).mean().sqrt()) < 2e-4


def test_brightness_layout_sees_dark_corners():
    size = 32
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    falloff = 1.0 / (1.0 + 0.8 * (rows**2 + cols**2) / 2) ** 2
    flat = torch.full((1, 4, size, size), 0.4)
    layout_flat = brightness_layout(flat)
    layout_vignetted = brightness_layout(flat * falloff)
    assert layout_flat.shape == (1, 16)
    assert torch.allclose(layout_flat, torch.zeros(1, 16), atol=1e-6)
    grid = layout_vignetted.view(4, 4)
    # Corners darker than the centre cells, and the grid is symmetric like the falloff.
    assert grid[[0, 0, 3, 3], [0, 3, 0, 3]].max() < grid[1:3, 1:3].min() - 0.3
    assert torch.allclose(grid, grid.flip(0), atol=1e-5) and torch.allclose(grid, grid.T, atol=1e-5)
    # Overall exposure does not matter, only the layout.
    assert torch.allclose(brightness_layout(flat * falloff * 0.25), layout_vignetted, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------
# 7. Rate grows with λ for the shipped model


def test_rate_is_monotonic_in_lambda_for_shipped_model(shipped_codec, make_dng):
    # On a synthetic frame; tests/test_shipped.py checks rate and quality on real sensor data.
    path = make_dng("rate.dng", 192, 256, cfa="RGGB", seed=7)
    sizes = [len(codec.encode_file(shipped_codec, path, lam).data) for lam in (0.0025, 0.01, 0.1)]
    assert sizes[0] < sizes[1] < sizes[2], sizes


# ---------------------------------------------------------------------------------------------------------
# 8. Model sizes


# RealCamNet (ACM MM 2024) reports 49.01 M parameters; the paper config is meant to be that model's size.
# 5%: the paper leaves layer details open (e.g. the priors' widths) that move the count by a few percent.
PAPER_PARAMETERS = 49.01e6


def test_paper_config_has_paper_scale():
    with torch.device("meta"):
        model = build_model("paper")
    assert abs(parameter_count(model) - PAPER_PARAMETERS) <= 0.05 * PAPER_PARAMETERS, parameter_count(model)


def test_shipped_model_size_is_what_the_readme_says(shipped_codec):
    """README's Limits state the shipped model's size ("N M parameters", plus an estimator's if it has one)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = re.search(r"shipped `rcam-small` model \((\d+(?:\.\d+)?) M parameters(?: plus a (\d+(?:\.\d+)?) M vignetting estimator)?", readme)
    assert found, "README no longer states the shipped model's parameter count"
    model = shipped_codec.model
    estimator = parameter_count(model.vignetting) if model.vignetting is not None else 0
    # The README rounds to 0.1 M.
    assert round((parameter_count(model) - estimator) / 1e6, 1) == float(found.group(1))
    assert round(estimator / 1e6, 1) == float(found.group(2) or 0)


@pytest.mark.parametrize("flip", range(8))
def test_undo_flip_inverts_apply_flip(flip):
    image = np.arange(5 * 7 * 3).reshape(5, 7, 3)
    assert np.array_equal(undo_flip(apply_flip(image, flip), flip), image)
