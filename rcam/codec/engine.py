"""Encode a RAW image into .rcb bytes and decode them into an oriented sRGB image, tile by tile."""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rcam.codec import container
from rcam.codec.entropy import TileLatents
from rcam.codec.layers import log_gain_at
from rcam.codec.metadata import EMPTY, Metadata, check_metadata
from rcam.codec.models import LAMBDA_RANGE
from rcam.codec.rawio import CellFalloff, RawImage, network_input, network_input_and_white, oriented_view, read_raw, reference_render, undo_flip
from rcam.codec.refine import frozen, refine_latents, tile_target, tile_tone
from rcam.codec.skeleton import Development
from rcam.codec.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, Tile, blend_weights, coordinate_map, crop_tile, plan_tiles, thumbnail
from rcam.codec.tone import (
    FIELD_KNOT_CHOICES,
    FIELD_KNOTS,
    IDENTITY,
    ToneStatistics,
    apply_tone,
    cheapest_field,
    identity,
    knots_worth_fitting,
)
from rcam.codec.tone_coding import encode_field, max_field_bytes
from rcam.codec.zoo import Codec
from rcam.errors import RcamError

DEFAULT_TILE_BATCH = 1
SIZE_TOLERANCE = 0.05  # a target size is met within ±5%
SIZE_SEARCH_STEPS = 12  # bisection steps in log λ at most (the λ range spans a factor of 40)
ALL_TILES_UP_TO = 4  # the tone fit synthesises every tile of a frame this small (see tone_fit_tiles)
# Larger frames: the tone fit synthesises a window of TONE_WINDOW x TONE_WINDOW latent pixels (16 output pixels
# each) at the centre of every tile, and leaves TONE_MARGIN latent pixels at the window's edges out of the fit:
# there the cut-off latents change the output (Canon DNG, λ 0.01: 0.13 levels RMS inside such a margin, 6 in it).
TONE_WINDOW = 32
TONE_MARGIN = 2
WINDOW_ALIGN = 4  # latent pixels: windows start where the tile's own attention windows do (32 packed pixels)


@dataclass(frozen=True)
class Encoded:
    """An encoded image: the .rcb bytes and, for tests and tools, the latents each tile's stream holds."""

    data: bytes
    header: container.Header
    latents: list[TileLatents]


def check_lambda(lam: float) -> float:
    """λ must lie in the range the variable-rate model was trained for."""
    low, high = LAMBDA_RANGE
    value = float(np.float32(lam))  # the header stores float32: use exactly that value on both sides
    # Compared as float32 too, so a checked λ passes again (float32(0.1) is a little above 0.1).
    if not (float(np.float32(low)) <= value <= float(np.float32(high))):
        raise RcamError(f"--lambda {lam} is outside the supported range [{low}, {high}]")
    return value


def check_refinement(steps: int, look: str, lam_given: bool = True) -> None:
    """Refinement (rcam.codec.refine) needs the faithful look, whose target the encoder has, and a λ given
    rather than chosen for a target size (refinement would change the size after)."""
    if steps and (look != "faithful" or not lam_given):
        raise RcamError(
            "--refine works with --look faithful at a --lambda: the clean look's target (the frame without its defects) "
            "is not one the encoder has, and a target size chooses its λ before refinement would change the size"
        )


def check_look(codec: Codec, look: str) -> str:
    """The look must be one this model renders (SPEC §3)."""
    if look not in codec.model.config.looks:
        raise RcamError(f"model {codec.name} renders the looks {', '.join(codec.model.config.looks)}, not {look!r}")
    return look


def look_tensor(look: str, batch: int, device: torch.device | str) -> torch.Tensor:
    """(B,) look indices as the model takes them."""
    return torch.full((batch,), container.LOOKS.index(look), dtype=torch.long, device=device)


def frame_development(image: RawImage, white: float) -> Development:
    """The colour matrix and auto-brightness level `white` network_input applied to this frame, as the header
    stores them (float32: the decoder applies exactly what the file holds)."""
    return Development(tuple(float(v) for v in np.float32(image.cam_to_srgb).ravel()), float(np.float32(white)))


def header_development(codec: Codec, header: container.Header, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What a skeleton model's synthesis needs of the header (None for other models)."""
    if not codec.model.config.skeleton:
        return None
    return Development(header.cam_to_srgb, header.white).tensors(batch, codec.device)


def _batches(tiles: list[Tile], size: int):
    for start in range(0, len(tiles), size):
        yield tiles[start : start + size]


@contextmanager
def one_thread():
    """torch's CPU work in the block runs on one intra-op thread (why: map_tiles); the caller's count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def transform_precision(codec: Codec):
    """The analysis and synthesis in the block compute in codec.precision (autocast is per thread: enter it in
    the thread that runs them, as map_tiles' workers do)."""
    with torch.autocast(codec.device.type, dtype=torch.bfloat16, enabled=codec.precision == "bfloat16"):
        yield


def transform_input(codec: Codec, tensor: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) input of the analysis or synthesis in the codec's memory layout (Codec.channels_last)."""
    return tensor.contiguous(memory_format=torch.channels_last) if codec.channels_last else tensor


def map_tiles(device: torch.device, function: Callable, items: Iterable, gradients: bool = False) -> Iterator:
    """function(item) for every item, in order, under inference mode (with `gradients`: autograd on, for the
    encoder's refinement); on the CPU each item runs on one intra-op thread and torch.get_num_threads() items
    run at once.

    Why: oneDNN's convolutions, MKL's matrix products and torch's vectorised loops split their work by the
    thread count, so a tile's floats changed in the last bits with --threads and some pixels rounded the
    other way. On one thread a tile is computed the same way whatever the thread count (or process, or
    tile batch), and tiles side by side give the parallelism back.
    """
    def mode():  # thread-local: each worker enters it itself
        return torch.enable_grad() if gradients else torch.inference_mode()

    if device.type != "cpu":
        for item in items:
            with mode():
                result = function(item)
            yield result
        return
    threads = torch.get_num_threads()

    def run(item):
        with mode():
            return function(item)

    if threads == 1:  # one tile at a time on one thread: this one (a pool's thread start took 3 ms a call, the
        # --jobs workers make four such calls for each small file)
        for item in items:
            yield run(item)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="rcam-tile", initializer=torch.set_num_threads, initargs=(1,))
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(run, item))
            if len(pending) > threads:  # at most threads + 1 tiles in hand at once: memory stays bounded
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        # A worker's set_num_threads(1) is also torch's default for threads started later: put it back.
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Analysis:
    """An image through the analysis transform, before the λ gain: what every λ's encoding shares."""

    image: RawImage
    tiles: list[Tile]
    overlap: int
    batches: list[torch.Tensor]  # per tile batch, (tiles in the batch, M, h, w) unscaled latents
    look: str
    development: Development
    thumbnail: torch.Tensor  # (4, S, S) on the CPU: the global prior's and the vignetting estimator's view of the frame


