"""Benchmark: peak resident memory of encode and decode, per stage, at several frame sizes.

Issue 19's goal: at most 2 GiB at 24 MP and flat from 24 to 100 MP. For each --megapixels it makes a
synthetic DNG and runs, each side in a fresh process of its own, the stages of bench_codec.staged_encode (the
calls `rcam encode` makes, checked there against the command) and rcam.codec.batch.decode_one (`rcam decode`
itself: each tile entropy-decoded and synthesised on a worker, then blending, tone and PNG write streamed a tile
row at a time),
recording the process's resident memory when each stage ends and its peak (VmHWM) so far. Then the growth per megapixel
between the sizes tells which stage holds full-frame arrays.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_memory.py [--megapixels 24 48] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs), so each stage's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class MemoryStages:
    """bench_codec.Stages' interface, recording per stage (peak RSS during it, RSS after it) in MiB."""

    def __init__(self) -> None:
        self.memory: dict[str, tuple[float, float]] = {}

    @contextmanager
    def __call__(self, name: str):
        _reset_peak()
        yield
        self.memory[name] = (_status_mib("VmHWM"), _status_mib("VmRSS"))


def synthetic_dng(megapixels: float, folder: Path) -> Path:
    """A synthetic DNG of about `megapixels` (3:2) in `folder`, as bench_codec makes it."""
    from PIL import Image

    from rcam.demo import sample_scene
    from rcam.training.synth import make_pair

    width = int(round(math.sqrt(megapixels * 1e6 * 3 / 2) / 2) * 2)
    height = int(round(width * 2 / 3 / 2) * 2)
    Image.fromarray(sample_scene(height, width)).save(folder / "scene.png")
    return make_pair(folder / "scene.png", folder, np.random.default_rng(0), "bench").degraded


def one_side(side: str, dng: Path, rcb: Path, threads: int, model: str, tile: int) -> dict:
    """One side's stages' memory, in this (fresh) process: encode `dng` into `rcb`, or decode `rcb` to a PNG."""
    import torch

    sys.path.insert(0, str(BENCH))
    from bench_codec import staged_encode

    from rcam.codec.batch import DecodeSettings, decode_one
    from rcam.codec.engine import read_checked
    from rcam.codec.rawio import read_raw
    from rcam.codec.tiling import DEFAULT_OVERLAP
    from rcam.codec.zoo import load_codec

    torch.set_num_threads(threads)
    codec = load_codec(model, "cpu")
    stages = MemoryStages()
    start = _status_mib("VmRSS")
    if side == "encode":
        rcb.write_bytes(staged_encode(codec, dng, 0.01, tile, DEFAULT_OVERLAP, "clean", stages))
    else:
        # decode_one as `rcam decode` runs it: each tile entropy-decoded by the worker that synthesises it
        with stages("container read"):
            read_checked(codec, rcb.read_bytes())
        with tempfile.TemporaryDirectory() as folder, stages("decode to PNG (streamed)"):
            decode_one(DecodeSettings(8, 95, False), codec, rcb, Path(folder) / "out.png")
    image = read_raw(dng)
    return {"megapixels": image.width * image.height / 1e6, "start": start, side: stages.memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, nargs="+", default=[24.0, 48.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--model", default="rcam-small")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # child: side, DNG, .rcb; JSON on stdout
    args = parser.parse_args()
    if args.one:
        from rcam.codec.allocator import tune_allocator
        from rcam.codec.blas import single_threaded_blas

        tune_allocator()  # as the rcam command runs
        single_threaded_blas()
        side, dng, rcb = args.one
        print(json.dumps(one_side(side, Path(dng), Path(rcb), args.threads, args.model, args.tile)))
        return
    results = []
    for megapixels in args.megapixels:
        print(f"{megapixels} MP ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as folder:
            dng = synthetic_dng(megapixels, Path(folder))
            result = {}
            for side in ("encode", "decode"):
                child = subprocess.run(
                    [sys.executable, __file__, "--one", side, str(dng), str(Path(folder) / "bench.rcb"), "--threads", str(args.threads),
                     "--tile", str(args.tile), "--model", args.model],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                reported = json.loads(child.stdout.strip().splitlines()[-1])
                result.update(reported, **{f"{side}_start": reported["start"]})
        results.append(result)
    sizes = "".join(f" {r['megapixels']:>6.1f}MP pk/after" for r in results)
    print(f"\nresident memory, MiB (peak during the stage / after it), threads {args.threads}, tile {args.tile}")
    for side in ("encode", "decode"):
        print(f"\n{side + ' stage':<26}{sizes}" + ("   MiB/MP of peak" if len(results) > 1 else ""))
        start_key = f"{side}_start"
        print(f"  {'(before)':<24}" + "".join(f" {r[start_key]:>17.0f}" for r in results))
        for stage in results[0][side]:
            cells = "".join(f" {r[side][stage][0]:>8.0f}/{r[side][stage][1]:<8.0f}" for r in results)
            slope = ""
            if len(results) > 1:
                first, last = results[0], results[-1]
                slope = f"{(last[side][stage][0] - first[side][stage][0]) / (last['megapixels'] - first['megapixels']):8.1f}"
            print(f"  {stage:<24}{cells}{slope}")
        peaks = [max(p for p, _ in r[side].values()) for r in results]
        print(f"  {'peak':<24}" + "".join(f" {p:>17.0f}" for p in peaks))


if __name__ == "__main__":
    main()
