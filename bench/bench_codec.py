"""Benchmark: where encode and decode spend their time, stage by stage, beside the develop-then-compress cascade.

On a synthetic DNG of --megapixels it prints:
  - whole commands: `rcam encode` and `rcam decode` as separate processes (model loading included), wall time
    and peak memory;
  - the stages, in this process, called in the order rcam.codec.engine.encode_file and rcam.codec.batch.decode_one
    call them (RAW read, metadata, analysis, reference render, hyper path, entropy coding, the tone fit (its
    synthesis, blending and fit, a tile row at a time), container write; container read, entropy decoding,
    synthesis, blending, tone, image write (quantise, PNG filter and zlib, a tile row at a time)).
    The staged bytes and pixels are checked against the commands' outputs, so the table cannot drift from
    what the codec does (exit status 1 if it has);
  - the cascade a user runs today: LibRaw's render + JPEG XL (effort 7) encode, and JPEG XL decode + the same
    PNG write; and the ratios rcam / cascade for encode, decode and the round trip.

Stages are split here that the codec overlaps: each worker thread runs the hyper path and range-codes the tiles
it ran, side by side, the reference render runs on its own thread beside the analysis, and in
decoding each worker entropy-decodes the tile it then synthesises, while the main thread blends and tones tiles
and a third thread compresses the PNG.
The stage totals are therefore more than the codec's own wall time, which is measured too (encode_file, and
decode_one, in this process) and is what the ratios use. The cascade writes its PNG with libpng (imagecodecs).

    .venv/bin/python bench/bench_codec.py [--megapixels 24] [--lambda 0.01] [--threads 2] [--tile 512] [--precision auto]
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path

import imagecodecs
import numpy as np
import torch
from PIL import Image

from rcam.codec import container
from rcam.codec.allocator import tune_allocator
from rcam.codec.blas import single_threaded_blas
from rcam.codec.engine import (
    _header,
    analyse_image,
    analysis_input,
    check_lambda,
    check_model,
    blended_rows,
    decode_latents,
    encode_file,
    entropy_code,
    fit_header_tone,
    hyper_path,
    read_checked,
    synthesise_tiles,
    tone_reference,
)  # fmt: skip
from rcam.codec.batch import DecodeSettings, decode_one
from rcam.codec.metadata import Metadata, check_metadata, png_chunks, read_metadata, upright
from rcam.codec.output import PNG_LEVEL, PngStream, _iccp_chunk, _png_with_icc, quantize, srgb_icc_profile, write_atomic
from rcam.codec.rawio import read_raw, reference_render
from rcam.codec.tiling import DEFAULT_OVERLAP
from rcam.codec.tone import apply_tone
from rcam.codec.zoo import load_codec
from rcam.demo import sample_scene
from rcam.measure.evaluate import timed_command
from rcam.training.synth import make_pair


class Stages:
    """Wall seconds per named stage, in the order first timed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def total(self) -> float:
        return sum(self.seconds.values())


def staged_encode(codec, dng: Path, lam: float, tile: int, overlap: int, look: str, stages: Stages) -> bytes:
    """rcam.codec.engine.encode_file with metadata and tone fit, as `rcam encode` runs it, one timed stage at a time."""
    with stages("RAW read"):
        image = read_raw(dng)
    with stages("metadata read"):
        captured = read_metadata(dng)
    with stages("analysis"):  # the normalisation written over the raw planes, as encode_file does
        analysis = analyse_image(codec, image, tile, overlap, 1, look, analysis_input(codec, image, overwrite=True))
    with stages("reference render"):
        reference = tone_reference(codec, dng, image, look, analysis.thumbnail)
    lam = check_lambda(lam)
    with stages("hyper path"):  # rcam.codec.engine._code, its network part
        hyper_out = list(hyper_path(codec, analysis, lam))
    with stages("entropy coding"):  # rcam.codec.engine._code, its coding part
        streams, latents = entropy_code(codec, hyper_out)
    header = _header(codec, analysis, lam, check_metadata(captured))
    with stages("tone fit"):  # synthesis of every other tile, blended and fitted a tile row at a time
        tone = fit_header_tone(codec, header, latents, reference)
    with stages("container write"):
        return container.write(replace(header, tone=tone), streams)


