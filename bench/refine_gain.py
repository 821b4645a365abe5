"""Benchmark: what encoder-side refinement (`rcam encode --look faithful --refine N`) buys, on frames it was not
tuned on.

The refinement's settings were chosen on the real Blackmagic DNG at λ 0.01. This measures them elsewhere:
synthetic DNGs made from validation photos (never trained on; rcam.training.synth, the training defect
families), each encoded in the faithful look at every λ without and with refinement, both measured against the
file's own LibRaw render (the faithful look's target). Prints bytes, PSNR and encode seconds per point, and the
BD-rate and BD-PSNR of refined against plain per image and on average.

    .venv/bin/python bench/refine_gain.py [PHOTO_DIR] [--images 6] [--steps 60] [--lambdas 0.005,0.01,0.025,0.1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rcam.codec.engine import decode_bytes, encode_file
from rcam.codec.output import quantize
from rcam.codec.rawio import reference_render
from rcam.codec.zoo import load_codec
from rcam.measure.bjontegaard import bd_psnr, bd_rate
from rcam.measure.metrics import psnr
from rcam.training.synth import list_photos, make_pair


def measure(codec, path: Path, reference: np.ndarray, lam: float, steps: int) -> tuple[float, float, float]:
    """(bpp, PSNR against the render, encode seconds) of one faithful-look encode."""
    start = time.perf_counter()
    encoded = encode_file(codec, path, lam, reference=reference, look="faithful", refine_steps=steps)
    seconds = time.perf_counter() - start
    decoded = quantize(decode_bytes(codec, encoded.data), 8)
    return 8 * len(encoded.data) / (reference.shape[0] * reference.shape[1]), psnr(decoded, reference), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared/data/photos/val/CBSD68"
    parser.add_argument("photos", nargs="?", default=str(default))
    parser.add_argument("--images", type=int, default=6, help="the first N photos (sorted by name)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lambdas", default="0.005,0.01,0.025,0.1")
    parser.add_argument("--model", default="rcam-small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    codec = load_codec(args.model)
    lambdas = [float(v) for v in args.lambdas.split(",")]
    rates, bd_psnrs = [], []
    with tempfile.TemporaryDirectory() as folder:
        for index, photo in enumerate(list_photos([Path(args.photos)])[: args.images]):
            pair = make_pair(photo, Path(folder), np.random.default_rng([args.seed, index]), photo.stem)
            reference = reference_render(pair.degraded)
            curves = {}
            for steps in (0, args.steps):
                curves[steps] = [measure(codec, pair.degraded, reference, lam, steps) for lam in lambdas]
                points = " ".join(f"{bpp:.3f} bpp {value:.2f} dB {seconds:.1f} s;" for bpp, value, seconds in curves[steps])
                print(f"{photo.stem} refine {steps}: {points}", flush=True)
            plain_rate, plain_psnr = [p[0] for p in curves[0]], [p[1] for p in curves[0]]
            refined_rate, refined_psnr = [p[0] for p in curves[args.steps]], [p[1] for p in curves[args.steps]]
            rate = bd_rate(plain_rate, plain_psnr, refined_rate, refined_psnr)
            gain = bd_psnr(plain_rate, plain_psnr, refined_rate, refined_psnr)
            rates.append(rate)
            bd_psnrs.append(gain)
            print(f"{photo.stem}: refined against plain BD-rate {rate:+.1f}%, BD-PSNR {gain:+.2f} dB", flush=True)
    print(f"mean over {len(rates)} images: BD-rate {np.mean(rates):+.1f}%, BD-PSNR {np.mean(bd_psnrs):+.2f} dB ({args.steps} steps)")


if __name__ == "__main__":
    main()
