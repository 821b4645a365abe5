"""Many inputs: finding them (recursively), where each one's output goes, running them in this process or in
worker processes, and the closing summary.

A failure in one file never stops the others; the command reports every failure at the end and exits 2 (1
when one was an rcam bug). Outputs are written atomically (rcam.codec.output.write_atomic), so Ctrl-C leaves
none half-written, with or without workers.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from tqdm import tqdm

from rcam.codec.allocator import tune_allocator
from rcam.codec.blas import single_threaded_blas
from rcam.codec.engine import decoded_bands, encode_file, read_checked
from rcam.codec.metadata import EMPTY, Metadata, read_metadata, upright
from rcam.codec.output import check_output_path, image_kind, write_atomic, write_image
from rcam.codec.zoo import Codec, load_codec
from rcam.errors import RcamError
from rcam.training.train import resolve_device


class BatchFailed(Exception):
    """Some inputs of a many-input command failed (already reported); carries the exit status."""

    def __init__(self, status: int):
        self.status = status


class InternalFailure(Exception):
    """An rcam bug while working on one file; carries the formatted traceback (workers send it as text)."""


@dataclass(frozen=True)
class Item:
    """One input file and its folder relative to the folder named on the command line ("." for a file named itself)."""

    source: Path
    folder: Path = Path(".")


@dataclass(frozen=True)
class Done:
    """What one file's work reports: its line and the sizes the summary adds up."""

    line: str
    bytes_in: int = 0
    bytes_out: int = 0
    pixels: int = 0


def expand_inputs(inputs: tuple[str, ...], suffixes: set[str], recursive: bool = False) -> list[Item]:
    """Files as given; folders -> their files with one of `suffixes`, sorted (with `recursive`, in all subfolders)."""
    items: list[Item] = []
    for name in inputs:
        path = Path(name)
        if not path.is_dir():
            items.append(Item(path))
            continue
        found: list[Item] = []
        # os.walk does not follow links to folders: a link loop cannot make the batch endless.
        for folder, subfolders, files in os.walk(path) if recursive else [(str(path), [], [p.name for p in path.iterdir()])]:
            subfolders.sort()
            relative = Path(folder).relative_to(path)
            found += [Item(Path(folder) / f, relative) for f in sorted(files) if Path(f).suffix.lower() in suffixes and (Path(folder) / f).is_file()]
        if not found:
            where = "folder tree" if recursive else "folder"
            raise RcamError(f"{path}: {where} holds no {'/'.join(sorted(suffixes))} files")
        items += found
    return items


def output_path(item: Item, output: str | None, out_dir: str | None, suffix: str, many: bool) -> Path:
    """Where one input's result goes: -o for a single input, else --out-dir (mirroring the input's subfolder) or
    beside the input."""
    if output and not many:
        return Path(output)
    if output and many:
        raise RcamError("-o names one output; with several inputs use --out-dir")
    folder = Path(out_dir) / item.folder if out_dir else item.source.parent
    return folder / (item.source.stem + suffix)


@dataclass(frozen=True)
class EncodeSettings:
    """The encode options every file of a batch shares (picklable: workers get a copy)."""

    lam: float | None
    target_bytes: int | None
    bpp: float | None
    strip_metadata: bool
    strip_gps: bool
    strict_metadata: bool
    tile: int
    overlap: int
    tile_batch: int
    tone_fit: bool
    look: str
    refine_steps: int = 0


@dataclass(frozen=True)
class DecodeSettings:
    """The decode options every file of a batch shares."""

    bits: int
    quality: int
    strip_metadata: bool


def warn(source: Path, message: str) -> None:
    """A warning about one input on stderr."""
    click.echo(f"rcam: warning: {source}: {message}", err=True)


def read_input(source: Path) -> bytes:
    """An input file's bytes; RcamError when it cannot be read."""
    try:
        return source.read_bytes()
    except OSError as error:
        raise RcamError(f"cannot read ({error.strerror})") from None


