"""Encoder-side refinement (rcam.codec.refine): the latents optimised against the file's own render."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import real_dng_crop, save_tiny_model
from rcam.codec import container
from rcam.codec.engine import decode_bytes, encode_file, header_tiles
from rcam.codec.output import quantize
from rcam.codec.rawio import reference_render
from rcam.codec.refine import tile_target, tile_tone
from rcam.codec.tiling import Tile
from rcam.codec.tone import apply_tone
from rcam.codec.zoo import load_codec
from rcam.errors import RcamError
from rcam.measure.metrics import psnr

BLACKMAGIC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "raw" / "blackmagic_pocket_2013.dng"


def test_tile_target_and_tone_match_the_frame():
    """A tile's target is the frame's pixels under it, its tone maps what apply_tone does there; the padding is
    masked out and left uncorrected."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    # Output rows 11 .. 42 and columns -2 .. 29 of the visible frame: 3 rows below it, 2 columns left of it.
    tile, pad_top, pad_left = Tile(top=6, left=0, height=16, width=16), 1, 2
    target, mask = tile_target(frame, tile, pad_top, pad_left)
    assert target.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    inside = (slice(0, 29), slice(2, 32))
    assert mask.sum() == 29 * 30 and torch.all(mask[0][inside] == 1)
    assert torch.equal(target[:, inside[0], inside[1]].permute(1, 2, 0), torch.from_numpy(frame[11:40, 0:30]).float() / 255.0)
    assert torch.all(target[:, 29:] == 0) and torch.all(target[:, :, :2] == 0)

    knots = 3
    tone = tuple(rng.uniform(0.8, 1.2, 3 * knots * knots)) + tuple(rng.uniform(-0.05, 0.05, 3 * knots * knots))
    gain, offset = tile_tone(tone, tile, pad_top, pad_left, (40, 60))
    grey = np.full((40, 60, 3), 0.5, np.float32)
    expected = apply_tone(grey, tone)[11:40, 0:30]
    ours = (0.5 * gain + offset).clamp(0, 1)[:, inside[0], inside[1]].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert torch.all(gain[:, 29:] == 1) and torch.all(offset[:, :, :2] == 0)


def rd_cost(data: bytes, decoded: np.ndarray, reference: np.ndarray, lam: float) -> float:
    pixels = reference.shape[0] * reference.shape[1]
    mse = np.mean((decoded.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return 8 * len(data) / pixels + lam * mse


@pytest.mark.skipif(not BLACKMAGIC.exists(), reason="needs ../shared/data/raw")
def test_refinement_lowers_the_rate_distortion_cost_of_a_real_frame(shipped_codec, tmp_path):
    """On a crop of a real DNG, 15 steps lower the file's R + λ·MSE against its render (training's cost, counted on
    the whole file's bytes and the decoded 8-bit pixels), and the refined file decodes as any other."""
    path = real_dng_crop(BLACKMAGIC, tmp_path / "crop.dng", 256, 384)
    reference = reference_render(path)
    lam = 0.01
    costs = {}
    for steps in (0, 15):
        encoded = encode_file(shipped_codec, path, lam, reference=reference, look="faithful", refine_steps=steps)
        decoded = quantize(decode_bytes(shipped_codec, encoded.data), 8)
        costs[steps] = (rd_cost(encoded.data, decoded, reference, lam), psnr(decoded, reference), len(encoded.data))
    assert costs[15][0] < 0.97 * costs[0][0], costs


@pytest.fixture(scope="module")
def skeleton_codec(tmp_path_factory):
    """A tiny random skeleton model: it renders both looks, with a channel-wise and checkerboard context."""
    path = tmp_path_factory.mktemp("refine") / "tiny.safetensors"
    return load_codec(save_tiny_model(path, skeleton=True, context_slices=2, context_spatial=8))


def test_refinement_does_not_depend_on_the_thread_count(skeleton_codec, make_dng):
    """Each tile is refined alone on one thread: the bytes are the same with 1 and 2 threads, and run to run."""
    path = make_dng(height=160, width=192)
    reference = reference_render(path)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            results.append(encode_file(skeleton_codec, path, 0.01, reference=reference, look="faithful", refine_steps=3, tile=64, overlap=32).data)
    finally:
        torch.set_num_threads(threads)
    plain = encode_file(skeleton_codec, path, 0.01, reference=reference, look="faithful", tile=64, overlap=32).data
    assert results[0] == results[1] == results[2]
    assert results[0] != plain  # three steps changed the latents
    assert len(header_tiles(container.read(results[0])[0])) > 1  # tiles side by side on two threads


def test_refinement_needs_the_faithful_look_and_a_lambda(skeleton_codec, make_dng, run):
    path = make_dng()
    with pytest.raises(RcamError, match="faithful"):
        encode_file(skeleton_codec, path, 0.01, look="clean", refine_steps=2)
    with pytest.raises(RcamError, match="lambda"):
        encode_file(skeleton_codec, path, target_bpp=0.5, look="faithful", refine_steps=2)
    status, _, stderr = run("encode", str(path), "--refine", "2")
    assert status == 2 and "--look faithful" in stderr


def test_a_checked_lambda_passes_the_check_again():
    """The header's float32 λ is what both sides use; at the range's top it is a little above 0.1 and must
    still pass when the encoder checks it again (refinement encodes twice)."""
    from rcam.codec.engine import check_lambda

    for lam in (0.0025, 0.01, 0.1):
        assert check_lambda(check_lambda(lam)) == check_lambda(lam)
    with pytest.raises(RcamError, match="outside"):
        check_lambda(0.1001)


def test_a_refinement_that_does_not_pay_is_not_kept(skeleton_codec, make_dng, monkeypatch):
    """The encoder keeps the plain file when the refined one costs more (bytes + λ·MSE against the render)."""
    import rcam.codec.engine as engine

    path = make_dng(height=96, width=128)
    reference = reference_render(path)
    plain = encode_file(skeleton_codec, path, 0.01, reference=reference, look="faithful")

    def spoiled(model, y, *args, **kwargs):  # latents pushed far off: more bits and a worse picture
        return y + 8.0 * torch.sign(torch.randn(y.shape, generator=torch.Generator().manual_seed(0)))

    monkeypatch.setattr(engine, "refine_latents", spoiled)
    kept = encode_file(skeleton_codec, path, 0.01, reference=reference, look="faithful", refine_steps=5)
    assert kept.data == plain.data
    spoiled_analysis = engine.refine_analysis(
        skeleton_codec, engine.analyse_image(skeleton_codec, engine.read_raw(path), look="faithful"), 0.01, reference, 5
    )
    worse = engine.encode_analysed(skeleton_codec, spoiled_analysis, 0.01, reference)
    assert engine.coded_cost(skeleton_codec, worse, reference) > engine.coded_cost(skeleton_codec, plain, reference)
