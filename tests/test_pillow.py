"""The Pillow plugin: Image.open on an .rcb decodes it with the model named in the file, metadata as for JPEG."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import capture_dng
from PIL import Image, UnidentifiedImageError

import rcam.pillow
from rcam.codec.engine import decode_bytes, encode_file
from rcam.codec.metadata import read_metadata
from rcam.codec.output import quantize, srgb_icc_profile


@pytest.fixture
def rcb(tmp_path, tiny_model_path):
    codec = rcam.pillow.use_model(str(tiny_model_path))
    source = capture_dng(tmp_path / "capture.dng")
    data = encode_file(codec, source, 0.01, tone_fit=False, metadata=read_metadata, tile=64, overlap=32).data
    path = tmp_path / "capture.rcb"
    path.write_bytes(data)
    return path, codec


def test_open_decodes_like_rcam_decode(rcb):
    path, codec = rcb
    with Image.open(path) as image:
        assert (image.format, image.mode) == ("RCB", "RGB")
        expected = quantize(decode_bytes(codec, path.read_bytes()), 8)
        assert image.size == (expected.shape[1], expected.shape[0])
        assert np.array_equal(np.asarray(image), expected)


def test_metadata_as_for_jpeg(rcb):
    path, _ = rcb
    with Image.open(path) as image:
        exif = image.getexif()  # before any pixel is decoded
        assert (exif[0x010F], exif[0x0110], exif[0x0112]) == ("Nikon", "Z 6", 1)
        assert exif.get_ifd(0x8825)[2] == (48.0, 51.0, 24.36)
        assert image.info["exif"].startswith(b"Exif\x00\x00")
        assert b"Ada Lovelace" in image.info["xmp"] and b'tiff:Orientation="1"' in image.info["xmp"]
        assert image.info["icc_profile"] == srgb_icc_profile()


def test_damaged_file_is_not_identified(rcb, tmp_path):
    path, _ = rcb
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    broken = tmp_path / "broken.rcb"
    broken.write_bytes(bytes(data))
    with pytest.raises(UnidentifiedImageError):
        Image.open(broken)


def test_other_files_are_left_to_other_plugins(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with Image.open(path) as image:
        assert image.format == "PNG"
