"""The rcam command line: exit statuses, error lines, safe outputs, many inputs, image formats.

Most tests run `rcam.cli.main` in-process (argv patched, SystemExit caught) to stay fast; two run the
installed console script in a subprocess to check the real process's exit status and stderr.
"""

from __future__ import annotations

import os
import re
import time

import imagecodecs
import numpy as np
import pytest
import tifffile
from conftest import (
    BAD_INPUTS,
    check_one_error_line,
    cmyg_dng,
    error_lines,
    linear_dng,
    part_files,
    run_script,
    text_file,
    too_small_dng,
    xtrans_dng,
)
from PIL import Image

from rcam import cli
from rcam.codec import batch, container
from rcam.codec import engine as codec
from rcam.codec.output import quantize, srgb_icc_profile
from rcam.codec.rawio import reference_render
from rcam.codec.tone import IDENTITY

# ---------------------------------------------------------------------------------------------------------
# Exit statuses and error lines


def test_script_missing_file_exits_2_with_one_line(tmp_path, tiny_model_path):
    missing = tmp_path / "missing.dng"
    result = run_script("encode", missing, "--model", tiny_model_path, "-o", tmp_path / "out.rcb")
    assert result.returncode == 2
    line = check_one_error_line(result.stderr, missing)
    assert "no such file" in line
    assert not (tmp_path / "out.rcb").exists()
    assert part_files(tmp_path) == []