def encode_one(settings: EncodeSettings, codec: Codec, source: Path, target: Path, progress=None) -> Done:
    """Encode one RAW file into `target`."""
    reader = None
    if not settings.strip_metadata:
        reader = functools.partial(read_metadata, gps=not settings.strip_gps, strict=settings.strict_metadata, warn=functools.partial(warn, source))
    # Refinement takes minutes: its own counter of tile steps, shown where the tile bar is (a terminal, one process).
    with tqdm(desc=f"{source.name}: refining", unit="tile step", leave=False, disable=None if progress and settings.refine_steps else True) as steps:
        encoded = encode_file(
            codec, source, settings.lam, tone_fit=settings.tone_fit, metadata=reader, target_bytes=settings.target_bytes,
            target_bpp=settings.bpp, tile=settings.tile, overlap=settings.overlap, tile_batch=settings.tile_batch,
            look=settings.look, progress=progress, refine_steps=settings.refine_steps, refine_progress=steps.update,
        )  # fmt: skip
    write_atomic(target, encoded.data)
    pixels = encoded.header.output_height * encoded.header.output_width
    chosen = f", lambda {encoded.header.lam:.6g}" if settings.lam is None else ""
    line = f"{source} -> {target}: {len(encoded.data)} bytes, {8 * len(encoded.data) / pixels:.4f} bpp{chosen}"
    return Done(line, source.stat().st_size, len(encoded.data), pixels)


def decode_one(settings: DecodeSettings, codec: Codec, source: Path, target: Path, progress=None) -> Done:
    """Decode one .rcb file into the image `target`, a tile row at a time (write_image says when it streams)."""
    kind = image_kind(target)
    data = read_input(source)
    header, streams = read_checked(codec, data)
    metadata = EMPTY if settings.strip_metadata else Metadata(header.exif, header.xmp)
    try:
        metadata = upright(metadata)
    except RcamError as error:  # the pixels are sound: write them, say what is missing
        warn(source, f"{error}: not written")
        metadata = EMPTY
    bands = (band for _, band in decoded_bands(codec, header, streams, progress))
    written = write_image(
        target, bands, header.sensor_height, header.sensor_width, kind, settings.bits, settings.quality, metadata, header.flip
    )  # fmt: skip
    width, height = header.output_width, header.output_height
    return Done(f"{source} -> {target}: {width}x{height}", len(data), written, width * height)


def attempt(work: Callable, codec: Codec | None, source: Path, target: Path | None, progress=None) -> Done:
    """work(codec, source, target, progress), with any error but RcamError turned into InternalFailure."""
    try:
        return work(codec, source, target, progress)
    except (RcamError, KeyboardInterrupt):
        raise
    except Exception:  # an rcam bug, not the user's fault: the traceback travels as text (it may come from a worker)
        raise InternalFailure(traceback.format_exc()) from None


# ------------------------------------------------------------------------------------------- worker processes

_worker_codec: Codec | RcamError | None = None
_stopping = False


def _stop(signum, frame) -> None:
    # The first Ctrl-C (or the parent's SIGINT) interrupts the file in hand; write_atomic removes its temporary.
    # Later ones do nothing, so they cannot interrupt that clean-up; queued files are refused (_worker_task).
    global _stopping
    if not _stopping:
        _stopping = True
        raise KeyboardInterrupt


def _worker_start(model_name: str, device: str, threads: int, precision: str = "auto") -> None:
    """A worker's initializer: load the codec once for all the files it will get."""
    global _worker_codec
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    tune_allocator()  # a process of rcam's own, like the CLI's
    single_threaded_blas()
    torch.set_num_threads(threads)
    try:
        _worker_codec = load_codec(model_name, resolve_device(device), precision=precision)
    except RcamError as error:  # reported on every file it gets, instead of a broken pool
        _worker_codec = error


def _worker_task(work: Callable, source: Path, target: Path) -> Done:
    if _stopping:
        raise KeyboardInterrupt
    if isinstance(_worker_codec, RcamError):
        raise _worker_codec
    return attempt(work, _worker_codec, source, target)


