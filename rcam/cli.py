"""The `rcam` command line: a thin layer over rcam.codec.engine, rcam.codec.container, rcam.codec.output and friends.

Exit status: 0 success, 2 bad input or usage (one line per problem on stderr, no traceback), 1 internal error,
130 interrupted. Commands that take many inputs keep going past bad files and report them at the end.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import sys
from pathlib import Path

import click
import torch

from rcam.codec import container
from rcam.codec.allocator import tune_allocator
from rcam.codec.blas import single_threaded_blas
from rcam.codec.batch import (
    BatchFailed,
    DecodeSettings,
    Done,
    EncodeSettings,
    Summary,
    decode_one,
    encode_one,
    expand_inputs,
    output_path,
    plan_outputs,
    read_input,
    run_batch,
    worker_threads,
)  # fmt: skip
from rcam.codec.engine import check_refinement, decode_bytes, encode_file, tone_reference
from rcam.codec.metadata import Metadata, summary
from rcam.codec.tiling import DEFAULT_OVERLAP, DEFAULT_TILE
from rcam.codec.tone import describe_tone
from rcam.codec.tone_coding import tone_code_summary
from rcam.codec.zoo import DEFAULT_MODEL, PRECISIONS, load_codec, resolve_precision, resolve_weights
from rcam.comparators import END_TO_END
from rcam.comparators.baselines import baseline_names, get_baseline
from rcam.errors import RcamError
from rcam.training.train import resolve_device

RAW_SUFFIXES = {".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".pef", ".srw", ".nrw", ".3fr", ".iiq", ".erf"}


SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str) -> int:
    """A file size such as 2MB, 500kB, 1.5MiB or 123456 (bytes) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and SIZE_UNITS.get(match.group(2).lower())
    if not unit:
        raise RcamError(f"--size {text!r}: expected a number of bytes with an optional unit (kB, MB, GB, KiB, MiB, GiB)")
    size = round(float(match.group(1)) * unit)
    if size < 1:
        raise RcamError(f"--size {text!r}: must be at least one byte")
    return size


def check_out_dir(out_dir: str | None) -> None:
    """An --out-dir must exist: checked once, before any work, so a batch fails with one line, not one per input."""
    if out_dir and not Path(out_dir).is_dir():
        raise RcamError(f"--out-dir {out_dir}: folder does not exist")


