"""Benchmark: rcam's decode seconds per megapixel beside a learned peer's, CompressAI's bmshj2018-hyperprior.

Issue 19's goal: decode no slower per megapixel than bmshj2018-hyperprior (Ballé et al. 2018, ScaleHyperprior
with N=128, M=192; untrained weights: only the time counts) on the same pixels and threads. The peer codes the
same frame the way rcam does, so neither is favoured by its tiling: the same tile plan (rcam.tiling: tiles of
2·tile output pixels, overlapping by 2·overlap), each tile on one intra-op thread and --threads tiles at once
(rcam.codec.map_tiles), the tiles' outputs blended into one canvas with rcam's ramps. Its decode is
CompressAI's decompress (entropy decoding of z and y + hyper and main synthesis) per tile, then the blend.
rcam's decode is rcam.codec.decode_bytes (entropy decoding, synthesis, blending, tone, orientation) of the
frame's .rcb. Neither writes an image (the same cost for both). The two run interleaved, --repeats times,
and the medians are printed.

    nice -n 10 .venv/bin/python bench/bench_peer.py [--megapixels 24] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rcam.codec.allocator import tune_allocator
from rcam.codec.blas import single_threaded_blas
from rcam.codec import engine as rcam_codec
from rcam.codec.tiling import DEFAULT_OVERLAP, blend_weights, crop_tile, plan_tiles
from rcam.codec.zoo import load_codec
from rcam.demo import sample_scene
from rcam.training.synth import make_pair


def peer_model():
    """bmshj2018-hyperprior's architecture (N=128, M=192), untrained, its entropy tables built."""
    from compressai.models import ScaleHyperprior

    torch.manual_seed(0)
    model = ScaleHyperprior(128, 192).eval()
    model.update(force=True)
    return model


def peer_encode(model, scene: torch.Tensor, tiles, threads: int) -> list[dict]:
    """(3, H, W) sRGB frame -> CompressAI's compress output per tile (tiles in output pixels)."""

    def compress(tile):
        return model.compress(crop_tile(scene, tile)[None])

    with closing(rcam_codec.map_tiles(torch.device("cpu"), compress, tiles)) as results:
        return list(results)


def peer_decode(model, streams: list[dict], tiles, extent: tuple[int, int], overlap: int) -> torch.Tensor:
    """CompressAI's decompress of every tile (map_tiles: threads tiles at once) blended as rcam blends: (3, H, W)."""

    def decompress(compressed):
        return model.decompress(compressed["strings"], compressed["shape"])["x_hat"][0]

    canvas = torch.zeros(3, *extent)
    weight_sum = torch.zeros(extent)
    with closing(rcam_codec.map_tiles(torch.device("cpu"), decompress, streams)) as results:
        for tile, image in zip(tiles, results):
            weights = blend_weights(tile, extent, overlap, scale=1)
            rows, cols = slice(tile.top, tile.top + tile.height), slice(tile.left, tile.left + tile.width)
            canvas[:, rows, cols] += image * weights
            weight_sum[rows, cols] += weights
    return canvas.div_(weight_sum.clamp_min_(1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=24.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=512, help="rcam's tile, packed pixels (the peer's is twice it in output pixels)")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.01)
    parser.add_argument("--model", default="rcam-small")
    args = parser.parse_args()
    tune_allocator()  # rcam and the peer alike, under the malloc settings the rcam command uses
    single_threaded_blas()  # and its BLAS threads
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        width = int(round(math.sqrt(args.megapixels * 1e6 * 3 / 2) / 2) * 2)
        height = int(round(width * 2 / 3 / 2) * 2)
        print(f"making a synthetic {width}x{height} DNG ({width * height / 1e6:.1f} MP) and encoding it ...", file=sys.stderr, flush=True)
        pixels = sample_scene(height, width)
        Image.fromarray(pixels).save(folder / "scene.png")
        dng = make_pair(folder / "scene.png", folder, np.random.default_rng(0), "bench").degraded
        codec = load_codec(args.model, "cpu")
        data = rcam_codec.encode_file(codec, dng, args.lam, tile=args.tile).data
    header, _ = rcam_codec.container.read(data)
    megapixels = header.output_height * header.output_width / 1e6

    # The peer's tiles: rcam's plan over the frame, in output pixels (rcam's packed plan scaled by 2).
    packed = plan_tiles(-(-height // 2), -(-width // 2), args.tile, DEFAULT_OVERLAP)
    tiles = [type(t)(2 * t.top, 2 * t.left, 2 * t.height, 2 * t.width) for t in packed]
    extent = (tiles[-1].top + tiles[-1].height, tiles[-1].left + tiles[-1].width)
    scene = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)
    peer = peer_model()
    print(f"encoding {len(tiles)} tiles of {tiles[0].height}x{tiles[0].width} with the peer ...", file=sys.stderr, flush=True)
    streams = peer_encode(peer, scene, tiles, args.threads)
    peer_bytes = sum(len(s) for c in streams for strings in c["strings"] for s in strings)

    rcam_times, peer_times = [], []
    for round_ in range(args.repeats):
        start = time.perf_counter()
        rcam_codec.decode_bytes(codec, data)
        rcam_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        peer_decode(peer, streams, tiles, extent, 2 * DEFAULT_OVERLAP)
        peer_times.append(time.perf_counter() - start)
        print(f"round {round_ + 1}/{args.repeats}: rcam {rcam_times[-1]:.2f} s, peer {peer_times[-1]:.2f} s", file=sys.stderr, flush=True)

    # How much of the peer's decode its untrained entropy model takes: one tile, one thread, decompress vs g_s.
    with rcam_codec.one_thread(), torch.inference_mode():
        start = time.perf_counter()
        y_hat = peer.decompress(streams[0]["strings"], streams[0]["shape"])["x_hat"]
        decompress_s = time.perf_counter() - start
        y_hat = peer.gaussian_conditional.dequantize(peer.gaussian_conditional.quantize(peer.g_a(crop_tile(scene, tiles[0])[None]), "symbols"))
        start = time.perf_counter()
        peer.g_s(y_hat)
        synthesis_s = time.perf_counter() - start

    ours, theirs = statistics.median(rcam_times), statistics.median(peer_times)
    print(f"\n{width}x{height} = {megapixels:.1f} MP, {len(tiles)} tiles of {tiles[0].height}x{tiles[0].width} output pixels, threads {args.threads}, median of {args.repeats}")
    print(f"{'decoder':<34} {'s':>7} {'s/MP':>7} {'bytes':>10}")
    print(f"{'rcam ' + args.model + ' (decode_bytes)':<34} {ours:7.2f} {ours / megapixels:7.3f} {len(data):10d}")
    print(f"{'bmshj2018-hyperprior N128 M192':<34} {theirs:7.2f} {theirs / megapixels:7.3f} {peer_bytes:10d}  (untrained)")
    print(f"rcam / peer: {ours / theirs:.2f}x  (goal: <= 1.00x)")
    print(f"peer, one tile on one thread: decompress {decompress_s:.2f} s, of which its synthesis g_s about {synthesis_s:.2f} s")


if __name__ == "__main__":
    main()
