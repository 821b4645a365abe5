"""The vignetting estimator: its map follows absolute frame position, its estimate is divided out of the input,
its examples carry the true falloff, and training pre-trains it, keeps it out of the codec's loss and resumes."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES as TINY
from conftest import BLACK_LEVEL, WHITE_LEVEL, smooth_mosaic

from rcam.codec import container
from rcam.codec.engine import analyse_image, decode_bytes, decode_latents, encode_file, estimated_falloff, tone_reference
from rcam.codec.layers import devignette, log_gain_at
from rcam.codec.models import CONFIGS, build_model
from rcam.codec.rawio import CellFalloff, read_raw, reference_render
from rcam.codec.tiling import Tile, coordinate_map
from rcam.codec.zoo import codec_from_model, load_codec, save_checkpoint
from rcam.errors import RcamError
from rcam.training.dng import write_bayer_dng
from rcam.training.train import TrainConfig, load_dataset, pretrain_vignetting, rd_loss, sample_lambdas, train, vignetting_examples


def test_log_gain_map_follows_absolute_position_across_tiles():
    grid = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8) * -0.01
    frame = (48, 64)
    whole = log_gain_at(grid, coordinate_map(Tile(0, 0, *frame), *frame)[None])[0, 0]
    # Two overlapping tiles read the same values where they overlap, and the whole frame's values there.
    first = log_gain_at(grid, coordinate_map(Tile(0, 0, 32, 40), *frame)[None])[0, 0]
    second = log_gain_at(grid, coordinate_map(Tile(16, 24, 32, 40), *frame)[None])[0, 0]
    assert torch.allclose(first[16:, 24:], second[:16, :16])
    assert torch.allclose(second, whole[16:48, 24:64])
    # Cell (k, l) sits at frame position ((k + 1/2)/8, (l + 1/2)/8): in a 48x64 frame pixels (3, 4) and (45, 60).
    assert whole[3, 4] == pytest.approx(grid[0, 0, 0, 0].item())
    assert whole[45, 60] == pytest.approx(grid[0, 0, -1, -1].item())


def test_devignetting_divides_linear_light_by_the_falloff():
    linear = torch.tensor([0.0, 0.001, 0.05, 0.2, 0.6, 1.0]).view(1, 6, 1, 1)
    encoded = torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    assert torch.allclose(devignette(encoded, torch.zeros(1, 1, 1, 1)), encoded, atol=1e-6)
    halved = devignette(encoded, torch.full((1, 1, 1, 1), math.log(0.5)))
    doubled = (2 * linear).clamp(max=1.5)
    expected = torch.where(doubled <= 0.0031308, 12.92 * doubled, 1.055 * doubled ** (1 / 2.4) - 0.055)
    assert torch.allclose(halved, expected, atol=1e-5)


def test_model_divides_its_estimate_out_of_the_input():
    config = replace(CONFIGS["small"], **TINY, vignetting=True)
    model = build_model(config).eval()
    plain = build_model(replace(config, vignetting=False)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("vignetting.")})
    # An estimator that always answers "the corners get half the light of the centre" (a fixed map).
    falloff = torch.zeros(8, 8)
    falloff[[0, 0, -1, -1], [0, -1, 0, -1]] = math.log(0.5)
    head = model.vignetting.head[-1]
    torch.nn.init.zeros_(head.weight)
    head.bias.data = falloff.flatten()
    x = torch.rand(1, 4, 32, 32) * 0.8
    coords = coordinate_map(Tile(0, 0, 32, 32), 32, 32)[None]
    thumb = torch.rand(1, 4, 32, 32)
    with torch.no_grad():
        expected = plain.analysis(devignette(x, log_gain_at(falloff.view(1, 1, 8, 8), coords)), coords, thumb)
        assert torch.allclose(model.analysis(x, coords, thumb), expected, atol=1e-5)
        assert not torch.allclose(plain.analysis(x, coords, thumb), expected, atol=1e-3)
    with pytest.raises(RcamError, match="absolute coordinates"):
        build_model(replace(config, coordinates="relative"))


def test_examples_carry_the_true_falloff(dataset):
    frames = [image.clean_frame for image in load_dataset(dataset, 32, fresh_defects=True)]
    thumbnails, log_gains = vignetting_examples(frames, 12, 32, np.random.default_rng(0), clean_fraction=0.0)
    assert thumbnails.shape == (12, 4, 32, 32) and log_gains.shape == (12, 1, 8, 8)
    assert torch.isfinite(thumbnails.float()).all()
    # Falloff from an off-centre optical axis: no gain above 1, corners darker than the middle of the frame.
    assert (log_gains <= 0).all()
    assert (log_gains[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]].max(dim=1).values < log_gains[:, 0, 3:5, 3:5].min(dim=1).values.min(dim=1).values).all()
    _, clean = vignetting_examples(frames, 4, 32, np.random.default_rng(0), clean_fraction=1.0)
    assert (clean == 0).all()


def test_examples_without_falloff_still_carry_noise_and_shading(dataset):
    # A flat grey frame: its thumbnail varies only through the defects. "No falloff" must not mean "no noise",
    # else noise alone tells the estimator that a frame has falloff.
    frame = load_dataset(dataset, 32, fresh_defects=True)[0].clean_frame
    flat = replace(frame, sample=np.full_like(frame.sample, 0.3))
    thumbnails, log_gains = vignetting_examples([flat], 6, 32, np.random.default_rng(1), clean_fraction=1.0)
    assert (log_gains == 0).all()
    assert (thumbnails.float().flatten(1).std(dim=1) > 1e-3).all()


def test_estimator_dropout_is_only_applied_when_asked():
    estimator = build_model(replace(CONFIGS["small"], **TINY, vignetting=True)).vignetting.train()
    thumb = torch.rand(2, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(estimator(thumb), estimator(thumb))  # train mode alone changes nothing
        assert not torch.equal(estimator(thumb, 0.5), estimator(thumb, 0.5))


def _codec_with_fixed_falloff(corner_gain: float):
    """A tiny model whose estimator always answers: corner cells get `corner_gain` of the centre's light.

    Its other weights are drawn from a seed of their own: what tests ran before must not change them."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(replace(CONFIGS["small"], **TINY, vignetting=True)).eval()
    falloff = torch.zeros(8, 8)
    falloff[[0, 0, -1, -1], [0, -1, 0, -1]] = math.log(corner_gain)
    torch.nn.init.zeros_(model.vignetting.head[-1].weight)
    model.vignetting.head[-1].bias.data = falloff.flatten()
    return codec_from_model(model)


