"""Crops of a real DNG as rcam decodes it, beside the reference render and the best cascade at the same bpp.

    .venv/bin/python bench/side_by_side.py [DNG] [--lambda 0.01] [--look faithful] [--out docs/side_by_side.png]
        [--crops 3] [--crop 160] [--scale 2]

The cascade is the reference render compressed by JPEG, WebP, JPEG XL or AVIF at the quality whose file is
the largest not above rcam's (each codec's sweep, refined by bisection on its quality); of those, the one
with the highest PSNR is shown. Crops are taken where the reference is darkest, most detailed and at a
corner, the places a user looks at first; each is enlarged (nearest neighbour) so pixels can be judged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from rcam.codec.engine import decode_bytes, encode_file, tone_reference
from rcam.codec.output import quantize
from rcam.codec.rawio import reference_render
from rcam.codec.zoo import load_codec
from rcam.comparators.baselines import BASELINES, encode_decode
from rcam.measure.metrics import psnr


def best_cascade(reference: np.ndarray, max_bytes: int) -> tuple[str, float, int, np.ndarray]:
    """(codec label, quality, bytes, decoded) of the best-PSNR cascade whose file is at most max_bytes."""
    best = None
    for name, baseline in BASELINES.items():
        low, high = min(baseline.qualities), max(baseline.qualities)
        point = None
        for _ in range(12):  # bisection on the quality: the size grows with it
            middle = (low + high) / 2
            candidate = encode_decode(name, reference, round(middle))
            if candidate.num_bytes <= max_bytes:
                point, low = candidate, middle
            else:
                high = middle
            if high - low < 1:
                break
        if point is None:
            continue
        score = psnr(point.decoded, reference)
        if best is None or score > best[0]:
            best = (score, baseline.label, point)
    if best is None:
        raise SystemExit(f"no cascade fits in {max_bytes} bytes")
    _, label, point = best
    return label, point.quality, point.num_bytes, point.decoded


def crop_positions(reference: np.ndarray, size: int, count: int) -> list[tuple[int, int, str]]:
    """Top-left corners of the darkest, the most detailed and the corner crop (as many as `count`)."""
    height, width = reference.shape[:2]
    luma = reference.astype(np.float32).mean(axis=2)
    step = size // 2
    cells = [(top, left) for top in range(0, height - size + 1, step) for left in range(0, width - size + 1, step)]
    darkest = min(cells, key=lambda c: luma[c[0] : c[0] + size, c[1] : c[1] + size].mean())
    detail = np.abs(np.diff(luma, axis=1))
    busiest = max(cells, key=lambda c: detail[c[0] : c[0] + size, c[1] : c[1] + size - 1].mean())
    found = [(*darkest, "darkest"), (*busiest, "most detail"), (0, 0, "corner")]
    return found[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared/data/raw/canon550d_magiclantern_colorchart.dng"
    parser.add_argument("dng", nargs="?", default=str(default))
    parser.add_argument("--lambda", dest="lam", type=float, default=0.01)
    parser.add_argument("--look", default=None, help="default: faithful where the model has it (the reference is the file's render)")
    parser.add_argument("--model", default="rcam-small")
    parser.add_argument("--out", default="out/side_by_side.png")
    parser.add_argument("--crops", type=int, default=3)
    parser.add_argument("--crop", type=int, default=160, help="crop side in output pixels")
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour enlargement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--refine", type=int, default=0, help="refinement steps (rcam encode --refine; faithful look)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    codec = load_codec(args.model)
    look = args.look or ("faithful" if "faithful" in codec.model.config.looks else "clean")
    path = Path(args.dng)
    reference = reference_render(path)
    encoded = encode_file(codec, path, args.lam, reference=tone_reference(codec, path, look=look), look=look, refine_steps=args.refine)
    decoded = quantize(decode_bytes(codec, encoded.data), 8)
    pixels = reference.shape[0] * reference.shape[1]
    label, quality, cascade_bytes, cascade = best_cascade(reference, len(encoded.data))
    columns = [
        (f"rcam {look}, lambda {args.lam:g}{f', refine {args.refine}' if args.refine else ''}: {8 * len(encoded.data) / pixels:.3f} bpp, {psnr(decoded, reference):.2f} dB", decoded),
        ("reference render (LibRaw)", reference),
        (f"{label} q{quality:.0f}: {8 * cascade_bytes / pixels:.3f} bpp, {psnr(cascade, reference):.2f} dB", cascade),
    ]
    size, scale = args.crop, args.scale
    positions = crop_positions(reference, size, args.crops)
    header, gap = 18, 6
    sheet = Image.new("RGB", (3 * size * scale + 4 * gap, len(positions) * (size * scale + header) + gap + header), "white")
    draw = ImageDraw.Draw(sheet)
    for column, (title, _) in enumerate(columns):
        draw.text((gap + column * (size * scale + gap), 4), title, fill="black")
    for row, (top, left, what) in enumerate(positions):
        y = header + row * (size * scale + header)
        draw.text((gap, y + 2), f"{what} ({left}, {top})", fill="black")
        for column, (_, image) in enumerate(columns):
            crop = Image.fromarray(image[top : top + size, left : left + size]).resize((size * scale, size * scale), Image.NEAREST)
            sheet.paste(crop, (gap + column * (size * scale + gap), y + header - 4))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    for title, _ in columns:
        print(title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