@dataclass(frozen=True)
class AnalysisInput:
    """What the analysis of every tile reads of a frame: its normalised planes, development and thumbnail."""

    planes: torch.Tensor  # (4, Hp, Wp) float32, rawio.network_input
    development: Development
    thumbnail: torch.Tensor  # (4, S, S) on the CPU


def analysis_input(codec: Codec, image: RawImage, overwrite: bool = False) -> AnalysisInput:
    """The frame normalised as the network reads it (rawio.network_input_and_white), and its thumbnail.

    `overwrite`: normalise in image.planes' own memory (4 bytes a sensor pixel less), for a caller that reads
    nothing from the raw values afterwards: encode_file, whose `image` then serves only its geometry and metadata.
    """
    normalised, white = network_input_and_white(image, overwrite)
    planes = torch.from_numpy(normalised)
    with one_thread():  # the thumbnail is made on the CPU whatever the device
        thumb = thumbnail(planes, codec.model.config.thumbnail)
    return AnalysisInput(planes, frame_development(image, white), thumb)


def analyse_image(
    codec: Codec, image: RawImage, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH, look: str = "clean", prepared: AnalysisInput | None = None,
) -> Analysis:  # fmt: skip
    """Run the analysis transform over every tile once, for `look` (SPEC §3; it does not depend on λ: the gain
    comes after it). `prepared`: analysis_input(codec, image) when the caller has it."""
    look = check_look(codec, look)
    model, device = codec.model, codec.device
    prepared = prepared or analysis_input(codec, image)
    planes, development = prepared.planes, prepared.development
    _, packed_height, packed_width = planes.shape
    tiles = plan_tiles(packed_height, packed_width, tile, overlap)
    thumb = prepared.thumbnail.to(device)
    absolute = model.config.coordinates == "absolute"

    def analyse(batch: list[Tile]) -> torch.Tensor:
        x = transform_input(codec, torch.stack([crop_tile(planes, t) for t in batch]).to(device))
        coords = torch.stack([coordinate_map(t, packed_height, packed_width, absolute) for t in batch]).to(device)
        with transform_precision(codec):
            return model.analysis(x, coords, thumb.expand(len(batch), -1, -1, -1), look_tensor(look, len(batch), device))

    # `tile_batch` tiles go through the network at once on a GPU; the CPU runs every tile alone (map_tiles),
    # since a batch's floats differ from a single tile's even on one thread, so the bytes never depend on it.
    with closing(map_tiles(device, analyse, _batches(tiles, tile_batch if device.type != "cpu" else 1))) as results:
        batches = list(results)
    return Analysis(image, tiles, overlap, batches, look, development, prepared.thumbnail)


def _lambda_gain(codec: Codec, lam: float) -> torch.Tensor:
    """The analysis' gain for λ, (1, M, 1, 1) on the codec's device."""
    with torch.inference_mode():
        return codec.model.gains(torch.tensor([lam], device=codec.device))[0]