def test_estimated_falloff_maps_the_estimate_onto_the_sensor(make_dng):
    path = make_dng(height=64, width=96)
    image = read_raw(path)
    gains = estimated_falloff(_codec_with_fixed_falloff(0.5), image).rows(slice(None))
    assert gains.shape == (64, 96) and gains.dtype == np.float32
    # Cell centres sit at (k + 1/2)/8 of each side: sensor pixels (4, 6) and (60, 90) are corner cells, (32, 48) the middle.
    assert gains[4, 6] == pytest.approx(0.5, abs=1e-3) and gains[60, 90] == pytest.approx(0.5, abs=1e-3)
    assert gains[32, 48] == pytest.approx(1.0)
    assert gains[4, 6] == gains[5, 7]  # one gain per 2x2 CFA cell, as the encoder's packed input has it
    assert estimated_falloff(codec_from_model(build_model(replace(CONFIGS["small"], **TINY)).eval()), image) is None


@pytest.mark.parametrize("cfa", ["RGGB", "GBRG"])
def test_the_analysis_thumbnail_gives_the_same_falloff(cfa, tmp_path):
    """The encoder hands the analysis' thumbnail to the falloff estimate instead of normalising the frame again:
    the same gains to the last bit, CFA padding included (the shipped estimator, which reads the thumbnail)."""
    codec = load_codec()
    mosaic = smooth_mosaic(302, 400, seed=2).astype(np.float64)
    rows, cols = np.mgrid[0:302, 0:400]
    radius2 = ((rows - 151) / 151) ** 2 + ((cols - 200) / 200) ** 2
    mosaic = BLACK_LEVEL + (mosaic - BLACK_LEVEL) * (1 - 0.3 * radius2)  # strong lens falloff: corners at 40%
    path = write_bayer_dng(tmp_path / "frame.dng", np.rint(mosaic).astype(np.uint16)[:301], cfa=cfa, black_level=BLACK_LEVEL,
                           white_level=WHITE_LEVEL, as_shot_neutral=(0.5, 1.0, 0.7))  # fmt: skip
    image = read_raw(path)
    again = estimated_falloff(codec, image).rows(slice(None))
    shared = estimated_falloff(codec, image, analyse_image(codec, image).thumbnail).rows(slice(None))
    assert again.shape == (301, 400) and np.array_equal(again, shared)
    assert np.ptp(again) > 0.01  # the estimate depends on the frame: a constant would prove nothing