def worker_threads(jobs: int, threads: int | None) -> int:
    """Threads per worker: --threads, else the CPUs this process may use shared out among the workers."""
    return threads or max(1, len(os.sched_getaffinity(0)) // jobs)


# ------------------------------------------------------------------------------------------------ the batch


@dataclass
class Summary:
    """Counts and sizes of a batch, for its closing lines."""

    verb: str
    files: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    pixels: int = 0
    seconds: float = 0.0

    def add(self, done: Done) -> None:
        """Count one file done."""
        self.done += 1
        self.bytes_in += done.bytes_in
        self.bytes_out += done.bytes_out
        self.pixels += done.pixels

    def line(self) -> str:
        """One line: files done, skipped and failed, bytes in and out, mean bpp (encode) or megapixels, wall time."""
        sizes = f"{self.bytes_in} bytes in, {self.bytes_out} bytes out"
        if self.verb == "encoded":
            # Mean over pixels (all bits over all pixels), as a folder's size on disk divides.
            sizes += f", {8 * self.bytes_out / self.pixels:.4f} bpp" if self.pixels else ", no bpp"
        else:
            sizes += f", {self.pixels / 1e6:.2f} MP"
        rate = f" ({self.done / self.seconds:.2f} files/s)" if self.seconds > 0 and self.done else ""
        return (
            f"rcam: {self.files} files: {self.done} {self.verb}, {self.skipped} skipped (output exists), {self.failed} failed; "
            f"{sizes}; {self.seconds:.1f} s{rate}"
        )


def plan_outputs(
    items: list[Item], target_of: Callable[[Item], Path], force: bool, skip_existing: bool, mirror: bool
) -> tuple[list[tuple[Path, Path | RcamError]], int]:  # fmt: skip
    """(source, target or the RcamError that refuses it) per input to do, and how many were skipped as done.

    Decided here, before any work starts, so that two inputs with one output (a.dng and a.nef) cannot race."""
    sources = tuple(item.source for item in items)
    plan: list[tuple[Path, Path | RcamError]] = []
    claimed: dict[Path, Path] = {}
    skipped = 0
    for item in items:
        try:
            target = target_of(item)
            if mirror:
                target.parent.mkdir(parents=True, exist_ok=True)
            if skip_existing and target.exists() and not any(target.exists() and s.exists() and os.path.samefile(target, s) for s in sources):
                skipped += 1
                continue
            check_output_path(target, force, sources)
            key = Path(os.path.abspath(target))
            if key in claimed:
                raise RcamError(f"{target}: also the output of {claimed[key]}")
            claimed[key] = item.source
            plan.append((item.source, target))
        except RcamError as error:
            plan.append((item.source, error))
        except OSError as error:  # e.g. a mirrored folder that cannot be made
            plan.append((item.source, RcamError(f"cannot make {error.filename} ({error.strerror})")))
    return plan, skipped


def _tile_bar(label: str):
    return tqdm(desc=label, unit="tile", leave=False, disable=None if label else True)


def run_batch(
    plan: list[tuple[Path, Path | RcamError | None]], work: Callable, codec: Codec | None, quiet: bool,
    summary: Summary | None = None, jobs: int = 1, pool_setup: tuple | None = None, distribute: Callable | None = None,
) -> None:  # fmt: skip
    """Run `work` (attempt's signature) on every planned input, printing each one's line, a bar over files on a
    terminal and the summary; report failures at the end (BatchFailed: exit 2, or 1 if internal).

    jobs 1 runs in this process with `codec`; more runs that many worker processes (start_pool), each loading
    its own codec from `pool_setup` (model name, device, threads per worker, precision), while this process
    only hands out files and collects. `distribute(todo, work, finish)` runs the files elsewhere instead
    (rcam.codec.cluster)."""
    start = time.perf_counter()
    pool = start_pool(jobs, pool_setup) if jobs > 1 and not distribute else None  # first: before any thread starts
    failed: list[str] = []
    internal = False
    many = len(plan) + (summary.skipped if summary else 0) > 1
    bar = tqdm(total=len(plan), unit="file", disable=None if many else True, file=sys.stderr)

    def finish(source: Path, outcome: Done | BaseException) -> None:
        nonlocal internal
        if isinstance(outcome, Done):
            if summary:
                summary.add(outcome)
            if not quiet:
                bar.write(outcome.line, file=sys.stdout)
        elif isinstance(outcome, InternalFailure):
            bar.write(f"rcam: internal error on {source}:\n{outcome}", file=sys.stderr)
            failed.append(f"{source}: internal error")
            internal = True
        else:
            message = str(outcome)
            # The error may already name the file; don't say it twice.
            line = message if message.startswith(str(source)) else f"{source}: {message}"
            bar.write(f"rcam: error: {line}", file=sys.stderr)
            failed.append(line)
        bar.update(1)

    try:
        todo = []
        for source, target in plan:
            if isinstance(target, RcamError):
                finish(source, target)
            else:
                todo.append((source, target))
        if distribute:
            distribute(todo, work, finish)
        elif jobs == 1:
            for source, target in todo:
                try:
                    with _tile_bar(source.name if codec else "") as tiles:
                        outcome = attempt(work, codec, source, target, lambda: tiles.update(1))
                except (RcamError, InternalFailure) as error:
                    outcome = error
                finish(source, outcome)
        else:
            _run_pool(todo, work, jobs, pool, finish)
    except KeyboardInterrupt:
        bar.close()
        if summary and many and not quiet:  # what is done stays done: say how far it got (--skip-existing resumes)
            summary.failed, summary.seconds = len(failed), time.perf_counter() - start
            click.echo(summary.line() + "; interrupted")
        raise
    finally:
        bar.close()
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    if summary:
        summary.failed = len(failed)
        summary.seconds = time.perf_counter() - start
        if many and not quiet:
            click.echo(summary.line())
    if failed:
        if many:
            total = len(plan) + (summary.skipped if summary else 0)
            click.echo(f"rcam: {len(failed)} of {total} inputs failed:", err=True)
            for line in failed:
                click.echo(f"  {line}", err=True)
        raise BatchFailed(1 if internal else 2)


def start_pool(jobs: int, pool_setup: tuple) -> ProcessPoolExecutor:
    """`jobs` worker processes, started now, each loading the codec of `pool_setup` (model name, device, threads
    per worker, precision).

    On the CPU the workers are forks of this process, made here, before it has run any torch work or started
    a thread (tqdm's bar comes later): a fork is ready in milliseconds, where a fresh interpreter imports torch
    for seconds. For a GPU they fork from a clean server process instead (forkserver): CUDA cannot be used in
    a child forked after the parent touched it.
    """
    on_cpu = resolve_device(pool_setup[1]).type == "cpu"
    context = multiprocessing.get_context("fork" if on_cpu else "forkserver")
    if not on_cpu:
        context.set_forkserver_preload(["rcam.codec.batch"])
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_start, initargs=pool_setup)
    if on_cpu:
        pool.submit(os.getpid).result()  # the first submit forks every worker (Python starts them all at once)
    return pool