def staged_decode(codec, data: bytes, target: Path, stages: Stages) -> bytes:
    """rcam.codec.batch.decode_one (decoded_bands streamed into write_image), one timed stage at a time and with
    nothing overlapped: every tile synthesised first, then each tile row blended, toned, quantised and added to
    the PNG in turn; returns the PNG bytes."""
    with stages("container read"):
        header, streams = read_checked(codec, data)
        metadata = upright(Metadata(header.exif, header.xmp))
    with stages("entropy decoding"):
        latents = decode_latents(codec, header, streams)
    with stages("synthesis"):  # decoded_bands, its network part
        with closing(synthesise_tiles(codec, header, latents)) as results:
            tile_images = list(results)
    assert header.flip == 0, "the bench frame is upright, so rcam decode streams it"
    buffer = io.BytesIO()
    with stages("image write (PNG)"):
        stream = PngStream(buffer, header.output_height, header.output_width, 8, _iccp_chunk(srgb_icc_profile()) + png_chunks(metadata))
    bands = blended_rows(header, tile_images)
    while True:
        with stages("blending"):  # decoded_bands, its canvas part
            top, rows, _ = next(bands, (None, None, None))
        if rows is None:
            break
        with stages("tone"):
            band = apply_tone(rows.clamp_(0.0, 1.0).numpy(), header.tone, top, header.sensor_height)
        with stages("image write (PNG)"):  # write_image: quantise, filter, compress
            stream.add(quantize(band, 8))
    with stages("image write (PNG)"):
        stream.close()
        write_atomic(target, buffer.getvalue())
    return buffer.getvalue()


def cascade(dng: Path, folder: Path, threads: int, encode_stages: Stages, decode_stages: Stages) -> bytes:
    """LibRaw render + JPEG XL e7 encode (+ file write); JPEG XL decode + a PNG write (libpng, rcam's zlib level)."""
    with encode_stages("LibRaw render"):
        render = reference_render(dng)
    with encode_stages("JPEG XL e7 encode"):
        jxl = imagecodecs.jpegxl_encode(render, level=90, effort=7, numthreads=threads)
        write_atomic(folder / "c.jxl", jxl)
    with decode_stages("JPEG XL decode"):
        pixels = imagecodecs.jpegxl_decode((folder / "c.jxl").read_bytes(), numthreads=threads)
    with decode_stages("image write (PNG)"):  # libpng, as the cascade's own tools write it
        write_atomic(folder / "c.png", _png_with_icc(imagecodecs.png_encode(pixels, level=PNG_LEVEL), srgb_icc_profile()))
    return jxl


