"""How much of rcam's error on real DNGs (faithful look) is the skeleton's rendering, and how much the planes.

    .venv/bin/python bench/plane_ceiling.py [../shared/data/raw] [--lambdas 0.01,0.1] [--model rcam-small]

Per file, against the file's reference render (LibRaw, SPEC §3): the skeleton (rcam.codec.skeleton.develop,
Malvar demosaic) on the encoder's own, uncompressed planes, and LibRaw itself (AHD) on the same planes, put back
into a DNG of white-balanced camera values. Per λ: the shipped decoder, and LibRaw on the planes the decoder
reconstructs (blended over the tiles like the image), with the encoder's tone fit. The first pair is the ceiling
of each rendering; the second says what the reconstructed planes allow. The decoder does not render through
LibRaw: this measures what doing so would buy. Last, the same planes coded by JPEG XL instead of rcam's learned
codec (rcam.comparators.planes_jxl, `rcam eval --baselines rawjxl`), rendered by the skeleton with the tone fit
and by LibRaw: what a classical codec makes of the network's own input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from rcam.codec import container
from rcam.codec.engine import decode_bytes, decode_latents, encode_file, header_tiles, synthesis_conditions
from rcam.codec.output import quantize
from rcam.codec.rawio import apply_flip, network_input_and_white, read_raw, reference_render, undo_flip
from rcam.codec.skeleton import develop
from rcam.codec.tiling import blend_weights
from rcam.codec.tone import apply_tone, fit_tone
from rcam.codec.zoo import load_codec
from rcam.comparators.planes_jxl import DISTANCES, decode_planes, encode_planes, file_size, libraw_render
from rcam.measure.metrics import dark_offset, psnr

def decoded_planes(codec, data: bytes) -> tuple[container.Header, np.ndarray]:
    """The planes (4, h, w) the decoder reconstructs from an .rcb file, blended over tiles as the image is."""
    header, streams = container.read(data)
    tiles = header_tiles(header)
    extent = (tiles[-1].top + tiles[-1].height, tiles[-1].left + tiles[-1].width)
    canvas, weight_sum = torch.zeros(4, *extent), torch.zeros(*extent)
    model = codec.model
    inverse_gain, development, look = synthesis_conditions(codec, header)
    with torch.inference_mode():
        for tile, latents in zip(tiles, decode_latents(codec, header, streams)):
            planes = model.synthesis_parts(latents.y_hat * inverse_gain, development, look)[1][0]
            weights = blend_weights(tile, extent, header.overlap, scale=1)
            area = (slice(tile.top, tile.top + tile.height), slice(tile.left, tile.left + tile.width))
            canvas[:, area[0], area[1]] += planes * weights
            weight_sum[area] += weights
    return header, (canvas / weight_sum).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="../shared/data/raw", type=Path)
    parser.add_argument("--lambdas", default="0.01,0.1")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    codec = load_codec(args.model)
    for path in sorted(args.folder.glob("*.dng")):
        reference = reference_render(path)
        image = read_raw(path)
        planes, white = network_input_and_white(image)
        crop = (slice(image.pad_top, image.pad_top + image.height), slice(image.pad_left, image.pad_left + image.width))
        sensor_reference = undo_flip(reference, image.flip)
        skeleton = develop(torch.from_numpy(planes)[None], torch.from_numpy(image.cam_to_srgb)[None], torch.tensor([white]))
        skeleton = quantize(skeleton[0].permute(1, 2, 0).numpy(), 8)[crop]
        libraw = libraw_render(planes, image.cam_to_srgb, white, crop)
        print(f"{path.name}: uncompressed planes -> skeleton {psnr(sensor_reference, skeleton):.2f} dB, LibRaw {psnr(sensor_reference, libraw):.2f} dB")
        pixels = reference.shape[0] * reference.shape[1]
        for distance in DISTANCES:
            streams = encode_planes(planes, distance)
            coded = decode_planes(*streams)
            developed = develop(torch.from_numpy(coded)[None], torch.from_numpy(image.cam_to_srgb)[None], torch.tensor([white]))
            developed = developed[0].permute(1, 2, 0).numpy()[crop]
            toned = quantize(apply_tone(developed, fit_tone(developed, sensor_reference)), 8)
            libraw_coded = libraw_render(coded, image.cam_to_srgb, white, crop)
            bpp = 8 * file_size(streams) / pixels
            print(
                f"  JPEG XL on the planes, distance {distance:g}: {bpp:.3f} bpp, skeleton + tone fit {psnr(sensor_reference, toned):.2f} dB "
                f"(darkest {dark_offset(sensor_reference, toned):+.2f}), LibRaw {psnr(sensor_reference, libraw_coded):.2f} dB (darkest {dark_offset(sensor_reference, libraw_coded):+.2f})"
            )
        for lam in (float(value) for value in args.lambdas.split(",")):
            encoded = encode_file(codec, path, lam, look="faithful", reference=reference)
            shipped = quantize(decode_bytes(codec, encoded.data), 8)
            header, reconstructed = decoded_planes(codec, encoded.data)
            rendered = libraw_render(reconstructed, np.asarray(header.cam_to_srgb, np.float32).reshape(3, 3), header.white, crop).astype(np.float32) / 255
            toned = quantize(apply_flip(apply_tone(rendered, fit_tone(rendered, sensor_reference)), header.flip), 8)
            bpp = 8 * len(encoded.data) / (reference.shape[0] * reference.shape[1])
            print(
                f"  λ {lam}: {bpp:.3f} bpp, shipped decoder {psnr(reference, shipped):.2f} dB (darkest {dark_offset(reference, shipped):+.2f}), "
                f"LibRaw on its planes + tone fit {psnr(reference, toned):.2f} dB (darkest {dark_offset(reference, toned):+.2f})"
            )


if __name__ == "__main__":
    main()