def test_reference_render_without_a_falloff(make_dng):
    path = make_dng(height=64, width=96)
    plain = reference_render(path)
    assert np.array_equal(reference_render(path, falloff=np.ones((64, 96), np.float32)), plain)
    # Half the light taken off the left half: the left half gets brighter against the right one.
    falloff = np.ones((64, 96), np.float32)
    falloff[:, :48] = 0.5
    lifted = reference_render(path, falloff=falloff).astype(float)
    ratio = lifted[:, :40].mean() / lifted[:, 56:].mean()
    assert ratio > 1.15 * plain[:, :40].astype(float).mean() / plain[:, 56:].astype(float).mean()
    with pytest.raises(RcamError, match="falloff"):
        reference_render(path, falloff=np.ones((64, 95), np.float32))
    with pytest.raises(RcamError, match="falloff"):
        reference_render(path, falloff=np.zeros((64, 96), np.float32))
    # The tone fit's reference is the render with the model's own estimate divided out.
    codec = _codec_with_fixed_falloff(0.5)
    assert np.array_equal(tone_reference(codec, path), reference_render(path, falloff=estimated_falloff(codec, read_raw(path))))
    assert not np.array_equal(tone_reference(codec, path), plain)


def test_reference_render_adjusts_the_raw_values_in_bands_with_the_same_result(make_dng, monkeypatch):
    """The falloff and noise are applied band by band (memory); bands of any height render the same pixels."""
    path = make_dng(height=64, width=96)
    falloff = np.linspace(0.4, 1.0, 64 * 96, dtype=np.float32).reshape(64, 96)
    noise = np.random.default_rng(3).normal(0.0, 40.0, (64, 96))
    whole = reference_render(path, falloff=falloff, raw_noise=noise)  # one band: the default exceeds 64 rows
    monkeypatch.setattr("rcam.codec.rawio.RENDER_BAND_ROWS", 7)  # bands that do not divide the frame
    assert np.array_equal(reference_render(path, falloff=falloff, raw_noise=noise), whole)
    assert not np.array_equal(whole, reference_render(path))


@pytest.mark.parametrize("cfa", ["RGGB", "GBRG", "GRBG"])
def test_a_falloff_per_cfa_cell_renders_as_its_per_pixel_map(make_dng, monkeypatch, cfa):
    """The encoder hands LibRaw's render a CellFalloff (a quarter of a per-pixel map's memory), expanded a band
    of rows at a time: the same pixels as the per-pixel map it stands for, bands of any height and CFA padding
    on either side; a cell map that does not cover the mosaic is refused."""
    path = make_dng(height=63, width=95, cfa=cfa)
    image = read_raw(path)
    packed_height, packed_width = image.planes.shape[1:]
    cells = np.linspace(0.4, 1.0, packed_height * packed_width, dtype=np.float32).reshape(packed_height, packed_width)
    falloff = CellFalloff(cells, image.pad_top, image.pad_left, image.height, image.width)
    per_pixel = falloff.rows(slice(None))
    padded = cells.repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(per_pixel, padded[image.pad_top : image.pad_top + 63, image.pad_left : image.pad_left + 95])
    whole = reference_render(path, falloff=per_pixel)
    monkeypatch.setattr("rcam.codec.rawio.RENDER_BAND_ROWS", 5)  # odd bands: each starts mid-cell in turn
    assert np.array_equal(reference_render(path, falloff=falloff), whole)
    assert not np.array_equal(whole, reference_render(path))
    with pytest.raises(RcamError, match="cells"):
        reference_render(path, falloff=CellFalloff(cells[:-1], image.pad_top, image.pad_left, image.height, image.width))


