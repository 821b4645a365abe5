"""Run the real `rcam encode` console script over a corpus of hostile RAW inputs and report how each ends.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/hostile_inputs.py [--keep FOLDER] [--only WORD]

The corpus (built in a temporary folder): empty, text, JPEG, truncated DNGs (cut in the TIFF header, the
IFD, the tag values, the image data, one byte short), huge declared dimensions, 1x1 / 2x2 / 21x21 / 22x22
and odd sizes, every CFA phase, every orientation, X-Trans, CMYG and linear DNGs. Each file gets its own
process (`rcam encode FILE -o OUT.rcb`), then one batch run encodes the whole folder with --out-dir, and
two runs write into a missing and an unwritable output folder. A tiny random model is used (as in
tests/conftest.py), so nothing depends on shipped weights.

A run is clean when it exits 0 with nothing on stderr and an .rcb that decodes to the reference render's
size, or exits 2 with exactly one `rcam: error:` line naming the file, no traceback and no output file; in
both cases nothing partial (*.part) may be left. Exit status 1 if any run is not clean.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import (  # noqa: E402
    BAD_INPUTS,
    RCAM,
    TAG_IMAGE_LENGTH,
    TAG_IMAGE_WIDTH,
    bayer_dng_of_size,
    error_lines,
    patch_tiff_tags,
    save_tiny_model,
    script_env,
    truncation_points,
)

from rcam.codec import container  # noqa: E402
from rcam.codec.engine import decode_bytes  # noqa: E402
from rcam.codec.rawio import reference_render  # noqa: E402
from rcam.codec.zoo import load_codec  # noqa: E402
from rcam.errors import RcamError  # noqa: E402


def build_corpus(folder: Path) -> list[tuple[str, Path]]:
    """Write the hostile inputs into `folder`; -> [(kind, path)]."""
    corpus = [(kind.replace("too-small", "16x16 Bayer"), make(folder)) for kind, make in BAD_INPUTS.items()]
    whole = bayer_dng_of_size(folder / "whole.dng", 48, 64, cfa="GBRG")
    for where, length in truncation_points(whole).items():
        path = folder / f"cut-{where.replace(' ', '-')}.dng"
        path.write_bytes(whole.read_bytes()[:length])
        corpus.append((f"truncated: {where} ({length} of {whole.stat().st_size} bytes)", path))
    whole.unlink()
    for width, height in [(100_000, 100_000), (30_000, 30_000), (14_000, 14_000), (64_000, 48)]:
        path = patch_tiff_tags(bayer_dng_of_size(folder / f"huge-{width}x{height}.dng", 48, 64), {TAG_IMAGE_WIDTH: width, TAG_IMAGE_LENGTH: height})
        corpus.append((f"declares {width}x{height}", path))
    for height, width in [(1, 1), (2, 2), (21, 21), (21, 64), (22, 22), (23, 27), (45, 62), (101, 33)]:
        corpus.append((f"{width}x{height} Bayer", bayer_dng_of_size(folder / f"size-{width}x{height}.dng", height, width, seed=2)))
    for cfa in ("RGGB", "BGGR", "GRBG", "GBRG"):
        corpus.append((f"CFA {cfa}", bayer_dng_of_size(folder / f"cfa-{cfa}.dng", 48, 64, cfa=cfa, seed=3)))
    for orientation in range(1, 9):
        path = bayer_dng_of_size(folder / f"orientation-{orientation}.dng", 45, 62, cfa="GRBG", orientation=orientation, seed=4)
        corpus.append((f"orientation {orientation}", path))
    return corpus


def leftovers(folder: Path) -> list[str]:
    """Temporary files rcam may have left in a folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part") or p.name.startswith("."))


def run_rcam(*args) -> tuple[int, str, float]:
    """The console script -> (exit status, stderr, seconds)."""
    start = time.perf_counter()
    result = subprocess.run([str(RCAM), *(str(a) for a in args)], capture_output=True, text=True, env=script_env(), timeout=300)
    return result.returncode, result.stderr, time.perf_counter() - start


def judge(status: int, stderr: str, source: Path, output: Path | None, folder: Path, codec) -> tuple[str, list[str]]:
    """-> (result text, problems) for one run; no problems = clean."""
    problems = []
    lines = stderr.strip().splitlines()
    if "Traceback" in stderr:
        problems.append("traceback")
    if leftovers(folder):
        problems.append(f"left {', '.join(leftovers(folder))}")
    if status == 0:
        if lines:
            problems.append(f"{len(lines)} stderr lines on success")
        if output is None:
            return "ok", problems
        try:
            image = decode_bytes(codec, output.read_bytes())
            reference = reference_render(source)
        except RcamError as error:
            problems.append(f"output does not decode: {error}")
            return "broken output", problems
        size = f"{image.shape[1]}x{image.shape[0]}"
        if image.shape != reference.shape:
            problems.append(f"decoded {size}, reference render {reference.shape[1]}x{reference.shape[0]}")
        return f"{size} = reference", problems
    if status != 2:
        problems.append(f"exit status {status}")
    if len(error_lines(stderr)) != 1 or len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines, {len(error_lines(stderr))} of them rcam: error:")
    elif str(source) not in lines[0]:
        problems.append("error line does not name the file")
    if output is not None and output.exists():
        problems.append("output written")
    return "no output", problems