def _run_pool(todo: list[tuple[Path, Path]], work: Callable, jobs: int, pool: ProcessPoolExecutor, finish: Callable) -> None:
    queue = deque(todo)
    pending: dict = {}

    def feed() -> None:  # a few files ahead per worker; the rest wait here
        while len(pending) < 2 * jobs and queue:
            source, target = queue.popleft()
            pending[pool.submit(_worker_task, work, source, target)] = (source, target)

    try:
        feed()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                source, _ = pending.pop(future)
                try:
                    outcome = future.result()
                except (RcamError, InternalFailure) as error:
                    outcome = error
                except KeyboardInterrupt:  # a worker was interrupted on its own (SIGINT sent to it alone)
                    raise
                except Exception as error:  # a worker died (killed, out of memory): this file failed, not the batch
                    outcome = InternalFailure(f"worker process failed: {error!r}")
                finish(source, outcome)
            feed()
    except KeyboardInterrupt:
        for future in pending:
            future.cancel()
        # The workers may not have seen the Ctrl-C (a SIGINT sent to this process alone): pass it on, so each
        # abandons its file and write_atomic removes the temporary.
        for process in list(getattr(pool, "_processes", {}).values()):
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)
        for future, (source, target) in pending.items():
            if future.done() and not future.cancelled() and future.exception() is None:  # finished meanwhile: count it
                finish(source, future.result())
            for part in target.parent.glob(f".{target.name}.*.part"):  # a worker killed harder leaves none either
                part.unlink(missing_ok=True)
        raise
    pool.shutdown(wait=True)
