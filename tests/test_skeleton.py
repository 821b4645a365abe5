"""The classical skeleton of the decoder (rcam.codec.skeleton): Malvar demosaic and the development the encoder applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_codec import REAL_DNGS

from rcam.codec.rawio import apply_flip, auto_bright_white, network_input, normalise_planes, read_raw, reference_render
from rcam.codec.skeleton import band_limit, band_limit_packed, demosaic, develop, develop_packed, linear_to_srgb, packed_pad, srgb_to_linear
from rcam.measure.metrics import dark_offset, psnr


def test_srgb_curves_invert_each_other():
    values = torch.linspace(0.0, 1.0, 1001)
    assert torch.allclose(srgb_to_linear(linear_to_srgb(values)), values, atol=1e-6)
    assert float(srgb_to_linear(torch.tensor(0.5))) == pytest.approx(0.21404, abs=1e-5)  # the sRGB standard's value
    # Odd-extended: the negative values of noisy dark cells keep their size (rawio.normalise_planes).
    assert torch.equal(srgb_to_linear(-values), -srgb_to_linear(values))


def test_demosaic_reproduces_affine_colour_planes_exactly():
    # Malvar-He-Cutler interpolates bilinearly plus a Laplacian term that vanishes on affine signals: away from
    # the border every channel of an affine image comes back exactly.
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(48.0), indexing="ij")
    image = torch.stack([0.1 + 0.01 * rows + 0.005 * cols, 0.3 - 0.002 * rows + 0.004 * cols, 0.2 + 0.003 * rows])[None]
    packed = torch.stack([image[:, 0, 0::2, 0::2], image[:, 1, 0::2, 1::2], image[:, 1, 1::2, 0::2], image[:, 2, 1::2, 1::2]], 1)
    restored = demosaic(packed)
    assert restored.shape == image.shape
    assert torch.allclose(restored[..., 2:-2, 2:-2], image[..., 2:-2, 2:-2], atol=1e-5)
    # Each site keeps its own sample.
    assert torch.equal(restored[:, 0, 0::2, 0::2], packed[:, 0]) and torch.equal(restored[:, 2, 1::2, 1::2], packed[:, 3])


def test_develop_undoes_the_encoder_normalisation_on_a_flat_frame():
    # A grey raw frame under a non-trivial matrix: develop must give back what the encoder's normalisation gave
    # each cell, since demosaicing a flat mosaic changes nothing.
    matrix = np.array([[1.6, -0.4, -0.2], [-0.2, 1.4, -0.2], [0.0, -0.5, 1.5]], dtype=np.float32)
    wb = np.array([2.0, 1.0, 1.5], dtype=np.float32)
    raw = np.stack([np.full((8, 8), 0.2 / wb[0]), np.full((8, 8), 0.2), np.full((8, 8), 0.2), np.full((8, 8), 0.2 / wb[2])]).astype(np.float32)
    raw[0] *= 1.3  # a colour cast, so that the matrix matters
    white = auto_bright_white(raw, wb, matrix)
    planes = torch.from_numpy(normalise_planes(raw, wb, matrix, white))[None]
    out = develop(planes, torch.from_numpy(matrix)[None], torch.tensor([white]))
    expected = planes[0, [0, 1, 3]].mean(dim=(1, 2))
    assert torch.allclose(out[0].mean(dim=(1, 2)), expected, atol=1e-4)
    assert float(out.std(dim=(2, 3)).max()) < 1e-5


def test_develop_passes_gradients_to_the_planes():
    planes = torch.full((1, 4, 8, 8), 0.5, requires_grad=True)
    develop(planes, torch.eye(3)[None], torch.tensor([1.0])).sum().backward()
    assert planes.grad is not None and float(planes.grad.abs().min()) > 0


@pytest.mark.parametrize("path", REAL_DNGS or [None], ids=[p.name for p in REAL_DNGS] or ["none"])
def test_the_skeleton_alone_comes_close_to_libraw_on_real_dngs(path):
    """The encoder's own input, developed by the skeleton with no network, against LibRaw's AHD render.

    This is the ceiling the network starts from: 36.2 dB (Canon, noisy) and 39.8 dB (Blackmagic) when written;
    LibRaw's own PPG demosaic scores 37.0-44.8 dB on such files and its half-size render scaled up 30.7-39.8 dB.
    """
    if path is None:
        pytest.skip("../shared/data/raw is not here")
    image = read_raw(path)
    white = auto_bright_white(image.planes, image.wb_gains, image.cam_to_srgb)
    planes = torch.from_numpy(network_input(image, white))[None]
    out = develop(planes, torch.from_numpy(image.cam_to_srgb)[None], torch.tensor([white]))[0]
    out = out[:, image.pad_top : image.pad_top + image.height, image.pad_left : image.pad_left + image.width]
    decoded = np.round(apply_flip(out.permute(1, 2, 0).numpy(), image.flip) * 255).astype(np.uint8)
    reference = reference_render(path)
    assert decoded.shape == reference.shape
    assert psnr(decoded, reference) > 35.5
    # No lifted blacks: the darkest 5% of the reference's areas come back within a level.
    assert abs(dark_offset(reference, decoded)) < 1.0


# ---------------------------------------------------------------------------------------------------------
# A skeleton model through the codec: looks, header, the estimator only for the clean look


@pytest.fixture(scope="module")
def skeleton_codec(tmp_path_factory):
    from conftest import save_tiny_model

    from rcam.codec.zoo import load_codec

    return load_codec(save_tiny_model(tmp_path_factory.mktemp("skeleton") / "tiny.safetensors", skeleton=True, vignetting=True))


def test_an_untrained_skeleton_model_outputs_the_development_of_its_planes(skeleton_codec):
    model = skeleton_codec.model
    y_hat = torch.randn(2, model.config.latent_channels, 4, 4)
    development = (torch.eye(3).expand(2, 3, 3) * 1.2, torch.tensor([0.5, 0.8]))
    rgb, planes = model.synthesis_parts(y_hat, development, torch.tensor([0, 1]))
    assert planes.shape == (2, 4, 32, 32) and rgb.shape == (2, 3, 64, 64)
    assert torch.allclose(rgb, develop(planes, *development), atol=1e-6)  # the correction starts at zero


def test_only_the_clean_look_divides_out_the_estimated_falloff(skeleton_codec):
    model = skeleton_codec.model
    x, coords, thumb = torch.rand(2, 4, 32, 32), torch.rand(2, 2, 32, 32), torch.rand(2, 4, 32, 32)
    looks = torch.tensor([0, 1])
    with torch.no_grad():
        before = model.analysis(x, coords, thumb, looks)
        saved = {k: v.clone() for k, v in model.vignetting.state_dict().items()}
        model.vignetting.head[2].bias.fill_(-0.5)  # a strong falloff estimate everywhere
        after = model.analysis(x, coords, thumb, looks)
        model.vignetting.load_state_dict(saved)
    assert not torch.allclose(before[0], after[0])  # clean: the estimate changes the input
    assert torch.equal(before[1], after[1])  # faithful: the falloff stays in


@pytest.mark.parametrize("look", ["clean", "faithful"])
def test_both_looks_round_trip_and_are_recorded(skeleton_codec, make_dng, look):
    from rcam.codec import container
    from rcam.codec.engine import decode_bytes, encode_file

    source = make_dng("scene.dng", 64, 96, cfa="GRBG")
    encoded = encode_file(skeleton_codec, source, 0.01, look=look)
    header, _ = container.read(encoded.data)
    image = read_raw(source)
    assert header.look == look and header.format_version == container.FORMAT_VERSION
    assert header.cam_to_srgb == tuple(float(v) for v in np.float32(image.cam_to_srgb).ravel())
    assert header.white == pytest.approx(auto_bright_white(image.planes, image.wb_gains, image.cam_to_srgb), rel=1e-6)
    decoded = decode_bytes(skeleton_codec, encoded.data)
    assert decoded.shape == reference_render(source).shape
    assert np.array_equal(decoded, decode_bytes(skeleton_codec, encoded.data))


def test_a_model_without_the_skeleton_refuses_the_faithful_look(tiny_codec, make_dng, run, tiny_model_path):
    from rcam.codec.engine import encode_file
    from rcam.errors import RcamError

    source = make_dng("scene.dng", 64, 96)
    with pytest.raises(RcamError, match="renders the looks clean, not 'faithful'"):
        encode_file(tiny_codec, source, 0.01, look="faithful")
    status, _, err = run("encode", source, "--model", tiny_model_path, "--look", "faithful", "-o", source.with_suffix(".rcb"))
    assert status == 2 and "not 'faithful'" in err and not source.with_suffix(".rcb").exists()


def test_the_band_limited_correction_has_nothing_at_the_two_pixel_period():
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checkerboard = ((rows + cols) % 2).float()[None, None].repeat(1, 3, 1, 1) - 0.5
    stripes = (cols % 2).float()[None, None].repeat(1, 3, 1, 1) - 0.5
    for pattern in (checkerboard, stripes):
        assert float(band_limit(pattern)[..., 1:-1, 1:-1].abs().max()) < 1e-6
    smooth = 0.01 * (rows + 2 * cols).float()[None, None].repeat(1, 3, 1, 1)  # affine: kept exactly
    assert torch.allclose(band_limit(smooth)[..., 1:-1, 1:-1], smooth[..., 1:-1, 1:-1], atol=1e-5)


def _malvar_at_full_resolution(packed: torch.Tensor) -> torch.Tensor:
    """The textbook way, as rcam once computed it: every kernel at every pixel of the reflected mosaic, then
    each CFA position picks its kernels. The reference the packed demosaic must equal."""
    from rcam.codec.skeleton import MALVAR_KERNELS

    mosaic = F.pixel_shuffle(packed, 2)
    filtered = F.pixel_unshuffle(F.conv2d(F.pad(mosaic, (2, 2, 2, 2), mode="reflect"), MALVAR_KERNELS), 2)
    red, green1, green2, blue = packed.unbind(1)
    at = lambda kernel, position: filtered[:, 4 * kernel + position]  # noqa: E731
    planes = [
        torch.stack([red, at(1, 1), at(2, 2), at(3, 3)], 1),
        torch.stack([at(0, 0), green1, green2, at(0, 3)], 1),
        torch.stack([at(3, 0), at(2, 1), at(1, 2), blue], 1),
    ]
    return torch.cat([F.pixel_shuffle(p, 2) for p in planes], 1)


@pytest.mark.parametrize("size", [(3, 4), (37, 53)])
def test_packed_padding_is_the_mosaic_padded(size):
    planes = torch.randn(2, 12, *size, generator=torch.Generator().manual_seed(size[0]))
    for mode in ("reflect", "replicate"):
        expected = F.pixel_unshuffle(F.pad(F.pixel_shuffle(planes, 2), (2, 2, 2, 2), mode=mode), 2)
        assert torch.equal(packed_pad(planes, mode), expected)


def test_packed_demosaic_and_band_limit_equal_the_full_resolution_ones():
    generator = torch.Generator().manual_seed(3)
    packed = torch.rand(2, 4, 37, 53, generator=generator)
    assert torch.allclose(demosaic(packed), _malvar_at_full_resolution(packed), atol=1e-6)
    correction = torch.randn(2, 12, 37, 53, generator=generator)
    assert torch.allclose(F.pixel_shuffle(band_limit_packed(correction), 2), band_limit(F.pixel_shuffle(correction, 2)), atol=1e-6)
    # develop_packed is develop before its pixel shuffle.
    matrix, white = torch.tensor([[1.6, -0.4, -0.2], [-0.2, 1.5, -0.3], [0.0, -0.5, 1.5]])[None].repeat(2, 1, 1), torch.tensor([0.5, 1.3])
    assert torch.equal(F.pixel_shuffle(develop_packed(packed, matrix, white), 2), develop(packed, matrix, white))


def test_develop_at_inference_is_the_training_curve():
    # Inference encodes sRGB in place with another formula (develop_packed); dark values below the curve's
    # linear segment included, it must give what training sees.
    planes = torch.rand(1, 4, 16, 24, generator=torch.Generator().manual_seed(5)) ** 4  # many near black
    matrix, white = torch.eye(3)[None], torch.tensor([1.0])
    with torch.inference_mode():
        fast = develop_packed(planes, matrix, white)
    exact = develop_packed(planes.requires_grad_(), matrix, white).detach()
    assert bool((exact < 0.0404).any())  # the linear segment is exercised
    assert torch.allclose(fast, exact, atol=3e-6, rtol=0)