def trim(line: str, folder: Path, width: int = 130) -> str:
    """An stderr line without the `rcam: error:` prefix and the temporary folder's path, cut to `width`."""
    line = line.removeprefix("rcam: error: ").replace(f"{folder}/", "")
    return line if len(line) <= width else line[: width - 1] + "…"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="build the corpus and outputs in this folder (kept) instead of a temporary one")
    parser.add_argument("--only", help="run only the kinds whose name contains this word")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rcam-hostile-"))
    corpus_dir, out_dir, batch_dir = root / "corpus", root / "out", root / "batch"
    for folder in (corpus_dir, out_dir, batch_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    model = save_tiny_model(root / "tiny.safetensors")
    codec = load_codec(model)
    corpus = []
    for kind, path in build_corpus(corpus_dir):
        if args.only and args.only not in kind:
            path.unlink()  # the batch run below sees the same files as the single runs
        else:
            corpus.append((kind, path))
    print(f"rcam: {RCAM}\ncorpus: {len(corpus)} files in {corpus_dir}, model {model.name} (tiny, random)\n")

    header = f"{'kind':44s} {'exit':>4s} {'sec':>5s}  {'result':18s} {'clean':5s}  stderr (without 'rcam: error: ')"
    print(header)
    print("-" * len(header))
    failures = 0
    for kind, source in corpus:
        output = out_dir / f"{source.stem}.rcb"
        status, stderr, seconds = run_rcam("encode", source, "--model", model, "-o", output, "--threads", "1")
        result, problems = judge(status, stderr, source, output, out_dir, codec)
        failures += bool(problems)
        line = stderr.strip().splitlines()[0] if stderr.strip() else ""
        print(f"{kind:44s} {status:4d} {seconds:5.1f}  {result:18s} {'yes' if not problems else 'NO':5s}  {trim(line, corpus_dir)}")
        for problem in problems:
            print(f"{'':44s} !!! {problem}")

    # The whole folder in one run: good files encoded, bad ones reported, exit 2.
    print(f"\nbatch: rcam encode {corpus_dir.name}/ --out-dir {batch_dir.name}/")
    status, stderr, seconds = run_rcam("encode", corpus_dir, "--model", model, "--out-dir", batch_dir, "--threads", "1")
    singles_ok = sorted(p.name for p in out_dir.glob("*.rcb"))
    batch_ok = sorted(p.name for p in batch_dir.glob("*.rcb"))
    complete = all(_parses(batch_dir / name) for name in batch_ok)
    summary = next((line for line in stderr.splitlines() if "inputs failed" in line), "(no summary line)")
    print(f"  exit {status} in {seconds:.1f} s; {len(error_lines(stderr))} error lines; summary: {trim(summary, corpus_dir)}")
    print(f"  outputs: {len(batch_ok)} .rcb, {'the same files' if batch_ok == singles_ok else 'NOT the same files'} as the single runs, "
          f"{'all complete' if complete else 'SOME INCOMPLETE'}; leftovers: {leftovers(batch_dir) or 'none'}; traceback: {'Traceback' in stderr}")  # fmt: skip
    batch_clean = status == 2 and batch_ok == singles_ok and complete and not leftovers(batch_dir) and "Traceback" not in stderr
    failures += not batch_clean

    # Output folders that cannot take the output.
    good = bayer_dng_of_size(root / "good.dng", 48, 64)
    print("\noutput folders:")
    missing = root / "no" / "such" / "folder"
    status, stderr, _ = run_rcam("encode", good, "--model", model, "--out-dir", missing)
    clean = status == 2 and len(stderr.strip().splitlines()) == 1 and not missing.exists()
    failures += not clean
    print(f"  {'missing --out-dir':34s} exit {status}  clean {'yes' if clean else 'NO'}  {trim(stderr.strip(), root)}")
    locked = root / "locked"
    locked.mkdir(exist_ok=True)
    with unwritable(locked) as how:
        if how is None:
            print(f"  {'unwritable --out-dir':34s} skipped: cannot make a folder unwritable here")
        else:
            status, stderr, _ = run_rcam("encode", good, "--model", model, "--out-dir", locked)
            clean = status == 2 and len(stderr.strip().splitlines()) == 1 and not any(locked.iterdir())
            failures += not clean
            print(f"  {'unwritable --out-dir (' + how + ')':34s} exit {status}  clean {'yes' if clean else 'NO'}  {trim(stderr.strip(), root)}")

    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'FAIL' if failures else 'OK'}: {failures} unclean runs")
    return 1 if failures else 0


def _parses(path: Path) -> bool:
    """Whether an .rcb file is complete and intact."""
    try:
        container.read(path.read_bytes())
        return True
    except RcamError:
        return False


@contextmanager
def unwritable(folder: Path):
    """Make a folder unwritable (mode 500; for root, who ignores modes, the immutable flag); yields how, or None."""
    folder.chmod(0o500)
    immutable = False
    if os.access(folder, os.W_OK) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        yield None if os.access(folder, os.W_OK) else "chattr +i" if immutable else "chmod 500"
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o700)


if __name__ == "__main__":
    sys.exit(main())