def print_stages(title: str, stages: Stages, megapixels: float) -> None:
    total = stages.total()
    print(f"\n{title:<26} {'s':>8} {'s/MP':>7} {'share':>6}")
    for name, seconds in stages.seconds.items():
        print(f"  {name:<24} {seconds:8.3f} {seconds / megapixels:7.3f} {seconds / total:6.1%}")
    print(f"  {'total':<24} {total:8.3f} {total / megapixels:7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=24.0)
    parser.add_argument("--lambda", dest="lam", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--model", default="rcam-small")
    parser.add_argument("--look", default="clean")
    parser.add_argument("--precision", default="auto", help="the transforms' precision (rcam --precision)")
    args = parser.parse_args()
    tune_allocator()  # the codec and the cascade in process run under the malloc settings the rcam command uses
    single_threaded_blas()  # and its BLAS threads
    torch.set_num_threads(args.threads)

    rcam = str(Path(sys.executable).parent / "rcam")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        width = int(round(math.sqrt(args.megapixels * 1e6 * 3 / 2) / 2) * 2)
        height = int(round(width * 2 / 3 / 2) * 2)
        print(f"making a synthetic {width}x{height} DNG ({width * height / 1e6:.1f} MP) ...", flush=True)
        Image.fromarray(sample_scene(height, width)).save(folder / "scene.png")
        dng = make_pair(folder / "scene.png", folder, np.random.default_rng(0), "bench").degraded
        megapixels = width * height / 1e6

        common = ["--threads", str(args.threads), "--model", args.model, "--device", "cpu", "--precision", args.precision, "-q"]
        encode_s, encode_mib = timed_command([rcam, "encode", str(dng), "-o", str(folder / "b.rcb"), "--lambda", str(args.lam), "--tile", str(args.tile), "--look", args.look, *common])
        decode_s, decode_mib = timed_command([rcam, "decode", str(folder / "b.rcb"), "-o", str(folder / "b.png"), *common])
        size = (folder / "b.rcb").stat().st_size

        start = time.perf_counter()
        codec = load_codec(args.model, "cpu", precision=args.precision)
        print(f"transforms in {codec.precision}")
        load_s = time.perf_counter() - start
        encode_stages, decode_stages = Stages(), Stages()
        data = staged_encode(codec, dng, args.lam, args.tile, DEFAULT_OVERLAP, args.look, encode_stages)
        png = staged_decode(codec, data, folder / "s.png", decode_stages)
        same_bytes = data == (folder / "b.rcb").read_bytes()
        same_pixels = np.array_equal(imagecodecs.png_decode(png), imagecodecs.png_decode((folder / "b.png").read_bytes()))
        start = time.perf_counter()  # the codec as rcam encode / rcam decode run it, stages overlapped
        write_atomic(folder / "w.rcb", encode_file(codec, dng, args.lam, metadata=read_metadata, tile=args.tile, look=args.look).data)
        encode_wall = time.perf_counter() - start
        same_bytes &= (folder / "w.rcb").read_bytes() == data
        start = time.perf_counter()
        decode_one(DecodeSettings(8, 95, False), codec, folder / "w.rcb", folder / "w.png")
        decode_wall = time.perf_counter() - start
        same_pixels &= (folder / "w.png").read_bytes() == png
        cascade_encode, cascade_decode = Stages(), Stages()
        jxl = cascade(dng, folder, args.threads, cascade_encode, cascade_decode)

    pixels = width * height
    print(f"\nimage           {width}x{height} = {megapixels:.1f} MP, threads {args.threads}, tile {args.tile}, lambda {args.lam}, model {args.model}, look {args.look}")
    print(f"rcam encode     {encode_s:7.2f} s  ({encode_s / megapixels:.2f} s/MP)  peak RSS {encode_mib:7.0f} MiB  -> {size} bytes, {8 * size / pixels:.3f} bpp  (whole command)")
    print(f"rcam decode     {decode_s:7.2f} s  ({decode_s / megapixels:.2f} s/MP)  peak RSS {decode_mib:7.0f} MiB  (whole command)")
    print(f"JPEG XL e7 q90  -> {len(jxl)} bytes, {8 * len(jxl) / pixels:.3f} bpp")
    print(f"model load      {load_s:7.2f} s  (in process; not in the stage totals)")
    overhead = [command - stages.total() for command, stages in ((encode_s, encode_stages), (decode_s, decode_stages))]
    print(f"outside stages  {overhead[0]:7.2f} s encode, {overhead[1]:.2f} s decode  (whole command less its stages: interpreter start, imports, model load)")
    print_stages("rcam encode stages", encode_stages, megapixels)
    print_stages("rcam decode stages", decode_stages, megapixels)
    print_stages("cascade encode", cascade_encode, megapixels)
    print_stages("cascade decode", cascade_decode, megapixels)
    rows = [
        ("encode", encode_wall, cascade_encode.total()),
        ("decode", decode_wall, cascade_decode.total()),
        ("round trip", encode_wall + decode_wall, cascade_encode.total() + cascade_decode.total()),
    ]
    print(f"\nstage totals   encode {encode_stages.total():.3f} s, decode {decode_stages.total():.3f} s; the codec, stages overlapped: {encode_wall:.3f} s, {decode_wall:.3f} s")
    print(f"\n{'in process':<12} {'rcam s':>8} {'cascade s':>10} {'rcam/cascade':>13}")
    for name, ours, theirs in rows:
        print(f"  {name:<10} {ours:8.3f} {theirs:10.3f} {ours / theirs:12.1f}x")
    print(f"\nstaged and in-process runs reproduce `rcam encode`'s bytes: {'yes' if same_bytes else 'NO'}; `rcam decode`'s pixels: {'yes' if same_pixels else 'NO'}")
    if not (same_bytes and same_pixels):
        print("the stages above no longer follow rcam.codec.engine: update staged_encode / staged_decode", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
