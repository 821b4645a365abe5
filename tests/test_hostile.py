"""Hostile inputs and conditions: each case either works or fails cleanly (exit 2, one `rcam: error:` line).

Truncated and oversized DNGs, images below LibRaw's size limit, every orientation, Ctrl-C in the middle of
a batch, and output folders that are missing or not writable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import imagecodecs
import numpy as np
import pytest
from conftest import (
    RCAM,
    TAG_IMAGE_LENGTH,
    TAG_IMAGE_WIDTH,
    bayer_dng_of_size,
    check_one_error_line,
    interruptible,
    part_files,
    patch_tiff_tags,
    script_env,
    truncation_points,
)

from rcam.codec import container
from rcam.codec.rawio import reference_render


def check_output_matches_reference(run, source, encoded, tiny_model_path, tmp_path):
    """A successful encode: the decoded image has exactly the reference render's size."""
    image = tmp_path / f"{encoded.stem}.png"
    status, _, err = run("decode", encoded, "--model", tiny_model_path, "-o", image)
    assert (status, err) == (0, "")
    assert imagecodecs.png_decode(image.read_bytes()).shape == reference_render(source).shape


# ---------------------------------------------------------------------------------------------------------
# Truncated files


# Each cut point has its own reason: a text file, an oversized image or another cut must not pass for it.
TRUNCATION_REASONS = {
    "header": "ends inside its 8-byte TIFF header",
    "ifd": "ends inside its first IFD",
    "tag values": "values of TIFF tag",
    "image data": "image data runs past the end",
    "last byte": "image data runs past the end",
}


@pytest.mark.parametrize("where", sorted(TRUNCATION_REASONS))
def test_truncated_dng(run, tmp_path, make_dng, tiny_model_path, where):
    whole = make_dng("whole.dng", 48, 64, cfa="GBRG")
    source = tmp_path / "cut.dng"
    source.write_bytes(whole.read_bytes()[: truncation_points(whole)[where]])
    target = tmp_path / "cut.rcb"
    status, out, err = run("encode", source, "--model", tiny_model_path, "-o", target)
    assert (status, out) == (2, "")
    line = check_one_error_line(err, source)
    assert "truncated" in line and TRUNCATION_REASONS[where] in line, line
    assert not target.exists()
    assert part_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# Declared sizes out of range