device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where the network runs.")
model_option = click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True, help="Model name from weights/manifest.json, or a .safetensors file.")
precision_option = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
    help="What the network computes in. auto: bfloat16 on a CPU with native bfloat16 (AMX, AVX-512 BF16; about 1.8x faster, "
    "0.01-0.03 dB), else float32. Decoders on machines that differ here differ by about 0.3 levels RMS; float32 for the "
    "least drift between machine types.",
)  # fmt: skip
refine_option = click.option(
    "--refine", "refine_steps", type=click.IntRange(0, 1000), default=0, show_default=True,
    help="Faithful look, at a --lambda: optimise each tile's latents against LibRaw's render of the file for this many "
    "gradient steps before coding (60 steps: 18% fewer bytes than JPEG at equal PSNR on the real DNGs, where the plain "
    "encode needs as many). Slow: about 1.3 s a step for each 512x512-packed tile on one CPU thread (--threads tiles at once).",
)
threads_option = click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads: that many tiles at once, each on one (default: torch's choice); the output does not depend on it.")
force_option = click.option("--force", is_flag=True, help="Overwrite existing outputs.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="Print only errors.")
jobs_option = click.option("--jobs", "-j", type=click.IntRange(1, 256), default=1, show_default=True, help="Worker processes, each coding one file at a time with its own copy of the model (--threads is then per worker); the outputs do not depend on it.")
recursive_option = click.option("--recursive", "-r", is_flag=True, help="Take the files in a folder's subfolders too; with --out-dir the subfolders are mirrored there.")
cluster_option = click.option("--cluster", metavar="ADDRESS", default=None, help="Run the files on the workers of the Dask scheduler at ADDRESS (tcp://host:8786) instead of here; needs pip install 'rcam[cluster]', and every worker needs rcam, the model's weights and the files under the same paths.")
skip_existing_option = click.option("--skip-existing", is_flag=True, help="Skip inputs whose output exists (an interrupted batch resumes where it stopped).")


def _setup(device: str, threads: int | None):
    if threads:
        torch.set_num_threads(threads)
    return resolve_device(device)


def on_cluster(address: str, model_name: str, device: str, threads: int | None, precision: str, quiet: bool):
    """run_batch's runner for the Dask cluster at `address`; RcamError when the cluster extra is not installed."""
    try:
        from rcam.codec.cluster import run_on_cluster
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in ("dask", "distributed"):
            raise
        raise RcamError("--cluster needs Dask distributed, an optional extra: pip install 'rcam[cluster]'") from None
    resolve_weights(model_name)  # a missing model is found here, once, before any file goes out
    return functools.partial(run_on_cluster, address, model_name, device, threads, precision, quiet)


def run_files(
    items, suffix: str, work, verb: str, *, output, out_dir, force, skip_existing, recursive, model_name, device, threads,
    jobs, quiet, cluster=None, precision="auto",
) -> None:  # fmt: skip
    """The shared part of encode and decode: plan the outputs, load the model here, in `jobs` workers or on the
    `cluster`'s workers, run."""
    if skip_existing and force:
        raise RcamError("--skip-existing keeps existing outputs, --force overwrites them: give one")
    if cluster and jobs > 1:
        raise RcamError("--jobs starts workers on this machine, --cluster uses the cluster's: give one")
    # The extra's absence is a usage error found before anything is planned.
    distribute = on_cluster(cluster, model_name, device, threads, precision, quiet) if cluster else None
    check_out_dir(out_dir)
    many = len(items) > 1
    plan, skipped = plan_outputs(
        items, lambda item: output_path(item, output, out_dir, suffix, many), force, skip_existing, mirror=bool(out_dir and recursive)
    )  # fmt: skip
    codec, pool_setup = None, None
    # Workers for a single file to do would only add their start-up: code it here.
    jobs = min(jobs, max(1, sum(not isinstance(target, RcamError) for _, target in plan)))
    # With --cluster its workers load the model and resolve the device (this machine may have no GPU where they do).
    if not distribute and jobs == 1:
        codec = load_codec(model_name, _setup(device, threads), precision=precision)
    elif not distribute:  # the workers load the model; its errors are found here first, once
        resolve_weights(model_name)
        resolve_precision(precision, resolve_device(device))
        pool_setup = (model_name, device, worker_threads(jobs, threads), precision)
    run_batch(plan, work, codec, quiet, Summary(verb, len(items), skipped=skipped), jobs, pool_setup, distribute)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rcam")
def cli() -> None:
    """rcam: a learned camera codec. RAW (DNG) -> compact .rcb bitstream -> finished sRGB image."""


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", help="Output .rcb file (one input only).")
@click.option("--out-dir", type=click.Path(file_okay=False), help="Folder for outputs (default: beside each input).")
@click.option("--lambda", "lam", type=float, default=None, help="Rate-distortion trade-off in [0.0025, 0.1]; larger = more bits, higher quality.  [default: 0.01]")
@click.option("--bpp", type=click.FloatRange(min=0, min_open=True), default=None, help="Target bits per output pixel instead of a λ: the file lands within ±5% or the command says what is reachable.")
@click.option("--size", "size_text", default=None, help="Target file size instead of a λ, e.g. 2MB, 500kB, 1.5MiB or bytes (within ±5%).")
@click.option("--strip-metadata", is_flag=True, help="Store no EXIF or XMP from the RAW (camera, lens, exposure, date, place).")
@click.option("--strip-gps", is_flag=True, help="Store the metadata without its GPS position (EXIF GPS IFD and XMP GPS properties).")
@click.option("--strict-metadata", is_flag=True, help="Refuse a RAW whose EXIF or XMP is damaged or oversized instead of dropping that block with a warning.")
@model_option
@click.option("--tile", type=int, default=DEFAULT_TILE, show_default=True, help="Tile side in packed pixels (multiple of 32): memory/speed knob.")
@click.option("--overlap", type=int, default=DEFAULT_OVERLAP, show_default=True, help="Tile overlap in packed pixels (multiple of 32).")
@click.option("--tile-batch", type=click.IntRange(1, 64), default=1, show_default=True, help="Tiles per network call on a GPU; the CPU runs each tile alone, so there the bytes do not depend on it.")
@click.option("--tone-fit/--no-tone-fit", default=True, show_default=True, help="Fit a per-channel tone correction against LibRaw's render of the file (a 6x6 gain and offset field per channel, 432 header bytes; every other tile is synthesised once more).")
@click.option("--look", type=click.Choice(container.LOOKS), default="clean", show_default=True, help="clean: sensor and lens defects (vignetting, dark shading, noise) removed; faithful: LibRaw's development of the file as it is (SPEC §3).")
@refine_option
@device_option
@precision_option
@threads_option
@jobs_option
@cluster_option
@recursive_option
@force_option
@skip_existing_option
@quiet_option
def encode(
    inputs, output, out_dir, lam, bpp, size_text, strip_metadata, strip_gps, strict_metadata, model_name, tile, overlap,
    tile_batch, tone_fit, look, refine_steps, device, precision, threads, jobs, cluster, recursive, force, skip_existing, quiet,
) -> None:  # fmt: skip
    """Encode RAW files (or folders of them) into .rcb bitstreams, with their capture metadata."""
    if sum(option is not None for option in (lam, bpp, size_text)) > 1:
        raise RcamError("give one of --lambda, --bpp and --size")
    target_bytes = parse_size(size_text) if size_text is not None else None
    lam = 0.01 if lam is None and bpp is None and target_bytes is None else lam
    if strip_metadata and (strip_gps or strict_metadata):
        raise RcamError("--strip-metadata stores no metadata: --strip-gps and --strict-metadata do not apply")
    check_refinement(refine_steps, look, lam is not None)  # once, before any file
    settings = EncodeSettings(
        lam, target_bytes, bpp, strip_metadata, strip_gps, strict_metadata, tile, overlap, tile_batch, tone_fit, look, refine_steps
    )  # fmt: skip
    run_files(
        expand_inputs(inputs, RAW_SUFFIXES, recursive), ".rcb", functools.partial(encode_one, settings), "encoded",
        output=output, out_dir=out_dir, force=force, skip_existing=skip_existing, recursive=recursive,
        model_name=model_name, device=device, threads=threads, jobs=jobs, quiet=quiet, cluster=cluster, precision=precision,
    )  # fmt: skip


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", help="Output image (.png, .jpg, .tif; one input only).")
@click.option("--out-dir", type=click.Path(file_okay=False), help="Folder for outputs (default: beside each input).")
@click.option("--format", "image_format", type=click.Choice(["png", "jpg", "tif"]), default="png", show_default=True, help="Output format when no -o is given.")
@click.option("--bits", type=click.Choice(["8", "16"]), default="8", show_default=True, help="Bits per sample (PNG and TIFF).")
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True, help="JPEG quality.")
@click.option("--strip-metadata", is_flag=True, help="Write no EXIF or XMP into the images.")
@model_option
@device_option
@precision_option
@threads_option
@jobs_option
@cluster_option
@recursive_option
@force_option
@skip_existing_option
@quiet_option
def decode(
    inputs, output, out_dir, image_format, bits, quality, strip_metadata, model_name, device, precision, threads, jobs, cluster,
    recursive, force, skip_existing, quiet,
) -> None:  # fmt: skip
    """Decode .rcb bitstreams into sRGB images with an embedded sRGB profile and the capture metadata."""
    run_files(
        expand_inputs(inputs, {".rcb"}, recursive), f".{image_format}", functools.partial(decode_one, DecodeSettings(int(bits), quality, strip_metadata)),
        "decoded", output=output, out_dir=out_dir, force=force, skip_existing=skip_existing, recursive=recursive,
        model_name=model_name, device=device, threads=threads, jobs=jobs, quiet=quiet, cluster=cluster, precision=precision,
    )  # fmt: skip


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
def info(inputs) -> None:
    """Show an .rcb file's header: model, λ, geometry, tiles, stream sizes, bpp, checksums."""
    items = expand_inputs(inputs, {".rcb"})

    def work(codec, source: Path, target, progress) -> Done:
        data = read_input(source)
        header, streams = container.read(data)
        pixels = header.output_height * header.output_width
        coded_field = header.format_version >= container.CODED_TONE_VERSION and describe_tone(header.tone) != "none"
        lines = [
            f"{source}",
            f"  format       rcb v{header.format_version}, {len(data)} bytes, {8 * len(data) / pixels:.4f} bpp",
            f"  model        {header.model_name} (weights {header.weights_digest.hex()})",
            f"  lambda       {header.lam:.6g}",
            f"  look         {header.look}" + (f" (colour matrix and white {header.white:.4g} for the skeleton decoder)" if header.format_version >= 4 else ""),
            f"  sensor       {header.sensor_width}x{header.sensor_height} visible, CFA padding top {header.pad_top} left {header.pad_left}",
            f"  output       {header.output_width}x{header.output_height}, orientation flip code {header.flip}",
            f"  tone         {describe_tone(header.tone)}" + (f"; {tone_code_summary(header.tone)}" if coded_field else ""),
            f"  tiles        {header.tile_cols}x{header.tile_rows} of {header.tile_width}x{header.tile_height} packed px, overlap {header.overlap}",
            f"  streams      {len(streams)}, {sum(header.stream_lengths)} bytes, smallest {min(header.stream_lengths)}, largest {max(header.stream_lengths)}",
            "  checksums    header, metadata and all streams OK" if header.format_version >= 4 else "  checksums    header and all streams OK",
        ]
        metadata = Metadata(header.exif, header.xmp)
        try:
            rows = summary(metadata) if metadata else [("metadata", "none")]
        except RcamError as error:
            rows = [("metadata", str(error))]
        lines += [f"  {label:<12} {value}" for label, value in rows]
        return Done("\n".join(lines))

    run_batch([(item.source, None) for item in items], work, None, quiet=False)


@cli.command()
@click.option("--input", "raw_path", type=click.Path(dir_okay=False), help="RAW file to use instead of the generated sample DNG.")
@click.option("--out-dir", type=click.Path(file_okay=False), default="out/demo", show_default=True, help="Where the sample, .rcb and PNG go.")
@click.option("--lambda", "lam", type=float, default=0.01, show_default=True, help="Rate-distortion trade-off.")
@model_option
@device_option
@precision_option
@threads_option
def demo(raw_path, out_dir, lam, model_name, device, precision, threads) -> None:
    """Encode and decode a sample RAW (generated by default); print bpp and PSNR against the reference render."""
    from rcam.demo import run_demo

    codec = load_codec(model_name, _setup(device, threads), precision=precision)
    result = run_demo(codec, Path(out_dir), Path(raw_path) if raw_path else None, lam)
    click.echo(f"input   {result['input']} ({result['size']})")
    click.echo(f"model   {codec.name}, lambda {lam}")
    click.echo(f"rcb     {result['bytes']} bytes = {result['bpp']:.4f} bpp")
    click.echo(f"PSNR    {result['psnr']:.2f} dB against the reference render of the input")
    if "psnr_clean" in result:
        click.echo(f"PSNR    {result['psnr_clean']:.2f} dB against the render of its defect-free twin")
    click.echo(f"decoded {result['output']}")


@cli.command()
@click.argument("photo_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out-dir", required=True, type=click.Path(file_okay=False), help="Dataset folder (index.jsonl + DNG/PNG pairs).")
@click.option("--variants", type=click.IntRange(1, 100), default=2, show_default=True, help="Synthetic RAW pairs per photo.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--max-side", type=click.IntRange(32, 20000), default=1024, show_default=True, help="Downscale photos to this longest side first.")
@click.option("--held-out", is_flag=True, help="A validation set whose every frame has the held-out defect families (radial-polynomial vignetting, column banding), which training data never has.")
def synth(photo_dirs, out_dir, variants, seed, max_side, held_out) -> None:
    """Build a training set of synthetic RAW pairs (degraded DNG, clean twin, target render) from photos; resumable."""
    from rcam.training.synth import build_dataset

    index = build_dataset([Path(d) for d in photo_dirs], Path(out_dir), variants, seed, max_side=max_side, held_out=held_out)
    click.echo(f"dataset index: {index}")


@cli.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--steps", type=click.IntRange(1), default=None, help="Override the config's total steps.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Override the config's device.")
def train(config, steps, device) -> None:
    """Train (or resume) a model from a JSON config; Ctrl-C saves a checkpoint and stops."""
    from dataclasses import replace

    from rcam.training.train import TrainConfig
    from rcam.training.train import train as run_training

    settings = TrainConfig.load(Path(config))
    if steps:
        settings = replace(settings, steps=steps)
    if device:
        settings = replace(settings, device=device)
    checkpoint = run_training(settings)
    click.echo(f"checkpoint: {checkpoint}")
    if torch.load(checkpoint, map_location="cpu", weights_only=True)["step"] < settings.steps:
        # Ctrl-C (or SIGTERM): the checkpoint is saved, but the run did not finish; a script must not go on as if it had.
        raise click.exceptions.Abort()


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", default=DEFAULT_MODEL, show_default=True, help="Model name in weights/manifest.json.")
@click.option("--half", is_flag=True, help="Store fp16 tensors (half the size).")
@click.option("--weights-dir", type=click.Path(file_okay=False), default=None, help="Folder for the weights and manifest (default: the shipped weights/).")
def export(checkpoint, name, half, weights_dir) -> None:
    """Turn a training checkpoint into shipped weights (safetensors + manifest entry)."""
    from rcam.codec.zoo import WEIGHTS_DIR, export_checkpoint

    click.echo(f"weights: {export_checkpoint(Path(checkpoint), name, Path(weights_dir) if weights_dir else WEIGHTS_DIR, half=half)}")


@cli.command("eval")
@click.argument("inputs", type=click.Path(exists=True))
@click.option("--protocol", type=click.Choice(["R", "S"]), default="R", show_default=True, help="R: folder of RAW files; S: folder of photos made into synthetic DNGs with clean twins.")
@click.option("--lambdas", default="0.005,0.01,0.025,0.1", show_default=True, help="Comma-separated λ values for rcam.")
@click.option(
    "--baselines", default="jpeg,webp,jpegxl,avif", show_default=True,
    help=f"Comma-separated comparators: the cascades {', '.join(baseline_names())} (jxl = jpegxl; reference render, or "
    f"for ISP+CODEC that learned ISP, then that codec) and the end-to-end codecs {', '.join(END_TO_END)} "
    f"(learned ISPs and rawtobit: trained weights in weights/, made with rcam train-comparator, clean look, protocol S; "
    f"rawjxl: rcam's own normalised planes through JPEG XL, then LibRaw's render, either protocol).",
)  # fmt: skip
@click.option("--out-dir", type=click.Path(file_okay=False), default="out/eval", show_default=True, help="Where results.json, CSVs and rd.png go.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N images.")
@click.option("--speed/--no-speed", default=True, show_default=True, help="Also time whole encode/decode commands and the cascade.")
@click.option("--held-out", is_flag=True, help="Protocol S: synthesise the DNGs with the defect families kept out of training (rcam.training.synth.HELD_OUT_FAMILIES), the generalisation check.")
@click.option("--look", type=click.Choice(("auto",) + container.LOOKS), default="auto", show_default=True, help="auto: faithful for protocol R (its reference is the file's own render), clean for S (SPEC §8); a model without the faithful look is measured in clean.")
@refine_option
@model_option
@device_option
@precision_option
@threads_option
def evaluate(inputs, protocol, lambdas, baselines, out_dir, limit, speed, held_out, look, refine_steps, model_name, device, precision, threads) -> None:
    """Measure rcam against develop-then-compress cascades: tables, BD-rate, RD plot (SPEC §8)."""
    import numpy as np

    from rcam.codec.output import quantize
    from rcam.comparators.learned_isp import load_learned_isp
    from rcam.measure.evaluate import make_command_timer, print_table, run_eval
    from rcam.training.synth import make_pair

    try:
        lambda_values = [float(v) for v in lambdas.split(",") if v.strip()]
    except ValueError:
        raise RcamError(f"--lambdas: '{lambdas}' is not a comma-separated list of numbers") from None
    names = [b.strip() for b in baselines.split(",") if b.strip()]
    cascades = [name for name in names if name.lower() not in END_TO_END]
    target_device = _setup(device, threads)
    # The learned ISPs first: missing weights are an error before any work.
    learned_isps = {isp: load_learned_isp(isp, target_device) for isp in sorted({get_baseline(name).isp for name in cascades} - {None})}
    codec = load_codec(model_name, target_device, precision=precision)
    if look == "auto":
        look = "faithful" if protocol == "R" and "faithful" in codec.model.config.looks else "clean"
    check_refinement(refine_steps, look)
    end_to_end = [_end_to_end_comparator(name.lower(), codec.device, look) for name in names if name.lower() in END_TO_END]
    # The λ sweep of one file fits its tone to one render.
    render = functools.lru_cache(maxsize=1)(functools.partial(tone_reference, codec, look=look))

    def run_codec(raw_path: Path, lam: float) -> tuple[int, np.ndarray]:
        encoded = encode_file(codec, raw_path, lam, reference=render(raw_path), look=look, refine_steps=refine_steps)
        return len(encoded.data), quantize(decode_bytes(codec, encoded.data), 8)

    extra = ["--model", model_name, "--device", "cpu" if codec.device.type == "cpu" else "cuda", "--precision", codec.precision]
    if threads:
        extra += ["--threads", str(threads)]
    timer = make_command_timer([str(Path(sys.executable).parent / "rcam")], extra) if speed else None
    results = run_eval(
        Path(inputs), protocol, lambda_values, cascades, Path(out_dir),
        run_codec, timer, limit=limit, speed=speed, numthreads=threads, end_to_end=end_to_end,
        make_pair=functools.partial(make_pair, held_out=True) if held_out else None,
        setup={
            "model": codec.name, "weights": codec.digest.hex(), "device": str(codec.device), "precision": codec.precision, "look": look, "held_out_families": held_out,
            "refine_steps": refine_steps,
            "learned_isps": {name: {"system": isp.system, "weights_sha256": isp.digest, "steps": isp.total_steps} for name, isp in learned_isps.items()},
        },
        isp_renders={name: isp.render for name, isp in learned_isps.items()},
    )  # fmt: skip
    print_table(results)


def _end_to_end_comparator(name: str, device: torch.device, look: str):
    """The end-to-end comparator `name` (one of rcam.comparators.END_TO_END), loaded for rcam.evaluate."""
    from rcam.comparators import planes_jxl, rawtobit

    return {"rawtobit": rawtobit.evaluation_comparator, "rawjxl": planes_jxl.evaluation_comparator}[name](device, look)


@cli.command("train-comparator")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--steps", type=click.IntRange(1), default=None, help="Override the config's total steps (a learned ISP's phases: stop after this many steps in all, the rest left for a resume).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Override the config's device.")
def train_comparator(config, steps, device) -> None:
    """Train (or resume) a seed-paper comparator from a JSON config: a RAWtoBit stage, CameraNet, CAS-Net or its ISP-Net; Ctrl-C saves and stops."""
    import json

    from rcam.comparators import isp_training, rawtobit

    try:
        comparator = json.loads(Path(config).read_text()).get("comparator")
    except (OSError, ValueError, AttributeError) as error:
        raise RcamError(f"{config}: not a valid comparator training config ({error})") from None
    trainers = {rawtobit.FAMILY: rawtobit.train_from_config} | dict.fromkeys(isp_training.COMPARATORS, isp_training.train_from_config)
    if comparator not in trainers:
        raise RcamError(f"{config}: unknown comparator {comparator!r} (the config's \"comparator\" field; known: {', '.join(trainers)})")
    checkpoint, finished = trainers[comparator](Path(config), steps, device)
    click.echo(f"checkpoint: {checkpoint}")
    if not finished:
        raise click.exceptions.Abort()