def test_training_pretrains_the_estimator_keeps_it_out_of_the_codec_loss_and_resumes(dataset, tmp_path, monkeypatch):
    weights = tmp_path / "start.safetensors"
    save_checkpoint(build_model(replace(CONFIGS["small"], **TINY)), weights)  # weights without an estimator
    config = TrainConfig(
        dataset=str(dataset), run_dir=str(tmp_path / "run"), model_overrides=TINY | {"vignetting": True}, steps=2,
        batch_size=2, patch=32, checkpoint_every=1, log_every=1, threads=1, val_every=0, fresh_defects=True,
        init_from=str(weights), vignetting_examples=16, vignetting_pretrain_steps=20, vignetting_batch=4,
    )  # fmt: skip
    with pytest.raises(RcamError, match="fresh_defects"):
        train(replace(config, fresh_defects=False))
    assert not (tmp_path / "run" / "last.pt").exists()
    images = load_dataset(dataset, TINY["thumbnail"], fresh_defects=True)
    # The estimator train() builds, as it was just before and just after its pre-training, and its examples.
    seen = {}

    def watched_pretraining(estimator, optimizer, examples, *args):
        seen["before"] = copy.deepcopy(estimator.state_dict())
        seen["examples"] = examples
        pretrain_vignetting(estimator, optimizer, examples, *args)
        seen["after"] = copy.deepcopy(estimator.state_dict())

    monkeypatch.setattr("rcam.training.train.pretrain_vignetting", watched_pretraining)
    checkpoint = train(config, images)
    state = torch.load(checkpoint, weights_only=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["vignetting_pretrain_step"] for r in log if "vignetting_pretrain_step" in r] == list(range(1, 21))
    steps = [r for r in log if "step" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["vignetting"]) for r in steps)
    # Pre-training moved the estimator it was given, towards the examples' true falloff.
    untrained, pretrained = build_model(replace(CONFIGS["small"], **TINY, vignetting=True)).vignetting, None
    untrained.load_state_dict(seen["before"])
    pretrained = copy.deepcopy(untrained)
    pretrained.load_state_dict(seen["after"])
    thumbnails, log_gains = seen["examples"]
    with torch.no_grad():
        error = lambda estimator: float(((estimator(thumbnails.float()) - log_gains) ** 2).mean())  # noqa: E731
        assert error(pretrained) < error(untrained)
    # The codec's optimizer does not hold the estimator: its loss never moves it.
    model = build_model(replace(CONFIGS["small"], **TINY, vignetting=True))
    codec_parameters = [name for name, _ in model.named_parameters() if not name.startswith("vignetting.")]
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(codec_parameters) < len(list(model.parameters()))
    assert len(state["vignetting_optimizer"]["param_groups"][0]["params"]) == len(list(model.vignetting.parameters()))
    # Resuming continues at step 2 without pre-training again.
    train(replace(config, steps=3), images)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len([r for r in log if "vignetting_pretrain_step" in r]) == 20
    assert [r["step"] for r in log if "step" in r] == [1, 2, 3]
    # Fine-tuning from weights that have a trained estimator does not pre-train it again.
    train(replace(config, run_dir=str(tmp_path / "again"), init_from=str(checkpoint)), images)
    again = (tmp_path / "again" / "log.jsonl").read_text()
    assert "vignetting_pretrain_step" not in again and '"step": 2' in again
    # ... unless told to leave its estimator out: then a new one is pre-trained.
    train(replace(config, run_dir=str(tmp_path / "new"), init_from=str(checkpoint), init_exclude=["vignetting."]), images)
    assert "vignetting_pretrain_step" in (tmp_path / "new" / "log.jsonl").read_text()


