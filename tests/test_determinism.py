"""A file decodes to the same pixels however it is run: thread count, tile batch, process (issue 21).

The kernels that split their work by the thread count (oneDNN convolutions, MKL matrix products, vectorised
elementwise loops) only split tiles large enough to be worth it, so these tests use a frame of 2x2 tiles of
the default size and the two real DNGs, and compare every value of the float output exactly, not within a
tolerance: one pixel in a million rounding the other way is the bug.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
from conftest import bayer_dng_of_size, run_script

from rcam.codec import container
from rcam.codec import engine as codec
from rcam.codec.output import quantize
from rcam.codec.rawio import network_input, read_raw
from rcam.codec.tiling import DEFAULT_TILE, plan_tiles
from rcam.codec.tone import FIELD_KNOTS, identity
from rcam.codec.zoo import DEFAULT_MODEL, load_codec, native_bfloat16, read_manifest

RAW_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw"
REAL_DNGS = sorted(RAW_DIR.glob("*.dng")) if RAW_DIR.is_dir() else []
THREADS = (1, 2, 3)
# Both transform precisions this CPU runs (the shipped-model tests below use the default, auto).
PRECISIONS_HERE = ["float32"] + (["bfloat16"] if native_bfloat16(torch.device("cpu")) else [])
# (threads, tile batch) of the encodes compared: every thread count and both tile batches, and one pair
# that differs in the tile batch alone.
ENCODE_SETTINGS = ((1, 1), (1, 4), (2, 1), (3, 4))


@contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to `count` for the block (what --threads does)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def shipped_codec():
    models = read_manifest().get("models", {})
    if DEFAULT_MODEL not in models:
        pytest.skip(f"weights/manifest.json lists no {DEFAULT_MODEL}")
    return load_codec(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def grid_dng(tmp_path_factory):
    """A GBRG frame the default tile plan cuts into 2x2 tiles of the default size (992 packed pixels a side).

    GBRG: the reader pads a row at the top, which the decoder crops again.
    """
    side = 2 * (2 * DEFAULT_TILE - 32)
    return bayer_dng_of_size(tmp_path_factory.mktemp("grid") / "grid.dng", side - 1, side, cfa="GBRG", seed=4)


def encode_each_way(codec_, path, reference, settings=ENCODE_SETTINGS, **options) -> dict[tuple[int, int], bytes]:
    """The file's bytes encoded under each (threads, tile batch); `options` go to encode_file."""
    encoded = {}
    for threads, tile_batch in settings:
        with torch_threads(threads):
            encoded[threads, tile_batch] = codec.encode_file(codec_, path, 0.01, reference=reference, tile_batch=tile_batch, **options).data
    return encoded


def decode_each_way(codec_, data) -> dict[int, np.ndarray]:
    """The file's float output decoded under each thread count."""
    decoded = {}
    for threads in THREADS:
        with torch_threads(threads):
            decoded[threads] = codec.decode_bytes(codec_, data)
    return decoded


def check_identical(results: dict) -> None:
    (first_key, first), *others = results.items()
    for key, value in others:
        if isinstance(value, bytes):
            assert value == first, f"{key} encodes to other bytes than {first_key}"
        else:
            differ = int(np.count_nonzero(value != first))
            assert differ == 0, f"{differ} values of {key} differ from {first_key}"


def test_grid_frame_has_2x2_default_tiles(grid_dng):
    planes = network_input(read_raw(grid_dng))
    tiles = plan_tiles(*planes.shape[1:])
    assert len(tiles) == 4 and {(t.height, t.width) for t in tiles} == {(DEFAULT_TILE, DEFAULT_TILE)}


@pytest.mark.parametrize("precision", PRECISIONS_HERE)
def test_grid_frame_same_bytes_and_pixels_any_threads_and_tile_batch(tiny_model_path, grid_dng, precision):
    tiny_codec = load_codec(tiny_model_path, precision=precision)
    reference = codec.tone_reference(tiny_codec, grid_dng)
    encoded = encode_each_way(tiny_codec, grid_dng, reference)
    check_identical(encoded)
    decoded = decode_each_way(tiny_codec, encoded[1, 1])
    check_identical(decoded)
    assert np.ptp(decoded[1]) > 0.1  # a real image, not a constant that any kernel gets right


@pytest.mark.parametrize("precision", PRECISIONS_HERE)
def test_tone_fit_windows_same_bytes_any_threads_and_tile_batch(tiny_model_path, make_dng, precision):
    # 2 x 3 tiles of 352 x 384: the tone fit synthesises windows of the tiles (engine.tone_fit_windows).
    tiny_codec = load_codec(tiny_model_path, precision=precision)
    path = make_dng("windows.dng", 1200, 1800, seed=5)
    reference = codec.tone_reference(tiny_codec, path)
    encoded = encode_each_way(tiny_codec, path, reference, settings=((1, 1), (2, 1), (3, 4)), tile=352)
    header = container.read(encoded[1, 1])[0]
    assert codec.tone_fit_windows(header) is not None and header.tone != identity(FIELD_KNOTS)
    check_identical(encoded)


@pytest.mark.parametrize("path", REAL_DNGS or [None], ids=[p.name for p in REAL_DNGS] or ["none"])
def test_real_dng_same_bytes_and_pixels_any_threads_and_tile_batch(shipped_codec, path):
    if path is None:
        pytest.skip(f"no real DNGs in {RAW_DIR}")
    falloffs = {}
    for threads in THREADS:  # the falloff shapes the render the encoder fits its tone to
        with torch_threads(threads):
            falloffs[threads] = codec.estimated_falloff(shipped_codec, read_raw(path)).cells
    check_identical(falloffs)
    reference = codec.tone_reference(shipped_codec, path)
    encoded = encode_each_way(shipped_codec, path, reference, settings=((1, 1), (3, 4)))
    check_identical(encoded)
    header = container.read(encoded[1, 1])[0]
    assert header.tile_rows * header.tile_cols >= 4
    check_identical(decode_each_way(shipped_codec, encoded[1, 1]))


def test_command_line_same_pixels_any_threads_across_processes(tiny_codec, tiny_model_path, grid_dng, tmp_path):
    # Separate processes, as a cluster splitting files over machines runs them, each told its thread count.
    files = {}
    for threads, tile_batch in ((1, 1), (3, 4)):
        files[threads] = tmp_path / f"t{threads}.rcb"
        args = ("--threads", threads, "--tile-batch", tile_batch, "--no-tone-fit")
        result = run_script("encode", grid_dng, "--model", tiny_model_path, "-o", files[threads], *args)
        assert result.returncode == 0, result.stderr
    check_identical({threads: path.read_bytes() for threads, path in files.items()})
    output = tmp_path / "t3.png"
    result = run_script("decode", files[1], "--model", tiny_model_path, "-o", output, "--threads", 3, "--bits", "16")
    assert result.returncode == 0, result.stderr
    with torch_threads(1):
        here = quantize(codec.decode_bytes(tiny_codec, files[1].read_bytes()), 16)
    assert here.shape == (1983, 1984, 3)
    check_identical({"this process, 1 thread": here, "rcam decode --threads 3": imagecodecs.png_decode(output.read_bytes())})