def _hyper(codec: Codec, gain: torch.Tensor, unscaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A tile batch's analysed latents -> (y scaled for λ, z its hyper-analysis)."""
    y = unscaled * gain
    return y, codec.model.hyper_analysis(y)


def _code_batch(codec: Codec, y: torch.Tensor, z: torch.Tensor) -> list[tuple[bytes, TileLatents]]:
    """Range-code each tile of a batch: (stream, latents) per tile, in order."""
    return [codec.coder.encode(y[index : index + 1], z[index : index + 1]) for index in range(len(y))]


def hyper_path(codec: Codec, analysis: Analysis, lam: float) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Scale the analysed latents for λ and run the hyper-analysis: (y, z) per tile batch, in order."""
    gain = _lambda_gain(codec, lam)
    with closing(map_tiles(codec.device, functools.partial(_hyper, codec, gain), analysis.batches)) as results:
        yield from results


def _collect(coded_batches: Iterable[list[tuple[bytes, TileLatents]]], progress=None) -> tuple[list[bytes], list[TileLatents]]:
    streams, latents = [], []
    for coded in coded_batches:
        for stream, tile_latents in coded:
            streams.append(stream)
            latents.append(tile_latents)
            if progress:
                progress()
    return streams, latents


def entropy_code(codec: Codec, batches, progress=None) -> tuple[list[bytes], list[TileLatents]]:
    """(y, z) per tile batch -> every tile's stream and latents, coded on this thread."""
    return _collect((_code_batch(codec, y, z) for y, z in batches), progress)


def _code(codec: Codec, analysis: Analysis, lam: float, progress=None) -> tuple[list[bytes], list[TileLatents]]:
    """Scale the analysed latents for λ, run the hyper-analysis and entropy-code every tile: hyper_path and
    entropy_code in one, each tile batch on a worker (map_tiles), so tiles are range-coded side by side instead
    of on the main thread while the workers wait."""
    gain = _lambda_gain(codec, lam)

    def hyper_and_code(unscaled: torch.Tensor) -> list[tuple[bytes, TileLatents]]:
        return _code_batch(codec, *_hyper(codec, gain, unscaled))

    with closing(map_tiles(codec.device, hyper_and_code, analysis.batches)) as results:
        return _collect(results, progress)


def _header(codec: Codec, analysis: Analysis, lam: float, metadata: Metadata) -> container.Header:
    image, tiles = analysis.image, analysis.tiles
    rows = len({t.top for t in tiles})
    return container.Header(
        model_name=codec.name, weights_digest=codec.digest, lam=lam,
        sensor_height=image.height, sensor_width=image.width, pad_top=image.pad_top, pad_left=image.pad_left,
        flip=image.flip, output_height=image.output_size[0], output_width=image.output_size[1],
        tile_height=tiles[0].height, tile_width=tiles[0].width, overlap=analysis.overlap,
        tile_rows=rows, tile_cols=len(tiles) // rows, look=analysis.look, cam_to_srgb=analysis.development.cam_to_srgb,
        white=analysis.development.white, exif=metadata.exif, xmp=metadata.xmp,
    )  # fmt: skip


def refine_analysis(
    codec: Codec, analysis: Analysis, lam: float, reference: np.ndarray, steps: int, tone: tuple[float, ...] = IDENTITY,
    progress=None,
) -> Analysis:  # fmt: skip
    """The analysis with every tile's latents refined for λ against `reference` ((H, W, 3) uint8, the look's
    target, oriented as the output) by `steps` gradient steps each (rcam.codec.refine), the decoded pixels
    tone-corrected by `tone` in the loss, in float32; each tile on one thread, torch.get_num_threads() side by side."""
    lam = check_lambda(lam)
    image, model, device = analysis.image, codec.model, codec.device
    if reference.shape[:2] != tuple(image.output_size):
        raise RcamError(f"reference render is {reference.shape[1]}x{reference.shape[0]}, the encoded frame {image.output_size[1]}x{image.output_size[0]}")
    sensor_reference = undo_flip(reference, image.flip)
    with torch.no_grad():
        gain, inverse_gain = model.gains(torch.tensor([lam], device=device))
    conditions = (analysis.development.tensors(1, device) if model.config.skeleton else None, look_tensor(analysis.look, 1, device))

    def refine(item: tuple[Tile, torch.Tensor]) -> torch.Tensor:
        tile, unscaled = item
        target, mask = tile_target(sensor_reference, tile, image.pad_top, image.pad_left)
        tone_maps = tile_tone(tone, tile, image.pad_top, image.pad_left, (image.height, image.width))
        y = refine_latents(
            model, unscaled.float() * gain, inverse_gain, conditions, target.to(device), mask.to(device),
            tuple(t.to(device) for t in tone_maps), lam, steps, progress=progress,
        )  # fmt: skip
        return (y / gain).to(unscaled.dtype)

    # Each tile alone, on one thread (map_tiles): its refined latents, and so the file's bytes, then do not
    # depend on the thread count or the tile batch.
    tiles = iter(analysis.tiles)
    items = ((next(tiles), batch[index : index + 1]) for batch in analysis.batches for index in range(len(batch)))
    with frozen(model), closing(map_tiles(device, refine, items, gradients=True)) as results:
        refined = list(results)
    refined_batches, start = [], 0
    for batch in analysis.batches:
        refined_batches.append(transform_input(codec, torch.cat(refined[start : start + len(batch)])))
        start += len(batch)
    return replace(analysis, batches=refined_batches)


def encode_analysed(
    codec: Codec, analysis: Analysis, lam: float, reference: np.ndarray | None = None, metadata: Metadata = EMPTY,
    progress=None, knot_choices: tuple[int, ...] = FIELD_KNOT_CHOICES, refine_steps: int = 0, refine_progress=None,
    tone_fit: bool = True,
) -> Encoded:  # fmt: skip
    """An analysed image -> Encoded at λ (with `tone_fit`, the tone fitted against `reference` when given, as
    encode_image, its field's K among `knot_choices`). `refine_steps` > 0 also refines the latents against
    `reference` (refine_analysis; the faithful look only, whose target the reference is), with the tone field
    fitted to the unrefined ones in the loss, and keeps the refined file only if its coded_cost is lower;
    `refine_progress()` is called after each tile's step."""
    lam = check_lambda(lam)
    if refine_steps:
        check_refinement(refine_steps, analysis.look)
        if reference is None:
            raise RcamError("refinement needs the file's reference render")
        plain = encode_analysed(codec, analysis, lam, reference, metadata, None, knot_choices, tone_fit=tone_fit)
        refined_analysis = refine_analysis(codec, analysis, lam, reference, refine_steps, plain.header.tone, refine_progress)
        refined = encode_analysed(codec, refined_analysis, lam, reference, metadata, progress, knot_choices, tone_fit=tone_fit)
        # The rate proxy is not the coder: keep whichever file training's cost prefers, so refinement never
        # makes a file worse by it.
        return min((refined, plain), key=lambda encoded: coded_cost(codec, encoded, reference))
    streams, latents = _code(codec, analysis, lam, progress)
    header = _header(codec, analysis, lam, check_metadata(metadata))
    if reference is not None and tone_fit:
        header = replace(header, tone=fit_header_tone(codec, header, latents, reference, knot_choices))
    return Encoded(container.write(header, streams), header, latents)


def coded_cost(codec: Codec, encoded: Encoded, reference: np.ndarray) -> float:
    """Training's cost of a file against `reference` ((H, W, 3) uint8, oriented as the output): its bits per
    output pixel + λ·(mean squared error of its 8-bit decode, in levels²)."""
    header, streams = container.read(encoded.data)
    sensor_reference = undo_flip(reference, header.flip)
    squared = 0.0
    for top, band in decoded_bands(codec, header, streams):
        decoded = np.round(np.clip(band, 0.0, 1.0) * 255.0).astype(np.float64)  # as output.quantize rounds
        squared += float(np.sum((decoded - sensor_reference[top : top + len(band)]) ** 2))
    pixels = header.output_height * header.output_width
    return 8 * len(encoded.data) / pixels + header.lam * squared / (3 * pixels)


def encode_image(
    codec: Codec, image: RawImage, lam: float, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH, progress=None, reference: np.ndarray | None = None,
    metadata: Metadata = EMPTY, look: str = "clean",
) -> Encoded:  # fmt: skip
    """RawImage -> Encoded (.rcb bytes + latents) in `look` (SPEC §3); `progress` is called once per tile.

    With `reference` ((H, W, 3) uint8, the reference render of the same file) the encoder also synthesises
    tiles spread over the frame as the decoder will and stores a fitted tone correction (rcam.codec.tone) in the header.
    `metadata` (EXIF and XMP, rcam.codec.metadata) is stored as it is.
    """
    lam = check_lambda(lam)
    analysis = analyse_image(codec, image, tile, overlap, tile_batch, look)
    return encode_analysed(codec, analysis, lam, reference, metadata, progress)


def file_size(codec: Codec, analysis: Analysis, lam: float, tone_fit: bool, metadata: Metadata = EMPTY) -> int:
    """The .rcb size at λ without synthesising anything, with a FIELD_KNOTS tone field (what encode_file fits for
    a target size) counted at the most bytes its code can take (max_field_bytes): the file is at most this big,
    and smaller by what the fitted field's code saves (216 bytes for the Blackmagic DNG at 0.1 bpp)."""
    lam = check_lambda(lam)
    streams, _ = _code(codec, analysis, lam)
    header = replace(_header(codec, analysis, lam, metadata), tone=identity(FIELD_KNOTS) if tone_fit else IDENTITY)
    size = len(container.write(header, streams))
    return size + (max_field_bytes(FIELD_KNOTS) - len(encode_field(header.tone)) if tone_fit else 0)


def lambda_for_size(
    codec: Codec, analysis: Analysis, target: int, tone_fit: bool = True, metadata: Metadata = EMPTY,
    tolerance: float = SIZE_TOLERANCE, steps: int = SIZE_SEARCH_STEPS,
) -> tuple[float, int]:  # fmt: skip
    """(λ, file bytes) closest to `target` bytes, by bisection in log λ (the rate grows with λ); RcamError naming
    the reachable range when the target lies outside it by more than `tolerance`."""
    low, high = LAMBDA_RANGE
    sizes = {low: file_size(codec, analysis, low, tone_fit, metadata), high: file_size(codec, analysis, high, tone_fit, metadata)}
    pixels = analysis.image.output_size[0] * analysis.image.output_size[1]

    def describe(size: int) -> str:
        return f"{size} bytes ({8 * size / pixels:.3f} bpp)"

    if sizes[low] > target * (1 + tolerance) or sizes[high] < target * (1 - tolerance):
        raise RcamError(
            f"target {describe(target)} is outside what λ in [{LAMBDA_RANGE[0]}, {LAMBDA_RANGE[1]}] reaches "
            f"for this image: {describe(sizes[low])} to {describe(sizes[high])}"
        )
    for _ in range(steps):
        best = min(sizes, key=lambda lam: abs(sizes[lam] - target))
        if abs(sizes[best] - target) <= tolerance / 4 * target:
            break
        below = max((lam for lam in sizes if sizes[lam] <= target), default=low)
        above = min((lam for lam in sizes if sizes[lam] > target and lam > below), default=high)
        middle = math.sqrt(below * above)
        if check_lambda(middle) in (check_lambda(below), check_lambda(above)):  # float32 λ cannot split them
            break
        sizes[middle] = file_size(codec, analysis, middle, tone_fit, metadata)
    best = min(sizes, key=lambda lam: abs(sizes[lam] - target))
    if abs(sizes[best] - target) > tolerance * target:  # a jump in the rate between two float32 λ
        raise RcamError(f"target {describe(target)} cannot be met within {tolerance:.0%}: the closest is {describe(sizes[best])}")
    return best, sizes[best]


def tone_fit_tiles(header: container.Header) -> list[bool]:
    """Tiles the encoder synthesises whole for the tone fit when tone_fit_windows gives none: all of a grid of
    at most ALL_TILES_UP_TO, else every other one (a checkerboard) for half the synthesis."""
    tiles = header_tiles(header)
    if len(tiles) <= ALL_TILES_UP_TO:
        return [True] * len(tiles)
    return [(index // header.tile_cols + index % header.tile_cols) % 2 == 0 for index in range(len(tiles))]


@dataclass(frozen=True)
class ToneWindow:
    """A window of one tile's latents the tone fit synthesises, and the part of the sensor frame it fits on."""

    tile: int  # index in the header's tile plan
    latent_rows: slice  # of the tile's ŷ
    latent_cols: slice
    rows: slice  # of the window's output image, the pixels the fit reads
    cols: slice
    top: int  # where those pixels are in the visible sensor frame
    left: int


def tone_fit_windows(header: container.Header, size: int = TONE_WINDOW, margin: int = TONE_MARGIN) -> list[ToneWindow] | None:
    """A window at the centre of every tile for the tone fit (size and margin in latent pixels), or None for
    a grid of at most ALL_TILES_UP_TO tiles or tiles too small to hold a window clear of their overlaps.

    Every tile, not a checkerboard of whole ones, so the fit sees the whole frame, for a fraction of the
    synthesis (24 MP: 35 windows of 32² latent pixels against 18 tiles of 56x60), which fitted as well as the
    checkerboard on synthetic 8 and 24 MP frames (within 0.02 dB; 24² windows lost up to 0.11). The windows stay inside
    the tiles' unblended middles, where the decoder's pixels are the tile's own.
    """
    tiles = header_tiles(header)
    latent_height, latent_width, overlap = header.tile_height // 8, header.tile_width // 8, header.overlap // 8
    if len(tiles) <= ALL_TILES_UP_TO or min(latent_height, latent_width) < size + 2 * overlap:
        return None
    # Centred: windows against the frame's edges (its outer knots) fitted no better on synthetic 8 MP frames.
    start_row = (latent_height - size) // 2 // WINDOW_ALIGN * WINDOW_ALIGN
    start_col = (latent_width - size) // 2 // WINDOW_ALIGN * WINDOW_ALIGN
    windows = []
    for index, tile in enumerate(tiles):
        # The fitted pixels in canvas coordinates (output pixels of the padded frame), clipped to the visible frame.
        first_row, first_col = 2 * tile.top + 16 * (start_row + margin), 2 * tile.left + 16 * (start_col + margin)
        top, left = max(first_row, header.pad_top), max(first_col, header.pad_left)
        bottom = min(first_row + 16 * (size - 2 * margin), header.pad_top + header.sensor_height)
        right = min(first_col + 16 * (size - 2 * margin), header.pad_left + header.sensor_width)
        if bottom <= top or right <= left:
            continue  # a window wholly in the padding
        offset_row, offset_col = 16 * margin + top - first_row, 16 * margin + left - first_col
        windows.append(
            ToneWindow(
                tile=index, latent_rows=slice(start_row, start_row + size), latent_cols=slice(start_col, start_col + size),
                rows=slice(offset_row, offset_row + bottom - top), cols=slice(offset_col, offset_col + right - left),
                top=top - header.pad_top, left=left - header.pad_left,
            )
        )  # fmt: skip
    return windows


def fit_header_tone(
    codec: Codec, header: container.Header, latents: list[TileLatents], reference: np.ndarray,
    knot_choices: tuple[int, ...] = FIELD_KNOT_CHOICES,
) -> tuple[float, ...]:  # fmt: skip
    """Synthesise what tone_fit_windows (else tone_fit_tiles) asks for, as the decoder will, and fit the tone on
    those pixels: the field of the K among `knot_choices` that costs least at the header's λ (cheapest_field)."""
    if reference.shape[:2] != (header.output_height, header.output_width):
        raise RcamError(f"reference render is {reference.shape[1]}x{reference.shape[0]}, the encoded frame {header.output_width}x{header.output_height}")
    # The field lives on the sensor frame, as the tiles do: a file's decoded pixels do not depend on its
    # orientation tag beyond the final flip.
    sensor_reference = undo_flip(reference, header.flip)
    pixels = header.output_height * header.output_width
    knots_fitted = knots_worth_fitting(knot_choices, pixels, min(header.sensor_height, header.sensor_width))
    candidates = [ToneStatistics(header.sensor_height, header.sensor_width, knots) for knots in knots_fitted]
    windows = tone_fit_windows(header)
    if windows is not None:
        crops = (replace(latents[w.tile], y_hat=latents[w.tile].y_hat[:, :, w.latent_rows, w.latent_cols]) for w in windows)
        with closing(synthesise_tiles(codec, header, crops)) as window_images:
            for window, image in zip(windows, window_images):
                fitted = image[:, window.rows, window.cols].permute(1, 2, 0).clamp(0.0, 1.0).numpy()
                height, width = fitted.shape[:2]
                area = (slice(window.top, window.top + height), slice(window.left, window.left + width))
                for statistics in candidates:
                    statistics.add(window.top, fitted, sensor_reference[area], None, window.left)
        return cheapest_field(candidates, header.lam, pixels)
    wanted = tone_fit_tiles(header)
    # A tile row at a time: the whole decoded frame was the encoder's largest array (288 MB at 24 MP).
    with closing(synthesise_tiles(codec, header, [t for t, run in zip(latents, wanted) if run])) as tile_images:
        for top, rows, complete in blended_rows(header, tile_images, wanted):
            band, usable = rows.clamp_(0.0, 1.0).numpy(), complete.numpy()
            for statistics in candidates:
                statistics.add(top, band, sensor_reference[top : top + len(rows)], usable)
            del rows, complete, band, usable  # views of the band: let it go before the next one is blended
    return cheapest_field(candidates, header.lam, pixels)


FALLOFF_BAND_ROWS = 256  # packed rows of the falloff map made at a time (memory, not results)


def estimated_falloff(codec: Codec, image: RawImage, thumb: torch.Tensor | None = None) -> CellFalloff | None:
    """The lens falloff the model divides out of `image`: gains in (0, 1] per 2x2 CFA cell, as in the encoder's
    packed input (CellFalloff.rows gives them per visible sensor pixel, 4 times the memory).

    None for a model without a vignetting estimator. `thumb`: the frame's (4, S, S) thumbnail when the caller
    has it (Analysis.thumbnail), which spares normalising the whole frame again (1.3 s at 24 MP).
    """
    model = codec.model
    if model.vignetting is None:
        return None
    packed_height, packed_width = image.planes.shape[1:]
    if thumb is None:
        with one_thread():
            thumb = thumbnail(torch.from_numpy(network_input(image)), model.config.thumbnail)
    with torch.inference_mode(), one_thread():
        grid = model.vignetting(thumb[None].to(codec.device))
    # A band of packed rows at a time: the whole frame's coordinates are 2 bytes a sensor pixel. Each gain is
    # computed alone, so the bands give the same bits as one pass.
    cells = np.empty((packed_height, packed_width), np.float32)
    for top in range(0, packed_height, FALLOFF_BAND_ROWS):
        band = Tile(top, 0, min(FALLOFF_BAND_ROWS, packed_height - top), packed_width)
        with torch.inference_mode(), one_thread():
            log_gain = log_gain_at(grid, coordinate_map(band, packed_height, packed_width)[None].to(codec.device))
        cells[top : top + band.height] = torch.exp(log_gain[0, 0]).float().cpu().numpy()
    return CellFalloff(cells, image.pad_top, image.pad_left, image.height, image.width)


def tone_falloff(codec: Codec, image: RawImage, look: str, thumb: torch.Tensor | None = None) -> CellFalloff | None:
    """The falloff tone_reference divides out of the render for `look` (None: the plain render); `thumb` as for
    estimated_falloff."""
    return None if check_look(codec, look) == "faithful" else estimated_falloff(codec, image, thumb)


def tone_reference(
    codec: Codec, path: Path, image: RawImage | None = None, look: str = "clean", thumb: torch.Tensor | None = None
) -> np.ndarray:  # fmt: skip
    """The render the encoder fits its tone to: (H, W, 3) uint8. For the clean look the reference render of the
    file with the model's estimated falloff divided out, as the decoded image has it (the plain reference
    render without an estimator): LibRaw's auto-brightness then sees the frame as the decoder shows it, and the
    clean target's exposure depends on how bright the corners really are. For the faithful look the plain
    reference render, its target. `thumb` as for estimated_falloff.
    """
    if check_look(codec, look) == "faithful":
        return reference_render(path)
    return reference_render(path, falloff=tone_falloff(codec, read_raw(path) if image is None else image, look, thumb))


def encode_file(
    codec: Codec, path: Path, lam: float | None = None, tone_fit: bool = True, reference: np.ndarray | None = None,
    metadata: Callable[[Path], Metadata] | None = None, target_bytes: int | None = None, target_bpp: float | None = None,
    tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, tile_batch: int = DEFAULT_TILE_BATCH, progress=None,
    look: str = "clean", refine_steps: int = 0, refine_progress=None,
) -> Encoded:  # fmt: skip
    """Read a RAW file and encode it in `look` (SPEC §3) at λ, or at the λ whose file is closest to `target_bytes` or `target_bpp`
    (bits per output pixel) by lambda_for_size. `refine_steps` > 0 (the faithful look at a λ): refine the
    latents against the file's render first (encode_analysed).

    `tone_fit` fits the tone against tone_reference(): pass it as `reference` when the caller already has it
    (e.g. one render for several λ), else it is rendered here. `metadata` reads the file's capture metadata
    (e.g. rcam.codec.metadata.read_metadata); without it none is stored.
    """
    if sum(value is not None for value in (lam, target_bytes, target_bpp)) != 1:
        raise RcamError("give one of a λ, a target size and a target bpp")
    check_refinement(refine_steps, look, lam is not None)
    image = read_raw(path)  # first: its checks give the precise reason a file is refused
    captured = metadata(path) if metadata else EMPTY
    if target_bpp is not None:
        target_bytes = max(1, round(target_bpp * image.output_size[0] * image.output_size[1] / 8))
    prepared = analysis_input(codec, image, overwrite=True)  # nothing below reads the raw values
    with ThreadPoolExecutor(1, thread_name_prefix="rcam-render") as render_pool:
        # LibRaw renders the tone reference on its own thread, beside the analysis: it runs on one core without
        # the GIL (1.5 s at 24 MP), and the encoder's stages around the analysis leave a core idle.
        rendering = None
        if (tone_fit or refine_steps) and reference is None:
            rendering = render_pool.submit(reference_render, path, tone_falloff(codec, image, look, prepared.thumbnail))
        analysis = analyse_image(codec, image, tile, overlap, tile_batch, look, prepared)
        if target_bytes is not None:
            lam, _ = lambda_for_size(codec, analysis, target_bytes, tone_fit, captured)
        if rendering is not None:
            reference = rendering.result()
    # For a target size the field keeps FIELD_KNOTS, whose bytes the size search counted (file_size).
    knot_choices = FIELD_KNOT_CHOICES if target_bytes is None else (FIELD_KNOTS,)
    return encode_analysed(
        codec, analysis, lam, reference, captured, progress, knot_choices, refine_steps, refine_progress, tone_fit
    )  # fmt: skip


def header_tiles(header: container.Header) -> list[Tile]:
    """The tile plan a header describes."""
    step_rows, step_cols = header.tile_height - header.overlap, header.tile_width - header.overlap
    return [
        Tile(r * step_rows, c * step_cols, header.tile_height, header.tile_width)
        for r in range(header.tile_rows)
        for c in range(header.tile_cols)
    ]


def check_model(codec: Codec, header: container.Header) -> None:
    """Refuse to decode with other weights than the ones that encoded."""
    if header.model_name != codec.name or header.weights_digest != codec.digest:
        raise RcamError(
            f"made with model {header.model_name} ({header.weights_digest.hex()[:12]}), "
            f"have {codec.name} ({codec.digest.hex()[:12]}); decode with --model {header.model_name}"
        )
    check_look(codec, header.look)


def decode_stream(codec: Codec, header: container.Header, number: int, stream: bytes, symbols: bool = True) -> TileLatents:
    """Entropy-decode tile `number`'s stream (no synthesis); symbols=False keeps only ŷ (half the memory)."""
    config = codec.model.config
    y_shape = (config.latent_channels, header.tile_height // 8, header.tile_width // 8)
    z_shape = (config.hyper_channels, header.tile_height // 32, header.tile_width // 32)
    try:
        decoded = codec.coder.decode(stream, y_shape, z_shape, legacy=header.format_version < container.ADAPTIVE_STREAMS_VERSION)
    except (RcamError, ValueError, RuntimeError) as error:
        raise RcamError(f"stream {number} cannot be decoded: {error}") from None
    return decoded if symbols else replace(decoded, y_symbols=_NO_SYMBOLS, z_symbols=_NO_SYMBOLS)


def decode_latents(codec: Codec, header: container.Header, streams: list[bytes], symbols: bool = True) -> list[TileLatents]:
    """Entropy-decode every tile's stream (no synthesis), as decode_stream."""
    return [decode_stream(codec, header, number, stream, symbols) for number, stream in enumerate(streams)]


_NO_SYMBOLS = np.zeros(0, np.int32)


def synthesis_conditions(codec: Codec, header: container.Header) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor]:
    """What the synthesis of each of a file's tiles takes besides its latents: (the inverse λ gain (1, M, 1, 1),
    the skeleton's development or None, the look (1,)), on the codec's device."""
    device = codec.device
    with torch.inference_mode():
        _, inverse_gain = codec.model.gains(torch.tensor([header.lam], device=device))
        return inverse_gain, header_development(codec, header, 1), look_tensor(header.look, 1, device)


def _tile_synthesis(codec: Codec, header: container.Header) -> Callable[[TileLatents], torch.Tensor]:
    """One tile's latents -> its (3, 2h, 2w) float32 RGB on the CPU: the synthesis every decode path runs."""
    model, device = codec.model, codec.device
    inverse_gain, development, look = synthesis_conditions(codec, header)

    def synthesise(tile_latents: TileLatents) -> torch.Tensor:
        y_hat = transform_input(codec, tile_latents.y_hat.to(device) * inverse_gain)
        with transform_precision(codec):
            return model.synthesis(y_hat, development, look)[0].float().cpu().contiguous()

    return synthesise


def synthesise_tiles(codec: Codec, header: container.Header, latents: Iterable[TileLatents]) -> Iterator[torch.Tensor]:
    """Tiles' latents -> each tile's (3, 2h, 2w) float32 RGB on the CPU, in order, a few tiles in hand at once.

    Each tile goes through the synthesis alone, on one thread (map_tiles): batched convolutions and the thread
    count change the rounding, and a file must decode to the same pixels however it is run. Close the iterator
    (contextlib.closing) when leaving it early.
    """
    return map_tiles(codec.device, _tile_synthesis(codec, header), latents)


def synthesise_streams(codec: Codec, header: container.Header, streams: list[bytes]) -> Iterator[torch.Tensor]:
    """Tiles' streams -> their images as synthesise_tiles gives them, each tile entropy-decoded by the worker that
    synthesises it: only the tiles in hand hold latents (the whole frame's took 6 bytes a sensor pixel of
    resident memory at M = 96), and the decoding runs beside the other workers' synthesis."""
    synthesise = _tile_synthesis(codec, header)

    def decode_and_synthesise(numbered: tuple[int, bytes]) -> torch.Tensor:
        return synthesise(decode_stream(codec, header, *numbered, symbols=False))

    return map_tiles(codec.device, decode_and_synthesise, enumerate(streams))


def _tile_area(tile: Tile, band_start: int = 0) -> tuple[slice, slice]:
    """(rows, cols) a tile's output covers on a canvas whose first row is output row `band_start`."""
    return slice(2 * tile.top - band_start, 2 * (tile.top + tile.height) - band_start), slice(2 * tile.left, 2 * (tile.left + tile.width))


def _add_tile(canvas: torch.Tensor, tile: Tile, image: torch.Tensor, extent: tuple[int, int], overlap: int, band_start: int = 0) -> None:
    """canvas (rows, W, 3) += the tile's (3, 2h, 2w) image times its blend weights: the one blending step that
    blend_tiles and blended_rows share, so both give the same floats."""
    canvas[_tile_area(tile, band_start)] += image.permute(1, 2, 0) * blend_weights(tile, extent, overlap, scale=2)[:, :, None]


def blend_tiles(
    header: container.Header, tile_images: Iterable[torch.Tensor], wanted: list[bool] | None = None, progress=None
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The wanted tiles' (3, 2h, 2w) images, in order -> ((H, W, 3) blended sensor-oriented RGB, unclamped; (H, W)
    bool: pixels whose tiles all ran).

    The canvas is laid out (H, W, 3), the order the tone, the orientation and the image writers read, so no
    full-frame copy is made to reorder it; the returned image is a view of it (the visible area).
    """
    tiles = header_tiles(header)
    wanted = wanted or [True] * len(tiles)
    extent = (tiles[-1].top + tiles[-1].height, tiles[-1].left + tiles[-1].width)
    # blend_weights sum to one wherever tiles meet, so the weighted sum is the blend: no weight map to divide
    # by (96 MB at 24 MP), and no map of missing tiles when every tile runs.
    canvas = torch.zeros(2 * extent[0], 2 * extent[1], 3)
    missing = None if all(wanted) else torch.zeros(2 * extent[0], 2 * extent[1], dtype=torch.bool)
    tile_images = iter(tile_images)
    for tile, run in zip(tiles, wanted):
        if not run:
            missing[_tile_area(tile)] = True  # blend weights are positive over the whole tile
            continue
        _add_tile(canvas, tile, next(tile_images), extent, header.overlap)
        if progress:
            progress()
    complete = torch.ones((), dtype=torch.bool).expand(canvas.shape[:2]) if missing is None else ~missing
    visible = (slice(header.pad_top, header.pad_top + header.sensor_height), slice(header.pad_left, header.pad_left + header.sensor_width))
    return canvas[visible], complete[visible]


def blended_rows(
    header: container.Header, tile_images: Iterable[torch.Tensor], wanted: list[bool] | None = None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """blend_tiles a tile row at a time: (first row, (h, W, 3) blended rows, (h, W) bool complete) of the visible
    sensor frame, top to bottom, each band as soon as no later tile touches it. The same sums in the same order
    as blend_tiles, so the same values, with at most one tile row and its overlap in memory."""
    tiles = header_tiles(header)
    wanted = wanted or [True] * len(tiles)
    extent = (tiles[-1].top + tiles[-1].height, tiles[-1].left + tiles[-1].width)
    tile_images = iter(tile_images)
    tops = sorted({tile.top for tile in tiles})
    canvas = missing = None
    band_start = 0  # canvas row (2x packed) where the band held in `canvas` starts
    visible_cols = slice(header.pad_left, header.pad_left + header.sensor_width)
    for index, top in enumerate(tops):
        band_end = 2 * (top + tiles[0].height)
        carried = 0 if canvas is None else band_start + canvas.shape[0] - 2 * top  # overlap rows kept from the band before
        carry = (canvas[-carried:].clone(), missing[-carried:].clone()) if carried > 0 else None
        canvas = missing = None  # the band before goes before the next one is made (80 MB each at 24 MP)
        canvas = torch.zeros(band_end - 2 * top, 2 * extent[1], 3)
        missing = torch.zeros(band_end - 2 * top, 2 * extent[1], dtype=torch.bool)
        if carry is not None:
            canvas[:carried], missing[:carried] = carry
        band_start = 2 * top
        for tile, run in zip(tiles, wanted):
            if tile.top != top:
                continue
            if not run:
                missing[_tile_area(tile, band_start)] = True
                continue
            _add_tile(canvas, tile, next(tile_images), extent, header.overlap, band_start)
        finished = band_end if index + 1 == len(tops) else 2 * tops[index + 1]  # canvas rows no later tile reaches
        first, last = max(band_start, header.pad_top), min(finished, header.pad_top + header.sensor_height)
        if last > first:
            rows = slice(first - band_start, last - band_start)
            yield first - header.pad_top, canvas[rows, visible_cols], ~missing[rows, visible_cols]


def synthesize(
    codec: Codec, header: container.Header, latents: Iterable[TileLatents], wanted: list[bool] | None = None, progress=None
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Tiles' latents -> ((H, W, 3) blended sensor-oriented RGB, unclamped; (H, W) bool: pixels whose tiles all ran).

    `wanted` picks the tiles to synthesise (all by default); synthesise_tiles and blend_tiles say how.
    """
    wanted = wanted or [True] * len(header_tiles(header))
    with closing(synthesise_tiles(codec, header, (t for t, run in zip(latents, wanted) if run))) as tile_images:
        return blend_tiles(header, tile_images, wanted, progress)


def read_checked(codec: Codec, data: bytes) -> tuple[container.Header, list[bytes]]:
    """container.read, then check that the file was made by `codec`'s model and weights."""
    header, streams = container.read(data)
    check_model(codec, header)
    return header, streams


def decoded_bands(codec: Codec, header: container.Header, streams: list[bytes], progress=None) -> Iterator[tuple[int, np.ndarray]]:
    """An .rcb file's tiles -> (first row, (h, W, 3) float32 sRGB band in [0, 1], tone-corrected) of the sensor-
    oriented frame, top to bottom, a tile row at a time: each tile is entropy-decoded and synthesised on a
    worker (synthesise_streams), and only one tile row of pixels is held (blended_rows). `progress()` is called
    once per tile synthesised."""
    def counted(images: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for image in images:
            yield image
            if progress:
                progress()

    with closing(synthesise_streams(codec, header, streams)) as tile_images:
        for top, rows, _ in blended_rows(header, counted(tile_images)):
            band = rows.clamp_(0.0, 1.0).numpy()  # a view of the band's canvas; the rows after it are not touched
            yield top, apply_tone(band, header.tone, top, header.sensor_height)


def decode_bytes(codec: Codec, data: bytes, progress=None) -> np.ndarray:
    """.rcb bytes -> (H, W, 3) float32 sRGB in [0, 1], oriented, the reference render's size, tone-corrected
    (a strided view of the decoded frame: np.ascontiguousarray it before handing it to code that needs that).

    The whole frame in memory; `rcam decode` streams decoded_bands into the image file instead.
    """
    header, streams = read_checked(codec, data)
    frame = np.empty((header.sensor_height, header.sensor_width, 3), np.float32)
    for top, band in decoded_bands(codec, header, streams, progress):
        frame[top : top + len(band)] = band
    # A view: every caller quantises it next, and an oriented float copy was 288 MB at 24 MP.
    return oriented_view(frame, header.flip)


def decode_file(codec: Codec, path: Path, **options) -> np.ndarray:
    """Read and decode an .rcb file (options as for decode_bytes)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RcamError(f"cannot read ({error.strerror})") from None
    return decode_bytes(codec, data, **options)