def test_the_codec_loss_sends_no_gradient_to_the_estimator():
    """The estimator learns from its own loss only: the codec's rate-distortion loss leaves its gradients empty."""
    model = build_model(replace(CONFIGS["small"], **TINY, vignetting=True)).train()
    # A falloff estimate below 1 everywhere: at a gain of exactly 1 the estimator's clamp at 0 would block the
    # gradient by itself, and this test would pass without the detach it is about.
    torch.nn.init.constant_(model.vignetting.head[-1].bias, -0.3)
    generator = torch.Generator().manual_seed(0)
    x, thumb = torch.rand(2, 4, 32, 32, generator=generator), torch.rand(2, 4, 32, 32, generator=generator)
    coords = coordinate_map(Tile(0, 0, 32, 32), 64, 64)[None].expand(2, -1, -1, -1)
    target = torch.rand(2, 3, 64, 64, generator=generator)
    rd_loss(model(x, coords, thumb, sample_lambdas(2, 0.0025, 0.1, np.random.default_rng(0))), target, torch.full((2,), 0.01))["loss"].backward()
    assert all(p.grad is None for p in model.vignetting.parameters())
    assert model.cadr.features.weight.grad is not None and model.cadr.features.weight.grad.abs().sum() > 0
    # The same input through the estimator without the detach does reach it: the test can see a leak.
    model.zero_grad(set_to_none=True)
    devignette(x, log_gain_at(model.vignetting(thumb), coords)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vignetting.parameters())


def test_tiny_model_with_the_estimator_round_trips(tmp_path, make_dng):
    """The estimator path as rcam-small ships it, in a tiny model: saved, loaded, encoded with the falloff
    divided out (tone fitted to tone_reference), decoded exactly and deterministically."""
    codec = _codec_with_fixed_falloff(0.5)
    weights = save_checkpoint(codec.model, tmp_path / "estimator.safetensors")
    loaded = load_codec(str(weights))
    assert loaded.model.vignetting is not None
    path = make_dng(height=64, width=96, cfa="GBRG", orientation=6)
    encoded = encode_file(loaded, path, 0.01)
    assert encoded.data == encode_file(loaded, path, 0.01, reference=tone_reference(loaded, path)).data
    assert encoded.data != encode_file(loaded, path, 0.01, reference=reference_render(path)).data  # the falloff counts
    header, streams = container.read(encoded.data)
    for sent, received in zip(encoded.latents, decode_latents(loaded, header, streams)):
        assert torch.equal(sent.y_hat, received.y_hat)
    decoded = decode_bytes(loaded, encoded.data)
    assert decoded.shape == reference_render(path).shape
    np.testing.assert_array_equal(decoded, decode_bytes(loaded, encoded.data))


@pytest.mark.parametrize("cfa", ["GRBG", "GBRG"])
def test_estimated_falloff_in_bands_is_the_one_pass_map(make_dng, monkeypatch, cfa):
    """estimated_falloff makes its map a band of packed rows at a time (memory): with bands of one
    row or of the whole frame, CFA padding on either side, the same gains to the last bit."""
    from rcam.codec import engine

    image = read_raw(make_dng(height=63, width=95, cfa=cfa))
    codec = _codec_with_fixed_falloff(0.5)  # corners at half, the middle at 1
    monkeypatch.setattr(engine, "FALLOFF_BAND_ROWS", 1)
    banded = estimated_falloff(codec, image).rows(slice(None))
    monkeypatch.setattr(engine, "FALLOFF_BAND_ROWS", 10_000)
    whole = estimated_falloff(codec, image).rows(slice(None))
    assert banded.shape == (63, 95) and np.array_equal(banded, whole)
    assert np.ptp(whole) > 0.4
