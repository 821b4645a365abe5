"""Benchmark: whole-command encode / decode time and peak memory on a synthetic 24-megapixel DNG.

Prints rcam encode and decode (each a separate `rcam` process: model loading included), and beside them the
cascade a user runs today: LibRaw's reference render plus a JPEG XL encode (effort 7) of it.

    .venv/bin/python bench/bench_codec.py [--megapixels 24] [--lambda 0.01] [--threads 2] [--tile 512]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image

from rcam.demo import sample_scene
from rcam.evaluate import timed_command
from rcam.rawio import reference_render
from rcam.synth import make_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=24.0)
    parser.add_argument("--lambda", dest="lam", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--model", default="rcam-small")
    args = parser.parse_args()

    rcam = str(Path(sys.executable).parent / "rcam")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        width = int(round(math.sqrt(args.megapixels * 1e6 * 3 / 2) / 2) * 2)
        height = int(round(width * 2 / 3 / 2) * 2)
        print(f"making a synthetic {width}x{height} DNG ({width * height / 1e6:.1f} MP) ...", flush=True)
        Image.fromarray(sample_scene(height, width)).save(folder / "scene.png")
        dng = make_pair(folder / "scene.png", folder, np.random.default_rng(0), "bench").degraded

        common = ["--threads", str(args.threads), "--model", args.model, "--device", "cpu", "-q"]
        encode_s, encode_mib = timed_command([rcam, "encode", str(dng), "-o", str(folder / "b.rcb"), "--lambda", str(args.lam), "--tile", str(args.tile), *common])
        decode_s, decode_mib = timed_command([rcam, "decode", str(folder / "b.rcb"), "-o", str(folder / "b.png"), *common])
        size = (folder / "b.rcb").stat().st_size

        start = time.perf_counter()
        render = reference_render(dng)
        render_s = time.perf_counter() - start
        start = time.perf_counter()
        jxl = imagecodecs.jpegxl_encode(render, level=90, effort=7, numthreads=args.threads)
        jxl_s = time.perf_counter() - start

    megapixels = width * height / 1e6
    print(f"image           {width}x{height} = {megapixels:.1f} MP, threads {args.threads}, tile {args.tile}, lambda {args.lam}")
    print(f"rcam encode     {encode_s:7.1f} s  ({encode_s / megapixels:.2f} s/MP)  peak RSS {encode_mib:7.0f} MiB  -> {size} bytes, {8 * size / (width * height):.3f} bpp")
    print(f"rcam decode     {decode_s:7.1f} s  ({decode_s / megapixels:.2f} s/MP)  peak RSS {decode_mib:7.0f} MiB")
    print(f"LibRaw render   {render_s:7.1f} s  ({render_s / megapixels:.2f} s/MP)  (in process)")
    print(f"JPEG XL e7 q90  {jxl_s:7.1f} s  ({jxl_s / megapixels:.2f} s/MP)  -> {len(jxl)} bytes, {8 * len(jxl) / (width * height):.3f} bpp")
    print(f"cascade total   {render_s + jxl_s:7.1f} s  ({(render_s + jxl_s) / megapixels:.2f} s/MP)")


if __name__ == "__main__":
    main()
