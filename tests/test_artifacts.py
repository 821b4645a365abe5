"""What users see, with the shipped model: no periodic texture at the decoder's periods, no lifted blacks.

These run the shipped weights (weights/manifest.json's default model) on real work, so they fail when a new
model brings back the artifacts earlier ones had: a fine periodic texture in flat areas (the pixel shuffle's
2-pixel period, the tile lattice) and grey, lifted shadows on real photographs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_codec import REAL_DNGS

from rcam.codec.engine import decode_bytes, encode_file
from rcam.codec.output import quantize
from rcam.codec.rawio import reference_render
from rcam.codec.zoo import load_codec
from rcam.measure.metrics import dark_offset
from rcam.training.dng import write_bayer_dng

TILE, OVERLAP = 64, 32  # packed pixels: a tile lattice every 2 * (TILE - OVERLAP) = 64 output pixels
# The decoded spectrum at the artifact frequencies may exceed the reference's by this factor. The reference
# of a noisy flat frame has white noise there; a decoder that removes noise and adds no pattern has less. The
# shipped stage-11 model has 3.0x (clean and faithful) at the 2-pixel period and 1.5x at the tile lattice's;
# stage 9 had 1.9-2.0x and 0.9x, stage 8 2.1x (what is left comes from demosaicing reconstructed planes, not
# from the correction, which rcam.codec.skeleton.band_limit keeps off that period); stage 7 had 7.4x, stage 8's
# correction without the band limit 13.5x. The margins catch those. At 2 px it was 2.5 until stage 11, which
# halves the real DNGs' bytes and leaves the Blackmagic file's shadows less blotchy but spends twice stage 9's
# bytes on this grey card and puts more of them at 2 px (README, Limits): a trade-off taken knowingly, not a
# fixed artifact. The tile lattice keeps 2.5.
SPECTRAL_MARGIN = {2: 3.5, 2 * (TILE - OVERLAP): 2.5}


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(2)
    yield load_codec()
    torch.set_num_threads(1)


def period_energy(image: np.ndarray, periods: tuple[int, ...]) -> dict[int, float]:
    """Luma power (H, W, 3 uint8 image) at the frequencies of each period along rows and columns, harmonics included."""
    luma = image.astype(np.float64).mean(axis=2)
    height, width = luma.shape
    power = np.abs(np.fft.fft2(luma - luma.mean())) ** 2 / (height * width)
    energy = {}
    for period in periods:
        rows = [k * height // period for k in range(1, period // 2 + 1)]
        cols = [k * width // period for k in range(1, period // 2 + 1)]
        # Whole lines of the spectrum: a pattern repeating down the rows puts its energy at (row bin, any column).
        energy[period] = float(power[rows, :].sum() + power[:, cols].sum())
    return energy


def test_a_flat_noisy_frame_decodes_without_periodic_texture(shipped, tmp_path):
    # A grey card shot at a moderate ISO: the reference render is flat plus white noise.
    height, width = 384, 512  # multiples of the tile lattice's 64-pixel period, so its bins fall on exact bins
    rng = np.random.default_rng(5)
    black, white = 256, 4095
    signal = 0.18 * (white - black)
    mosaic = black + signal + rng.normal(0.0, np.sqrt(2.0 * signal / 10 + 4.0), (height, width))
    path = write_bayer_dng(tmp_path / "grey.dng", np.clip(np.rint(mosaic), 0, white).astype(np.uint16),
                           black_level=black, white_level=white, as_shot_neutral=(0.5, 1.0, 0.7))  # fmt: skip
    reference = reference_render(path)
    reference_energy = period_energy(reference, tuple(SPECTRAL_MARGIN))
    for look in shipped.model.config.looks:
        encoded = encode_file(shipped, path, 0.01, look=look, tile=TILE, overlap=OVERLAP)
        decoded = quantize(decode_bytes(shipped, encoded.data), 8)
        energy = period_energy(decoded, tuple(SPECTRAL_MARGIN))
        for period, value in energy.items():
            assert value <= SPECTRAL_MARGIN[period] * reference_energy[period], (look, period, value, reference_energy[period])


@pytest.mark.parametrize("path", REAL_DNGS or [None], ids=[p.name for p in REAL_DNGS] or ["none"])
def test_real_photographs_keep_their_blacks(shipped, path):
    """The darkest 5% of the reference render's areas come back within ±2 levels on average (faithful look,
    λ 0.01; rcam.measure.metrics.dark_offset says why areas, not single noisy pixels)."""
    if path is None:
        pytest.skip("../shared/data/raw is not here")
    look = "faithful" if "faithful" in shipped.model.config.looks else "clean"
    reference = reference_render(path)
    decoded = quantize(decode_bytes(shipped, encode_file(shipped, path, 0.01, look=look).data), 8)
    offset = dark_offset(reference, decoded)
    assert abs(offset) <= 2.0, offset