def test_script_encode_exits_0_with_clean_stderr(tmp_path, make_dng, tiny_model_path):
    source = make_dng("scene.dng", 48, 64, cfa="GBRG")
    encoded = tmp_path / "scene.rcb"
    result = run_script("encode", source, "--model", tiny_model_path, "-o", encoded, "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings from the libraries either
    assert str(encoded) in result.stdout
    header, _ = container.read(encoded.read_bytes())
    assert (header.output_height, header.output_width) == (48, 64)


# What each bad input's one line must say: each names its own problem, not a catch-all.
BAD_INPUT_REASONS = {
    "text": "a text file, not a RAW file",
    "empty": "empty file",
    "jpeg": "a JPEG image, not a RAW file",
    "linear": "not a Bayer RAW (linear or demosaiced data)",
    "xtrans": "6x6 CFA",
    "cmyg": "with 4 colours is not RGB Bayer",
    "too-small": "declares a 16x16 image, under the 22 pixels a side LibRaw reads",
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(run, tmp_path, tiny_model_path, kind):
    source = BAD_INPUTS[kind](tmp_path)
    target = tmp_path / "out.rcb"
    status, out, err = run("encode", source, "--model", tiny_model_path, "-o", target)
    assert status == 2
    line = check_one_error_line(err, source)
    assert BAD_INPUT_REASONS[kind] in line, line
    # No other kind's reason fits this file too (a catch-all message would).
    assert [other for other, reason in BAD_INPUT_REASONS.items() if reason in line] == [kind], line
    assert out == ""
    assert not target.exists()
    assert part_files(tmp_path) == []


@pytest.mark.parametrize("command", ["decode", "info"])
def test_bad_bitstream_exits_2(run, tmp_path, tiny_model_path, command):
    source = tmp_path / "junk.rcb"
    source.write_bytes(b"definitely not an rcam bitstream")
    args = [command, source] + (["--model", tiny_model_path, "-o", tmp_path / "junk.png"] if command == "decode" else [])
    status, _, err = run(*args)
    assert status == 2
    check_one_error_line(err, source)
    assert not (tmp_path / "junk.png").exists()
    assert part_files(tmp_path) == []


def test_usage_errors_exit_2(run, tmp_path, make_dng, tiny_model_path):
    source = make_dng()
    status, _, err = run("encode")  # no inputs
    assert status == 2 and "Traceback" not in err
    status, _, err = run("encode", source, "--model", tiny_model_path, "--lambda", "5", "-o", tmp_path / "x.rcb")
    assert status == 2 and "lambda" in err and "Traceback" not in err
    status, _, err = run("encode", source, "--model", tmp_path / "nope.safetensors")
    assert status == 2 and "nope.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "x.rcb").exists()


def test_internal_error_exits_1(run, tmp_path, make_dng, tiny_model_path, monkeypatch):
    source = make_dng()

    def broken(*args, **kwargs):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(batch, "encode_file", broken)
    status, _, err = run("encode", source, "--model", tiny_model_path, "-o", tmp_path / "out.rcb")
    assert status == 1
    assert "internal error" in err and str(source) in err
    assert not (tmp_path / "out.rcb").exists()


def info_fields(out: str) -> dict[str, str]:
    """`rcam info` of one file as label -> value; the contract is a two-column table whose values line up, not
    the number of spaces."""
    lines = out.rstrip("\n").splitlines()[1:]  # the first line names the file
    labels = [line.split()[0] for line in lines]
    starts = {line.index(label) + len(label) + len(line[line.index(label) + len(label) :]) - len(line[line.index(label) + len(label) :].lstrip()) for line, label in zip(lines, labels)}
    assert len(starts) == 1, out  # every value starts in the same column
    column = starts.pop()
    return {label: line[column:] for line, label in zip(lines, labels)}


# ---------------------------------------------------------------------------------------------------------
# Successful runs and output safety


def test_encode_decode_info_round_trip(run, tmp_path, make_dng, tiny_model_path):
    source = make_dng("scene.dng", 64, 96, cfa="BGGR", orientation=6)
    encoded, image = tmp_path / "scene.rcb", tmp_path / "scene.png"
    status, out, err = run("encode", source, "--model", tiny_model_path, "-o", encoded, "--lambda", "0.025")
    assert (status, err) == (0, "")
    assert encoded.is_file() and str(encoded) in out and "bpp" in out
    status, out, err = run("decode", encoded, "--model", tiny_model_path, "-o", image)
    assert (status, err) == (0, "")
    reference = reference_render(source)
    assert Image.open(image).size == (reference.shape[1], reference.shape[0])
    status, out, err = run("info", encoded)
    assert (status, err) == (0, "")
    assert "tiny" in out and "0.025" in out and "bpp" in out and "checksums" in out
    assert f"{reference.shape[1]}x{reference.shape[0]}" in out
    fields = info_fields(out)
    assert fields["format"].startswith(f"rcb v{container.FORMAT_VERSION}") and re.match(r"(\d+)x\1 field: gain R.*; coded in \d+ bytes, gain step 1/\d+$", fields["tone"])
    assert fields["look"].startswith("clean")
    # The DNG writer's Make and Model and its orientation (6: the pixels were turned, the PNG says 1).
    assert fields["camera"] == "rcam Synthetic" and fields["orientation"].startswith("right, top")
    exif = Image.open(image).getexif()
    assert (exif[0x010F], exif[0x0110], exif[0x0112]) == ("rcam", "Synthetic", 1)
    assert part_files(tmp_path) == []


def test_encode_without_tone_fit(run, tmp_path, make_dng, tiny_model_path):
    source, encoded = make_dng(), tmp_path / "plain.rcb"
    assert run("encode", source, "--model", tiny_model_path, "-o", encoded, "--no-tone-fit")[0] == 0
    assert container.read(encoded.read_bytes())[0].tone == IDENTITY
    status, out, _ = run("info", encoded)
    assert status == 0 and info_fields(out)["tone"] == "none"


def test_outputs_get_normal_permissions(run, tmp_path, make_dng, tiny_model_path):
    source = make_dng()
    target = tmp_path / "out.rcb"
    assert run("encode", source, "--model", tiny_model_path, "-o", target)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_existing_output_needs_force(run, tmp_path, make_dng, tiny_model_path):
    source = make_dng()
    target = tmp_path / "out.rcb"
    target.write_bytes(b"precious")
    status, _, err = run("encode", source, "--model", tiny_model_path, "-o", target)
    assert status == 2
    line = check_one_error_line(err, source)
    assert "already exists" in line and str(target) in line
    assert target.read_bytes() == b"precious"
    status, _, err = run("encode", source, "--model", tiny_model_path, "-o", target, "--force")
    assert (status, err) == (0, "")
    assert target.read_bytes().startswith(b"\x89RCB")
    assert part_files(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_never_overwrites_the_input(run, tmp_path, make_dng, tiny_model_path, force):
    source = make_dng()
    before = source.read_bytes()
    status, _, err = run("encode", source, "--model", tiny_model_path, "-o", source, *(["--force"] if force else []))
    assert status == 2
    assert "input" in check_one_error_line(err, source)
    assert source.read_bytes() == before
    assert part_files(tmp_path) == []


def test_many_inputs_keep_going_past_a_bad_one(run, tmp_path, make_dng, tiny_model_path):
    inputs = tmp_path / "in"
    outputs = tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    first = make_dng("a.dng", 48, 64, folder=inputs, seed=1)
    bad = text_file(inputs)
    second = make_dng("z.dng", 48, 64, cfa="GRBG", folder=inputs, seed=2)
    status, out, err = run("encode", first, bad, second, "--model", tiny_model_path, "--out-dir", outputs)
    assert status == 2
    assert "Traceback" not in err
    assert (outputs / "a.rcb").is_file() and (outputs / "z.rcb").is_file()
    assert not (outputs / "notes.rcb").exists()
    report = err[err.index("1 of 3 inputs failed") :]
    assert str(bad) in report
    assert str(first) not in report and str(second) not in report
    assert len(error_lines(err)) == 1
    assert part_files(outputs) == [] and part_files(inputs) == []
    # A folder as input: its RAW files, sorted; the bad one fails again, the good ones already exist.
    status, out, err = run("encode", inputs, "--model", tiny_model_path, "--out-dir", outputs)
    assert status == 2
    assert "3 of 3 inputs failed" in err and "already exists" in err
    # Decoding several bitstreams into a folder.
    status, out, err = run("decode", outputs / "a.rcb", outputs / "z.rcb", "--model", tiny_model_path, "--out-dir", outputs, "--format", "jpg")
    assert (status, err) == (0, "")
    assert (outputs / "a.jpg").is_file() and (outputs / "z.jpg").is_file()


def test_failed_write_leaves_no_partial_file(run, tmp_path, make_dng, tiny_model_path, monkeypatch):
    source = make_dng()
    target = tmp_path / "out.rcb"

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("rcam.codec.output.os.replace", disk_full)
    status, _, err = run("encode", source, "--model", tiny_model_path, "-o", target)
    assert status == 2
    assert "cannot write" in check_one_error_line(err, source)
    assert not target.exists()
    assert part_files(tmp_path) == []


def test_decode_with_another_model_is_refused(run, tmp_path, make_dng, tiny_model_path, other_model_path):
    source = make_dng()
    encoded = tmp_path / "a.rcb"
    assert run("encode", source, "--model", tiny_model_path, "-o", encoded)[0] == 0
    status, _, err = run("decode", encoded, "--model", other_model_path, "-o", tmp_path / "a.png")
    assert status == 2
    assert "made with model" in check_one_error_line(err, encoded)
    assert not (tmp_path / "a.png").exists()


# ---------------------------------------------------------------------------------------------------------
# Output image formats


@pytest.fixture
def encoded_scene(run, tmp_path, make_dng, tiny_model_path):
    source = make_dng("scene.dng", 45, 67, cfa="GRBG", orientation=8)
    encoded = tmp_path / "scene.rcb"
    assert run("encode", source, "--model", tiny_model_path, "-o", encoded)[0] == 0
    return source, encoded


@pytest.mark.parametrize(
    "name, bits",
    [("out.png", 8), ("out16.png", 16), ("out.jpg", 8), ("out.jpeg", 8), ("out.tif", 8), ("out16.tiff", 16)],
)
def test_decode_formats_with_icc_profile(run, tmp_path, encoded_scene, tiny_model_path, tiny_codec, name, bits):
    source, encoded = encoded_scene
    target = tmp_path / name
    status, _, err = run("decode", encoded, "--model", tiny_model_path, "-o", target, "--bits", bits)
    assert (status, err) == (0, "")
    reference = reference_render(source)
    height, width = reference.shape[:2]
    expected = quantize(codec.decode_bytes(tiny_codec, encoded.read_bytes()), bits)
    data = target.read_bytes()
    if target.suffix == ".png":
        pixels = imagecodecs.png_decode(data)
        assert pixels.dtype == (np.uint16 if bits == 16 else np.uint8)
        np.testing.assert_array_equal(pixels, expected)  # lossless: exactly the decoded image
        with Image.open(target) as image:
            assert image.size == (width, height)
            assert image.info.get("icc_profile") == srgb_icc_profile()
    elif target.suffix in (".jpg", ".jpeg"):
        with Image.open(target) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (width, height)
            assert image.info.get("icc_profile") == srgb_icc_profile()
            pixels = np.asarray(image)
        assert np.abs(pixels.astype(int) - expected).mean() < 8  # lossy, but the same picture
    else:
        with tifffile.TiffFile(target) as tiff:
            page = tiff.pages[0]
            pixels = page.asarray()
            assert 34675 in page.tags
            assert bytes(page.tags[34675].value) == srgb_icc_profile()
        assert pixels.dtype == (np.uint16 if bits == 16 else np.uint8)
        np.testing.assert_array_equal(pixels, expected)
    assert pixels.shape == reference.shape
    assert part_files(tmp_path) == []


def test_decode_16_bit_jpeg_is_refused(run, tmp_path, encoded_scene, tiny_model_path):
    _, encoded = encoded_scene
    status, _, err = run("decode", encoded, "--model", tiny_model_path, "-o", tmp_path / "x.jpg", "--bits", "16")
    assert status == 2
    assert "8-bit" in check_one_error_line(err, encoded)
    assert not (tmp_path / "x.jpg").exists()
    assert part_files(tmp_path) == []


def test_the_same_file_decodes_to_the_same_bytes_in_separate_runs(run, tmp_path, make_dng, tiny_model_path):
    # The embedded sRGB profile carried its creation time: same pixels, different files from run to run.
    from conftest import run_script

    source, encoded = make_dng(), tmp_path / "a.rcb"
    assert run("encode", source, "--model", tiny_model_path, "-o", encoded)[0] == 0
    outputs = []
    for number in range(2):
        target = tmp_path / f"out{number}.png"
        assert run_script("decode", encoded, "--model", tiny_model_path, "-o", target).returncode == 0
        outputs.append(target.read_bytes())
        time.sleep(1.1)  # the profile's date has whole seconds
    assert outputs[0] == outputs[1]
