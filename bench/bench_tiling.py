"""Benchmark: what tile overlap and the tone fit's second synthesis cost, and whether less of either would do.

Issue 19, "no work done twice". Two measurements on the real DNGs in ../shared/data/raw and a synthetic frame
of --megapixels (the real ones are small: one to four tiles):

1. Tile plans (tile, overlap) in packed pixels: file bytes, encode seconds (analysis + coding + tone fit), the
   decoded PSNR against the reference render (SPEC §3) and a seam measure: the mean absolute step between
   neighbouring output pixels across the lines where tiles meet (both ends of each blending band), over the
   mean step across all lines. 1.0 is no seam; a hard tile border shows as a larger ratio.
2. The tone fit (rcam.codec.fit_header_tone) on the synthetic frame at the default plan: its share of the
   encode time, and the tone fitted on fewer tiles (a quarter grid instead of the checkerboard) or on the
   decoded frame downscaled, against the fit on every tile: largest difference of the 6·K² tone values and
   the decoded PSNR each gives.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_tiling.py [--megapixels 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rcam.codec import container
from rcam.codec import engine as rcam_codec
from rcam.codec.output import quantize
from rcam.codec.rawio import read_raw, undo_flip
from rcam.codec.tone import apply_tone, fit_tone
from rcam.codec.zoo import load_codec
from rcam.demo import sample_scene
from rcam.measure.metrics import psnr
from rcam.training.synth import make_pair

RAW_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw"
PLANS = ((512, 32), (512, 0), (768, 32), (1024, 32))


def seam_ratio(image: np.ndarray, header: container.Header) -> float:
    """Mean |step| across the lines where tiles meet over the mean |step| across all lines, (H, W, 3) sensor frame."""
    tiles = rcam_codec.header_tiles(header)
    ratios = []
    for axis, pad, starts, length in (
        (0, header.pad_top, sorted({t.top for t in tiles})[1:], image.shape[0]),
        (1, header.pad_left, sorted({t.left for t in tiles})[1:], image.shape[1]),
    ):
        steps = np.abs(np.diff(image.astype(np.float64), axis=axis)).mean(axis=(1 - axis, 2))  # step between line i and i+1
        # A band starts where the next tile starts and ends `overlap` later; with no overlap both are the border.
        lines = {2 * (start + end) - pad - 1 for start in starts for end in (0, header.overlap)}
        lines = [line for line in lines if 0 <= line < length - 1]
        if lines:
            ratios.append(steps[lines].mean() / steps.mean())
    return max(ratios) if ratios else float("nan")


def decoded_sensor(codec, data: bytes) -> tuple[np.ndarray, container.Header]:
    """(H, W, 3) uint8 decoded frame in sensor orientation (tone applied), and the header."""
    header, streams = container.read(data)
    image, _ = rcam_codec.synthesize(codec, header, rcam_codec.decode_latents(codec, header, streams))
    toned = apply_tone(image.clamp_(0, 1).numpy(), header.tone)
    return quantize(toned, 8), header


def plans_table(codec, frames: dict[str, Path], lam: float) -> None:
    print(f"\n1. tile plans at λ {lam} (encode = analysis + coding + tone fit, in process)")
    print(f"{'frame':<34} {'tile/ovl':>9} {'tiles':>6} {'bytes':>9} {'Δbytes':>7} {'encode s':>9} {'PSNR dB':>8} {'seam':>6}")
    for name, path in frames.items():
        image = read_raw(path)
        reference = rcam_codec.tone_reference(codec, path, image)
        base_bytes = None
        for tile, overlap in PLANS:
            start = time.perf_counter()
            encoded = rcam_codec.encode_image(codec, image, lam, tile, overlap, reference=reference)
            seconds = time.perf_counter() - start
            decoded, header = decoded_sensor(codec, encoded.data)
            quality = psnr(decoded, undo_flip(reference, header.flip))
            size = len(encoded.data)
            base_bytes = base_bytes or size
            print(
                f"{name[:34]:<34} {tile:>4}/{overlap:<4} {len(encoded.latents):6d} {size:9d} {size / base_bytes - 1:+7.1%} "
                f"{seconds:9.1f} {quality:8.2f} {seam_ratio(decoded, header):6.2f}",
                flush=True,
            )


def subset(header: container.Header, keep) -> list[bool]:
    return [bool(keep(index // header.tile_cols, index % header.tile_cols)) for index in range(header.tile_rows * header.tile_cols)]


def tone_table(codec, path: Path, lam: float) -> None:
    image = read_raw(path)
    start = time.perf_counter()
    analysis = rcam_codec.analyse_image(codec, image)
    reference = rcam_codec.tone_reference(codec, path, image)
    streams, latents = rcam_codec._code(codec, analysis, lam)
    header = rcam_codec._header(codec, analysis, lam, rcam_codec.EMPTY)
    coding_s = time.perf_counter() - start
    start = time.perf_counter()
    full, _ = rcam_codec.synthesize(codec, header, latents)
    synthesis_s = time.perf_counter() - start
    decoded = np.ascontiguousarray(full.clamp_(0, 1).numpy())
    sensor_reference = undo_flip(reference, header.flip)
    tiles = len(latents)

    # Pixels a subset's synthesis completes are blended from the same tiles in the same order as in the full
    # synthesis, so fitting the full frame's pixels under the subset's mask is exactly the subset's fit.
    def mask_of(wanted: list[bool]) -> np.ndarray:
        missing = np.zeros(decoded.shape[:2], bool)
        for tile, run in zip(rcam_codec.header_tiles(header), wanted):
            if not run:
                rows = slice(max(2 * tile.top - header.pad_top, 0), max(2 * (tile.top + tile.height) - header.pad_top, 0))
                cols = slice(max(2 * tile.left - header.pad_left, 0), max(2 * (tile.left + tile.width) - header.pad_left, 0))
                missing[rows, cols] = True
        return ~missing

    def psnr_with(tone) -> float:
        return psnr(quantize(apply_tone(decoded.copy(), tone), 8), sensor_reference)

    start = time.perf_counter()
    all_tone = fit_tone(decoded, sensor_reference)
    fit_s = time.perf_counter() - start
    variants = {
        "every tile": ([True] * tiles, None),
        "checkerboard (today)": (rcam_codec.tone_fit_tiles(header), None),
        "quarter grid (r, c even)": (subset(header, lambda r, c: r % 2 == 0 and c % 2 == 0), None),
        "every tile, decode /2": ([True] * tiles, 2),
        "every tile, decode /4": ([True] * tiles, 4),
    }
    print(f"\n2. tone fit on {path.name}: {tiles} tiles ({header.tile_rows}x{header.tile_cols}), λ {lam}")
    print(f"   analysis + reference + coding {coding_s:.1f} s; synthesis of all tiles {synthesis_s:.1f} s ({synthesis_s / tiles:.2f} s/tile); fit {fit_s:.2f} s")
    print(f"   {'fit on':<26} {'tiles':>6} {'~synth s':>9} {'share of encode':>16} {'max|Δtone|':>11} {'PSNR dB':>8}")
    print(f"   {'no tone fit':<26} {0:6d} {0.0:9.1f} {0.0:16.1%} {'':>11} {psnr_with((1.0, 1.0, 1.0, 0.0, 0.0, 0.0)):8.2f}")
    for name, (wanted, scale) in variants.items():
        usable = mask_of(wanted)
        if scale:
            # A downscaled decode: the fit sees every scale-th pixel's neighbourhood average.
            h, w = (decoded.shape[0] // scale) * scale, (decoded.shape[1] // scale) * scale
            small = decoded[:h, :w].reshape(h // scale, scale, w // scale, scale, 3).mean(axis=(1, 3))
            small_ref = sensor_reference[:h, :w].reshape(h // scale, scale, w // scale, scale, 3).mean(axis=(1, 3))
            tone = fit_tone(small, np.round(small_ref).astype(np.uint8))
        else:
            tone = fit_tone(decoded, sensor_reference, usable)
        synth = synthesis_s * sum(wanted) / tiles / (scale * scale if scale else 1)
        share = (synth + fit_s) / (coding_s + synth + fit_s)
        difference = max(abs(a - b) for a, b in zip(tone, all_tone))
        print(f"   {name:<26} {sum(wanted):6d} {synth:9.1f} {share:16.1%} {difference:11.4f} {psnr_with(tone):8.2f}", flush=True)
    print("   (decode /k: a synthesis at 1/k scale does not exist; its time is the full one / k², an upper bound on the gain)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lambda", dest="lam", type=float, default=0.01)
    parser.add_argument("--model", default="rcam-small")
    parser.add_argument("--skip-plans", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    codec = load_codec(args.model, "cpu")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        width = int(round(math.sqrt(args.megapixels * 1e6 * 3 / 2) / 2) * 2)
        height = int(round(width * 2 / 3 / 2) * 2)
        Image.fromarray(sample_scene(height, width)).save(folder / "scene.png")
        synthetic = make_pair(folder / "scene.png", folder, np.random.default_rng(0), "bench").degraded
        frames = {p.name: p for p in sorted(RAW_DIR.glob("*.dng"))}
        frames[f"synthetic {width}x{height}"] = synthetic
        print(f"threads {args.threads}, model {args.model}", file=sys.stderr)
        if not args.skip_plans:
            plans_table(codec, frames, args.lam)
        tone_table(codec, synthetic, args.lam)


if __name__ == "__main__":
    main()