# Reads a RAW file in a fresh process that may not grow its address space by more than 1 GiB; prints the
# outcome, the seconds it took and the peak resident memory in MiB as JSON.
READ_UNDER_LIMIT = """
import json, resource, sys, time
from rcam.errors import RcamError
from rcam.codec.rawio import read_raw
with open("/proc/self/statm") as statm:
    mapped = int(statm.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + (1 << 30), resource.RLIM_INFINITY))
start = time.perf_counter()
try:
    read_raw(sys.argv[1])
    outcome = "read"
except RcamError as error:
    outcome = str(error)
seconds = time.perf_counter() - start
with open("/proc/self/status") as status:  # VmHWM: this process's peak; ru_maxrss would include the forked parent's
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps([outcome, seconds, peak_kib / 1024]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.parametrize(
    "width, height, words",
    [
        (100_000, 100_000, "100000x100000 image, over the 64000 pixels a side"),  # over LibRaw's limit: refused when opened
        (30_000, 30_000, "30000x30000 sensor, over the 200 MP"),  # within LibRaw's limit, over rcam's: refused before unpacking
        (14_000, 14_000, "truncated: declares a 14000x14000 image"),  # accepted by both: unpacking runs out of data
        (64_000, 48, "truncated: declares a 64000x48 image"),
    ],
)
def test_huge_declared_dimensions(run, tmp_path, make_dng, tiny_model_path, width, height, words):
    source = patch_tiff_tags(make_dng("huge.dng", 48, 64), {TAG_IMAGE_WIDTH: width, TAG_IMAGE_LENGTH: height})
    target = tmp_path / "huge.rcb"
    status, out, err = run("encode", source, "--model", tiny_model_path, "-o", target)
    assert (status, out) == (2, "")
    assert words in check_one_error_line(err, source)
    assert not target.exists() and part_files(tmp_path) == []
    # The same read in a process capped at 1 GiB more address space: same error, fast, little memory.
    probe = subprocess.run(
        [sys.executable, "-c", READ_UNDER_LIMIT, str(source)], capture_output=True, text=True, env=script_env(), timeout=120
    )
    assert probe.returncode == 0 and probe.stderr == "", probe.stderr
    outcome, seconds, peak_mib = json.loads(probe.stdout)
    assert words in outcome
    assert seconds < 2.0
    assert peak_mib < 300


# ---------------------------------------------------------------------------------------------------------
# Tiny images


@pytest.mark.parametrize("height, width", [(1, 1), (2, 2), (21, 21), (21, 64), (64, 21)])
def test_below_libraw_size_limit_is_refused(run, tmp_path, tiny_model_path, height, width):
    source = bayer_dng_of_size(tmp_path / "small.dng", height, width)
    target = tmp_path / "small.rcb"
    status, out, err = run("encode", source, "--model", tiny_model_path, "-o", target)
    assert (status, out) == (2, "")
    assert f"declares a {width}x{height} image, under the 22 pixels a side" in check_one_error_line(err, source)
    assert not target.exists() and part_files(tmp_path) == []


@pytest.mark.parametrize("height, width, cfa", [(22, 22, "RGGB"), (23, 22, "BGGR"), (22, 25, "GRBG"), (23, 27, "GBRG")])
def test_smallest_sizes_work(run, tmp_path, tiny_model_path, height, width, cfa):
    source = bayer_dng_of_size(tmp_path / "small.dng", height, width, cfa=cfa)
    target = tmp_path / "small.rcb"
    status, _, err = run("encode", source, "--model", tiny_model_path, "-o", target)
    assert (status, err) == (0, "")
    check_output_matches_reference(run, source, target, tiny_model_path, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Orientation

DIHEDRAL = {
    "identity": lambda a: a,
    "mirror left-right": lambda a: a[:, ::-1],
    "rotate 180": lambda a: a[::-1, ::-1],
    "mirror top-bottom": lambda a: a[::-1],
    "transpose": lambda a: a.transpose(1, 0, 2),
    "rotate 90 clockwise": lambda a: np.rot90(a, -1),
    "transverse": lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    "rotate 90 counter-clockwise": lambda a: np.rot90(a, 1),
}


def test_every_orientation_is_libraws_transform_of_the_upright_image(run, tmp_path, tiny_model_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    # Odd, non-square frame: every transform gives a different array, and the CFA padding is exercised.
    sources = {k: bayer_dng_of_size(inputs / f"o{k}.dng", 45, 62, cfa="GRBG", orientation=k, seed=3) for k in range(1, 9)}
    status, _, err = run("encode", inputs, "--model", tiny_model_path, "--out-dir", outputs)
    assert (status, err) == (0, "")
    status, _, err = run("decode", outputs, "--model", tiny_model_path, "--out-dir", outputs)
    assert (status, err) == (0, "")
    decoded = {k: imagecodecs.png_decode((outputs / f"o{k}.png").read_bytes()) for k in sources}
    renders = {k: reference_render(path) for k, path in sources.items()}
    seen = set()
    for k in sources:
        # Which transform LibRaw applies for orientation k, from its own renders of the same mosaic.
        matches = [name for name, transform in DIHEDRAL.items() if np.array_equal(transform(renders[1]), renders[k])]
        assert len(matches) == 1, (k, matches)
        seen.add(matches[0])
        assert decoded[k].shape == renders[k].shape
        np.testing.assert_array_equal(decoded[k], DIHEDRAL[matches[0]](decoded[1]), err_msg=f"orientation {k}")
    assert len(seen) == 8  # every orientation tag was honoured, each differently


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_leaves_only_complete_outputs(tmp_path, make_dng, tiny_model_path):
    """The real console script, interrupted in the middle of a batch: status 130, no partial files."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    # A few tenths of a second per file (small tiles make many of them), so the batch is still busy when
    # the first output appears.
    first = make_dng("in00.dng", 512, 768, folder=inputs)
    # Many more files than can finish while a loaded machine gets round to sending the signal (a fresh-clone
    # run beside a training job once saw all 12 of an earlier batch done, status 0).
    count = 40
    for number in range(1, count):
        shutil.copy(first, inputs / f"in{number:02d}.dng")
    command = [str(RCAM), "encode", str(inputs), "--model", str(tiny_model_path), "--out-dir", str(outputs), "--tile", "64", "--overlap", "32", "--threads", "1"]
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=script_env(), preexec_fn=interruptible)
        try:
            deadline = time.monotonic() + 180
            while not any(outputs.glob("*.rcb")):
                assert process.poll() is None, "rcam exited before writing an output"
                assert time.monotonic() < deadline, "no output within 180 s"
                time.sleep(0.01)
            process.send_signal(signal.SIGINT)
            status = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    err = (tmp_path / "stderr").read_text()
    assert status == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "rcam: interrupted", err
    names = sorted(p.name for p in outputs.iterdir())
    assert all(name.endswith(".rcb") and name[:-4] + ".dng" in os.listdir(inputs) for name in names), names
    assert 1 <= len(names) < count, names  # stopped in the middle
    for name in names:
        header, _ = container.read((outputs / name).read_bytes())  # complete: lengths and checksums verified
        assert (header.output_height, header.output_width) == (512, 768)


# ---------------------------------------------------------------------------------------------------------
# Output folders


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_missing_output_folder(run, tmp_path, make_dng, tiny_model_path, command):
    sources = [make_dng("a.dng"), make_dng("b.dng", seed=1)]
    missing = tmp_path / "no" / "such" / "folder"
    if command == "decode":
        for index, source in enumerate(sources):
            encoded = tmp_path / f"image{index}.rcb"
            assert run("encode", source, "--model", tiny_model_path, "-o", encoded)[0] == 0
            sources[index] = encoded
    status, out, err = run(command, *sources, "--model", tiny_model_path, "--out-dir", missing)
    assert (status, out) == (2, "")
    # One line for the whole batch, naming the folder, not one per input.
    line = check_one_error_line(err, missing)
    assert "does not exist" in line
    assert not (tmp_path / "no").exists()  # not created either


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder nobody can create files in: mode 500, and for root (who ignores modes) the immutable flag."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    immutable = False
    if os.access(folder, os.W_OK) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a folder unwritable here (root without chattr)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o700)


def test_unwritable_output_folder(run, tmp_path, make_dng, tiny_model_path, unwritable_folder):
    source = make_dng()
    status, out, err = run("encode", source, "--model", tiny_model_path, "--out-dir", unwritable_folder)
    assert (status, out) == (2, "")
    line = check_one_error_line(err, source)
    assert "cannot write" in line and str(unwritable_folder) in line
    assert list(unwritable_folder.iterdir()) == []
