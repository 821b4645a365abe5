"""Benchmark: throughput of `rcam encode` and `rcam decode` over a folder of many small files, --jobs 1 against
more worker processes.

Makes --files synthetic DNGs of --height x --width (distinct scenes), then runs each whole command once per
--jobs value (every run a fresh process: interpreter start, imports and model loading included, as a user
pays them) and prints wall time, files per second and the speed-up over the first --jobs value. The outputs of
every run are checked against the first run's: .rcb bytes and decoded pixels identical (exit status 1 if not).

    .venv/bin/python bench/bench_batch.py [--files 40] [--height 256] [--width 384] [--jobs 1,2] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image

from rcam.demo import sample_scene
from rcam.measure.evaluate import timed_command
from rcam.training.synth import make_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--jobs", default="1,2", help="comma-separated --jobs values; the first is the reference")
    parser.add_argument("--threads", type=int, default=1, help="--threads (per worker when --jobs > 1)")
    parser.add_argument("--model", default="rcam-small")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.01)
    args = parser.parse_args()
    jobs_values = [int(v) for v in args.jobs.split(",")]

    rcam = str(Path(sys.executable).parent / "rcam")
    same = True
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        raws, scratch = folder / "raw", folder / "scratch"
        raws.mkdir()
        scratch.mkdir()
        print(f"making {args.files} synthetic {args.width}x{args.height} DNGs ...", flush=True)
        for number in range(args.files):
            Image.fromarray(sample_scene(args.height, args.width, seed=number)).save(scratch / f"scene{number:03d}.png")
            pair = make_pair(scratch / f"scene{number:03d}.png", scratch, np.random.default_rng(number), f"f{number:03d}")
            pair.degraded.rename(raws / f"f{number:03d}.dng")
        common = ["--model", args.model, "--threads", str(args.threads), "--device", "cpu", "-q"]
        reference: dict[str, bytes] = {}
        for jobs in jobs_values:
            rcb, png = folder / f"rcb{jobs}", folder / f"png{jobs}"
            rcb.mkdir()
            png.mkdir()
            encode_s, encode_mib = timed_command([rcam, "encode", raws, "--out-dir", rcb, "--lambda", str(args.lam), "--jobs", str(jobs), *common])
            decode_s, decode_mib = timed_command([rcam, "decode", rcb, "--out-dir", png, "--jobs", str(jobs), *common])
            # .rcb files byte for byte; images by their pixels (the PNG's sRGB profile holds its creation time).
            outputs = {p.name: p.read_bytes() for p in rcb.iterdir()} | {p.name: imagecodecs.png_decode(p.read_bytes()).tobytes() for p in png.iterdir()}
            reference = reference or outputs
            differ = sorted(name for name in reference.keys() | outputs.keys() if reference.get(name) != outputs.get(name))
            if differ:
                print(f"--jobs {jobs}: {len(differ)} outputs differ from --jobs {jobs_values[0]}'s: {' '.join(differ[:8])}", file=sys.stderr)
                same = False
            rows.append((jobs, encode_s, decode_s))

    print(f"\n{args.files} files of {args.width}x{args.height}, model {args.model}, --threads {args.threads}, lambda {args.lam}")
    print(f"{'jobs':>4} {'encode s':>9} {'files/s':>8} {'speed-up':>9} {'decode s':>9} {'files/s':>8} {'speed-up':>9}")
    _, first_encode, first_decode = rows[0]
    for jobs, encode_s, decode_s in rows:
        print(
            f"{jobs:>4} {encode_s:9.2f} {args.files / encode_s:8.2f} {first_encode / encode_s:8.2f}x"
            f" {decode_s:9.2f} {args.files / decode_s:8.2f} {first_decode / decode_s:8.2f}x"
        )
    print(f"outputs identical across --jobs: {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
