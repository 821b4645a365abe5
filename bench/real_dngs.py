"""bpp and PSNR (against the reference render) of rcam on every DNG in a folder, at several λ.

    .venv/bin/python bench/real_dngs.py [../shared/data/raw] [--lambdas 0.005,0.01,0.025] [--model rcam-small]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rcam.codec import decode_bytes, encode_file
from rcam.metrics import psnr
from rcam.output import quantize
from rcam.rawio import reference_render
from rcam.zoo import load_codec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared/data/raw"))
    parser.add_argument("--lambdas", default="0.005,0.01,0.025")
    parser.add_argument("--model", default="rcam-small")
    args = parser.parse_args()
    codec = load_codec(args.model)
    print(f"model {codec.name} ({codec.digest.hex()[:12]})")
    print(f"{'file':45s} {'lambda':>7s} {'bytes':>8s} {'bpp':>7s} {'PSNR dB':>8s} {'enc s':>6s} {'dec s':>6s}")
    for path in sorted(Path(args.folder).glob("*.dng")):
        reference = reference_render(path)
        for lam in (float(v) for v in args.lambdas.split(",")):
            start = time.perf_counter()
            encoded = encode_file(codec, path, lam)
            middle = time.perf_counter()
            decoded = quantize(decode_bytes(codec, encoded.data), 8)
            end = time.perf_counter()
            bpp = 8 * len(encoded.data) / (reference.shape[0] * reference.shape[1])
            print(f"{path.name:45s} {lam:7.4f} {len(encoded.data):8d} {bpp:7.4f} {psnr(decoded, reference):8.2f} {middle - start:6.1f} {end - middle:6.1f}")


if __name__ == "__main__":
    main()
