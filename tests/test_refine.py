"""Encoder-side latent refinement (`rcam encode --refine N`): a better rate-distortion cost against the render,
files the ordinary decoder reads, the same bytes with any thread count, and clear refusals."""

import numpy as np
import pytest
import torch
from conftest import RAW_DIR, real_dng_crop

from rcam.codec import container
from rcam.codec.engine import decode_bytes, encode_file, tone_reference
from rcam.codec.output import quantize
from rcam.errors import RcamError

REAL_FILE = RAW_DIR / "blackmagic_pocket_2013.dng"


@pytest.fixture(scope="module")
def skeleton_codec(tmp_path_factory):
    """A tiny untrained skeleton model: it renders the faithful look, which refinement needs."""
    from conftest import save_tiny_model

    from rcam.codec.zoo import load_codec

    return load_codec(save_tiny_model(tmp_path_factory.mktemp("refine") / "tiny.safetensors", skeleton=True, vignetting=True))


def rd_cost(data: bytes, lam: float, codec, reference: np.ndarray) -> float:
    """bpp + λ · 255² · MSE of the decoded image against `reference` (uint8): what the refinement lowers."""
    decoded = quantize(decode_bytes(codec, data), 8).astype(np.float64)
    bpp = 8 * len(data) / (reference.shape[0] * reference.shape[1])
    return bpp + lam * float(np.mean((decoded - reference) ** 2))


@pytest.fixture(scope="module")
def real_crop(tmp_path_factory):
    """256 x 256 from the middle of the Blackmagic DNG: real sensor data, where the analysis' guess is poorest."""
    if not REAL_FILE.is_file():
        pytest.skip(f"no real DNG at {REAL_FILE}")
    return real_dng_crop(REAL_FILE, tmp_path_factory.mktemp("refine") / "crop.dng", 256, 256)


def test_refinement_lowers_the_rate_distortion_cost_on_real_data(shipped_codec, real_crop):
    lam, look = 0.1, "faithful"
    reference = tone_reference(shipped_codec, real_crop, look=look).astype(np.float64)
    plain = encode_file(shipped_codec, real_crop, lam, look=look)
    refined = encode_file(shipped_codec, real_crop, lam, look=look, refine=8)
    assert container.read(refined.data)[0].lam == container.read(plain.data)[0].lam  # an ordinary file: nothing new to decode
    before, after = rd_cost(plain.data, lam, shipped_codec, reference), rd_cost(refined.data, lam, shipped_codec, reference)
    assert after < 0.9 * before, (before, after)


def test_refinement_runs_over_overlapping_tiles_of_a_rotated_frame(skeleton_codec, make_dng):
    # Each tile's target is its area of the sensor-oriented render, weighted by its blend weights; an
    # untrained network here, so only that it runs, changes the latents and decodes as an ordinary file.
    path = make_dng("tiles.dng", 200, 88, orientation=6)
    plain = encode_file(skeleton_codec, path, 0.05, tile=64, overlap=32, look="faithful")
    refined = encode_file(skeleton_codec, path, 0.05, tile=64, overlap=32, look="faithful", refine=4)
    header = refined.header
    assert header.tile_rows * header.tile_cols >= 3 and refined.data != plain.data
    decoded = decode_bytes(skeleton_codec, refined.data)
    assert decoded.shape == (header.output_height, header.output_width, 3) and np.isfinite(decoded).all()


def test_refined_bytes_do_not_depend_on_the_thread_count(skeleton_codec, make_dng):
    path = make_dng("threads.dng", 200, 88)
    files = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            files.append(encode_file(skeleton_codec, path, 0.01, tile=64, overlap=32, look="faithful", refine=3).data)
    finally:
        torch.set_num_threads(threads)
    assert files[0] == files[1]


def test_refinement_needs_a_lambda_and_the_render(tiny_codec, make_dng):
    path = make_dng("refused.dng", 64, 96)
    with pytest.raises(RcamError, match="not a target size"):
        encode_file(tiny_codec, path, target_bytes=2000, refine=5)
    with pytest.raises(RcamError, match="reference render"):
        encode_file(tiny_codec, path, 0.01, tone_fit=False, refine=5)
    with pytest.raises(RcamError, match="0 or more"):
        encode_file(tiny_codec, path, 0.01, refine=-1)
    with pytest.raises(RcamError, match="faithful look"):
        encode_file(tiny_codec, path, 0.01, look="clean", refine=5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bpp", "1", "--look", "faithful"], "--refine goes with --lambda"),
        (["--no-tone-fit", "--look", "faithful"], "--refine needs the reference render"),
        ([], "it goes with --look faithful"),
    ],
)
def test_cli_refuses_refine_without_what_it_needs(run, tmp_path, make_dng, tiny_model_path, extra, message):
    source = make_dng("cli.dng", 64, 96)
    status, _, err = run("encode", source, "--model", tiny_model_path, "-o", tmp_path / "x.rcb", "--refine", "3", *extra)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.rcb").exists()
