"""How much of rcam's error on real DNGs (faithful look) is the skeleton's rendering, and how much the planes.

    .venv/bin/python bench/plane_ceiling.py [../shared/data/raw] [--lambdas 0.01,0.1] [--model rcam-small]

Per file, against the file's reference render (LibRaw, SPEC §3): the skeleton (rcam.codec.skeleton.develop,
Malvar demosaic) on the encoder's own, uncompressed planes, and LibRaw itself (AHD) on the same planes, put back
into a DNG of white-balanced camera values. Per λ: the shipped decoder, and LibRaw on the planes the decoder
reconstructs (blended over the tiles like the image), with the encoder's tone fit. The first pair is the ceiling
of each rendering; the second says what the reconstructed planes allow. The decoder does not render through
LibRaw: this measures what doing so would buy.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import rawpy
import torch
import torch.nn.functional as F

from rcam.codec import container
from rcam.codec.engine import decode_bytes, decode_latents, encode_file, header_tiles, synthesis_conditions
from rcam.codec.output import quantize
from rcam.codec.rawio import apply_flip, network_input_and_white, read_raw, reference_render, undo_flip
from rcam.codec.skeleton import camera_planes, develop
from rcam.codec.tiling import blend_weights
from rcam.codec.tone import apply_tone, fit_tone
from rcam.codec.zoo import load_codec
from rcam.measure.metrics import dark_offset, psnr
from rcam.training.dng import write_bayer_dng

# LibRaw's linear sRGB (D65) -> XYZ: its camera matrix is derived from an XYZ -> camera matrix through it.
XYZ_FROM_SRGB = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])


def libraw_render(planes: np.ndarray, cam_to_srgb: np.ndarray, white: float, crop: tuple[slice, slice]) -> np.ndarray:
    """Encoder-space planes (4, h, w) -> LibRaw's standard render: uint8 (H, W, 3), sensor orientation, cropped.

    `cam_to_srgb` and `white` are the frame's colour matrix and auto-brightness level (rawio.normalise_planes).
    The planes go back to white-balanced camera values (white = 65535) in an RGGB DNG whose ColorMatrix1 makes
    LibRaw derive exactly `cam_to_srgb` and whose neutral makes its white balance 1.
    """
    matrix = torch.tensor(cam_to_srgb, dtype=torch.float32)[None]
    camera = camera_planes(torch.from_numpy(planes)[None], matrix, torch.tensor([white], dtype=torch.float32))
    mosaic = F.pixel_shuffle(camera, 2)[0, 0].numpy()
    # LibRaw normalises each row of camera <- sRGB to sum 1, so any row scale of this matrix is fine.
    xyz_to_camera = np.linalg.inv(cam_to_srgb.astype(np.float64)) @ np.linalg.inv(XYZ_FROM_SRGB)
    with tempfile.TemporaryDirectory() as folder:
        path = write_bayer_dng(Path(folder) / "planes.dng", np.clip(np.rint(mosaic * 65535), 0, 65535).astype(np.uint16), xyz_to_camera=xyz_to_camera)
        with rawpy.imread(str(path)) as raw:
            image = raw.postprocess(use_camera_wb=True, output_color=rawpy.ColorSpace.sRGB, output_bps=8, gamma=(2.4, 12.92))
    return image[crop]


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
