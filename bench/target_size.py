"""How close `rcam encode --bpp` lands: target vs achieved bpp on RAW files, with the λ the search chose.

    python bench/target_size.py ../shared/data/raw/*.dng cache/synth_val/*.dng --targets 0.2,0.35,0.5,0.75,1,1.5

Each file is read, analysed and rendered once; each target then runs the same search and exact encode as
`rcam encode --bpp` (rcam.codec.engine.lambda_for_size, encode_analysed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rcam.codec.engine import analyse_image, encode_analysed, lambda_for_size, tone_reference
from rcam.codec.rawio import read_raw
from rcam.codec.tone import FIELD_KNOTS
from rcam.codec.zoo import DEFAULT_MODEL, load_codec
from rcam.errors import RcamError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--targets", default="0.2,0.35,0.5,0.75,1,1.5")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    codec = load_codec(args.model)
    targets = [float(t) for t in args.targets.split(",")]
    print("| file | target bpp | achieved bpp | error % | λ | search s |")
    print("|---|---|---|---|---|---|")
    errors = []
    for path in args.files:
        image = read_raw(path)
        pixels = image.output_size[0] * image.output_size[1]
        analysis = analyse_image(codec, image)
        reference = tone_reference(codec, path, image)
        for target in targets:
            start = time.perf_counter()
            try:
                lam, _ = lambda_for_size(codec, analysis, round(target * pixels / 8))
            except RcamError as error:
                print(f"| {path.name} | {target} | unreachable: {error} | | | |")
                continue
            seconds = time.perf_counter() - start
            achieved = 8 * len(encode_analysed(codec, analysis, lam, reference, knot_choices=(FIELD_KNOTS,)).data) / pixels
            error = 100 * (achieved - target) / target
            errors.append(abs(error))
            print(f"| {path.name} | {target} | {achieved:.4f} | {error:+.2f} | {lam:.5g} | {seconds:.1f} |", flush=True)
    if errors:
        print(f"\n{len(errors)} reachable targets: largest |error| {max(errors):.2f}%, mean {sum(errors) / len(errors):.2f}%")


if __name__ == "__main__":
    main()
