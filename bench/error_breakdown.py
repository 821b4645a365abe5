"""Where rcam's error against the reference render lies on real DNGs: smooth field, fine scale, corners.

    .venv/bin/python bench/error_breakdown.py [../shared/data/raw] [--lambdas 0.01,0.1] [--model rcam-small]
        [--look clean|faithful] [--threads N]

Per file: the noise floor (rcam/measure/noise.py: about the best any pipeline that removes the sensor noise can
score against the file's own render). Per file and λ: PSNR on the whole frame; the share of the squared error
that is a smooth field (the error blurred with a Gaussian of SIGMA_SMOOTH pixels: vignetting, shading, tone)
and the PSNR that would be left without it; the pixel-scale energy (image minus its blur at SIGMA_FINE) of
reference and decoded image (texture and noise the reference keeps and rcam removes); the mean difference
decoded − reference in the four corner boxes and the centre box (1/8 of each side), 8-bit levels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from rcam.codec.container import LOOKS
from rcam.codec.engine import decode_bytes, encode_file, tone_reference
from rcam.codec.output import quantize
from rcam.codec.rawio import reference_render
from rcam.codec.zoo import load_codec
from rcam.measure.metrics import psnr
from rcam.measure.noise import noise_floor

SIGMA_SMOOTH = 16.0  # pixels: slower than any texture, faster than vignetting
SIGMA_FINE = 1.0


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, 3) float64 -> each channel blurred with a Gaussian of `sigma` pixels."""
    return np.stack([gaussian_filter(image[..., c], sigma) for c in range(image.shape[2])], axis=-1)


def breakdown(reference: np.ndarray, decoded: np.ndarray) -> dict[str, float | list[float]]:
    """(H, W, 3) uint8 reference and decoded image -> the figures in the module docstring."""
    ref, dec = reference.astype(np.float64), decoded.astype(np.float64)
    error = dec - ref
    mse = float(np.mean(error**2))
    smooth = blur(error, SIGMA_SMOOTH)
    detail_mse = float(np.mean((error - smooth) ** 2))
    height, width = error.shape[:2]
    box_h, box_w = height // 8, width // 8
    corners = [error[:box_h, :box_w], error[:box_h, -box_w:], error[-box_h:, :box_w], error[-box_h:, -box_w:]]
    centre = error[(height - box_h) // 2 : (height + box_h) // 2, (width - box_w) // 2 : (width + box_w) // 2]
    return {
        "psnr": psnr(decoded, reference),
        "smooth_share": float(np.mean(smooth**2)) / mse,
        "psnr_without_smooth": 10 * np.log10(255.0**2 / detail_mse),
        "fine_energy_reference": float(np.mean((ref - blur(ref, SIGMA_FINE)) ** 2)),
        "fine_energy_decoded": float(np.mean((dec - blur(dec, SIGMA_FINE)) ** 2)),
        "corners": [float(box.mean()) for box in corners],
        "centre": float(centre.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared/data/raw"))
    parser.add_argument("--lambdas", default="0.01,0.1")
    parser.add_argument("--model", default="rcam-small")
    parser.add_argument("--look", default="faithful", choices=LOOKS, help="faithful targets the reference render (SPEC §3)")
    parser.add_argument("--threads", type=int, default=None, help="Torch threads (default: torch's choice).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    codec = load_codec(args.model)
    print(f"{'file':24s} {'λ':>6s} {'bpp':>6s} {'PSNR':>6s} {'floor':>6s} {'smooth%':>7s} {'w/o sm':>6s}"
          f" {'fine ref/dec':>12s}  corners TL TR BL BR / centre (levels)")  # fmt: skip
    for path in sorted(Path(args.folder).glob("*.dng")):
        reference = reference_render(path)
        tone_render = tone_reference(codec, path, look=args.look)
        floor = noise_floor(path)
        for lam in (float(value) for value in args.lambdas.split(",")):
            data = encode_file(codec, path, lam, reference=tone_render, look=args.look).data
            figures = breakdown(reference, quantize(decode_bytes(codec, data), 8))
            bpp = 8 * len(data) / (reference.shape[0] * reference.shape[1])
            corners = " ".join(f"{value:+5.1f}" for value in figures["corners"])
            print(
                f"{path.name[:24]:24s} {lam:6.4f} {bpp:6.3f} {figures['psnr']:6.2f} {floor:6.2f}"
                f" {100 * figures['smooth_share']:6.0f}% {figures['psnr_without_smooth']:6.2f}"
                f" {figures['fine_energy_reference']:5.1f}/{figures['fine_energy_decoded']:5.1f}  {corners} / {figures['centre']:+.1f}"
            )  # fmt: skip


if __name__ == "__main__":
    main()