@cli.command("export-comparator")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", default=None, help="Name in weights/manifest.json (default: rawtobit-small for RAWtoBit; a learned ISP's config name: cameranet, casnet-artifacts, casnet).")
@click.option("--half", is_flag=True, help="Store fp16 tensors (half the size).")
@click.option("--weights-dir", type=click.Path(file_okay=False), default=None, help="Folder for the weights and manifest (default: the shipped weights/).")
def export_comparator(checkpoint, name, half, weights_dir) -> None:
    """Turn a comparator's final training checkpoint (RAWtoBit's rbn stage, a learned ISP's last.pt) into weights (safetensors + manifest entry)."""
    from rcam.comparators import isp_training, rawtobit

    folder = Path(weights_dir) if weights_dir else None
    if isp_training.is_checkpoint(Path(checkpoint)):
        path = isp_training.export_comparator(Path(checkpoint), name, folder, half=half)
    else:
        path = rawtobit.export_rbn(Path(checkpoint), name or rawtobit.DEFAULT_WEIGHTS, folder, half=half)
    click.echo(f"weights: {path}")


def main() -> None:
    """Console entry point: map errors to exit statuses."""
    tune_allocator()  # process-wide settings: here, not in the library (rcam.codec.allocator, rcam.codec.blas)
    single_threaded_blas()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.Abort:
        click.echo("rcam: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(2)
    except RcamError as error:
        click.echo(f"rcam: error: {error}", err=True)
        sys.exit(2)
    except BatchFailed as failed:
        sys.exit(failed.status)
    except KeyboardInterrupt:
        click.echo("rcam: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    sys.exit(0)


def command() -> None:
    """The `rcam` command: main(), then leave without the interpreter's teardown.

    Python's finalisation with torch loaded (its modules' dicts, libtorch's static destructors) took 0.7-0.8 s
    after every command had finished its work, a fifth of a small file's encode. Everything rcam writes is
    complete and closed by then; the standard streams are flushed and the atexit callbacks run before leaving.
    """
    try:
        main()
        status = 0
    except SystemExit as done:
        status = done.code
    if status is not None and not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(status or 0)
